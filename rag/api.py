"""OpenAI-compatible HTTP API over the answer chain: ``create_app(settings) -> FastAPI``.

Endpoints (everything under ``/v1`` needs ``Authorization: Bearer <RAG_API_KEY>`` when a key is set):

- ``POST /v1/chat/completions``: the answer chain, streaming (SSE) or not. ``model`` picks the
  knowledge base (``rag-<kb>``); earlier user/assistant turns in ``messages`` are the history
  used to rewrite a follow-up question. System messages are ignored: the grounded prompt is ours.
- ``GET /v1/models``, ``GET /v1/models/{id}``: one model ``rag-<kb>`` per knowledge base in ``settings.home``.
- ``POST /v1/search``: ``{"query", "kb"?, "k"?, "mode"?}`` → hits with per-channel ranks and scores.
- ``POST /v1/embeddings``: OpenAI shape, computed by the knowledge base's embedder. Extension:
  ``input_type`` = ``"passage"`` (default) or ``"query"`` (e5 models embed the two differently).
- ``GET /healthz`` (no auth), ``GET /docs`` (OpenAPI UI).

Extra fields of a chat completion (the last chunk of a stream carries them too; clients that
do not know them ignore them):

- ``citations``: the verified citations ``[{number, chunk_id, doc_id, title, section, page,
  start, end, quote, quote_start, quote_end}]``; ``number`` is the ``[n]`` in the text.
- ``rag``: ``{kb, question, query (the rewritten question used for retrieval), answer (verified
  text without the sources block), refused, backend, notice, unsupported_sentences, sentences,
  passages (numbered as in the text, with dense/BM25 ranks and scores), timings (ms)}``.

The message text keeps its ``[n]`` markers and ends with a numbered sources block, so any chat
client shows where each claim comes from. ``max_tokens`` (or ``max_completion_tokens``) caps the
model's answer at min(max_tokens, ``RAG_LLM_MAX_TOKENS``) tokens; a cut answer keeps only the
citations it reached. ``temperature`` and other sampling fields are ignored (server settings apply).

Input bounds (``rag.config``): at most ``max_messages`` messages of at most ``max_message_chars``
characters each, user messages (the question and earlier ones) of at most ``max_question_chars``
(400 otherwise), a body of at most ``max_request_bytes`` (413). Client text is parsed in worker
threads, never on the event loop, and a non-streaming client that disconnects stops its answer
and frees its slot.
"""
from __future__ import annotations

import asyncio
import base64
import copy
import json
import logging
import time
import uuid
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import AsyncIterator

import anyio
from fastapi import FastAPI, Request, Security
from fastapi.responses import Response
from fastapi.security import HTTPBearer
from sse_starlette import EventSourceResponse
from starlette.concurrency import run_in_threadpool
from starlette.middleware.cors import CORSMiddleware

from rag.answer import Answerer, AnswerResult
from rag.config import Settings
from rag.netguard import is_loopback  # noqa: F401 (also re-exported: rag.api.is_loopback)
from rag.tokens import count_tokens
from rag.api_library import MODEL_PREFIX, Library  # noqa: F401 (also imported from here)
from rag.api_guard import Gate, Guard, check_bind  # noqa: F401 (check_bind: also imported from here)
from rag.api_wire import (  # noqa: F401 (ApiError, ChatMessage, split_messages: also imported from here)
    VERIFIED_HEADING, ApiError, ChatMessage, ChatRequest, EmbeddingRequest, SearchRequest, bad_request,
    install_error_handlers, extras, footer, parse_chat, split_messages, usage)

log = logging.getLogger("rag.api")

MAX_EMBED_INPUTS = 256  # embedding is CPU work: one request must not hold a slot for minutes
# Origins of desktop apps (Electron/Tauri: ChatBox, Cherry Studio...) and local web UIs. Never "null":
# sandboxed iframes of any site send that.
LOCAL_ORIGINS = r"^((app|file|tauri|capacitor|vscode-webview)://.*|https?://(localhost|127\.0\.0\.1|\[::1\])(:\d+)?)$"
DISCONNECT_POLL_SECONDS = 0.25  # how often a waiting or answering non-streaming request checks its client


@dataclass
class Chat:
    """One chat completion request, resolved."""

    kb: str
    model: str
    question: str
    history: list[dict]
    include_usage: bool
    id: str = ""
    created: int = 0

    def __post_init__(self):
        self.id = self.id or f"chatcmpl-{uuid.uuid4().hex[:24]}"
        self.created = self.created or int(time.time())

    def chunk(self, delta: dict | None, finish: str | None = None, **extra) -> str:
        """One SSE data line; ``delta=None`` gives the choice-less usage chunk."""
        choices = [] if delta is None else [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]
        body = {"id": self.id, "object": "chat.completion.chunk", "created": self.created, "model": self.model,
                "choices": choices, **extra}
        return json.dumps(body, ensure_ascii=False, separators=(",", ":"))


class _GatedEventSource(EventSourceResponse):
    """An SSE response that leaves the gate when it ends, however it ends (done, client gone,
    error): the stream outlives the endpoint function, so the endpoint cannot release it."""

    def __init__(self, content, release, **kwargs):
        super().__init__(content, **kwargs)
        self._release = release

    async def __call__(self, scope, receive, send):
        try:
            await super().__call__(scope, receive, send)
        finally:
            self._release()


async def _answer_events(answerer: Answerer, chat: Chat) -> AsyncIterator[str]:
    """SSE data of one streamed answer; the sync chain is stepped in worker threads."""
    events = answerer.stream(chat.question, chat.history)
    try:
        yield chat.chunk({"role": "assistant", "content": ""})
        streamed, result = "", None
        while (event := await run_in_threadpool(next, events, None)) is not None:
            if event["type"] == "token":
                streamed += event["text"]
                yield chat.chunk({"content": event["text"]})
            elif event["type"] == "final":
                result = event["result"]
        if result is None:
            raise RuntimeError("answer stream ended without a result")
        tail = footer(result)
        if not streamed:
            tail = result.answer + tail
        elif streamed.strip() != result.answer:
            # Tokens already shown cannot be taken back: say what the citation check kept.
            tail = f"\n\n{VERIFIED_HEADING}\n{result.answer}" + tail
        if tail:
            yield chat.chunk({"content": tail})
        yield chat.chunk({}, "stop", **extras(result, chat.kb))
        if chat.include_usage:
            counts = await run_in_threadpool(usage, chat.question, chat.history, result, streamed + tail)
            yield chat.chunk(None, usage=counts)
        yield "[DONE]"
    except Exception as exc:  # headers are sent: the error goes into the stream, OpenAI style
        log.exception("streamed answer failed")
        error = exc if isinstance(exc, ApiError) else ApiError(500, "回答失败，详情见服务端日志 / answer failed "
                                                                   "(see the server log)", "internal_error")
        yield json.dumps({"error": {"message": error.message, "type": error.type, "param": None,
                                    "code": error.code}}, ensure_ascii=False)
    finally:
        # Close the chain in a thread, shielded from the cancellation of a vanished client, so a
        # streaming LLM releases its lock before the gate lets the next request in.
        with anyio.CancelScope(shield=True):
            await run_in_threadpool(events.close)


# ----------------------------------------------------------------------------- routes


@dataclass
class Service:
    """What the routes of one app share (no module-level state)."""

    settings: Settings
    library: Library
    chat_gate: Gate
    work_gate: Gate
    max_tokens_limit: int


API_DESCRIPTION = """中文文档问答 · OpenAI-compatible API over local knowledge bases, with verified citations.

Base URL `/v1`; model `rag-<kb>` (see `GET /v1/models`); `Authorization: Bearer <RAG_API_KEY>` when the
server has a key. Errors are OpenAI-style: `{"error": {"message", "type", "param", "code"}}`."""

CHAT_DESCRIPTION = """Answer a question from a knowledge base (OpenAI chat completions).

`model` selects the knowledge base (`rag-<kb>`). The message content keeps the `[n]` citation
markers and ends with a numbered sources block. Extra response fields (also in the last stream chunk):

- `citations`: `[{number, chunk_id, doc_id, title, section, page, start, end, quote, quote_start, quote_end}]`
- `rag`: `{kb, question, query, answer, refused, backend, notice, unsupported_sentences, sentences, passages, timings}`

Busy: 429 when the queue is full, 503 when the wait ran out (both with `Retry-After`)."""


async def _watch_disconnect(request: Request, scope: anyio.CancelScope) -> None:
    """Cancel ``scope`` as soon as the client of ``request`` disconnects (polled: a
    non-streaming request otherwise hears of it only when its response is sent)."""
    while not await request.is_disconnected():
        await anyio.sleep(DISCONNECT_POLL_SECONDS)
    scope.cancel()


async def _ask_while_connected(answerer: Answerer, question: str, history: list[dict]) -> AnswerResult:
    """The non-streaming answer, stepped event by event in worker threads: cancelling it (the
    client left) stops the chain at the next step (a token of the LLM, at worst the prompt
    reading) and closes it, so the LLM lock and the slot are free again."""
    events = answerer.stream(question, history)
    try:
        while (event := await run_in_threadpool(next, events, None)) is not None:
            if event["type"] == "final":
                return event["result"]
        raise RuntimeError("answer stream ended without a result")
    finally:
        # Shielded: a cancelled request must still close the chain (in a thread: closing a
        # streaming LLM waits for its current token).
        with anyio.CancelScope(shield=True):
            await run_in_threadpool(events.close)


def capped(answerer: Answerer, max_tokens: int | None) -> Answerer:
    """``answerer`` whose LLM answer stops after ``max_tokens`` tokens (None, or not below
    ``llm_max_tokens``: the answerer itself). A shallow copy: searcher, prompts, caches and the
    loaded models are shared; only its ``chat_model`` binds the cap (the rewrite step binds its
    own, smaller one)."""
    if not max_tokens or max_tokens >= answerer.settings.llm_max_tokens:
        return answerer
    view = copy.copy(answerer)
    base = answerer.chat_model

    def chat_model(backend: str):
        model = base(backend)
        return model.bind(max_tokens=max_tokens) if model is not None else None

    view.chat_model = chat_model  # the instance attribute shadows the method for this request only
    return view


def _chat_routes(app: FastAPI, svc: Service, auth) -> None:
    @app.post("/v1/chat/completions", tags=["openai"], dependencies=auth, description=CHAT_DESCRIPTION)
    async def chat_completions(body: ChatRequest, request: Request):
        kb = svc.library.kb_for(body.model)
        # Up to max_request_bytes of client text: parsed in a worker thread, not on the event loop.
        question, history = await run_in_threadpool(parse_chat, body.messages, svc.settings)
        requested = body.max_completion_tokens or body.max_tokens
        if requested and requested > svc.max_tokens_limit:
            raise ApiError(400, f"max_tokens 不能超过 {svc.max_tokens_limit} / max_tokens must be at most "
                                f"{svc.max_tokens_limit}", "max_tokens_too_large", "max_tokens")
        if body.n not in (None, 1):
            raise ApiError(400, "只支持 n=1 / only n=1 is supported", "unsupported_n", "n")
        chat = Chat(kb, MODEL_PREFIX + kb, question, history,
                    bool(body.stream_options and body.stream_options.include_usage))
        if body.stream:
            await svc.chat_gate.enter()
            try:
                answerer = capped(await run_in_threadpool(svc.library.answerer, kb), requested)
            except BaseException:
                svc.chat_gate.leave()
                raise
            # The response leaves the gate when the stream ends, however it ends (sse_starlette
            # cancels it when the client goes); a client that stops reading must not hold a slot.
            return _GatedEventSource(_answer_events(answerer, chat), svc.chat_gate.leave, ping=15, send_timeout=30)
        result = None
        with anyio.CancelScope() as connected:  # cancelled by the watcher when the client leaves
            watcher = asyncio.create_task(_watch_disconnect(request, connected))
            try:
                async with _slot(svc.chat_gate):  # a client that leaves while queued leaves the queue
                    answerer = capped(await run_in_threadpool(svc.library.answerer, kb), requested)
                    result = await _ask_while_connected(answerer, question, history)
            finally:
                watcher.cancel()
        if result is None:
            log.info("client disconnected before its answer was ready: answer stopped, slot freed")
            return Response(status_code=499)  # nginx's "client closed request"; nobody reads it
        content = result.answer + footer(result)
        counts = await run_in_threadpool(usage, question, history, result, content)
        return {"id": chat.id, "object": "chat.completion", "created": chat.created, "model": chat.model,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": content},
                             "logprobs": None, "finish_reason": "stop"}],
                "usage": counts, **extras(result, kb)}


def _retrieval_routes(app: FastAPI, svc: Service, auth) -> None:
    @app.post("/v1/search", tags=["rag"], dependencies=auth)
    async def search(body: SearchRequest):
        """Hybrid (or single-channel) retrieval: hits with fused score, dense and BM25 ranks and scores."""
        kb = svc.library.kb_for(body.kb or svc.settings.kb, "kb")
        limit = svc.settings.max_question_chars
        if len(body.query) > limit:
            raise bad_request("question_too_long", "query", f"查询太长（{len(body.query)} 字，最多 {limit} 字）",
                               f"query too long ({len(body.query)} characters, at most {limit})")

        def run():
            return svc.library.answerer(kb).searcher.search(body.query, body.k, body.mode)

        async with _slot(svc.work_gate):
            hits = await run_in_threadpool(run)
        data = []
        for number, hit in enumerate(hits, 1):
            item = hit.to_dict()
            item.pop("source", None)
            data.append({"number": number, **item})
        return {"object": "list", "kb": kb, "query": body.query, "mode": body.mode, "data": data}

    @app.post("/v1/embeddings", tags=["openai"], dependencies=auth)
    async def embeddings(body: EmbeddingRequest):
        """OpenAI embeddings with the knowledge base's embedder (L2-normalised float32)."""
        kb = svc.library.kb_for(body.model)
        texts = [body.input] if isinstance(body.input, str) else body.input
        if not texts or not all(isinstance(t, str) and t.strip() for t in texts):
            raise ApiError(400, "input 必须是非空文本或文本列表（不支持 token 数组）/ input must be non-empty text "
                                "or a list of texts (token arrays are not supported)", "invalid_input", "input")
        if len(texts) > MAX_EMBED_INPUTS:
            raise ApiError(400, f"一次最多 {MAX_EMBED_INPUTS} 条 / at most {MAX_EMBED_INPUTS} inputs per request",
                           "too_many_inputs", "input")
        limit = svc.settings.max_message_chars  # the embedder's time grows with the text
        if (longest := max(map(len, texts))) > limit:
            raise bad_request("input_too_long", "input", f"输入太长（{longest} 字，每条最多 {limit} 字）",
                               f"input too long ({longest} characters, at most {limit} per input)")

        def run():
            embedder = svc.library.answerer(kb).searcher.embedder
            if body.dimensions not in (None, embedder.dim):
                raise ApiError(400, f"该模型只有 {embedder.dim} 维 / this model has {embedder.dim} dimensions",
                               "invalid_dimensions", "dimensions")
            embed = embedder.embed_queries if body.input_type == "query" else embedder.embed_passages
            return embed(texts), sum(count_tokens(t) for t in texts)  # counting up to 1 MB: not on the loop

        async with _slot(svc.work_gate):
            vectors, tokens = await run_in_threadpool(run)
        data = []
        for i, vector in enumerate(vectors):
            value = (base64.b64encode(vector.astype("<f4").tobytes()).decode() if body.encoding_format == "base64"
                     else vector.astype(float).tolist())
            data.append({"object": "embedding", "index": i, "embedding": value})
        return {"object": "list", "data": data, "model": body.model,
                "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}


def _info_routes(app: FastAPI, svc: Service, auth) -> None:
    def model_card(kb: str) -> dict:
        created = int((Path(svc.settings.home) / kb / "kb.sqlite").stat().st_mtime)
        return {"id": MODEL_PREFIX + kb, "object": "model", "created": created, "owned_by": "rag"}

    @app.get("/v1/models", tags=["openai"], dependencies=auth)
    async def list_models():
        """One model per knowledge base: ``rag-<kb>``."""
        return {"object": "list", "data": [model_card(kb) for kb in svc.library.names()]}

    @app.get("/v1/models/{model_id}", tags=["openai"], dependencies=auth)
    async def get_model(model_id: str):
        return model_card(svc.library.kb_for(model_id))

    @app.get("/healthz", tags=["ops"])
    async def healthz():
        """Liveness without auth: answers even while every slot is busy (the event loop never blocks)."""
        gate = svc.chat_gate
        return {"status": "ok", "backend": svc.settings.llm_backend, "knowledge_bases": len(svc.library.names()),
                "chat": {"running": gate.running, "waiting": gate.waiting, "slots": gate.slots, "queue": gate.queue}}


@asynccontextmanager
async def _slot(gate: Gate):
    await gate.enter()
    try:
        yield
    finally:
        gate.leave()


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
    library = Library(settings)
    slots = concurrency or default_concurrency(settings.llm_backend, settings.threads)
    svc = Service(settings, library, Gate("chat", slots, queue_size, queue_timeout),
                  Gate("search/embeddings", max(1, settings.threads), queue_size, queue_timeout),
                  max_tokens_limit or settings.llm_context)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        # Load the embedder and the default KB before taking traffic: the first query would
        # otherwise pay seconds of model, index and jieba loading.
        def warm():
            library.embedder()
            if settings.kb in library.names():
                try:
                    library.answerer(settings.kb).searcher.search("预热", 1)
                except ApiError as exc:  # e.g. built with another embedder: serve the other KBs
                    log.warning("knowledge base %s unavailable: %s", settings.kb, exc.message)

        await run_in_threadpool(warm)
        yield
        library.close()

    app = FastAPI(title="rag-zh API", version="1", lifespan=lifespan, description=API_DESCRIPTION)
    install_error_handlers(app)
    # Documents the bearer scheme in /docs; enforcement is in Guard, which runs before the body is read.
    auth = [Security(HTTPBearer(auto_error=False))]
    _chat_routes(app, svc, auth)
    _retrieval_routes(app, svc, auth)
    _info_routes(app, svc, auth)
    app.add_middleware(Guard, api_key=api_key, max_body_bytes=max_body_bytes or settings.max_request_bytes)
    # Outside the Guard, so a browser's preflight (which never carries the key) is answered. Without
    # a key only local apps may read responses, not a web page; with a key any origin may try.
    origins = {"allow_origins": ["*"]} if api_key else {"allow_origin_regex": LOCAL_ORIGINS}
    app.add_middleware(CORSMiddleware, **origins, allow_methods=["GET", "POST"],
                       allow_headers=["Authorization", "Content-Type"], expose_headers=["Retry-After"])
    return app
