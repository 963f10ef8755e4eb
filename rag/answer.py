"""Step 7 — answer: question in, grounded Chinese answer with verified citations out.

The chain (LCEL): rewrite a follow-up into a standalone question → hybrid
retrieve → pack numbered passages into the token budget → LLM → verify the
citations (``rag.cite``). Three backends: ``local`` (GGUF via llama.cpp),
``openai`` (any OpenAI-compatible endpoint) and ``extractive`` (no LLM: the best
supporting sentences, instantly; also the fallback when an LLM is unavailable).
"""
from __future__ import annotations

import re
import time
from dataclasses import asdict, dataclass, field
from typing import Iterator

from langchain_core.messages import AIMessage, HumanMessage, SystemMessage
from langchain_core.output_parsers import StrOutputParser
from langchain_core.prompts import ChatPromptTemplate, PromptTemplate
from langchain_core.runnables import RunnableLambda

from rag.clean import is_heading_line
from rag.align import align
from rag.followup import is_elliptical, resolve_followup
from rag.frame import question_frame
from rag.places import dominant_place
from rag.cite import Citation, best_quote, bigrams, locate, split_sentences, verify
from rag.config import PROJECT_ROOT, Settings
from rag.focus import focus, question_grams
from rag.judge import support_probability
from rag.zh import is_question
from rag.retrieve import Hit, Searcher
from rag.tokens import count_tokens

REFUSAL = "文档中没有找到相关信息"
_REFUSAL_PATTERNS = re.compile(r"文档中没有找到|没有找到相关信息|资料中没有|资料未提及|无法从资料|未提供相关信息|没有提到|未提及")
# Dense cosine of the best passage below which nothing is considered relevant. e5 cosines are
# compressed (unrelated Chinese text still scores ~0.75); measured on the shared sets (README).
MIN_DENSE_SCORE = 0.80
# What an answer to a "how long / how high / when ..." question usually contains: the extractive
# backend prefers sentences with these cues (and with a number) when the question asks for one.
_ANSWER_CUES = [
    (re.compile(r"多长|长度"), re.compile(r"长度|全长|总长|长约|千米|公里|米")),
    (re.compile(r"多高|高度|海拔"), re.compile(r"高度|海拔|高约|米")),
    (re.compile(r"多大|面积"), re.compile(r"面积|平方")),
    (re.compile(r"多久|多长时间"), re.compile(r"\d+\s*(?:年|个月|天|小时|分钟)")),
    (re.compile(r"哪年|哪一年|何时|什么时候|哪天"), re.compile(r"\d+\s*年|\d+\s*月|\d+\s*日")),
]
_QUANTITY_QUESTION = re.compile(r"多少|几|多长|多高|多大|多远|多久|多重|多宽|多深|哪年|何时|什么时候|比例|百分之")


@dataclass
class AnswerResult:
    """Everything the UI, API and evaluation need about one answer."""

    question: str
    query: str  # the standalone (rewritten) question used for retrieval
    answer: str  # text with verified [n] markers
    citations: list[Citation] = field(default_factory=list)
    sentences: list[dict] = field(default_factory=list)  # per-sentence verification
    refused: bool = False
    unsupported_sentences: int = 0
    passages: list[dict] = field(default_factory=list)  # the numbered passages shown ([1] = passages[0])
    backend: str = "extractive"
    notice: str | None = None  # e.g. "LLM unavailable, extractive answer"
    judge: float | None = None  # the LLM's probability that its answer is backed (None: not asked)
    timings: dict[str, float] = field(default_factory=dict)  # ms: rewrite, retrieve, first_token, total

    def to_dict(self) -> dict:
        return asdict(self)

    def sources_text(self) -> str:
        """Numbered sources block, readable in any terminal or chat client."""
        lines = []
        for c in self.citations:
            where = " · ".join(x for x in (c.title or c.doc_id, c.section, f"第{c.page}页" if c.page else "") if x)
            lines.append(f"[{c.number}] {where}\n    「{c.quote}」")
        return "\n".join(lines)


def passage_context(hit: Hit) -> str:
    """What a passage is about besides its text: document title and section path."""
    return f"{hit.chunk.title or ''} {hit.chunk.section or ''}".strip()


def load_prompt(name: str) -> str:
    return (PROJECT_ROOT / "prompts" / f"{name}.txt").read_text(encoding="utf-8")


def is_refusal(text: str) -> bool:
    return bool(_REFUSAL_PATTERNS.search(text))


class Answerer:
    """Answers questions over one knowledge base.

    Args:
        settings: configuration (KB, backend, token budget...).
        searcher: an open ``Searcher`` to share (built from settings when omitted).
        models: a shared ``{backend: chat model}`` cache (one LLM in memory for many KBs).
    """

    def __init__(self, settings: Settings, searcher: Searcher | None = None, models: dict | None = None):
        self.settings = settings
        self.searcher = searcher or Searcher(settings)
        # Chat models by backend; pass one dict to several Answerers so they share one loaded LLM.
        self._models: dict[str, object] = models if models is not None else {}
        system, answer = load_prompt("system"), load_prompt("answer")
        self.answer_prompt = ChatPromptTemplate.from_messages([("system", system), ("human", answer)])
        self._instruction_tokens = count_tokens(system + answer)  # read once, not per question
        self.passage_prompt = PromptTemplate.from_template(load_prompt("passage"))
        self.rewrite_prompt = ChatPromptTemplate.from_messages([("human", load_prompt("rewrite"))])
        self.judge_prompt = load_prompt("judge").strip()
        self._doc_places: dict[str, str | None] = {}  # doc id → the place it is about (rag.align)

    def place_of(self, hit: Hit) -> str | None:
        """The place a passage's document is about (``rag.places.dominant_place``), cached per document."""
        doc_id = hit.chunk.doc_id
        if doc_id not in self._doc_places:
            doc = self.searcher.kb.document_text(doc_id)
            if len(self._doc_places) > 256:
                self._doc_places.clear()
            self._doc_places[doc_id] = dominant_place(doc[1]) if doc else None
        return self._doc_places[doc_id]

    # ------------------------------------------------------------ pieces
    def chat_model(self, backend: str):
        """The LangChain chat model of a backend (loaded once and reused)."""
        if backend not in self._models:
            from rag.llm import check_openai_endpoint, make_chat_model

            if backend == "openai":
                check_openai_endpoint(self.settings)
            self._models[backend] = make_chat_model(self.settings, backend)
        return self._models[backend]

    def judge(self, backend: str, messages, answer: str) -> float | None:
        """The model's probability that ``answer`` is backed by the passages (``rag.judge``);
        None when the backend gives no probabilities or the call fails (the verifier's word stands)."""
        try:
            return support_probability(self.chat_model(backend), messages, answer, self.judge_prompt)
        except Exception:
            return None

    def rewrite(self, question: str, history: list[dict], backend: str) -> str:
        """Standalone version of a follow-up question (unchanged without history).

        A follow-up that only names a new place, year or organisation ("那宜昌呢?") is the
        previous question about the new one (``rag.followup.resolve_followup``), for every
        backend and without an LLM call; anything else goes to the LLM's rewrite prompt.
        """
        turns = [m for m in history if m.get("role") in ("user", "assistant") and m.get("content")]
        if not turns:
            return question
        previous = ""
        for m in turns:  # the previous user question made standalone by the same rule
            if m["role"] == "user":
                previous = resolve_followup(str(m["content"]), previous) if previous else str(m["content"])
                previous = previous or str(m["content"])
        substituted = resolve_followup(question, previous) if previous else None
        if substituted:
            return substituted
        if backend == "extractive":
            if not is_elliptical(question):
                return question  # a question that stands on its own is not mixed with the last one
            # No LLM: carry the previous question's words so the retriever keeps the topic.
            # The follow-up's places, years and organisations replace the previous question's.
            kinds = {c.kind for c in question_frame(question).constraints}
            for c in question_frame(previous).constraints:
                if c.kind in kinds:
                    previous = previous.replace(c.text, "")
            return f"{previous} {question}".strip()
        transcript = "\n".join(
            f"{'用户' if m['role'] == 'user' else '助手'}：{str(m['content'])[:300]}" for m in turns[-6:]
        )
        chain = self.rewrite_prompt | self.chat_model(backend).bind(max_tokens=96) | StrOutputParser()
        rewritten = chain.invoke({"history": transcript, "question": question}).strip().splitlines()
        rewritten = rewritten[0].strip() if rewritten else ""
        return rewritten.strip("“”\"' ") or question

    def pack(self, hits: list[Hit], query: str = "") -> tuple[list[Hit], str]:
        """Number the passages that fit the token budget, each focused on the sentences that
        bear on ``query`` (``rag.focus``); never cut a sentence in the middle."""
        s = self.settings
        budget = min(s.llm_passage_tokens, s.llm_context - s.llm_max_tokens
                     - self._instruction_tokens - 64)
        chosen, parts, used = [], [], 0
        for hit in hits:
            if len(chosen) >= s.llm_passages:
                break
            c = hit.chunk
            body = focus(c.text, query, s.llm_focus_tokens) if query and s.llm_focus_tokens else c.text
            text = self.passage_prompt.format(
                number=len(chosen) + 1, title=c.title or c.doc_id, section=f"（{c.section}）" if c.section else "",
                text=body)
            cost = count_tokens(text)
            if used + cost > budget:
                continue  # a later, shorter passage may still fit
            chosen.append(hit)
            parts.append(text)
            used += cost
        return chosen, "\n\n".join(parts)

    def citations_for(self, numbers: list[int], sentences, hits: list[Hit]) -> list[Citation]:
        citations = []
        for n in numbers:
            c = hits[n - 1].chunk
            quotes = {best_quote(s.text, c.text) for s in sentences if n in s.cited}
            found = [(c.text.find(q), q) for q in quotes if c.text.find(q) >= 0]
            if found:  # one contiguous quote covering every sentence this passage supports
                first = min(at for at, _ in found)
                quote = c.text[first:max(at + len(q) for at, q in found)]
            else:
                quote = c.text[:80]
            span = None
            doc = self.searcher.kb.document_text(c.doc_id)
            if doc:
                span = locate(doc[1], c.start, c.end, quote)
            citations.append(Citation(n, c.id, c.doc_id, c.title, c.section, c.page, c.start, c.end, quote,
                                      span[0] if span else None, span[1] if span else None))
        return citations

    def extractive_answer(self, query: str, hits: list[Hit]) -> str:
        """Best supporting sentences from the top passages, with their [n]."""
        q = question_grams(query)
        cues = [cue for asked, cue in _ANSWER_CUES if asked.search(query)]
        wants_number = bool(_QUANTITY_QUESTION.search(query))
        frame = question_frame(query)
        scored = []
        for n, hit in enumerate(hits[:3], 1):
            context, place = passage_context(hit), self.place_of(hit)
            for sentence in split_sentences(hit.chunk.text):
                grams = bigrams(sentence)
                # A title line or a question is not an answer, nor a sentence about another
                # place, year or subject than the one asked (the verifier's alignment rule).
                if grams and not is_heading_line(sentence) and not is_question(sentence) \
                        and align(sentence, hit.chunk.text, frame, context, place).aligned:
                    coverage = len(q & grams) / max(1, len(q))
                    # A coverage tie is broken by the kind of answer asked for, then by passage rank.
                    bonus = 0.05 * (wants_number and bool(re.search(r"\d", sentence))) \
                        + 0.1 * any(cue.search(sentence) for cue in cues)
                    scored.append((coverage + bonus if coverage else 0.0, -n, sentence.strip(), n))
        scored.sort(reverse=True)
        if not scored or scored[0][0] < 0.2:
            return REFUSAL
        best = [s for s in scored[:2] if s[0] >= 0.6 * scored[0][0]]
        return "".join(re.sub(r"([。！？!?；;]?)$", rf"[{n}]\1", text, count=1) for _, _, text, n in best)

    # ------------------------------------------------------------ the whole thing
    def stream(self, question: str, history: list[dict] | None = None, backend: str | None = None,
               k: int | None = None) -> Iterator[dict]:
        """Answer, yielding events: ``{"type": "query"|"passages"|"token"|"final", ...}``.

        Args:
            question: the user's question.
            history: earlier turns as ``[{"role": "user"|"assistant", "content": str}]``.
            backend: ``local``, ``openai`` or ``extractive`` (settings default when None).
            k: passages to retrieve.
        """
        started = time.perf_counter()
        backend = backend or self.settings.llm_backend
        timings: dict[str, float] = {}
        notice = None
        try:
            query = self.rewrite(question, history or [], backend)
        except Exception as exc:  # the LLM is down: keep answering without it
            notice = f"大模型不可用，已改用抽取式回答 / LLM unavailable, extractive answer ({exc})"
            backend, query = "extractive", self.rewrite(question, history or [], "extractive")
        timings["rewrite"] = (time.perf_counter() - started) * 1000
        yield {"type": "query", "query": query}
        t = time.perf_counter()
        hits = self.searcher.search(query, k or self.settings.top_k)
        timings["retrieve"] = (time.perf_counter() - t) * 1000
        hits, context = self.pack(hits, query)
        passages = [dict(h.to_dict(), number=i) for i, h in enumerate(hits, 1)]
        yield {"type": "passages", "passages": passages}

        relevant = bool(hits) and max((h.dense_score or 0.0) for h in hits) >= MIN_DENSE_SCORE
        text = ""
        messages = None
        if not relevant:
            text = REFUSAL
        elif backend == "extractive":
            text = self.extractive_answer(query, hits)
            timings["first_token"] = (time.perf_counter() - started) * 1000
            yield {"type": "token", "text": text}
        else:
            try:
                model = self.chat_model(backend)
                messages = self.answer_prompt.format_messages(context=context, question=query)
                for chunk in model.stream(messages):
                    piece = chunk.content if isinstance(chunk.content, str) else ""
                    if piece:
                        timings.setdefault("first_token", (time.perf_counter() - started) * 1000)
                        text += piece
                        yield {"type": "token", "text": piece}
            except Exception as exc:
                notice = f"大模型出错，已改用抽取式回答 / LLM failed, extractive answer ({exc})"
                backend, text = "extractive", self.extractive_answer(query, hits)
                yield {"type": "token", "text": text}
        refused = is_refusal(text) or not text.strip()
        result = AnswerResult(question, query, REFUSAL if refused else text, backend=backend, notice=notice,
                              passages=passages, refused=refused)
        if not refused:
            check = verify(text, [h.chunk.text for h in hits], question=query,
                           contexts=[passage_context(h) for h in hits], places=[self.place_of(h) for h in hits])
            if not check.used_numbers:
                # Not one sentence is supported by the passages: an invented answer is worse than none.
                result.answer, result.refused = REFUSAL, True
                result.sentences = [asdict(s) for s in check.sentences]
                result.notice = result.notice or f"回答没有资料支持，已拒答 / unsupported answer withheld: {text.strip()[:200]}"
            else:
                result.answer = check.answer
                result.sentences = [asdict(s) for s in check.sentences]
                result.unsupported_sentences = check.unsupported
                result.citations = self.citations_for(check.used_numbers, check.sentences, hits)
                if backend != "extractive" and messages is not None and self.settings.llm_judge_threshold > 0:
                    result.judge = self.judge(backend, messages, text)
                    threshold = self.settings.llm_judge_threshold
                    if result.judge is not None and result.judge < threshold:
                        result.notice = result.notice or (
                            f"模型判断资料不支持该回答（{result.judge:.2f} < {threshold}），已拒答 / the model "
                            f"judged its answer unsupported, withheld: {text.strip()[:200]}")
                        result.answer, result.refused, result.citations = REFUSAL, True, []
        timings["total"] = (time.perf_counter() - started) * 1000
        result.timings = timings
        yield {"type": "final", "result": result}

    def ask(self, question: str, history: list[dict] | None = None, backend: str | None = None,
            k: int | None = None) -> AnswerResult:
        """Answer without streaming."""
        for event in self.stream(question, history, backend, k):
            if event["type"] == "final":
                return event["result"]
        raise RuntimeError("answer stream ended without a result")

    def as_runnable(self) -> RunnableLambda:
        """The whole chain as one LCEL runnable: ``{"question", "history"?, "backend"?}`` → ``AnswerResult``."""
        return RunnableLambda(lambda x: self.ask(x["question"], x.get("history"), x.get("backend"), x.get("k")))


def history_messages(history: list[dict]):
    """OpenAI-style history → LangChain messages (for callers that need them)."""
    kinds = {"user": HumanMessage, "assistant": AIMessage, "system": SystemMessage}
    return [kinds[m["role"]](content=m["content"]) for m in history if m.get("role") in kinds]


def make_answer_fn(settings: Settings, backend: str | None = None, searcher: Searcher | None = None):
    """``(question, history=None) -> dict`` for ``rag eval``: the answer, refusal flag, citations
    with their passage text (so the evaluator can check them against gold answers), the model's
    raw text before verification, the per-sentence checks, the passages with their title and
    section (so a verifier change can be re-scored from the log), and timings."""
    answerer = Answerer(settings, searcher)

    def answer(question: str, history: list[dict] | None = None) -> dict:
        raw = {"text": ""}
        result = None
        for event in answerer.stream(question, history, backend=backend):
            if event["type"] == "token":
                raw["text"] += event["text"]
            elif event["type"] == "final":
                result = event["result"]
        passages = {p["number"]: p["text"] for p in result.passages}
        return {
            "answer": result.answer,
            "raw_answer": raw["text"],
            "refused": result.refused,
            "backend": result.backend,
            "notice": result.notice,
            "query": result.query,
            "citations": [{"number": c.number, "doc_id": c.doc_id, "quote": c.quote,
                           "passage": passages.get(c.number, "")} for c in result.citations],
            "sentences": len(result.sentences),
            "checks": [{k: s[k] for k in ("text", "cited", "supported", "reason")} for s in result.sentences],
            "passages": [{"number": p["number"], "doc_id": p["doc_id"], "text": p["text"],
                          "context": f"{p.get('title') or ''} {p.get('section') or ''}".strip(),
                          "dense_score": p.get("dense_score")} for p in result.passages],
            "judge": result.judge,
            "unsupported_sentences": result.unsupported_sentences,
            "timings": result.timings,
        }

    return answer
