"""What the answer chain yields: typed events while it runs, one ``AnswerResult`` at the end.

Every front end (CLI, web UI, HTTP API, eval runner, MCP) reads these same types; nobody
parses ``{"type": ...}`` dicts. ``eval_record`` is the one conversion of a result into the
record ``rag eval`` scores and logs, used by the CLI's and the UI's eval runs alike.

LCEL adds streamed chunks to get a step's ``invoke`` output; for these events the sum of
a stream is its last item (``__add__`` returns the right operand), so ``chain.invoke``
returns the final ``Answered`` while ``chain.stream`` yields every event.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field

from rag.answer_probe import PartAnswer
from rag.cite import Citation


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
    raw_answer: str = ""  # the model's text before verification (what the eval log keeps)
    parts: list[str] = field(default_factory=list)  # the question's parts when it asks several things
    # per part, the short answer the LLM read in its best passages before the merge (rag.answer_probe)
    part_answers: list[PartAnswer] = field(default_factory=list)
    kbs: list[str] = field(default_factory=list)  # the knowledge bases searched (several: citations name theirs)
    filters: dict = field(default_factory=dict)  # the metadata filter applied (``rag.filters``), if any

    def to_dict(self) -> dict:
        data = asdict(self)
        data["part_answers"] = [a.to_dict() for a in self.part_answers]  # JSON-ready (no chunk keys)
        return data

    def sources_text(self) -> str:
        """Numbered sources block, readable in any terminal or chat client."""
        lines = []
        for c in self.citations:
            kb = c.kb if len(self.kbs) > 1 else ""
            where = " · ".join(x for x in (kb, c.title or c.doc_id, c.section, f"第{c.page}页" if c.page else "") if x)
            lines.append(f"[{c.number}] {where}\n    「{c.quote}」")
        return "\n".join(lines)


class _LastWins:
    """LCEL sums a step's streamed chunks for ``invoke``: the sum of events is the last one."""

    def __add__(self, other):
        return other


@dataclass(frozen=True)
class Rewritten(_LastWins):
    """The standalone question retrieval uses (a follow-up rewritten with the history)."""

    query: str


@dataclass(frozen=True)
class Probing(_LastWins):
    """A compound question's parts, before the LLM reads each part's answer (``rag.answer_probe``):
    seconds with a local model, so a front end can say what is happening."""

    parts: list[str]


@dataclass(frozen=True)
class Retrieved(_LastWins):
    """The numbered passages given to the model (``[1]`` = ``passages[0]``)."""

    passages: list[dict]
    parts: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class Token(_LastWins):
    """A piece of the model's answer as it is generated (not yet verified)."""

    text: str


@dataclass(frozen=True)
class Drafted(_LastWins):
    """The model's whole answer before verification, and the backend that wrote it."""

    text: str
    backend: str


@dataclass(frozen=True)
class Answered(_LastWins):
    """The verified answer: the last event of every run."""

    result: AnswerResult


AnswerEvent = Rewritten | Probing | Retrieved | Token | Drafted | Answered


def eval_record(result: AnswerResult) -> dict:
    """The record ``rag eval`` scores and logs for one answer.

    It holds the answer, the refusal flag, the citations with the text of their passage (so
    the evaluator can check them against gold quotes), the model's raw text, the
    per-sentence checks, and the passages with their title and section (so a verifier change
    can be re-scored from the log), plus the timings.
    """
    passages = {p["number"]: p["text"] for p in result.passages}
    return {
        "answer": result.answer,
        "raw_answer": result.raw_answer,
        "refused": result.refused,
        "backend": result.backend,
        "notice": result.notice,
        "query": result.query,
        "parts": result.parts,
        "part_answers": [a.answer for a in result.part_answers],
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
