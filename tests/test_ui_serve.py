"""``rag serve``: refuses to expose the UI without a password; with one, the UI sits behind a login."""
from __future__ import annotations

import re
import socket
import subprocess
import time

import httpx

from conftest import rag_command, rag_env


def test_refuses_to_bind_other_addresses_without_a_password(tmp_path):
    # PYTHONPROFILEIMPORTTIME: Python lists every module it imports on stderr.
    done = subprocess.run(rag_command("serve", "--home", tmp_path / "index", "--host", "0.0.0.0", "--port", 9),
                          cwd=tmp_path, env=rag_env(PYTHONPROFILEIMPORTTIME="1"), capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 2
    assert "必须设置访问密码" in done.stderr and "RAG_UI_PASSWORD" in done.stderr
    imported = re.findall(r"^import time:\s+\d+ \|\s+\d+ \|\s+(\S+)$", done.stderr, re.M)
    assert "rag.cli" in imported, done.stderr[-2000:]  # the listing works
    loaded = [m for m in imported if m.split(".")[0] == "gradio" or m == "ui.app"]
    assert not loaded, f"refused only after loading the UI: {loaded[:5]}"
    assert not (tmp_path / "index").exists()


def test_password_puts_the_ui_behind_a_login(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = subprocess.Popen(
        rag_command("serve", "--home", tmp_path / "index", "--kb", "空库", "--port", port, "--llm", "extractive"),
        cwd=tmp_path, env=rag_env(RAG_UI_PASSWORD="s3cret-口令"),  # the password via the environment, not argv
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 120
        while True:
            assert server.poll() is None, server.stderr.read()
            try:
                httpx.get(url + "/login_check", timeout=2)
                break
            except httpx.TransportError:
                assert time.time() < deadline, "rag serve did not start"
                time.sleep(0.3)
        with httpx.Client(base_url=url, timeout=10) as client:
            assert client.get("/config").status_code == 401
            assert client.post("/login", data={"username": "rag", "password": "wrong"}).status_code == 400
            assert client.post("/login", data={"username": "rag", "password": "s3cret-口令"}).status_code == 200
            config = client.get("/config")
            assert config.status_code == 200 and "中文文档问答" in config.text
    finally:
        server.terminate()
        server.wait(timeout=30)
