"""OpenAI-compatible HTTP API over the answer chain (``rag api``): ``create_app(settings) -> FastAPI``,
a thin adapter over ``rag.service.RagService``.

Endpoints (everything under ``/v1`` needs ``Authorization: Bearer <RAG_API_KEY>`` when a key is set):

- ``POST /v1/chat/completions``: the answer chain, streaming (SSE) or not. ``model`` picks the
  knowledge base (``rag-<kb>``); earlier user/assistant turns in ``messages`` are the history
  used to rewrite a follow-up question. System messages are ignored: the grounded prompt is ours.
- ``GET /v1/models``, ``GET /v1/models/{id}``: one model ``rag-<kb>`` per knowledge base in ``settings.home``.
- ``POST /v1/search``: ``{"query", "kb"?, "k"?, "mode"?}`` → hits with per-channel ranks and scores.
- ``POST /v1/embeddings``: OpenAI shape, computed by the knowledge base's embedder. Extension:
  ``input_type`` = ``"passage"`` (default) or ``"query"`` (e5 models embed the two differently).
- ``POST /v1/feedback``: 👍/👎 on an answer (with a comment, a correction or "should have refused"),
  stored in the KB (``rag.feedback``; ``rag feedback export`` turns it into an eval set).
- ``GET /healthz`` (no auth), ``GET /docs`` (OpenAPI UI).

Extra fields of a chat completion (the last chunk of a stream carries them too; clients that
do not know them ignore them):

- ``citations``: the verified citations ``[{number, chunk_id, doc_id, title, section, page,
  start, end, quote, quote_start, quote_end}]``; ``number`` is the ``[n]`` in the text.
- ``rag``: ``{kb, question, query (the rewritten question used for retrieval), answer (verified
  text without the sources block), refused, backend, notice, unsupported_sentences, sentences,
  passages (numbered as in the text, with dense/BM25 ranks and scores), timings (ms), raw_answer (the
  model's text before verification), parts (the parts of a compound question; empty otherwise), judge}``.

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

from rag.api.app import MODEL_PREFIX, ApiContext, create_app, default_concurrency
from rag.api.guard import Gate, Guard
from rag.api.wire import ApiError, ChatMessage, split_messages
from rag.netguard import check_bind, is_loopback

__all__ = ["MODEL_PREFIX", "ApiContext", "ApiError", "ChatMessage", "Gate", "Guard", "check_bind",
           "create_app", "default_concurrency", "is_loopback", "split_messages"]
