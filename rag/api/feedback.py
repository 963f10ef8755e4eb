"""``POST /v1/feedback``: store a 👍/👎 (with an optional comment, corrected answer or "should
have refused") on an answer, in the answering KB's SQLite (``rag.feedback``).

Body: ``{model | kb, question, answer, query?, citations? [{number, doc_id, quote}], backend?,
refused?, vote: "up"|"down", comment?, correction?, should_refuse?}``; returns ``{"id", "object":
"feedback", "kb"}``. 404 for an unknown KB; 400 for text past the bounds (the question
``max_question_chars``, every other text ``max_message_chars``) or a contradictory body.
A cheap write: no slot, but the SQLite write runs in a worker thread.
"""
from __future__ import annotations

from typing import Literal

from fastapi import FastAPI
from pydantic import BaseModel, Field
from starlette.concurrency import run_in_threadpool

from rag.api.wire import ApiError, bad_request
from rag.feedback import FeedbackEntry
from rag.service import KnowledgeBaseNotFound
from rag.store import KnowledgeBaseBusyError

MAX_CITATIONS = 64


class FeedbackCitationBody(BaseModel):
    number: int = Field(ge=0)
    doc_id: str = Field(min_length=1)
    quote: str = ""
    kb: str | None = Field(None, description="the citation's KB (answers over several KBs name it)")


class FeedbackRequest(BaseModel):
    model: str | None = None
    kb: str | None = None
    question: str = Field(min_length=1)
    answer: str = ""
    query: str = ""
    citations: list[FeedbackCitationBody] = Field(default_factory=list, max_length=MAX_CITATIONS)
    backend: str = Field("", max_length=64)
    refused: bool = False
    vote: Literal["up", "down"]
    comment: str = ""
    correction: str = ""
    should_refuse: bool = False


def _check_bounds(body: FeedbackRequest, settings) -> None:
    limit = settings.max_question_chars
    for name in ("question", "query"):
        if len(getattr(body, name)) > limit:
            raise bad_request("question_too_long", name, f"{name} 太长（{len(getattr(body, name))} 字，最多 {limit} 字）",
                              f"{name} too long ({len(getattr(body, name))} characters, at most {limit})")
    limit = settings.max_message_chars
    texts = [("answer", body.answer), ("comment", body.comment), ("correction", body.correction)]
    texts += [(f"citations.{i}.quote", c.quote) for i, c in enumerate(body.citations)]
    texts += [(f"citations.{i}.doc_id", c.doc_id) for i, c in enumerate(body.citations)]
    for name, text in texts:
        if len(text) > limit:
            raise bad_request("input_too_long", name, f"{name} 太长（{len(text)} 字，最多 {limit} 字）",
                              f"{name} too long ({len(text)} characters, at most {limit})")


def feedback_routes(app: FastAPI, ctx, auth) -> None:
    """Add ``POST /v1/feedback``; ``ctx`` is the app's ``ApiContext``."""

    @app.post("/v1/feedback", tags=["rag"], dependencies=auth)
    async def feedback(body: FeedbackRequest):
        """Store a vote on an answer (👍/👎, comment, corrected answer, should have refused) in its KB;
        `rag feedback export` turns the votes into an eval question set."""
        if body.model and body.kb:
            raise ApiError(400, "model 与 kb 只能给一个 / give model or kb, not both", "invalid_request", "kb")
        param = "kb" if body.kb else "model"
        kb = ctx.kb_for(body.kb or body.model or ctx.settings.kb, param)
        if "+" in kb:  # an answer over several KBs: stored with its first citation's KB (else the first KB)
            chosen = kb.split("+")
            kb = next((c.kb for c in body.citations if c.kb in chosen), chosen[0])
        _check_bounds(body, ctx.settings)
        try:
            entry = FeedbackEntry(question=body.question, answer=body.answer, vote=body.vote, query=body.query,
                                  citations=[c.model_dump() for c in body.citations], backend=body.backend,
                                  refused=body.refused, comment=body.comment, correction=body.correction,
                                  should_refuse=body.should_refuse)
        except ValueError as exc:
            raise ApiError(400, str(exc), "invalid_feedback") from exc
        try:
            feedback_id = await run_in_threadpool(ctx.service.add_feedback, kb, entry)
        except KnowledgeBaseNotFound as exc:  # removed meanwhile
            raise ApiError(404, str(exc), "model_not_found", param) from exc
        except KnowledgeBaseBusyError as exc:
            raise ApiError(503, str(exc), "knowledge_base_busy", headers={"Retry-After": "5"}) from exc
        return {"id": feedback_id, "object": "feedback", "kb": kb}
