"""``rag eval``: measure retrieval (and, once plugged in, answers) on a question set.

Two question formats are read (one JSON object per line):

- gold by document id (the shared ``evaldata`` sets)::

    {"id", "question", "answers", "answer_parts", "gold_ids", "gold_groups"?, "negative_ids"?}

  a retrieved chunk is relevant when its ``doc_id`` is in ``gold_ids``;
- gold by quote (``corpus/seeds_eval/dev.jsonl``)::

    {"id", "question", "answers", "gold_docs", "gold_quotes", "type"}

  a retrieved chunk is relevant when it belongs to a gold document and its span
  ``[start:end]`` of the original document text covers a quote (compared with all
  whitespace removed). ``type == "negative"`` (or no gold at all) marks an
  unanswerable question: it is left out of the retrieval metrics.

The runner writes one JSON line per question to ``<out>/log.jsonl`` (a rerun skips
ids already there), then ``report.json``, ``report.md`` and ``hit_at_k.png``.
An answer step can be plugged in as ``answer_fn(question) -> dict`` (None =
retrieval only); whatever it returns is stored in the log under ``"answer"``.
"""
from __future__ import annotations

import hashlib
import json
import re
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable

from rag import metrics as M
from rag.config import PROJECT_ROOT, Settings

KS = (1, 3, 5, 10)
DEPTH = 10  # chunks retrieved per question for the metrics (at least -k)
# Sources whose change alters chunk boundaries or BM25 tokens of an evaluation KB.
PIPELINE_FILES = ("load.py", "clean.py", "split.py", "tokens.py", "lexical.py")
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
            return "; ".join(f"{d}: 「{q}」" for d, q in zip(self.gold_docs * len(self.gold_quotes), self.gold_quotes))
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
        )


def load_questions(path: Path, limit: int | None = None) -> list[Question]:
    """Read a questions JSONL file (either format); ``limit`` keeps the first N."""
    questions = []
    seen = set()
    with Path(path).open(encoding="utf-8-sig") as fh:
        for line_no, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                q = Question.from_dict(json.loads(line))
            except ValueError as exc:
                raise ValueError(f"{path}:{line_no}: {exc}") from exc
            if q.id in seen:
                raise ValueError(f"{path}:{line_no}: duplicate question id {q.id!r}")
            seen.add(q.id)
            questions.append(q)
            if limit and len(questions) >= limit:
                break
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
        self._squashed: dict[str, str] = {}

    def _span(self, doc_id: str, start: int, end: int) -> str:
        found = self._document_text(doc_id) if self._document_text else None
        return _squash(found[1][start:end]) if found else ""

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


# ----------------------------------------------------------------------------- knowledge bases
def _file_digest(path: Path) -> str:
    h = hashlib.sha256()
    path = Path(path)
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    for file in files:
        h.update(str(file.relative_to(path) if path.is_dir() else file.name).encode() + b"\x00")
        with file.open("rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                h.update(block)
        h.update(b"\x01")
    return h.hexdigest()


def corpus_kb_name(corpus: Path, settings: Settings, name: str | None = None) -> str:
    """``eval-<name>-<hash8>``: the hash covers the corpus bytes and the settings that
    change what is indexed (embedder, chunk size, overlap), so a changed corpus or
    setting gets a new KB while a rerun reuses the built one."""
    corpus = Path(corpus)
    if name is None:
        if corpus.is_dir():
            name = corpus.name
        elif corpus.stem in ("corpus", "docs", "passages"):  # evaldata/<set>/corpus.jsonl -> <set>
            name = corpus.parent.name
        else:
            name = corpus.stem
    key = json.dumps([_file_digest(corpus), settings.embedder, settings.chunk_tokens, settings.chunk_overlap_tokens])
    safe = re.sub(r"[^0-9A-Za-z_.-]+", "_", name).strip("_") or "corpus"
    return f"eval-{safe}-{hashlib.sha256(key.encode()).hexdigest()[:8]}"


def pipeline_fingerprint() -> str:
    """Hash of the code that turns documents into chunks and tokens."""
    h = hashlib.sha256()
    for name in PIPELINE_FILES:
        file = PROJECT_ROOT / "rag" / name
        h.update(file.read_bytes() if file.exists() else b"-")
    return h.hexdigest()[:16]


def ensure_corpus_kb(corpus: Path, settings: Settings, embedder=None, name: str | None = None,
                     progress: bool = True, log=print) -> tuple[Settings, dict]:
    """Build (or reuse) the evaluation KB of a corpus file or folder.

    Returns the settings pointing at that KB and an info dict (``kb``, ``built``,
    ``documents``, ``chunks``, ``embedded``, ``embed_seconds``, ``seconds``).
    When the chunking/tokenising code changed since the KB was built, every document
    is re-split (vectors of unchanged chunk texts are reused from the KB's cache).
    """
    from rag.ingest import Ingestor
    from rag.store import KnowledgeBase

    kb_name = corpus_kb_name(corpus, settings, name)
    kb_settings = settings.model_copy(update={"kb": kb_name})
    marker = kb_settings.kb_dir / "eval-corpus.json"
    fingerprint = pipeline_fingerprint()
    info = {"kb": kb_name, "built": False, "embedded": 0, "embed_seconds": 0.0, "seconds": 0.0}
    previous = json.loads(marker.read_text()) if marker.exists() else None
    if previous and previous.get("complete") and previous.get("pipeline") == fingerprint:
        kb = KnowledgeBase(kb_settings.kb_dir)
        try:
            info.update(documents=len(kb.documents()), chunks=kb.chunk_count())
        finally:
            kb.close()
        return kb_settings, info
    if previous and previous.get("pipeline") != fingerprint and (kb_settings.kb_dir / "kb.sqlite").exists():
        log(f"切分/分词代码已变，重新切分 / chunking code changed: re-splitting {kb_name} (cached vectors reused)")
        kb = KnowledgeBase(kb_settings.kb_dir)
        try:  # mark every document stale so the ingestor re-splits it; vectors stay cached
            kb.db.execute("UPDATE documents SET content_hash = 'stale'")
        finally:
            kb.close()
    log(f"建立评测知识库 / building evaluation KB {kb_name} from {corpus}")
    kb_settings.kb_dir.mkdir(parents=True, exist_ok=True)
    marker.write_text(json.dumps({"corpus": str(corpus), "pipeline": fingerprint, "complete": False}))
    report = Ingestor(kb_settings, embedder).ingest([Path(corpus)], prune=True, progress=progress)
    if not report.ok:
        raise RuntimeError("评测语料导入失败 / corpus ingest failed:\n" + report.summary())
    marker.write_text(json.dumps({"corpus": str(corpus), "pipeline": fingerprint, "complete": True,
                                  "documents": len(report.added) + len(report.updated) + len(report.unchanged),
                                  "chunks": report.chunks, "built_at": time.time()}))
    kb = KnowledgeBase(kb_settings.kb_dir)
    try:
        info.update(documents=len(kb.documents()), chunks=kb.chunk_count())
    finally:
        kb.close()
    info.update(built=True, embedded=report.embedded, embed_seconds=report.embed_seconds, seconds=report.seconds)
    return kb_settings, info
