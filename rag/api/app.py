"""The app factory of ``rag api``: ``create_app(settings)``, the shared context, and the search,
embeddings and model routes (the chat route is ``rag.api.chat``)."""
from __future__ import annotations

import base64
import logging
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

from fastapi import FastAPI, Security
from fastapi.security import HTTPBearer
from starlette.concurrency import run_in_threadpool
from starlette.middleware.cors import CORSMiddleware

from rag.answer import Answerer
from rag.api.chat import chat_routes, slot
from rag.api.feedback import feedback_routes
from rag.api.guard import Gate, Guard
from rag.api.wire import ApiError, EmbeddingRequest, SearchRequest, bad_request, install_error_handlers
from rag.config import Settings
from rag.filters import FilterError, Where
from rag.multi_kb import MixedEmbeddersError, split_kbs
from rag.service import KnowledgeBaseNotFound, RagService
from rag.store import KnowledgeBaseError
from rag.tokens import count_tokens

log = logging.getLogger("rag.api")

MODEL_PREFIX = "rag-"
MAX_EMBED_INPUTS = 256  # embedding is CPU work: one request must not hold a slot for minutes
# Origins of desktop apps (Electron/Tauri: ChatBox, Cherry Studio...) and local web UIs. Never "null":
# sandboxed iframes of any site send that.
LOCAL_ORIGINS = r"^((app|file|tauri|capacitor|vscode-webview)://.*|https?://(localhost|127\.0\.0\.1|\[::1\])(:\d+)?)$"

API_DESCRIPTION = """中文文档问答 · OpenAI-compatible API over local knowledge bases, with verified citations.

Base URL `/v1`; model `rag-<kb>` (see `GET /v1/models`), or several KBs searched as one: `rag-<a>+<b>`;
`Authorization: Bearer <RAG_API_KEY>` when the server has a key. Metadata filters: `filters` on `/v1/search`,
`metadata` on chat requests (`{"path": "news/", "title": "…", "date_from": "2024-01", "date_to": "2024-06",
"fields": {"source": "…"}}`). Errors are OpenAI-style: `{"error": {"message", "type", "param", "code"}}`."""


@dataclass
class ApiContext:
    """What the routes of one app share (no module-level state): the service and the gates."""

    settings: Settings
    service: RagService
    chat_gate: Gate
    work_gate: Gate
    max_tokens_limit: int

    @staticmethod
    def model_id(kb: str) -> str:
        return MODEL_PREFIX + kb

    def kb_for(self, name: str, param: str = "model") -> str:
        """The KB(s) a model id or KB name refers to: ``rag-<kb>``, ``<kb>``, or several searched as
        one (``rag-a+b``, ``a,b``), returned as ``a+b``; 404 when one does not exist."""
        names = self.service.names()
        found = []
        for part in split_kbs(name.removeprefix(MODEL_PREFIX)) if "+" in name or "," in name else [name]:
            for kb in (part.removeprefix(MODEL_PREFIX), part):  # the second: a KB itself named "rag-..."
                if kb in names:
                    found.append(kb)
                    break
            else:
                known = ", ".join(MODEL_PREFIX + n for n in names) or "无 none (run rag ingest)"
                raise ApiError(404, f"模型/知识库不存在 / model or knowledge base not found: {part!r}; "
                                    f"可用 available: {known}（几个知识库一起：rag-a+b / several: rag-a+b）",
                               "model_not_found", param)
        return "+".join(dict.fromkeys(found))

    def answerer(self, kb: str) -> Answerer:
        """The answer chain of a KB or several (``a+b``); blocking on first use: opens the KBs' indexes."""
        try:
            return self.service.answerer(kb)
        except KnowledgeBaseNotFound as exc:
            raise ApiError(404, str(exc), "model_not_found", "model") from exc
        except MixedEmbeddersError as exc:
            raise ApiError(400, str(exc), "incompatible_knowledge_bases", "model") from exc
        except KnowledgeBaseError as exc:  # e.g. built with another embedder
            raise ApiError(503, str(exc), "knowledge_base_unavailable") from exc

    @staticmethod
    def where(filters: dict | None, param: str) -> Where:
        """A request's metadata filter (400 ``invalid_filters`` with the reason when it cannot be read)."""
        try:
            return Where.from_mapping(filters)
        except FilterError as exc:
            raise ApiError(400, str(exc), "invalid_filters", param) from exc


def _retrieval_routes(app: FastAPI, ctx: ApiContext, auth) -> None:
    @app.post("/v1/search", tags=["rag"], dependencies=auth)
    async def search(body: SearchRequest):
        """Hybrid (or single-channel) retrieval: hits with fused score, dense and BM25 ranks and scores."""
        kb = ctx.kb_for(body.kb or ctx.settings.kb, "kb")
        where = ctx.where(body.filters, "filters")
        limit = ctx.settings.max_question_chars
        if len(body.query) > limit:
            raise bad_request("question_too_long", "query", f"查询太长（{len(body.query)} 字，最多 {limit} 字）",
                               f"query too long ({len(body.query)} characters, at most {limit})")

        def run():
            return ctx.answerer(kb).retrieve(body.query, body.k, body.mode, where=where)

        async with slot(ctx.work_gate):
            found = await run_in_threadpool(run)
        hits = found.hits
        data = []
        for number, hit in enumerate(hits, 1):
            item = hit.to_dict()
            item.pop("source", None)
            data.append({"number": number, **item})
        return {"object": "list", "kb": kb, "query": body.query, "mode": body.mode, "filters": where.to_dict(),
                "parts": found.parts, "part_answers": [a.to_dict() for a in found.part_answers], "data": data}

    @app.post("/v1/embeddings", tags=["openai"], dependencies=auth)
    async def embeddings(body: EmbeddingRequest):
        """OpenAI embeddings with the knowledge base's embedder (L2-normalised float32)."""
        kb = ctx.kb_for(body.model)
        texts = [body.input] if isinstance(body.input, str) else body.input
        if not texts or not all(isinstance(t, str) and t.strip() for t in texts):
            raise ApiError(400, "input 必须是非空文本或文本列表（不支持 token 数组）/ input must be non-empty text "
                                "or a list of texts (token arrays are not supported)", "invalid_input", "input")
        if len(texts) > MAX_EMBED_INPUTS:
            raise ApiError(400, f"一次最多 {MAX_EMBED_INPUTS} 条 / at most {MAX_EMBED_INPUTS} inputs per request",
                           "too_many_inputs", "input")
        limit = ctx.settings.max_message_chars  # the embedder's time grows with the text
        if (longest := max(map(len, texts))) > limit:
            raise bad_request("input_too_long", "input", f"输入太长（{longest} 字，每条最多 {limit} 字）",
                               f"input too long ({longest} characters, at most {limit} per input)")

        def run():
            embedder = ctx.answerer(kb).searcher.embedder
            if body.dimensions not in (None, embedder.dim):
                raise ApiError(400, f"该模型只有 {embedder.dim} 维 / this model has {embedder.dim} dimensions",
                               "invalid_dimensions", "dimensions")
            embed = embedder.embed_queries if body.input_type == "query" else embedder.embed_passages
            return embed(texts), sum(count_tokens(t) for t in texts)  # counting up to 1 MB: not on the loop

        async with slot(ctx.work_gate):
            vectors, tokens = await run_in_threadpool(run)
        data = []
        for i, vector in enumerate(vectors):
            value = (base64.b64encode(vector.astype("<f4").tobytes()).decode() if body.encoding_format == "base64"
                     else vector.astype(float).tolist())
            data.append({"object": "embedding", "index": i, "embedding": value})
        return {"object": "list", "data": data, "model": body.model,
                "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}


def _info_routes(app: FastAPI, ctx: ApiContext, auth) -> None:
    def model_card(kb: str) -> dict:
        created = int((Path(ctx.settings.home) / kb / "kb.sqlite").stat().st_mtime)
        return {"id": ctx.model_id(kb), "object": "model", "created": created, "owned_by": "rag"}

    @app.get("/v1/models", tags=["openai"], dependencies=auth)
    async def list_models():
        """One model per knowledge base: ``rag-<kb>`` (several at once: ``rag-a+b``, not listed)."""
        return {"object": "list", "data": [model_card(kb) for kb in ctx.service.names()]}

    @app.get("/v1/models/{model_id}", tags=["openai"], dependencies=auth)
    async def get_model(model_id: str):
        return model_card(ctx.kb_for(model_id))

    @app.get("/healthz", tags=["ops"])
    async def healthz():
        """Liveness without auth: answers even while every slot is busy (the event loop never blocks)."""
        gate = ctx.chat_gate
        return {"status": "ok", "backend": ctx.settings.llm_backend, "knowledge_bases": len(ctx.service.names()),
                "chat": {"running": gate.running, "waiting": gate.waiting, "slots": gate.slots, "queue": gate.queue}}


def default_concurrency(backend: str, threads: int) -> int:
    """Answers that may run at once: one for the in-process LLM (it is serialised anyway, more
    would only hold threads), the cores for extractive, a few for a remote server."""
    return {"local": 1, "extractive": max(1, threads)}.get(backend, 4)


def create_app(settings: Settings, *, concurrency: int | None = None, queue_size: int = 16,
               queue_timeout: float = 60.0, max_body_bytes: int | None = None,
               max_tokens_limit: int | None = None) -> FastAPI:
    """The API app for the knowledge bases under ``settings.home``.

    Args:
        settings: configuration; ``llm_backend`` answers, ``kb`` is the default KB,
            ``api_key`` (RAG_API_KEY) turns on bearer auth.
        concurrency: answers running at once (default by backend, see ``default_concurrency``).
        queue_size: requests allowed to wait for a slot; beyond it → 429.
        queue_timeout: seconds a request may wait for a slot; beyond it → 503.
        max_body_bytes: request body limit → 413 (default ``settings.max_request_bytes``).
        max_tokens_limit: largest accepted ``max_tokens`` (default: the model context, ``llm_context``).
    """
    api_key = settings.api_key or None  # RAG_API_KEY="" means no key, not an empty one
    service = RagService(settings)
    slots = concurrency or default_concurrency(settings.llm_backend, settings.threads)
    ctx = ApiContext(settings, service, Gate("chat", slots, queue_size, queue_timeout),
                     Gate("search/embeddings", max(1, settings.threads), queue_size, queue_timeout),
                     max_tokens_limit or settings.llm_context)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        # Load the embedder and the default KB before taking traffic: the first query would
        # otherwise pay seconds of model, index and jieba loading.
        def warm():
            service.embedder()
            if service.exists(settings.kb):
                try:
                    ctx.answerer(settings.kb).searcher.search("预热", 1)
                except ApiError as exc:  # e.g. built with another embedder: serve the other KBs
                    log.warning("knowledge base %s unavailable: %s", settings.kb, exc.message)

        await run_in_threadpool(warm)
        yield
        service.close()

    app = FastAPI(title="rag-zh API", version="1", lifespan=lifespan, description=API_DESCRIPTION)
    install_error_handlers(app)
    # Documents the bearer scheme in /docs; enforcement is in Guard, which runs before the body is read.
    auth = [Security(HTTPBearer(auto_error=False))]
    chat_routes(app, ctx, auth)
    _retrieval_routes(app, ctx, auth)
    _info_routes(app, ctx, auth)
    feedback_routes(app, ctx, auth)
    app.add_middleware(Guard, api_key=api_key, max_body_bytes=max_body_bytes or settings.max_request_bytes)
    # Outside the Guard, so a browser's preflight (which never carries the key) is answered. Without
    # a key only local apps may read responses, not a web page; with a key any origin may try.
    origins = {"allow_origins": ["*"]} if api_key else {"allow_origin_regex": LOCAL_ORIGINS}
    app.add_middleware(CORSMiddleware, **origins, allow_methods=["GET", "POST"],
                       allow_headers=["Authorization", "Content-Type"], expose_headers=["Retry-After"])
    return app
