"""Evaluation questions and what counts as relevant (``rag eval``).

Two formats, one JSON object per line: gold by document id (``gold_ids``, ``gold_groups``)
and gold by quote (``gold_docs`` + ``gold_quotes``, matched against a chunk's span of the
original text, whitespace ignored); ``type == "negative"`` or no gold marks an unanswerable
question; ``history`` holds the earlier turns of a follow-up.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from rag import metrics as M


KS = (1, 3, 5, 10)
DEPTH = 10  # chunks retrieved per question for the metrics (at least -k)
_WS = re.compile(r"\s+")


# ----------------------------------------------------------------------------- questions
@dataclass
class Question:
    """One evaluation question in either gold format (see module docstring)."""

    id: str
    question: str
    type: str = ""
    answers: list[str] = field(default_factory=list)
    answer_parts: list[list[str]] = field(default_factory=list)
    gold_ids: list[str] = field(default_factory=list)
    gold_groups: list[list[str]] = field(default_factory=list)
    negative_ids: list[str] = field(default_factory=list)
    gold_docs: list[str] = field(default_factory=list)
    gold_quotes: list[str] = field(default_factory=list)
    # Earlier chat turns of a follow-up question: [{"role": "user"|"assistant", "content": str}].
    history: list[dict] = field(default_factory=list)

    @property
    def by_quote(self) -> bool:
        return bool(self.gold_quotes)

    @property
    def negative(self) -> bool:
        """Unanswerable: typed ``negative`` or without any gold."""
        return self.type == "negative" or not (self.gold_ids or self.gold_quotes or self.gold_docs)

    @property
    def gold_units(self) -> list[str]:
        """What recall counts: gold ids, or gold quotes (by index) for the quote format."""
        if self.by_quote:
            return [f"q{i}" for i in range(len(self.gold_quotes))]
        return list(dict.fromkeys(self.gold_ids or self.gold_docs))

    @property
    def parts(self) -> list[list[str]]:
        """Answer parts; a flat ``answers`` list counts as one part with aliases."""
        if self.answer_parts:
            return self.answer_parts
        return [self.answers] if self.answers else []

    def gold_summary(self) -> str:
        if self.negative:
            return "(无答案 unanswerable)"
        if self.by_quote:
            quotes = " ".join(f"「{q}」" for q in self.gold_quotes)
            return f"{', '.join(self.gold_docs)}: {quotes}" if self.gold_docs else quotes
        ids = self.gold_ids or self.gold_docs
        return ", ".join(ids[:4]) + (f" (+{len(ids) - 4})" if len(ids) > 4 else "")

    @classmethod
    def from_dict(cls, row: dict) -> "Question":
        def strs(key):
            return [str(x) for x in row.get(key) or []]

        if "id" not in row or "question" not in row:
            raise ValueError(f"question needs 'id' and 'question': {json.dumps(row, ensure_ascii=False)[:120]}")
        return cls(
            id=str(row["id"]), question=str(row["question"]), type=str(row.get("type") or ""),
            answers=strs("answers"),
            answer_parts=[[str(a) for a in part] for part in row.get("answer_parts") or []],
            gold_ids=strs("gold_ids"), gold_groups=[[str(x) for x in g] for g in row.get("gold_groups") or []],
            negative_ids=strs("negative_ids"), gold_docs=strs("gold_docs"), gold_quotes=strs("gold_quotes"),
            history=[{"role": str(m.get("role")), "content": str(m.get("content") or "")}
                     for m in row.get("history") or [] if isinstance(m, dict)],
        )

    @property
    def search_query(self) -> str:
        """What retrieval-only evaluation searches: a follow-up made standalone by the rule the
        answer step applies first (``rag.followup.resolve_followup``), else the question itself."""
        from rag.followup import resolve_followup

        previous = next((m["content"] for m in reversed(self.history) if m["role"] == "user"), "")
        return (resolve_followup(self.question, previous) if previous else None) or self.question


class UnreviewedDrafts(ValueError):
    """A question file still holding drafted questions nobody has accepted (``rag eval-gen``)."""


def load_questions(path: Path, limit: int | None = None) -> list[Question]:
    """Read a questions JSONL file (either format); ``limit`` keeps the first N.

    Raises:
        UnreviewedDrafts: a row carries a ``status`` other than ``"accepted"`` (a ``rag eval-gen``
            draft not yet reviewed, or one rejected in review). The whole file is refused rather
            than those rows skipped: metrics over the reviewed part of a set would pass for the set's.
    """
    questions = []
    seen = set()
    unreviewed: dict[str, list[int]] = {}
    with Path(path).open(encoding="utf-8-sig") as fh:
        for line_no, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                status = row.get("status") if isinstance(row, dict) else None
                if status not in (None, "", "accepted"):
                    unreviewed.setdefault(str(status), []).append(line_no)
                    continue
                q = Question.from_dict(row)
            except ValueError as exc:
                raise ValueError(f"{path}:{line_no}: {exc}") from exc
            if q.id in seen:
                raise ValueError(f"{path}:{line_no}: duplicate question id {q.id!r}")
            seen.add(q.id)
            questions.append(q)
            if limit and len(questions) >= limit:
                break
    if unreviewed:
        counts = "，".join(f"{len(lines)} 条 status={status}（第 {lines[0]} 行起）" for status, lines in unreviewed.items())
        raise UnreviewedDrafts(
            f"{path}: 含未审核或已拒绝的草稿：{counts}。草稿须先审核：界面“评测 → 审核草稿”载入此文件逐条接受或拒绝，"
            f"再“保存已接受的题目”得到可运行的题集 / holds rows not accepted in review "
            f"({', '.join(f'{len(v)} {k}' for k, v in unreviewed.items())}): review them in the UI "
            f"(评测 → 审核草稿) and run the saved accepted set")
    return questions


# ----------------------------------------------------------------------------- relevance
def _squash(text: str) -> str:
    return _WS.sub("", text)


def doc_matches(doc_id: str, gold: str) -> bool:
    """A KB document id matches a gold id exactly or as a path suffix
    (``seeds/000_x.txt`` matches gold ``000_x.txt`` when a folder was ingested)."""
    return doc_id == gold or doc_id.endswith("/" + gold)


class Judge:
    """Decides which gold units a retrieved chunk covers.

    Args:
        document_text: ``doc_id -> (title, original text)`` (``KnowledgeBase.document_text``);
            needed for the quote format only.
    """

    def __init__(self, document_text: Callable[[str], tuple[str, str] | None] | None = None):
        self._document_text = document_text
        self._texts: dict[str, str] = {}  # gold documents' original text, read once

    def _span(self, doc_id: str, start: int, end: int) -> str:
        if doc_id not in self._texts:
            found = self._document_text(doc_id) if self._document_text else None
            self._texts[doc_id] = found[1] if found else ""
        return _squash(self._texts[doc_id][start:end])

    def units(self, q: Question, doc_id: str, start: int, end: int) -> frozenset[str]:
        """Gold units (see ``Question.gold_units``) covered by one chunk; empty = not relevant."""
        if q.negative:
            return frozenset()
        if q.by_quote:
            docs = q.gold_docs
            if docs and not any(doc_matches(doc_id, d) for d in docs):
                return frozenset()
            span = self._span(doc_id, start, end)
            return frozenset(f"q{i}" for i, quote in enumerate(q.gold_quotes) if _squash(quote) and _squash(quote) in span)
        return frozenset(g for g in (q.gold_ids or q.gold_docs) if doc_matches(doc_id, g))


def score_question(q: Question, ranked_units: list[frozenset[str]], ranked_doc_ids: list[str]) -> dict:
    """Retrieval metrics of one answerable question (keys as in ``report.json``)."""
    flags = [bool(u) for u in ranked_units]
    scores = M.retrieval_metrics(flags, ks=KS, depth=DEPTH)
    scores[f"recall@{DEPTH}"] = M.recall_at(ranked_units, q.gold_units, DEPTH)
    if q.gold_groups:
        scores[f"all_groups@{DEPTH}"] = M.all_groups_at(ranked_doc_ids, q.gold_groups, DEPTH, match=doc_matches)
    return scores
