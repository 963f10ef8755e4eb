"""``POST /v1/chat/completions``: the answer chain over HTTP, streamed (SSE) or not.

The sync chain is stepped event by event in worker threads, so the event loop never blocks,
and a client that leaves stops its answer at the next step and frees its slot.
"""
from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import AsyncIterator, Iterator

import anyio
from fastapi import FastAPI, Request
from fastapi.responses import Response
from sse_starlette import EventSourceResponse
from starlette.concurrency import run_in_threadpool

from rag.answer_types import AnswerEvent, Answered, AnswerResult, Token
from rag.api.guard import Gate
from rag.api.wire import VERIFIED_HEADING, ApiError, ChatRequest, extras, footer, parse_chat, usage

log = logging.getLogger("rag.api")

DISCONNECT_POLL_SECONDS = 0.25  # how often a waiting or answering non-streaming request checks its client

CHAT_DESCRIPTION = """Answer a question from a knowledge base (OpenAI chat completions).

`model` selects the knowledge base (`rag-<kb>`). The message content keeps the `[n]` citation
markers and ends with a numbered sources block. Extra response fields (also in the last stream chunk):

- `citations`: `[{number, chunk_id, doc_id, title, section, page, start, end, quote, quote_start, quote_end}]`
- `rag`: `{kb, question, query, parts, answer, raw_answer, refused, backend, notice, unsupported_sentences, sentences, passages, timings, judge}`

Busy: 429 when the queue is full, 503 when the wait ran out (both with `Retry-After`)."""


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


async def _close(events: Iterator[AnswerEvent]) -> None:
    # Shielded: a cancelled request must still close the chain (in a thread: closing a
    # streaming LLM waits for its current token), so the LLM lock is free before the slot is.
    with anyio.CancelScope(shield=True):
        await run_in_threadpool(events.close)


async def _answer_events(events: Iterator[AnswerEvent], chat: Chat) -> AsyncIterator[str]:
    """SSE data of one streamed answer."""
    try:
        yield chat.chunk({"role": "assistant", "content": ""})
        streamed, result = "", None
        while (event := await run_in_threadpool(next, events, None)) is not None:
            if isinstance(event, Token):
                streamed += event.text
                yield chat.chunk({"content": event.text})
            elif isinstance(event, Answered):
                result = event.result
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
        await _close(events)


async def _watch_disconnect(request: Request, scope: anyio.CancelScope) -> None:
    """Cancel ``scope`` as soon as the client of ``request`` disconnects (polled: a
    non-streaming request otherwise hears of it only when its response is sent)."""
    while not await request.is_disconnected():
        await anyio.sleep(DISCONNECT_POLL_SECONDS)
    scope.cancel()


async def result_while_connected(events: Iterator[AnswerEvent]) -> AnswerResult:
    """The non-streaming answer, stepped event by event in worker threads: cancelling it (the
    client left) stops the chain at the next step (a token of the LLM, at worst the prompt
    reading) and closes it, so the LLM lock and the slot are free again."""
    try:
        while (event := await run_in_threadpool(next, events, None)) is not None:
            if isinstance(event, Answered):
                return event.result
        raise RuntimeError("answer stream ended without a result")
    finally:
        await _close(events)


@asynccontextmanager
async def slot(gate: Gate):
    """Hold one of ``gate``'s slots (waiting in its bounded queue) for the block."""
    await gate.enter()
    try:
        yield
    finally:
        gate.leave()


def chat_routes(app: FastAPI, ctx, auth) -> None:
    """Add the chat completions route; ``ctx`` is the app's ``ApiContext``."""
    @app.post("/v1/chat/completions", tags=["openai"], dependencies=auth, description=CHAT_DESCRIPTION)
    async def chat_completions(body: ChatRequest, request: Request):
        kb = ctx.kb_for(body.model)
        where = ctx.where(body.metadata, "metadata")
        # Up to max_request_bytes of client text: parsed in a worker thread, not on the event loop.
        question, history = await run_in_threadpool(parse_chat, body.messages, ctx.settings)
        requested = body.max_completion_tokens or body.max_tokens
        if requested and requested > ctx.max_tokens_limit:
            raise ApiError(400, f"max_tokens 不能超过 {ctx.max_tokens_limit} / max_tokens must be at most "
                                f"{ctx.max_tokens_limit}", "max_tokens_too_large", "max_tokens")
        if body.n not in (None, 1):
            raise ApiError(400, "只支持 n=1 / only n=1 is supported", "unsupported_n", "n")
        chat = Chat(kb, ctx.model_id(kb), question, history,
                    bool(body.stream_options and body.stream_options.include_usage))

        def start() -> Iterator[AnswerEvent]:
            return ctx.answerer(kb).stream(question, history, max_tokens=requested, where=where)

        if body.stream:
            await ctx.chat_gate.enter()
            try:
                events = await run_in_threadpool(start)
            except BaseException:
                ctx.chat_gate.leave()
                raise
            # The response leaves the gate when the stream ends, however it ends (sse_starlette
            # cancels it when the client goes); a client that stops reading must not hold a slot.
            return _GatedEventSource(_answer_events(events, chat), ctx.chat_gate.leave, ping=15, send_timeout=30)
        result = None
        with anyio.CancelScope() as connected:  # cancelled by the watcher when the client leaves
            watcher = asyncio.create_task(_watch_disconnect(request, connected))
            try:
                async with slot(ctx.chat_gate):  # a client that leaves while queued leaves the queue
                    result = await result_while_connected(await run_in_threadpool(start))
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
