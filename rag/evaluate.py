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
    marker.write_text(json.dumps({"corpus": str(corpus), "pipeline": fingerprint, "complete": False,
                                  "biggest_build": (previous or {}).get("biggest_build")}))
    report = Ingestor(kb_settings, embedder).ingest([Path(corpus)], prune=True, progress=progress)
    if not report.ok:
        raise RuntimeError("评测语料导入失败 / corpus ingest failed:\n" + report.summary())
    build = {"embedded": report.embedded, "embed_seconds": round(report.embed_seconds, 3),
             "seconds": round(report.seconds, 3), "at": time.time()}
    # the biggest build is kept: it tells the embedding throughput of this corpus
    biggest = (previous or {}).get("biggest_build")
    if not biggest or build["embedded"] >= biggest.get("embedded", 0):
        biggest = build
    marker.write_text(json.dumps({"corpus": str(corpus), "pipeline": fingerprint, "complete": True,
                                  "documents": len(report.added) + len(report.updated) + len(report.unchanged),
                                  "chunks": report.chunks, "last_build": build, "biggest_build": biggest}))
    kb = KnowledgeBase(kb_settings.kb_dir)
    try:
        info.update(documents=len(kb.documents()), chunks=kb.chunk_count())
    finally:
        kb.close()
    info.update(built=True, embedded=report.embedded, embed_seconds=report.embed_seconds, seconds=report.seconds)
    return kb_settings, info


# ----------------------------------------------------------------------------- the runner
def git_revision() -> dict:
    """``{"revision", "dirty"}`` of the project checkout (read-only git calls; None outside git)."""
    def run(*args):
        return subprocess.run(["git", *args], cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=10)

    try:
        rev = run("rev-parse", "HEAD")
        if rev.returncode != 0:
            return {"revision": None, "dirty": None}
        dirty = run("status", "--porcelain", "--untracked-files=no")
        return {"revision": rev.stdout.strip(), "dirty": bool(dirty.stdout.strip())}
    except (OSError, subprocess.SubprocessError):
        return {"revision": None, "dirty": None}


def _read_log(path: Path) -> dict[str, dict]:
    """Records of a per-question log by id; a line cut by an interruption is dropped
    (and the file rewritten without it, so the next append starts on a clean line)."""
    if not path.exists():
        return {}
    records: dict[str, dict] = {}
    bad = False
    raw = path.read_text(encoding="utf-8")
    for line in raw.splitlines():
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            records[str(row["id"])] = row
        except (ValueError, KeyError, TypeError):
            bad = True
    if bad or (raw and not raw.endswith("\n")):
        tmp = path.with_suffix(".tmp")
        tmp.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records.values()), encoding="utf-8")
        tmp.replace(path)
    return records


def _hit_record(hit, units: frozenset[str]) -> dict:
    c = hit.chunk
    return {
        "doc_id": c.doc_id, "start": c.start, "end": c.end, "score": round(hit.score, 6),
        "dense_rank": hit.dense_rank, "bm25_rank": hit.bm25_rank,
        "gold": sorted(units), "snippet": c.text[:80].replace("\n", " "),
    }


def evaluate_question(q: Question, searcher, judge: Judge, mode: str, depth: int) -> dict:
    """Retrieve for one question and score it; returns its log record."""
    started = time.perf_counter()
    hits = searcher.search(q.search_query, depth, mode)
    latency = (time.perf_counter() - started) * 1000
    units = [judge.units(q, h.chunk.doc_id, h.chunk.start, h.chunk.end) for h in hits]
    record = {
        "id": q.id, "question": q.question, "type": q.type or ("negative" if q.negative else ""),
        "negative": q.negative, "gold": q.gold_summary(),
        "retrieved": [_hit_record(h, u) for h, u in zip(hits, units)],
        "latency_ms": {"retrieve": round(latency, 3)},
    }
    if not q.negative:
        record["metrics"] = score_question(q, units, [h.chunk.doc_id for h in hits])
        first = next((i for i, u in enumerate(units, 1) if u), None)
        record["first_relevant_rank"] = first
    return record


def _answer_record(q: Question, answer_fn: Callable[..., dict]) -> dict:
    started = time.perf_counter()
    try:
        result = dict((answer_fn(q.question, q.history) if q.history else answer_fn(q.question)) or {})
    except Exception as exc:  # one failing question must not stop a long run
        result = {"error": f"{type(exc).__name__}: {exc}"}
    result["latency_ms"] = round((time.perf_counter() - started) * 1000, 3)
    text = str(result.get("answer") or result.get("text") or "")
    if "error" in result:
        result["refused"] = None
    else:
        result["refused"] = bool(result.get("refused")) or M.is_refusal(text)
    if not q.negative and q.parts and "error" not in result:
        result["correct"] = M.answer_correct(text, q.parts)
        # A citation is precise when its passage holds the evidence: an accepted answer form,
        # a gold quote, or (gold by id) it comes from a gold document.
        gold = [alias for part in q.parts for alias in part] + list(q.gold_quotes)
        result["precise_citations"] = sum(
            1 for c in result.get("citations", [])
            if any(M.contains(str(c.get("passage", "")), g) for g in gold)
            or any(doc_matches(str(c.get("doc_id", "")), g) for g in q.gold_ids))
    return result


def _aggregate(records: list[dict], has_groups: bool) -> dict:
    scored = [r["metrics"] for r in records if r.get("metrics")]
    keys = [f"hit@{k}" for k in KS] + [f"mrr@{DEPTH}", f"recall@{DEPTH}"]
    retrieval = {key: M.mean(s[key] for s in scored) for key in keys}
    if has_groups:
        grouped = [s[f"all_groups@{DEPTH}"] for s in scored if f"all_groups@{DEPTH}" in s]
        retrieval[f"all_groups@{DEPTH}"] = M.mean(grouped)
    return {k: (round(v, 4) if v is not None else None) for k, v in retrieval.items()}


def _answers_summary(records: list[dict]) -> dict | None:
    answered = [r for r in records if "answer" in r]
    if not answered:
        return None
    pos = [r["answer"] for r in answered if not r["negative"] and "correct" in r["answer"]]
    neg = [r["answer"] for r in answered if r["negative"]]
    lat = [r["answer"]["latency_ms"] for r in answered]
    errors = sum(1 for r in answered if "error" in r["answer"])

    def rate(values):
        values = [v for v in values if v is not None]
        return round(sum(values) / len(values), 4) if values else None

    cited = [a for a in pos if a.get("citations")]
    n_citations = sum(len(a["citations"]) for a in cited)
    results = [r["answer"] for r in answered if "error" not in r["answer"]]
    n_sentences = sum(int(a.get("sentences") or 0) for a in results)
    first_token = [a["timings"]["first_token"] for a in results if a.get("timings", {}).get("first_token")]
    return {
        "accuracy": rate([a["correct"] for a in pos]),
        "citation_precision": round(sum(a.get("precise_citations", 0) for a in cited) / n_citations, 4)
        if n_citations else None,
        "unsupported_sentence_rate": round(sum(int(a.get("unsupported_sentences") or 0) for a in results)
                                           / n_sentences, 4) if n_sentences else None,
        "first_token_p50_ms": _round(M.percentile(first_token, 50)),
        "first_token_p95_ms": _round(M.percentile(first_token, 95)),
        "refusal_rate": rate([a.get("refused") for a in neg]),
        "false_refusal_rate": rate([r["answer"].get("refused") for r in answered
                               if not r["negative"] and "error" not in r["answer"]]),
        "n_answered": len(answered), "errors": errors,
        "latency_p50_ms": _round(M.percentile(lat, 50)), "latency_p95_ms": _round(M.percentile(lat, 95)),
    }


def _round(value, digits=2):
    return round(value, digits) if value is not None else None


def hit_curve(records: list[dict], depth: int = DEPTH) -> list[float]:
    """hit@k for k = 1..depth over the answerable questions of a log."""
    firsts = [r.get("first_relevant_rank") for r in records if not r["negative"]]
    if not firsts:
        return []
    return [round(sum(1 for f in firsts if f and f <= k) / len(firsts), 4) for k in range(1, depth + 1)]


def run_eval(questions_path: Path, settings: Settings, out: Path, *, k: int = 5, mode: str = "hybrid",
             limit: int | None = None, answer_fn: Callable[[str], dict] | None = None, searcher=None,
             progress: bool = True, fresh: bool = False, extra_config: dict | None = None) -> dict:
    """Evaluate a question file against ``settings.kb``; resumable through ``out/log.jsonl``.

    Args:
        questions_path: JSONL questions (either gold format).
        settings: points at the KB to search.
        out: run directory (``log.jsonl``, ``run.json``, ``report.json``, ``report.md``, ``hit_at_k.png``).
        k: chunks given to the answer step (retrieval metrics always look at the top 10).
        mode: ``hybrid``, ``dense`` or ``bm25``.
        limit: only the first N questions.
        answer_fn: ``(question[, history]) -> {"answer": text, ...}`` (``history`` only for
            questions that have one); None = retrieval only.
        searcher: an open ``Searcher`` to reuse (opened from ``settings`` when None).
        fresh: discard an earlier log in ``out`` instead of resuming it.
        extra_config: more entries for ``report["config"]`` (e.g. the corpus).
    Returns the report dict (also written to ``out/report.json``).
    """
    from tqdm import tqdm

    from rag.retrieve import Searcher

    questions = load_questions(questions_path, limit)
    if not questions:
        raise ValueError(f"{questions_path}: 没有问题 / no questions")
    own_searcher = searcher is None
    searcher = searcher or Searcher(settings)
    try:
        config = {
            "kb": settings.kb, "embedder": settings.embedder, "k": k,
            "chunk_tokens": settings.chunk_tokens, "chunk_overlap_tokens": settings.chunk_overlap_tokens,
            "mode": mode, "questions": str(questions_path), "kb_generation": searcher.kb.generation,
            "fusion": settings.fusion, "bm25_weight": settings.bm25_weight, "rrf_k": settings.rrf_k,
            "reranker": settings.reranker, "answers": answer_fn is not None, **(extra_config or {}),
        }
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        log_path, run_path = out / "log.jsonl", out / "run.json"
        identity = {key: config[key] for key in ("kb", "embedder", "mode", "answers", "questions")}
        if fresh:
            log_path.unlink(missing_ok=True)
        elif run_path.exists() and log_path.exists():
            earlier = json.loads(run_path.read_text(encoding="utf-8"))
            before = earlier.get("identity")
            if earlier.get("config", {}).get("kb_generation") not in (None, config["kb_generation"]):
                print(f"注意：知识库 {settings.kb} 在上次运行后有变化 / note: the KB changed since the earlier part "
                      f"of this run (generation {earlier['config']['kb_generation']} → {config['kb_generation']});"
                      " use --fresh for a clean run", file=sys.stderr)
            if before != identity:
                changed = sorted(key for key in identity if (before or {}).get(key) != identity[key])
                raise ValueError(
                    f"{out} 中已有不同配置的运行 / {out} holds a run with another configuration "
                    f"({', '.join(changed)}); 用 --fresh 重来或换 --out / use --fresh or another --out")
        run_path.write_text(json.dumps({"identity": identity, "config": config}, ensure_ascii=False, indent=2),
                            encoding="utf-8")
        done = _read_log(log_path)
        wanted = {q.id for q in questions}
        todo = [q for q in questions if q.id not in done]
        judge = Judge(searcher.kb.document_text)
        depth = max(k, DEPTH)
        running = [r["metrics"] for r in done.values() if r["id"] in wanted and r.get("metrics")]
        if todo:
            searcher.search(todo[0].question, depth, mode)  # warm-up: index load, first embedding
        with log_path.open("a", encoding="utf-8") as log, tqdm(
            total=len(questions), initial=len(questions) - len(todo), desc=f"评测 eval {mode}", unit="q",
            disable=not progress, file=sys.stderr, dynamic_ncols=True,
        ) as bar:
            for q in todo:
                record = evaluate_question(q, searcher, judge, mode, depth)
                if answer_fn is not None:
                    record["answer"] = _answer_record(q, answer_fn)
                log.write(json.dumps(record, ensure_ascii=False) + "\n")
                log.flush()
                done[q.id] = record
                if record.get("metrics"):
                    running.append(record["metrics"])
                    bar.set_postfix({"hit@5": f"{M.mean(m['hit@5'] for m in running):.3f}",
                                     "mrr": f"{M.mean(m['mrr@10'] for m in running):.3f}"}, refresh=False)
                bar.update(1)
    finally:
        if own_searcher:
            searcher.close()
    records = [done[q.id] for q in questions if q.id in done]
    report = build_report(records, config, has_groups=any(q.gold_groups for q in questions))
    write_report(out, report, records)
    return report


def build_report(records: list[dict], config: dict, has_groups: bool = False) -> dict:
    """The ``report.json`` content from per-question log records."""
    latencies = [r["latency_ms"]["retrieve"] for r in records]
    report = {
        "retrieval": _aggregate(records, has_groups),
        "latency": {"retrieve_p50_ms": _round(M.percentile(latencies, 50)),
                    "retrieve_p95_ms": _round(M.percentile(latencies, 95))},
        "n": len(records),
        "n_negative": sum(1 for r in records if r["negative"]),
        "config": config,
        "git": git_revision(),
        "hit_curve": hit_curve(records),
    }
    answers = _answers_summary(records)
    if answers:
        report["answer"] = answers
        report["latency"]["answer_p50_ms"] = answers["latency_p50_ms"]
        report["latency"]["answer_p95_ms"] = answers["latency_p95_ms"]
        report["latency"]["first_token_p50_ms"] = answers["first_token_p50_ms"]
        report["latency"]["first_token_p95_ms"] = answers["first_token_p95_ms"]
    return report


def worst_misses(records: list[dict], n: int = 10) -> list[dict]:
    """Answerable questions retrieved worst: no gold in the top 10 first, then latest first gold."""
    scored = [r for r in records if r.get("metrics")]
    scored.sort(key=lambda r: (-(r.get("first_relevant_rank") or 99), r["metrics"].get(f"recall@{DEPTH}", 0), r["id"]))
    return [r for r in scored if (r.get("first_relevant_rank") or 99) > 1][:n]


def set_label(questions_path) -> str:
    """A readable name for a question file: ``evaldata/drcd/questions.jsonl`` → ``drcd``,
    ``seeds_eval/dev.jsonl`` → ``seeds_eval/dev``, ``my_set.jsonl`` → ``my_set``."""
    path = Path(str(questions_path))
    if path.stem == "questions":
        return path.parent.name or path.stem
    if path.stem in ("dev", "test", "train") and path.parent.name:
        return f"{path.parent.name}/{path.stem}"
    return path.stem


def _fmt(value) -> str:
    return "–" if value is None else (f"{value:.3f}" if isinstance(value, float) else str(value))


def render_markdown(report: dict, records: list[dict]) -> str:
    cfg = report["config"]
    lines = [
        f"# rag eval · {set_label(cfg.get('questions', ''))} · {cfg.get('mode')}",
        "",
        f"KB `{cfg.get('kb')}` · embedder `{cfg.get('embedder')}` · chunks {cfg.get('chunk_tokens')}/"
        f"{cfg.get('chunk_overlap_tokens')} tokens · k {cfg.get('k')} · git {str(report['git'].get('revision'))[:10]}"
        + (" (dirty)" if report["git"].get("dirty") else ""),
        "",
        f"{report['n']} questions, {report['n_negative']} unanswerable (not in retrieval metrics).",
        "",
        "| metric | value |",
        "|---|---|",
    ]
    lines += [f"| {key} | {_fmt(value)} |" for key, value in report["retrieval"].items()]
    lines += [f"| latency {key} | {_fmt(value)} |" for key, value in report["latency"].items()]
    for key, value in (report.get("answer") or {}).items():
        lines.append(f"| answers {key} | {_fmt(value)} |")
    misses = worst_misses(records)
    if misses:
        lines += ["", "## Worst misses", "", "| id | question | gold | first gold rank | retrieved instead (top 3) |",
                  "|---|---|---|---|---|"]
        for r in misses:
            instead = "<br>".join(
                f"{h['doc_id']} [{h['start']}:{h['end']}] {h['snippet'][:40]}" for h in r["retrieved"][:3]
            )
            cell = lambda s: str(s).replace("|", "\\|").replace("\n", " ")  # noqa: E731
            lines.append(f"| {r['id']} | {cell(r['question'])} | {cell(r['gold'])} | "
                         f"{r.get('first_relevant_rank') or '>10'} | {cell(instead)} |")
    return "\n".join(lines) + "\n"


def plot_hit_curve(path: Path, curves: dict[str, list[float]], title: str = "hit@k") -> None:
    """PNG of hit@k against k for one or more runs (matplotlib, Agg backend)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.4), dpi=110)
    for label, curve in curves.items():
        if curve:
            ax.plot(range(1, len(curve) + 1), curve, marker="o", label=label)
    ax.set_xlabel("k (chunks)")
    ax.set_ylabel("hit@k")
    ax.set_ylim(0, 1.02)
    ax.set_xticks(range(1, DEPTH + 1))
    ax.grid(alpha=0.3)
    ax.set_title(title)
    if len(curves) > 1:
        ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def write_report(out: Path, report: dict, records: list[dict]) -> None:
    out = Path(out)
    (out / "report.json").write_text(json.dumps(report, ensure_ascii=False, indent=2) + "\n", encoding="utf-8")
    (out / "report.md").write_text(render_markdown(report, records), encoding="utf-8")
    plot_hit_curve(out / "hit_at_k.png", {report["config"].get("mode", "run"): report["hit_curve"]},
                   title=f"hit@k · {set_label(report['config'].get('questions', ''))}")


# ----------------------------------------------------------------------------- compare / thresholds
def _flatten(report: dict) -> dict[str, float]:
    flat = {}
    for section in ("retrieval", "latency", "answer"):
        for key, value in (report.get(section) or {}).items():
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                flat[f"{section}.{key}"] = value
    return flat


def compare_reports(old_path: Path, new_report: dict, new_records: list[dict] | None = None) -> str:
    """Per-metric deltas against an older ``report.json`` and the question ids whose
    hit@k (k of the run when in 1/3/5/10, else 5) or answer correctness flipped
    (needs the old run's ``log.jsonl`` next to its report)."""
    old_path = Path(old_path)
    if old_path.is_dir():
        old_path = old_path / "report.json"
    old = json.loads(old_path.read_text(encoding="utf-8"))
    a, b = _flatten(old), _flatten(new_report)
    lines = [f"对比 compare with {old_path}", f"{'metric':32s} {'old':>9s} {'new':>9s} {'delta':>9s}"]
    for key in [k for k in b if k in a] + [k for k in b if k not in a]:
        if key in a:
            lines.append(f"{key:32s} {a[key]:9.4f} {b[key]:9.4f} {b[key] - a[key]:+9.4f}")
        else:
            lines.append(f"{key:32s} {'–':>9s} {b[key]:9.4f}")
    old_log = old_path.parent / "log.jsonl"
    if new_records is not None and old_log.exists():
        k = new_report["config"].get("k") if new_report["config"].get("k") in KS else 5
        old_records = _read_log(old_log)
        gained, lost, ans_gained, ans_lost = [], [], [], []
        for r in new_records:
            o = old_records.get(r["id"])
            if not o or not r.get("metrics") or not o.get("metrics"):
                continue
            before, after = o["metrics"][f"hit@{k}"], r["metrics"][f"hit@{k}"]
            if before != after:
                (gained if after > before else lost).append(r["id"])
            ca, cb = (o.get("answer") or {}).get("correct"), (r.get("answer") or {}).get("correct")
            if ca is not None and cb is not None and ca != cb:
                (ans_gained if cb else ans_lost).append(r["id"])
        lines.append(f"hit@{k} 新命中 now hit ({len(gained)}): {' '.join(gained) or '–'}")
        lines.append(f"hit@{k} 新丢失 now missed ({len(lost)}): {' '.join(lost) or '–'}")
        if ans_gained or ans_lost:
            lines.append(f"answers now correct ({len(ans_gained)}): {' '.join(ans_gained) or '–'}")
            lines.append(f"answers now wrong ({len(ans_lost)}): {' '.join(ans_lost) or '–'}")
    return "\n".join(lines)


KNOWN_METRICS = {
    "retrieval": [f"hit@{k}" for k in KS] + [f"mrr@{DEPTH}", f"recall@{DEPTH}", f"all_groups@{DEPTH}"],
    "latency": ["retrieve_p50_ms", "retrieve_p95_ms", "answer_p50_ms", "answer_p95_ms"],
    "answer": ["accuracy", "refusal_rate", "false_refusal_rate", "citation_precision", "unsupported_sentence_rate",
               "n_answered", "errors", "latency_p50_ms", "latency_p95_ms", "first_token_p50_ms", "first_token_p95_ms"],
}


def parse_threshold(spec: str) -> tuple[str, float]:
    """``retrieval.hit@5=0.9`` or ``hit@5=0.9`` → (metric, value); unknown metric names
    are refused here, before a long run."""
    metric, sep, value = spec.partition("=")
    metric = metric.strip()
    if not sep or not metric:
        raise ValueError(f"--fail-under expects METRIC=VALUE, got {spec!r}")
    try:
        floor = float(value)
    except ValueError:
        raise ValueError(f"--fail-under: not a number in {spec!r}") from None
    section, _, key = metric.rpartition(".")
    if key not in (KNOWN_METRICS.get(section, []) if section else sum(KNOWN_METRICS.values(), [])):
        known = ", ".join(f"{s}.{k}" for s, keys in KNOWN_METRICS.items() for k in keys)
        raise ValueError(f"--fail-under: unknown metric {metric!r} (known: {known})")
    return metric, floor


def metric_value(report: dict, metric: str) -> float | None:
    """Look up ``section.key`` or a bare key (searched in retrieval, answers, latency)."""
    flat = _flatten(report)
    if metric in flat:
        return flat[metric]
    for section in ("retrieval", "answer", "latency"):
        if f"{section}.{metric}" in flat:
            return flat[f"{section}.{metric}"]
    return None


def check_thresholds(report: dict, specs: Iterable[str]) -> list[str]:
    """Failure messages for every ``METRIC=VALUE`` the report is below (empty = all pass).
    An unknown metric raises ``ValueError``."""
    failures = []
    for spec in specs:
        metric, floor = parse_threshold(spec)
        value = metric_value(report, metric)
        if value is None:
            known = ", ".join(_flatten(report)) or "none"
            raise ValueError(f"--fail-under: {metric!r} is not in this report (it has: {known})")
        if value < floor:
            failures.append(f"{metric} = {value:.4f} < {floor}")
    return failures
