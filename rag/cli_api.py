"""``rag api``: serve the knowledge bases as an OpenAI-compatible HTTP API (see ``rag.api``)."""
from __future__ import annotations

import sys


def served_names(service, kb: str | None) -> list[str]:
    """The KBs a server command will serve; ``kb`` (the default one) must exist, and an empty
    home is said on stderr (the server still starts: KBs may be added later)."""
    if kb:
        service.require(kb)  # KnowledgeBaseError: printed by rag.cli as one line
    names = service.names()
    if not names:
        print(f"注意：{service.home} 下还没有知识库，先运行 rag ingest / no knowledge bases under "
              f"{service.home} yet: run rag ingest", file=sys.stderr)
    return names


def cmd_api(args) -> int:
    import uvicorn

    from rag.api import MODEL_PREFIX, create_app
    from rag.cli import _settings
    from rag.netguard import check_bind
    from rag.service import RagService

    settings = _settings(args)
    if args.llm:
        settings.llm_backend = args.llm
    check_bind(args.host, settings.api_key)  # ValueError: printed by rag.cli as one line, exit 2
    names = served_names(RagService(settings), getattr(args, "kb", None))
    shown = f"[{args.host}]" if ":" in args.host else args.host
    print(f"rag api · http://{shown}:{args.port}/v1 · 模型 models: "
          f"{', '.join(MODEL_PREFIX + n for n in names) or '-'} · 后端 backend: {settings.llm_backend} · "
          f"密钥 API key: {'on' if settings.api_key else 'off (RAG_API_KEY)'} · 文档 docs: /docs", file=sys.stderr)
    app = create_app(settings)
    # A short graceful shutdown: an open stream must not keep Ctrl-C waiting.
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level, timeout_graceful_shutdown=5)
    return 0


def register(sub, common) -> None:
    from rag.cli_serve import add_listen_args

    p = sub.add_parser("api", parents=[common], help="OpenAI 兼容的 HTTP 接口 OpenAI-compatible HTTP API")
    add_listen_args(p, 8000, "监听地址 bind address (default 127.0.0.1; others need RAG_API_KEY)",
                    "default: RAG_LLM_BACKEND or local")
    p.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    p.set_defaults(func=cmd_api)
