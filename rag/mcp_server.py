"""MCP server over the knowledge bases (``rag mcp``): ``create_mcp(settings) -> MCPServer``, a thin
adapter over ``rag.service.RagService`` (the same core as the CLI, the web UI and ``rag api``).

Tools (descriptions in Chinese and English; every result is structured: the SDK publishes the
return model as the tool's ``outputSchema`` and sends ``structuredContent`` plus the same JSON as text):

- ``search(query, k=5, kb=None, filters=None)`` → ``SearchResult``: the passages with their citation metadata
  (doc_id, title, section, page, character span) and per-channel scores (fused, dense, BM25), and
  the parts a compound question was split into (``Passage.parts`` points into them).
- ``ask(question, kb=None, backend=None, filters=None)`` → ``AskResult``: the verified answer with ``[n]``
  markers, the refusal flag, the citations with their quotes, and a notice (e.g. LLM unavailable).
- ``list_documents(kb=None)`` → ``DocumentList``: doc_id, title, date, metadata and chunk count per
  document, and the names of all knowledge bases.

``kb`` may name several KBs searched as one ("a,b": ``rag.multi_kb``; every passage and citation
names its KB); ``filters`` is a metadata filter (``rag.filters``: path prefix/glob, title, date
range, fields) applied inside the index search.

Arguments map one to one onto ``RagService`` calls.

Bounds as in ``rag api``: ``k`` in 1..50, a question of at most ``max_question_chars``. Embedding,
search and generation run in worker threads behind the API's bounded gates (``rag.api.guard.Gate``),
so concurrent calls never block the event loop; an answer is stepped event by event, so a
cancelled call stops its answer at the next step. Errors the caller can act on (unknown KB,
question too long, server busy) are tool errors (``isError``) carrying the bilingual message;
anything else is the SDK's generic tool error, with the traceback in the server log (stderr).
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Annotated, Literal

import anyio.to_thread
from mcp.server.mcpserver import MCPServer
from mcp.server.mcpserver.exceptions import ToolError
from mcp_types import ToolAnnotations
from pydantic import BaseModel, Field

from rag.api.app import default_concurrency
from rag.api.chat import result_while_connected, slot
from rag.api.guard import Gate
from rag.api.wire import ApiError
from rag.cite import Citation
from rag.cli_answer import question_error
from rag.config import Settings
from rag.filters import FilterError, Where
from rag.retrieve import Hit
from rag.service import LLMChoice, RagService
from rag.store import KnowledgeBaseError

MAX_K = 50
QUEUE_SIZE = 16  # calls that may wait for a slot (as in rag api); beyond it: a "busy" tool error
QUEUE_TIMEOUT = 60.0  # seconds a call may wait for a slot

INSTRUCTIONS = """本地中文文档知识库问答。Local Chinese document knowledge bases with verified citations.
- search: 检索原文片段（带出处和各通道分数）/ retrieve passages with sources and per-channel scores.
- ask: 基于文档回答并核对引用，查不到时拒答 / answer from the documents with checked [n] citations; refuses when the documents do not say.
- list_documents: 列出知识库中的文档 / list the documents (and the knowledge bases).
默认知识库 default knowledge base: {kb}."""

SEARCH_DESCRIPTION = (
    "在知识库中检索与问题最相关的原文片段（向量 + BM25 混合检索），返回每段的文档、标题、章节、页码、字符位置和各通道分数；"
    "复合问题会拆成几个子问题分别检索。\n"
    "Search a knowledge base (hybrid dense + BM25) for the passages most relevant to a query. Each passage "
    "comes with its document, title, section, page, character span and per-channel scores (fused, dense, "
    "BM25); a compound question is split into parts (listed in `parts`) and searched part by part.")
ASK_DESCRIPTION = (
    "根据知识库回答问题：答案中的每个 [n] 都经过核对，对应 citations 中的出处和原文引文；文档中没有答案时拒答（refused=true）。\n"
    "Answer a question from a knowledge base. Every [n] marker in the answer has been verified against "
    "the cited passage; `citations` gives each source with its exact quote. When the documents do not "
    "contain the answer, it refuses (refused=true) instead of guessing.")
LIST_DESCRIPTION = (
    "列出知识库中的文档（doc_id、标题、片段数）以及所有知识库的名称。\n"
    "List the documents of a knowledge base (doc_id, title, number of chunks) and the names of all "
    "knowledge bases.")

KbArg = Annotated[str | None, Field(description="知识库名，默认为服务器的 --kb；多个用逗号分隔，如 a,b / knowledge "
                                                "base name (default: the server's --kb); several searched as one: a,b")]


class Filters(BaseModel):
    """A metadata filter (``rag.filters.Where``): every given condition must hold."""

    path: str | list[str] | None = Field(None, description="文档路径前缀或通配（任一）/ document path prefix or glob "
                                                           "(any of them), e.g. news/ or *.pdf")
    title: str | None = Field(None, description="标题包含 title contains")
    date_from: str | None = Field(None, description="起始日期（含）/ from date, inclusive: 2024, 2024-05, 2024-05-01")
    date_to: str | None = Field(None, description="截止日期（含）/ to date, inclusive")
    fields: dict[str, str] | None = Field(None, description="其他字段等于 other fields equal (jsonl fields, front matter)")

    def where(self) -> Where:
        try:
            return Where.from_mapping(self.model_dump(exclude_none=True))
        except FilterError as exc:
            raise ToolError(str(exc)) from exc


FiltersArg = Annotated[Filters | None, Field(description="元数据过滤 metadata filter (optional)")]


class Passage(BaseModel):
    """One retrieved passage: where it comes from and how each channel ranked it."""

    number: int = Field(description="名次 rank, 1 = best")
    text: str
    doc_id: str
    title: str
    section: str = Field(description="章节路径 heading path")
    page: int | None = Field(description="PDF 页码 page (1-based) or null")
    start: int = Field(description="在原文中的起始字符位置 start offset in the document text")
    end: int
    chunk_id: int
    kb: str = Field(description="所在知识库 the knowledge base it is in")
    score: float = Field(description="融合分数 fused score")
    dense_rank: int | None = Field(description="向量检索名次 dense rank (null: not in its top)")
    dense_score: float | None
    bm25_rank: int | None = Field(description="BM25 名次 BM25 rank (null: not in its top)")
    bm25_score: float | None
    rerank_score: float | None = None
    parts: list[int] = Field(description="该片段服务的子问题下标 indices into SearchResult.parts")

    @classmethod
    def of(cls, number: int, hit: Hit) -> Passage:
        c = hit.chunk

        def num(x):
            return None if x is None else float(x)

        return cls(number=number, text=c.text, doc_id=c.doc_id, title=c.title, section=c.section,
                   page=c.page, start=c.start, end=c.end, chunk_id=c.id, kb=c.kb, score=float(hit.score),
                   dense_rank=hit.dense_rank, dense_score=num(hit.dense_score), bm25_rank=hit.bm25_rank,
                   bm25_score=num(hit.bm25_score), rerank_score=num(hit.rerank_score), parts=list(hit.parts))


class SearchResult(BaseModel):
    kb: str
    query: str
    parts: list[str] = Field(description="问题的子问题（单一问题时就是它本身）/ the question's parts ([query] if single)")
    method: str = Field(description="拆分方式 how it was split: single | rules")
    filters: dict = Field(default_factory=dict, description="所用的元数据过滤 the metadata filter applied")
    part_answers: list[str] = Field(default_factory=list, description=(
        "复合问题：大模型从各子问题前几段读出的简短答案，含它的段落排前（空：未预读）/ compound questions: "
        "the short answer the LLM read per part; passages holding it were moved up (empty: not probed)"))
    passages: list[Passage]


class AskResult(BaseModel):
    kb: str
    question: str
    query: str = Field(description="用于检索的独立问题 the standalone question used for retrieval")
    answer: str = Field(description="核对后的回答，带 [n] 引用 / verified answer with [n] markers")
    refused: bool = Field(description="文档中没有答案 the documents do not answer it")
    citations: list[Citation] = Field(description="[n] 对应的出处与原文引文 / the source and exact quote of each [n]")
    notice: str | None = Field(description="提示，如 LLM 不可用时改用抽取式回答 / e.g. LLM unavailable, extractive answer")
    backend: str
    parts: list[str] = Field(description="复合问题的子问题 the parts of a compound question (empty otherwise)")


class DocumentEntry(BaseModel):
    doc_id: str
    title: str
    chunks: int
    date: str | None = Field(None, description="文档日期 document date (ISO), what date filters compare")
    meta: dict = Field(default_factory=dict, description="元数据字段 metadata fields (jsonl / front matter)")


class DocumentList(BaseModel):
    kb: str
    knowledge_bases: list[str] = Field(description="所有知识库 every knowledge base on this server")
    documents: list[DocumentEntry]


@contextmanager
def _tool_errors():
    """Errors the caller can act on become tool errors with their bilingual message."""
    try:
        yield
    except KnowledgeBaseError as exc:  # unknown or invalid KB name, KB built with another embedder...
        raise ToolError(str(exc)) from exc
    except ApiError as exc:  # the gates: queue full / waited too long
        raise ToolError(exc.message) from exc


class RagTools:
    """The tools of one MCP server, over one ``RagService``.

    Args:
        service: the shared core (models, KBs); its ``settings`` give the default KB, the
            default answer backend and the input bounds.
    """

    def __init__(self, service: RagService):
        self.service = service
        self.settings = service.settings
        s = self.settings
        self.chat_gate = Gate("ask", default_concurrency(s.llm_backend, s.threads), QUEUE_SIZE, QUEUE_TIMEOUT)
        self.work_gate = Gate("search", max(1, s.threads), QUEUE_SIZE, QUEUE_TIMEOUT)

    def _question(self, text: str) -> str:
        text = text.strip()
        if not text:
            raise ToolError("问题为空 / empty question")
        if error := question_error(text, self.settings):
            raise ToolError(error)
        return text

    async def search(
        self,
        query: Annotated[str, Field(description="问题或关键词 question or keywords")],
        k: Annotated[int, Field(ge=1, le=MAX_K, description=f"返回的片段数 passages to return (1-{MAX_K})")] = 5,
        kb: KbArg = None,
        filters: FiltersArg = None,
    ) -> SearchResult:
        """See ``SEARCH_DESCRIPTION``.

        Args:
            query: the question (at most ``max_question_chars`` characters).
            k: passages to return.
            kb: knowledge base, or several ("a,b"; default: the server's).
            filters: metadata filter (default: none).
        """
        query = self._question(query)
        name = kb or self.settings.kb
        where = filters.where() if filters else Where()

        def run():
            answerer = self.service.answerer(name)  # unknown KB: KnowledgeBaseNotFound
            return answerer.searcher.name, answerer.retrieve(query, k, where=where)

        with _tool_errors():
            async with slot(self.work_gate):
                kb_name, found = await anyio.to_thread.run_sync(run)
        return SearchResult(kb=kb_name, query=found.query, parts=found.parts, method=found.method,
                            filters=where.to_dict(), part_answers=[a.answer for a in found.part_answers],
                            passages=[Passage.of(n, hit) for n, hit in enumerate(found.hits, 1)])

    async def ask(
        self,
        question: Annotated[str, Field(description="问题 the question")],
        kb: KbArg = None,
        backend: Annotated[Literal["local", "openai", "extractive"] | None, Field(
            description="回答方式，默认为服务器设置 / answer backend (default: the server's): local = 本地模型 "
                        "local LLM, openai = 配置的兼容接口 the configured OpenAI-compatible endpoint, "
                        "extractive = 直接摘录原文 sentences from the passages")] = None,
        filters: FiltersArg = None,
    ) -> AskResult:
        """See ``ASK_DESCRIPTION``.

        Args:
            question: the question (at most ``max_question_chars`` characters).
            kb: knowledge base (default: the server's).
            backend: answer backend (default: ``settings.llm_backend``); an OpenAI-compatible
                backend always uses the operator's configured endpoint and key.
            filters: metadata filter on the passages (default: none).
        """
        question = self._question(question)
        name = kb or self.settings.kb
        choice = LLMChoice(backend or self.settings.llm_backend)
        where = filters.where() if filters else Where()

        def start():
            answerer = self.service.answerer(name, choice)  # unknown KB: KnowledgeBaseNotFound
            return answerer.searcher.name, answerer.stream(question, where=where)

        with _tool_errors():
            async with slot(self.chat_gate):
                kb_name, events = await anyio.to_thread.run_sync(start)
                result = await result_while_connected(events)
        return AskResult(kb=kb_name, question=result.question, query=result.query, answer=result.answer,
                         refused=result.refused, citations=result.citations, notice=result.notice,
                         backend=result.backend, parts=result.parts)

    async def list_documents(self, kb: KbArg = None) -> DocumentList:
        """See ``LIST_DESCRIPTION``.

        Args:
            kb: knowledge base (default: the server's).
        """
        name = kb or self.settings.kb

        def run():
            checked = self.service.require(name)
            return checked, self.service.names(), self.service.documents(checked)

        with _tool_errors():
            kb_name, names, docs = await anyio.to_thread.run_sync(run)
        return DocumentList(kb=kb_name, knowledge_bases=names,
                            documents=[DocumentEntry(doc_id=d.doc_id, title=d.title, chunks=d.chunks, date=d.date,
                                                     meta={k: str(v) for k, v in d.meta.items()}) for d in docs])


def create_mcp(settings: Settings, service: RagService | None = None, log_level: str = "INFO") -> MCPServer:
    """The MCP server for the knowledge bases under ``settings.home``.

    Args:
        settings: configuration; ``kb`` is the default KB, ``llm_backend`` the default answer
            backend, ``max_question_chars`` and ``threads`` bound the calls.
        service: the core to serve (default: a new ``RagService(settings)``); the caller owns
            it and closes it after the server stops.
        log_level: the SDK's log level (its logs go to stderr: stdout is the stdio protocol).
    """
    tools = RagTools(service or RagService(settings))
    read_only = ToolAnnotations(read_only_hint=True, destructive_hint=False, idempotent_hint=True,
                                open_world_hint=False)
    mcp = MCPServer("rag-zh", title="中文文档问答 rag-zh", instructions=INSTRUCTIONS.format(kb=settings.kb),
                    log_level=log_level.upper())
    mcp.add_tool(tools.search, name="search", title="检索 Search", description=SEARCH_DESCRIPTION,
                 annotations=read_only)
    # Not idempotent: an LLM's answer may differ between calls.
    mcp.add_tool(tools.ask, name="ask", title="问答 Ask", description=ASK_DESCRIPTION,
                 annotations=read_only.model_copy(update={"idempotent_hint": False}))
    mcp.add_tool(tools.list_documents, name="list_documents", title="文档列表 List documents",
                 description=LIST_DESCRIPTION, annotations=read_only)
    return mcp
