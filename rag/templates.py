"""The prompt templates (``prompts/*.txt``), read as package resources.

The top-level ``prompts/`` folder is shipped inside the package as ``rag/prompts/``
(``pyproject.toml``: ``package-dir`` maps ``rag.prompts`` to ``prompts``), so an
installed wheel answers without the source tree. In a checkout or an editable install
the folder is read where it is, beside the ``rag`` package: setuptools' editable finder
maps only packages that have an ``__init__.py``, and ``prompts/`` holds text files only.
"""
from __future__ import annotations

from functools import lru_cache
from importlib import resources
from importlib.resources.abc import Traversable
from pathlib import Path

SUFFIX = ".txt"


@lru_cache(maxsize=1)
def prompt_dir() -> Traversable:
    """The folder of the prompt templates: ``rag/prompts`` inside an installed package,
    else the project's top-level ``prompts/`` (checkout / editable install)."""
    package = resources.files("rag")
    inside = package / "prompts"
    if inside.is_dir():
        return inside
    beside = Path(str(package)).parent / "prompts"
    if beside.is_dir():
        return beside
    raise FileNotFoundError(f"prompt templates not found: neither {inside} nor {beside} exists")


def prompt_names() -> list[str]:
    """Names of the templates (``system``, ``answer``, ...), sorted."""
    return sorted(p.name[: -len(SUFFIX)] for p in prompt_dir().iterdir() if p.name.endswith(SUFFIX))


def load_prompt(name: str) -> str:
    """The text of ``prompts/<name>.txt`` (UTF-8)."""
    if not name or "/" in name or "\\" in name or name.startswith("."):
        raise ValueError(f"bad prompt name: {name!r}")
    path = prompt_dir() / f"{name}{SUFFIX}"
    if not path.is_file():
        raise FileNotFoundError(f"no prompt template {name!r} in {prompt_dir()}")
    return path.read_text(encoding="utf-8")
