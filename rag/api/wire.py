"""The OpenAI wire format of ``rag api``: error objects, request bodies, and reading chat
messages (bounded, linear time) and writing answers (sources block, extra fields, usage)."""
from __future__ import annotations

from typing import Any, Literal

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

from rag.answer_types import AnswerResult
from rag.config import Settings
from rag.tokens import count_tokens


SOURCES_WORD = "来源"
VERIFIED_HEADING = "核对后的回答 verified answer:"
SOURCES_HEADING = "来源 Sources:"


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


def install_error_handlers(app: FastAPI) -> None:
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
    metadata: dict[str, Any] | None = Field(None, description="metadata filter on the passages (rag.filters): "
                                            '{"path", "title", "date_from", "date_to", "fields": {...}}')


class SearchRequest(BaseModel):
    query: str = Field(min_length=1, description="at most RAG_MAX_QUESTION_CHARS characters")
    kb: str | None = Field(None, description="KB name, rag-<kb>, or several: a+b; default: the server's --kb")
    k: int = Field(5, ge=1, le=50)
    mode: Literal["hybrid", "dense", "bm25"] = "hybrid"
    filters: dict[str, Any] | None = Field(None, description='metadata filter: {"path": "news/" | ["a/", "*.pdf"], '
                                           '"title": "…", "date_from": "2024-01", "date_to": "2024-06", '
                                           '"fields": {"source": "…"}} or {"where": ["title~…", …]}')


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


def bad_request(code: str, param: str, zh: str, en: str) -> ApiError:
    return ApiError(400, f"{zh} / {en}", code, param)


def check_messages(messages: list[ChatMessage], settings: Settings) -> None:
    """The input bounds of a chat request (400 with an OpenAI-style error when broken): at most
    ``max_messages`` messages, each at most ``max_message_chars`` characters, and every user
    message, the question and the earlier ones, at most ``max_question_chars`` (earlier questions
    are read like the question itself when a follow-up is rewritten)."""
    if len(messages) > settings.max_messages:
        raise bad_request("too_many_messages", "messages", f"消息太多（{len(messages)} 条，最多 "
                           f"{settings.max_messages} 条），请删减对话历史",
                           f"too many messages ({len(messages)}, at most {settings.max_messages}): "
                           f"shorten the conversation history")
    for i, m in enumerate(messages):
        text = message_text(m.content)
        if len(text) > settings.max_message_chars:
            raise bad_request("message_too_long", f"messages.{i}.content",
                               f"第 {i + 1} 条消息太长（{len(text)} 字，最多 {settings.max_message_chars} 字）",
                               f"message {i} is too long ({len(text)} characters, at most "
                               f"{settings.max_message_chars})")
        size = len(text.strip())
        if m.role == "user" and size > settings.max_question_chars:
            last = i == len(messages) - 1
            raise bad_request("question_too_long", "messages" if last else f"messages.{i}.content",
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
            kb = c.kb if len(result.kbs) > 1 else ""  # several KBs searched: each citation names its own
            where = " · ".join(x for x in (kb, doc, c.section, f"第{c.page}页" if c.page else "") if x)
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
