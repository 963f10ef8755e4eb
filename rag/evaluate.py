"""``rag eval``: measure retrieval and answers on a question set.

The questions and what counts as relevant are in ``rag.eval_questions``, the reports in
``rag.eval_report``; this module builds (or reuses) an evaluation KB from a corpus and runs
the questions. It writes one JSON line per question to ``<out>/log.jsonl`` (a rerun skips ids
already there), then ``report.json``, ``report.md`` and ``hit_at_k.png``. An answer step is
plugged in as ``answer_fn(question[, history]) -> dict`` (None = retrieval only); whatever it
returns is stored in the log under ``"answer"``.
"""
from __future__ import annotations

import hashlib
import json
import re
import sys
import time
from pathlib import Path
from typing import Callable

from rag import metrics as M
from rag.config import PROJECT_ROOT, Settings
from rag.eval_questions import (  # noqa: F401 (re-exported: callers import them from rag.evaluate)
    DEPTH, KS, Judge, Question, doc_matches, load_questions, score_question)
from rag.eval_report import (  # noqa: F401 (re-exported)
    build_report, check_thresholds, compare_reports, git_revision, hit_curve, parse_threshold, read_log,
    worst_misses, write_report)

# Sources whose change alters chunk boundaries or BM25 tokens of an evaluation KB.
PIPELINE_FILES = ("load.py", "clean.py", "split.py", "tokens.py", "lexical.py", "zh.py")


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
        try:  # so the ingestor re-splits every document; vectors stay cached
            kb.mark_documents_stale()
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
def _hit_record(hit, units: frozenset[str]) -> dict:
    c = hit.chunk
    return {
        "doc_id": c.doc_id, "start": c.start, "end": c.end, "score": round(hit.score, 6),
        "dense_rank": hit.dense_rank, "bm25_rank": hit.bm25_rank, "parts": list(getattr(hit, "parts", [])),
        "gold": sorted(units), "snippet": c.text[:80].replace("\n", " "),
    }


def evaluate_question(q: Question, searcher, judge: Judge, mode: str, depth: int, probe=None) -> dict:
    """Retrieve for one question and score it; returns its log record.

    ``probe``: the answer step's ``rag.answer_probe.AnswerProbe`` (``Answerer.probe``), so that
    the retrieval scored is the one the answer step reads."""
    started = time.perf_counter()
    # the same retrieval as search(); a compound question's parts go to the log (rag.decompose)
    retrieval = searcher.search_parts(q.search_query, depth, mode, probe=probe)
    hits = retrieval.hits
    latency = (time.perf_counter() - started) * 1000
    units = [judge.units(q, h.chunk.doc_id, h.chunk.start, h.chunk.end) for h in hits]
    record = {
        "id": q.id, "question": q.question, "type": q.type or ("negative" if q.negative else ""),
        "negative": q.negative, "gold": q.gold_summary(),
        "parts": retrieval.parts, "retrieved": [_hit_record(h, u) for h, u in zip(hits, units)],
        "latency_ms": {"retrieve": round(latency, 3)},
    }
    if retrieval.part_answers:
        record["part_answers"] = [a.answer for a in retrieval.part_answers]
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
        # The chain's own flag when it gives one: a two-part answer may say one part is not
        # in the documents (文档中没有找到…) and still answer the other.
        result["refused"] = bool(result["refused"]) if "refused" in result else M.is_refusal(text)
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


def run_eval(questions_path: Path, settings: Settings, out: Path, *, k: int = 5, mode: str = "hybrid",
             limit: int | None = None, answer_fn: Callable[[str], dict] | None = None, searcher=None,
             progress: bool = True, fresh: bool = False, extra_config: dict | None = None, probe=None) -> dict:
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
        probe: the answer step's answer probe (``Answerer.probe``) for compound questions; None:
            their parts are merged without it.
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
            "reranker": settings.reranker, "answers": answer_fn is not None, "part_probe": probe is not None,
            **(extra_config or {}),
        }
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        log_path, run_path = out / "log.jsonl", out / "run.json"
        identity = {key: config[key] for key in ("kb", "embedder", "mode", "answers", "questions", "part_probe")}
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
        done = read_log(log_path)
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
                record = evaluate_question(q, searcher, judge, mode, depth, probe)
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


