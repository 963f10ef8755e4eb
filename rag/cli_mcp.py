"""``rag mcp``: the knowledge bases as an MCP server (``rag.mcp_server``) for Claude Desktop,
Cherry Studio, Cursor or any agent.

- stdio (default): the client starts ``rag mcp --kb K`` and talks over stdin/stdout. Every log
  line goes to stderr; while serving, the SDK also points file descriptor 1 at stderr, so a
  stray ``print`` of a library cannot corrupt the protocol.
- streamable HTTP with ``--port P``: ``http://HOST:P/mcp``, under the rules of ``rag api``
  (``rag.api.guard.Guard`` and ``rag.netguard.check_bind``): a loopback bind needs no key; any
  other bind needs ``RAG_API_KEY``; with a key every request needs ``Authorization: Bearer
  <key>`` (401 otherwise); without one only loopback ``Host`` headers are answered (403
  otherwise: DNS rebinding). The SDK's own Host/Origin check is replaced by that one rule.
"""
from __future__ import annotations

import copy
import logging
import sys
import threading

DEFAULT_HOST = "127.0.0.1"
MCP_PATH = "/mcp"

log = logging.getLogger("rag.mcp")


def _warm(service, kb: str) -> None:
    """Load the embedder and the default KB's indexes in the background: the first call would
    otherwise pay seconds of loading, and a client's start-up handshake must not wait for it.

    Args:
        service: the server's ``RagService``.
        kb: the default KB, whose indexes are opened.
    """
    from rag.store import KnowledgeBaseError

    def run():
        try:
            service.embedder()
            if service.exists(kb):
                service.searcher(kb).search("预热", 1)
        except (KnowledgeBaseError, OSError, RuntimeError, ValueError) as exc:  # the tools report it per call
            log.warning("knowledge base %s not preloaded: %s", kb, exc)

    threading.Thread(target=run, name="rag-mcp-warm", daemon=True).start()


def _http_app(mcp, settings, host: str):
    """The streamable HTTP app at ``/mcp`` behind the API's guard (auth, Host, body size).

    Args:
        mcp: the ``MCPServer`` (``rag.mcp_server.create_mcp``).
        settings: ``api_key`` (RAG_API_KEY) and ``max_request_bytes`` apply.
        host: the bind address (the SDK records it; the Host rule is the guard's).
    """
    from mcp.server.transport_security import TransportSecuritySettings

    from rag.api.guard import Guard

    app = mcp.streamable_http_app(
        streamable_http_path=MCP_PATH, host=host, max_request_body_size=settings.max_request_bytes,
        # Guard applies the project's Host rule (loopback Host names without a key, any with one).
        transport_security=TransportSecuritySettings(enable_dns_rebinding_protection=False))
    return Guard(app, api_key=settings.api_key or None, max_body_bytes=settings.max_request_bytes)


def _stderr_log_config() -> dict:
    """uvicorn's logging with the access log on stderr too (its default is stdout)."""
    from uvicorn.config import LOGGING_CONFIG

    config = copy.deepcopy(LOGGING_CONFIG)
    config["handlers"]["access"]["stream"] = "ext://sys.stderr"
    return config


def cmd_mcp(args) -> int:
    from rag.cli import _settings
    from rag.netguard import check_bind

    settings = _settings(args)
    if args.llm:
        settings.llm_backend = args.llm
    http = args.port is not None
    if not http and args.host != DEFAULT_HOST:
        raise ValueError("--host 只用于 HTTP，请同时给出 --port / --host applies to HTTP only: add --port")
    if http:
        check_bind(args.host, settings.api_key)  # ValueError: printed by rag.cli as one line, exit 2

    from rag.cli_api import served_names
    from rag.mcp_server import create_mcp
    from rag.service import RagService

    service = RagService(settings)
    names = served_names(service, getattr(args, "kb", None))
    # One plain line per record on stderr (before the SDK's setup, which then keeps it: the SDK
    # would install a rich handler that wraps each record over several 80-column lines in log files).
    logging.basicConfig(level=args.log_level.upper(), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    mcp = create_mcp(settings, service, log_level=args.log_level)
    where = "stdio"
    if http:
        shown = f"[{args.host}]" if ":" in args.host else args.host
        where = (f"http://{shown}:{args.port}{MCP_PATH} · 密钥 API key: "
                 f"{'on' if settings.api_key else 'off (RAG_API_KEY)'}")
    print(f"rag mcp · {where} · 知识库 knowledge bases: {', '.join(names) or '-'} · 默认 default: {settings.kb}"
          f" · 后端 backend: {settings.llm_backend}", file=sys.stderr)
    _warm(service, settings.kb)
    try:
        if http:
            import uvicorn

            # A short graceful shutdown: an open event stream must not keep Ctrl-C waiting.
            uvicorn.run(_http_app(mcp, settings, args.host), host=args.host, port=args.port,
                        log_level=args.log_level, log_config=_stderr_log_config(), timeout_graceful_shutdown=5)
        else:
            mcp.run("stdio")
    finally:
        service.close()
    return 0


def register(sub, common) -> None:
    from rag.cli_serve import add_listen_args

    p = sub.add_parser("mcp", parents=[common], help="MCP 服务器 MCP server (stdio, or HTTP with --port)")
    add_listen_args(p, None, "HTTP 监听地址 HTTP bind address (default 127.0.0.1; others need RAG_API_KEY)",
                    "默认回答模型 default backend (default: RAG_LLM_BACKEND or local)")
    p.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    p.set_defaults(func=cmd_mcp)
