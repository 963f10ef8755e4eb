"""``rag serve``: the web UI (chat with clickable citations, knowledge-base management)."""
from __future__ import annotations

import os
import sys

from rag.netguard import ALLOWED_HOSTS_ENV

PASSWORD_ENV = "RAG_UI_PASSWORD"


def cmd_serve(args) -> int:
    from rag.cli import _settings
    from rag.netguard import parse_allowed_hosts
    from ui.bind import AUTH_USER, check_bind

    settings = _settings(args)
    if args.llm:
        settings.llm_backend = args.llm
    # The environment variable keeps the password out of `ps` output and shell history.
    password = args.password or os.environ.get(PASSWORD_ENV) or None
    check_bind(args.host, password)  # before importing gradio: a refusal should be instant
    # ValueError (a bad entry) is reported by rag.cli as one line, also before gradio loads.
    allowed_hosts = parse_allowed_hosts(args.allowed_hosts or os.environ.get(ALLOWED_HOSTS_ENV))
    from ui.app import create_app

    app = create_app(settings, chat_concurrency=args.concurrency)
    login = f" · 用户名 {AUTH_USER}，密码已设置" if password else ""
    hosts = f" · 允许的 Host {', '.join(allowed_hosts)}" if allowed_hosts else ""
    print(f"知识库目录 {settings.home} · 默认知识库 {settings.kb} · 回答模型 {settings.llm_backend}{login}{hosts}",
          file=sys.stderr)
    app.launch(host=args.host, port=args.port, password=password, allowed_hosts=allowed_hosts)
    return 0


def add_listen_args(p, port: int, host_help: str, llm_help: str) -> None:
    """The flags every server command has: where it listens and its default answer backend."""
    p.add_argument("--host", default="127.0.0.1", help=host_help)
    p.add_argument("--port", type=int, default=port)
    p.add_argument("--llm", choices=["local", "openai", "extractive"], help=llm_help)


def register(sub, common) -> None:
    p = sub.add_parser("serve", parents=[common], help="启动网页界面 start the web UI")
    add_listen_args(p, 7860, "监听地址 (default 127.0.0.1; any other address requires a password)",
                    "默认回答模型 default backend")
    p.add_argument("--password", help=f"访问密码，登录用户名 rag / access password, user name rag (or set {PASSWORD_ENV})")
    p.add_argument("--allowed-hosts",
                   help="额外允许的 Host 名称，逗号分隔，name 或 name:port / extra Host names to answer, comma "
                        "separated (e.g. localhost:9000 for an SSH tunnel). Loopback bind: added to the loopback "
                        "names; other binds: only these (and loopback) instead of any Host "
                        f"(or set {ALLOWED_HOSTS_ENV})")
    p.add_argument("--concurrency", type=int, default=8, help="同时生成的回答数 answers computed at once")
    p.set_defaults(func=cmd_serve)
