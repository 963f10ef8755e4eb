"""Security of the web UI, through a real server on loopback:

* the ``Host`` header check (``rag.netguard``) that stops DNS rebinding: a page on
  another site must not drive the loopback UI (read or delete documents);
* the operator's ``RAG_LLM_API_KEY`` only ever goes to the operator's ``RAG_LLM_BASE_URL``:
  a base URL typed in the browser gets the user's own key or none;
* deleting a document also deletes the eval runs under the KB home that quote it.
"""
from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import pytest
from gradio_client import Client

from conftest import UI_DOCS, UI_UPLOAD_NAME, UI_UPLOAD_TEXT, free_port, ui_settings, write_ui_docs

# Gradio's queue calls a pandas API that pandas 3 deprecates: not ours to fix.
pytestmark = pytest.mark.filterwarnings("ignore::pandas.errors.Pandas4Warning")

KB = "安全库"
OPERATOR_KEY = "sk-operator-secret-7f3a91"
USER_KEY = "sk-user-own-key-55"
QUESTION = "城市图书馆每周几闭馆？"
MODEL_ANSWER = "城市图书馆每周一闭馆[1]。"


class Recorder:
    """A minimal OpenAI-compatible server on 127.0.0.1 (random port) that records the
    ``Authorization`` header of every request it receives."""

    def __init__(self):
        self.requests: list[tuple[str, str, str | None]] = []  # (method, path, Authorization)
        recorder = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # keep the test output clean
                pass

            def _send_json(self, body: dict) -> None:
                data = json.dumps(body).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self):
                recorder.requests.append(("GET", self.path, self.headers.get("Authorization")))
                self._send_json({"object": "list", "data": [{"id": "m", "object": "model", "owned_by": "t"}]})

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers.get("Content-Length") or 0)) or b"{}")
                recorder.requests.append(("POST", self.path, self.headers.get("Authorization")))
                if not body.get("stream"):
                    self._send_json({"id": "c", "object": "chat.completion", "created": 0, "model": "m",
                                     "choices": [{"index": 0, "finish_reason": "stop",
                                                  "message": {"role": "assistant", "content": MODEL_ANSWER}}]})
                    return
                self.send_response(200)
                self.send_header("Content-Type", "text/event-stream")
                self.end_headers()  # HTTP/1.0: the stream ends when the connection closes
                for delta, finish in (({"role": "assistant", "content": MODEL_ANSWER}, None), ({}, "stop")):
                    chunk = {"id": "c", "object": "chat.completion.chunk", "created": 0, "model": "m",
                             "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}
                    self.wfile.write(f"data: {json.dumps(chunk)}\n\n".encode())
                self.wfile.write(b"data: [DONE]\n\n")

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}/v1"
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self._thread.start()

    def keys(self) -> list[str | None]:
        return [auth for _, _, auth in self.requests]

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture(scope="module")
def operator_llm():
    """The endpoint the operator configured (RAG_LLM_BASE_URL) with their key."""
    recorder = Recorder()
    yield recorder
    recorder.close()


@pytest.fixture(scope="module")
def secured_ui(tmp_path_factory, operator_llm):
    """A running UI on a free 127.0.0.1 port over KB ``安全库`` (the UI test documents),
    configured by the operator with an OpenAI endpoint and its key. Yields ``(app, port)``."""
    from rag.ingest import Ingestor
    from ui.app import create_app

    root = tmp_path_factory.mktemp("ui-security")
    docs = write_ui_docs(root)
    settings = ui_settings(root, kb=KB, llm_retries=0, llm_timeout=20, llm_base_url=operator_llm.url,
                           llm_api_key=OPERATOR_KEY, llm_model="m")
    report = Ingestor(settings).ingest([docs], progress=False)
    assert report.ok and len(report.added) == len(UI_DOCS), report.summary()
    port = free_port()
    app = create_app(settings)
    app.launch(host="127.0.0.1", port=port, prevent_thread_lock=True, quiet=True)
    try:
        yield app, port
    finally:
        app.close()


# --------------------------------------------------------------------------- Host header (DNS rebinding)


def test_only_loopback_host_headers_with_the_right_port_are_served(secured_ui):
    _, port = secured_ui
    base = f"http://127.0.0.1:{port}"
    for host in (f"127.0.0.1:{port}", f"localhost:{port}", f"LOCALHOST:{port}", f"[::1]:{port}"):
        response = httpx.get(base + "/config", headers={"Host": host}, timeout=10)
        assert response.status_code == 200, (host, response.status_code)
        assert "中文文档问答" in response.text
    # What a DNS-rebound page sends: its own name. Also a loopback name on another port (that is
    # another origin) and a Host without a port (port 80 implied).
    for host in (f"evil.example:{port}", "evil.example", f"127.0.0.1.evil.example:{port}", f"127.0.0.1:{port + 1}",
                 "localhost", f"localhost:{port}@evil.example"):
        response = httpx.get(base + "/config", headers={"Host": host}, timeout=10)
        assert response.status_code == 403, (host, response.status_code)
        assert "Host" in response.text and "本机" in response.text
    evil = {"Host": f"evil.example:{port}"}
    assert httpx.get(base + "/", headers=evil, timeout=10).status_code == 403
    assert httpx.get(base + "/gradio_api/info", headers=evil, timeout=10).status_code == 403
    # The document delete endpoint is not reachable either.
    call = httpx.post(base + "/gradio_api/call/remove_documents", headers=evil, timeout=10,
                      json={"data": [KB, ["资料/城市图书馆服务指南.md"]]})
    assert call.status_code == 403
    assert len(secured_ui[0].service.documents(KB)) == len(UI_DOCS)


def test_netguard_loopback_names_and_host_rules():
    from rag.netguard import host_allowed, is_loopback, split_host

    for host in ("127.0.0.1", "127.0.0.2", "localhost", "LocalHost", "::1", "[::1]", "[::1]:7860",
                 "127.0.0.1:7860", "localhost:80", "::ffff:127.0.0.1"):
        assert is_loopback(host), host
    for host in ("0.0.0.0", "::", "192.168.1.5", "example.org", "localhost.evil.example", "", "[::1", "127.0.0.1:x"):
        assert not is_loopback(host), host
    assert split_host("[::1]:7860") == ("::1", 7860) and split_host("Example.ORG") == ("example.org", None)
    with pytest.raises(ValueError):
        split_host("a b:1")

    # Bound to loopback: loopback names with the bound port only (plus the operator's allow-list).
    assert host_allowed("127.0.0.1:7860", "127.0.0.1", 7860)
    assert host_allowed("localhost:7860", "localhost", 7860)
    assert not host_allowed("localhost:7861", "127.0.0.1", 7860)
    assert not host_allowed("evil.example:7860", "127.0.0.1", 7860)
    assert host_allowed("localhost", "127.0.0.1", 80) and not host_allowed("localhost", "127.0.0.1", 7860)
    assert host_allowed("rag.internal:443", "127.0.0.1", 7860, allowed=["rag.internal"])
    assert host_allowed("localhost:9000", "127.0.0.1", 7860, allowed=["localhost:9000"])  # an ssh tunnel
    assert not host_allowed("localhost:9001", "127.0.0.1", 7860, allowed=["localhost:9000"])
    assert host_allowed(None, "127.0.0.1", 7860)  # HTTP/1.0 without Host: not a browser
    # Bound elsewhere (a password is required there): any Host, unless the operator lists names.
    assert host_allowed("evil.example:7860", "0.0.0.0", 7860)
    assert host_allowed("192.168.1.5:7860", "0.0.0.0", 7860)
    assert host_allowed("rag.lan:7860", "0.0.0.0", 7860, allowed=["rag.lan"])
    assert not host_allowed("evil.example:7860", "0.0.0.0", 7860, allowed=["rag.lan"])
    assert host_allowed("localhost:7860", "0.0.0.0", 7860, allowed=["rag.lan"])  # Gradio's own start-up check
    assert host_allowed("192.168.1.5:7860", "192.168.1.5", 7860, allowed=["rag.lan"])  # ... on a LAN bind
    assert not host_allowed("192.168.1.5:7861", "192.168.1.5", 7860, allowed=["rag.lan"])


def test_ui_bind_uses_the_shared_loopback_check():
    import rag.netguard
    import ui.bind

    assert ui.bind.is_loopback is rag.netguard.is_loopback


# --------------------------------------------------------------------------- the operator's LLM key


def ask_openai(port: int, base_url: str, api_key: str) -> str:
    """One chat turn through the running UI's /chat API with the OpenAI backend, as the settings
    panel sends it: question, KB, backend, k, base URL, API key, model, show details."""
    client = Client(f"http://127.0.0.1:{port}/", verbose=False)
    try:
        chatbot, *_ = client.predict(QUESTION, KB, "openai", 3, base_url, api_key, "m", False, api_name="/chat")
    finally:
        client.close()
    return "".join(part.get("text", "") for part in chatbot[-1]["content"])


def test_a_browser_chosen_llm_url_never_receives_the_operators_key(secured_ui, operator_llm):
    _, port = secured_ui
    stranger = Recorder()  # the endpoint a UI user typed in the settings panel
    try:
        answer = ask_openai(port, stranger.url, "")  # empty key field
        assert any(method == "POST" for method, _, _ in stranger.requests), stranger.requests  # it was used
        assert "每周一闭馆" in answer
        assert not any(OPERATOR_KEY in (key or "") for key in stranger.keys()), stranger.keys()

        stranger.requests.clear()
        ask_openai(port, stranger.url, USER_KEY)  # the user's own key is sent to the user's endpoint
        assert stranger.keys() and all(key == f"Bearer {USER_KEY}" for key in stranger.keys()), stranger.keys()
        assert not operator_llm.requests
    finally:
        stranger.close()

    # The operator's own endpoint (empty field = the configured URL, or the same URL typed) gets the key:
    # the recorder would have seen it above.
    for typed in ("", operator_llm.url + "/"):
        operator_llm.requests.clear()
        ask_openai(port, typed, "")
        assert operator_llm.keys() and all(key == f"Bearer {OPERATOR_KEY}" for key in operator_llm.keys())


def test_the_settings_panel_says_where_the_operators_key_goes(secured_ui):
    _, port = secured_ui
    config = httpx.get(f"http://127.0.0.1:{port}/config", timeout=10).text
    assert "RAG_LLM_API_KEY" in config and "RAG_LLM_BASE_URL" in config
    assert "不会发送" in config and "never sent" in config
    assert OPERATOR_KEY not in config


# --------------------------------------------------------------------------- delete purges eval logs


def _fake_run(runs: Path, name: str, kb: str, doc_id: str) -> Path:
    """A finished run folder of ``kb`` whose log quotes ``doc_id``."""
    run = runs / name
    run.mkdir(parents=True)
    (run / "run.json").write_text(json.dumps({"identity": {"kb": kb}, "config": {"kb": kb}}), encoding="utf-8")
    record = {"id": "q", "question": "?", "retrieved": [{"doc_id": doc_id, "start": 0, "end": 9, "snippet": "片段"}]}
    (run / "log.jsonl").write_text(json.dumps(record, ensure_ascii=False) + "\n", encoding="utf-8")
    (run / "report.json").write_text("{}", encoding="utf-8")
    return run


def test_deleting_a_document_deletes_the_eval_runs_that_quote_it(secured_ui, tmp_path):
    app, port = secured_ui
    kb = "清除库"
    (tmp_path / UI_UPLOAD_NAME).write_text(UI_UPLOAD_TEXT, encoding="utf-8")
    other = tmp_path / "城市图书馆服务指南.md"
    other.write_text(UI_DOCS["城市图书馆服务指南.md"], encoding="utf-8")
    assert app.service.ingest(kb, [tmp_path / UI_UPLOAD_NAME, other], progress=False).ok
    ids = {d.title: d.doc_id for d in app.service.documents(kb)}
    volcano = next(doc_id for doc_id in ids.values() if doc_id.endswith(UI_UPLOAD_NAME))
    library = next(doc_id for doc_id in ids.values() if doc_id != volcano)

    questions = tmp_path / "set.jsonl"
    questions.write_text(json.dumps({"id": "v", "question": "青岚火山观测站有几名值守人员？", "answers": ["7名"],
                                     "gold_ids": [UI_UPLOAD_NAME]}, ensure_ascii=False) + "\n", encoding="utf-8")
    *_, run_dir, _ = app.eval_panel.run(str(questions), "current", kb, None, True, "hybrid", 3, 0,
                                        "extractive", "", "", "")
    run_dir = Path(run_dir)
    assert "青岚火山观测站" in (run_dir / "log.jsonl").read_text(encoding="utf-8")
    served = app.eval_panel.export_dir / "eval" / run_dir.name
    assert (served / "report.md").is_file()
    runs = app.eval_panel.runs_root
    keep_other_kb = _fake_run(runs, "keep-other-kb", KB, volcano)  # same id, another KB
    keep_other_doc = _fake_run(runs, "keep-other-doc", kb, library)  # same KB, only the other document

    client = Client(f"http://127.0.0.1:{port}/", verbose=False)
    try:
        *_, status = client.predict(kb, [volcano], api_name="/remove_documents")
    finally:
        client.close()
    assert [d.doc_id for d in app.service.documents(kb)] == [library]
    assert not run_dir.exists() and not served.exists()
    assert "评测记录" in status, status
    assert keep_other_kb.is_dir() and keep_other_doc.is_dir()


def test_purge_skips_a_running_evaluation(secured_ui):
    app, _ = secured_ui
    panel = app.eval_panel
    running = _fake_run(panel.runs_root, "running-now", "另一库", "a.txt")
    finished = _fake_run(panel.runs_root, "finished", "另一库", "a.txt")
    panel._active.add(running.resolve())
    try:
        removed, skipped = panel.purge_runs("另一库", ["a.txt"])
    finally:
        panel._active.discard(running.resolve())
    assert removed == [finished.name] and skipped == [running.name]
    assert running.is_dir() and not finished.exists()
