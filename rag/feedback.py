"""Answer feedback (👍/👎, comment, corrected answer, "should have refused"), stored per KB in
its SQLite (table ``feedback``, schema version 2, ``rag.store_schema``), and its export as a
``rag eval`` question set (``rag feedback export``).

- ``FeedbackEntry``: one vote on one answer, built from the ``AnswerResult`` it judges
  (``FeedbackEntry.from_result``) or from an API body.
- ``FeedbackLog(kb)``: add / list / count over an open ``KnowledgeBase``. A write is one short
  ``BEGIN IMMEDIATE`` transaction on the KB's connection; it does not take the KB's write lock
  file (``write.lock``), which an ingest holds for minutes while it embeds: a vote touches
  neither documents, vectors nor index generations, and SQLite's own lock (waited for up to
  ``lock_timeout`` seconds) orders it with the other writers.
- ``drop_feedback_citing`` / ``rename_feedback_doc``: called by ``KnowledgeBaseTransaction``
  when a document is removed (the feedback citing it goes with it, quotes included) or renamed.
- ``export_questions``: the eval set (see ``docs/feedback.md``): 👍 → a regression question with
  the cited quotes as gold; 👎 with a correction → a question to fix (``answers: [correction]``);
  👎 marked "should have refused" → ``"type": "negative"``; any other 👎 is skipped and counted.
"""
from __future__ import annotations

import json
import re
import sqlite3
import time
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # no import cycle: rag.store_transaction imports this module
    from rag.answer_types import AnswerResult
    from rag.store import KnowledgeBase

UP, DOWN = 1, -1
_VOTES = {"up": UP, "down": DOWN, "+1": UP, "-1": DOWN, "1": UP, "👍": UP, "👎": DOWN}
_COLUMNS = ("id", "created_at", "question", "query", "answer", "citations", "backend", "refused", "vote",
            "comment", "correction", "should_refuse")
_WS = re.compile(r"\s+")
# A correction found verbatim in more documents than this is too common to be gold evidence.
MAX_CORRECTION_DOCS = 3


def parse_vote(value) -> int:
    """``+1`` / ``-1`` from ``"up"``/``"down"`` (also ``1``, ``-1``, ``"👍"``, ``"👎"``); ValueError otherwise."""
    vote = None if isinstance(value, bool) else _VOTES.get(str(value).strip().lower())
    if vote is None:
        raise ValueError(f"评价只能是 up 或 down / vote must be \"up\" or \"down\", not {value!r}")
    return vote


@dataclass
class FeedbackCitation:
    """A citation of the judged answer: its ``[n]``, the document and the verified quote."""

    number: int
    doc_id: str
    quote: str = ""


@dataclass
class FeedbackEntry:
    """One vote on one answer.

    Args:
        question: what the user asked.
        answer: the answer judged (verified text with its ``[n]`` markers).
        vote: ``UP`` (+1) or ``DOWN`` (-1); ``"up"``/``"down"`` are accepted too.
        query: the standalone (rewritten) question used for retrieval.
        citations: the answer's citations.
        backend: the answer backend (``extractive``, ``local``, ``openai``).
        refused: the answer was a refusal.
        comment: free text.
        correction: the right answer, as the user gives it (👎 only).
        should_refuse: the documents do not answer this; the answer should have been a refusal (👎 only).
        id, created_at: set when stored.

    Raises:
        ValueError: an unknown vote, an empty question, or a combination that says two things
            (should_refuse with 👍 or with a correction, a correction with 👍).
    """

    question: str
    answer: str
    vote: int
    query: str = ""
    citations: list[FeedbackCitation] = field(default_factory=list)
    backend: str = ""
    refused: bool = False
    comment: str = ""
    correction: str = ""
    should_refuse: bool = False
    id: int | None = None
    created_at: float | None = None

    def __post_init__(self):
        self.vote = parse_vote(self.vote)
        self.question = (self.question or "").strip()
        self.query = (self.query or "").strip() or self.question
        self.comment, self.correction = (self.comment or "").strip(), (self.correction or "").strip()
        self.citations = [c if isinstance(c, FeedbackCitation) else FeedbackCitation(
            int(c["number"]), str(c["doc_id"]), str(c.get("quote") or "")) for c in self.citations]
        if not self.question:
            raise ValueError("问题不能为空 / question must not be empty")
        if self.vote == UP and (self.correction or self.should_refuse):
            raise ValueError("纠正答案和“应当拒答”只用于 👎 / a correction or should_refuse goes with a down vote")
        if self.correction and self.should_refuse:
            raise ValueError("纠正答案与“应当拒答”不能同时给出 / give either a correction or should_refuse, not both")

    @classmethod
    def from_result(cls, result: AnswerResult, vote, comment: str = "", correction: str = "",
                    should_refuse: bool = False) -> FeedbackEntry:
        """The feedback on an answer of the chain (question, rewritten query, answer, citations, backend)."""
        return cls(question=result.question, answer=result.answer, vote=vote, query=result.query,
                   citations=[FeedbackCitation(c.number, c.doc_id, c.quote) for c in result.citations],
                   backend=result.backend, refused=result.refused, comment=comment, correction=correction,
                   should_refuse=should_refuse)

    @classmethod
    def from_record(cls, record: dict, vote, comment: str = "", correction: str = "",
                    should_refuse: bool = False) -> FeedbackEntry:
        """The feedback on an answer kept as ``AnswerResult.to_dict()`` (the web UI's turns)."""
        return cls(question=str(record.get("question") or ""), answer=str(record.get("answer") or ""), vote=vote,
                   query=str(record.get("query") or ""),
                   citations=[FeedbackCitation(int(c["number"]), str(c["doc_id"]), str(c.get("quote") or ""))
                              for c in record.get("citations") or []],
                   backend=str(record.get("backend") or ""), refused=bool(record.get("refused")),
                   comment=comment, correction=correction, should_refuse=should_refuse)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def _from_row(cls, row: tuple) -> FeedbackEntry:
        values = dict(zip(_COLUMNS, row))
        values["citations"] = json.loads(values["citations"])
        values["refused"], values["should_refuse"] = bool(values["refused"]), bool(values["should_refuse"])
        return cls(**values)


class FeedbackLog:
    """The feedback of one open knowledge base (see the module docstring for how it writes).

    Args:
        kb: an open ``KnowledgeBase`` (schema version 2 or newer: opening it migrated it).
    """

    def __init__(self, kb: KnowledgeBase):
        self.kb = kb

    def add(self, entry: FeedbackEntry) -> int:
        """Store ``entry``; returns its id (also set on ``entry``, with ``created_at``).

        An entry whose ``id`` is set replaces the stored entry with that id (the web UI's second
        vote, or its comment / correction, on an answer it already voted on); when that entry
        is gone (its document was removed) a new one is stored, with a new id.
        """
        entry.created_at = entry.created_at or time.time()
        citations = json.dumps([asdict(c) for c in entry.citations], ensure_ascii=False)
        values = (entry.created_at, entry.question, entry.query, entry.answer, citations, entry.backend,
                  int(entry.refused), entry.vote, entry.comment, entry.correction, int(entry.should_refuse))
        with self.kb._write() as db:  # BEGIN IMMEDIATE … COMMIT, rolled back on error
            if entry.id is not None and db.execute(
                    f"UPDATE feedback SET {', '.join(f'{c}=?' for c in _COLUMNS[1:])} WHERE id=?",
                    (*values, entry.id)).rowcount:
                return entry.id
            cursor = db.execute(
                f"INSERT INTO feedback({', '.join(_COLUMNS[1:])}) VALUES ({', '.join('?' * (len(_COLUMNS) - 1))})",
                values)
        entry.id = int(cursor.lastrowid)
        return entry.id

    def entries(self) -> list[FeedbackEntry]:
        """All stored feedback, oldest first."""
        rows = self.kb.db.execute(f"SELECT {', '.join(_COLUMNS)} FROM feedback ORDER BY id").fetchall()
        return [FeedbackEntry._from_row(row) for row in rows]

    def count(self) -> int:
        return self.kb.db.execute("SELECT COUNT(*) FROM feedback").fetchone()[0]


# ----------------------------------------------------------------------------- document changes
def _citing(db: sqlite3.Connection, doc_id: str) -> list[tuple[int, str]]:
    return db.execute(
        "SELECT f.id, f.citations FROM feedback f WHERE EXISTS (SELECT 1 FROM json_each(f.citations) c "
        "WHERE json_extract(c.value, '$.doc_id') = ?)", (doc_id,)).fetchall()


def drop_feedback_citing(db: sqlite3.Connection, doc_id: str) -> int:
    """Inside the write transaction removing ``doc_id``: delete the feedback citing it (its quotes
    are the removed text). Returns how many entries went."""
    ids = [row[0] for row in _citing(db, doc_id)]
    db.executemany("DELETE FROM feedback WHERE id=?", [(i,) for i in ids])
    return len(ids)


def rename_feedback_doc(db: sqlite3.Connection, old: str, new: str) -> None:
    """Inside the write transaction renaming a document: its citations follow it."""
    for feedback_id, text in _citing(db, old):
        citations = [{**c, "doc_id": new} if c.get("doc_id") == old else c for c in json.loads(text)]
        db.execute("UPDATE feedback SET citations=? WHERE id=?",
                   (json.dumps(citations, ensure_ascii=False), feedback_id))


# ----------------------------------------------------------------------------- export
def _squash(text: str) -> str:
    return _WS.sub("", text)


@dataclass
class ExportCounts:
    """What ``export_questions`` made of the stored feedback."""

    regression: int = 0  # 👍 answers: gold = their cited quotes
    fix: int = 0  # 👎 with a correction
    negative: int = 0  # 👎 "should have refused", and 👍 on a refusal
    skipped_unlabelled: int = 0  # 👎 with neither a correction nor should_refuse
    skipped_no_evidence: int = 0  # no gold left: quotes gone from the documents, correction nowhere found

    @property
    def written(self) -> int:
        return self.regression + self.fix + self.negative

    def summary(self) -> str:
        return (f"写出 {self.written} 个问题 wrote {self.written} questions: 回归 regression {self.regression}"
                f" · 待修正 to fix {self.fix} · 应拒答 negative {self.negative}; 跳过 skipped:"
                f" 👎 无纠正 without correction or refusal flag {self.skipped_unlabelled}"
                f" · 无证据 no evidence in the KB {self.skipped_no_evidence}")


def _correction_gold(doc_ids: list[str], text_of, correction: str) -> list[str]:
    """Documents whose text holds the correction verbatim (whitespace ignored), when few do."""
    needle = _squash(correction)
    found = [doc_id for doc_id in doc_ids if needle and needle in text_of(doc_id)]
    return found if len(found) <= MAX_CORRECTION_DOCS else []


def _meta(entry: FeedbackEntry) -> dict:
    """Where a question came from (ignored by ``rag eval``, kept for the reviewer)."""
    return {"id": entry.id, "vote": "up" if entry.vote == UP else "down", "created_at": entry.created_at,
            "answer": entry.answer, "backend": entry.backend, "comment": entry.comment}


def export_questions(kb: KnowledgeBase) -> tuple[list[dict], ExportCounts]:
    """The KB's feedback as ``rag eval`` questions (gold-by-quote format), ids ``feedback-<id>``.

    - 👍 on a cited answer → ``type: "regression"``, ``gold_docs`` + ``gold_quotes`` = its
      citations whose quote is still in the document's current text (none left: skipped).
    - 👍 on a refusal, 👎 with ``should_refuse`` → ``type: "negative"``.
    - 👎 with a correction → ``type: "fix"``, ``answers: [correction]``; gold: the documents that
      hold the correction verbatim (it is then the gold quote), else the documents the answer
      cited (gold by document); with neither the question could only be scored as
      unanswerable, so it is skipped and counted.
    - 👎 with neither → skipped and counted.
    """
    counts = ExportCounts()
    questions: list[dict] = []
    texts: dict[str, str] = {}

    def text_of(doc_id: str) -> str:
        if doc_id not in texts:
            texts[doc_id] = _squash((kb.document_text(doc_id) or ("", ""))[1])
        return texts[doc_id]

    for entry in FeedbackLog(kb).entries():
        row = {"id": f"feedback-{entry.id}", "question": entry.question}
        if entry.vote == UP and (entry.refused or not entry.citations) or entry.should_refuse:
            row["type"] = "negative"
            counts.negative += 1
        elif entry.vote == UP:
            cited = [c for c in entry.citations if _squash(c.quote) and _squash(c.quote) in text_of(c.doc_id)]
            if not cited:
                counts.skipped_no_evidence += 1
                continue
            row.update(type="regression", gold_docs=list(dict.fromkeys(c.doc_id for c in cited)),
                       gold_quotes=list(dict.fromkeys(c.quote for c in cited)))
            counts.regression += 1
        elif entry.correction:
            holders = _correction_gold([d.doc_id for d in kb.documents()], text_of, entry.correction)
            if holders:
                row.update(gold_docs=holders, gold_quotes=[entry.correction])
            else:
                docs = [d for d in dict.fromkeys(c.doc_id for c in entry.citations) if text_of(d)]
                if not docs:
                    counts.skipped_no_evidence += 1
                    continue
                row["gold_docs"] = docs
            row.update(type="fix", answers=[entry.correction])
            counts.fix += 1
        else:
            counts.skipped_unlabelled += 1
            continue
        row["feedback"] = _meta(entry)
        questions.append(row)
    return questions, counts
