"""Several KBs in one question: does searching a corpus split over two KBs (``rag.multi_kb``) rank
like one KB holding it all? Prints (and writes ``bench/multi_kb.md``) hit@1 / hit@5 / MRR@10 per
set for the whole KB and the two halves searched together, and their p50 latency.

The halves are the set's passages split by position (even / odd lines of corpus.jsonl), built as KBs
``bench-<set>-half0`` / ``-half1`` under ``index/`` (reused on later runs); the whole KB is the eval
KB ``rag eval --corpus`` builds. Passages are mapped back from chunks by their jsonl id.

    .venv/bin/python bench/bench_multi_kb.py --sets cmrc2018,rgb_zh --limit 300
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from rag.config import Settings  # noqa: E402
from rag.evaluate import ensure_corpus_kb  # noqa: E402
from rag.service import RagService  # noqa: E402

SHARED = ROOT.parent / "shared" / "evaldata"


def split_corpus(corpus: Path, out: Path) -> list[Path]:
    """Write the even and odd lines of ``corpus`` as two jsonl files (once)."""
    halves = [out / f"half{i}" / corpus.name for i in range(2)]
    if not all(h.is_file() for h in halves):
        lines = [line for line in corpus.read_text(encoding="utf-8").splitlines() if line.strip()]
        for i, half in enumerate(halves):
            half.parent.mkdir(parents=True, exist_ok=True)
            half.write_text("\n".join(lines[i::2]) + "\n", encoding="utf-8")
    return halves


def scores(searcher, questions: list[dict]) -> dict:
    ranks, times = [], []
    for q in questions:
        started = time.perf_counter()
        hits = searcher.search(q["question"], k=10)
        times.append((time.perf_counter() - started) * 1000)
        gold = set(q["gold_ids"])
        ids = [h.chunk.doc_id.rsplit("/", 1)[-1] for h in hits]
        ranks.append(next((r for r, i in enumerate(ids, 1) if i in gold), None))
    n = len(ranks)
    return {"hit@1": sum(r == 1 for r in ranks) / n, "hit@5": sum(r is not None and r <= 5 for r in ranks) / n,
            "mrr@10": sum(1 / r for r in ranks if r) / n, "p50_ms": statistics.median(times)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sets", default="cmrc2018,rgb_zh")
    parser.add_argument("--limit", type=int, default=300, help="questions per set")
    args = parser.parse_args()
    settings = Settings(home=ROOT / "index")
    service = RagService(settings)
    rows = []
    for name in args.sets.split(","):
        corpus, questions_file = SHARED / name / "corpus.jsonl", SHARED / name / "questions.jsonl"
        if not corpus.is_file():
            print(f"skip {name}: {corpus} not found", file=sys.stderr)
            continue
        questions = [json.loads(line) for line in questions_file.read_text(encoding="utf-8").splitlines()
                     if line.strip()][:args.limit]
        whole = ensure_corpus_kb(corpus, settings, service.embedder())[0].kb
        halves = []
        for i, half in enumerate(split_corpus(corpus, ROOT / "index" / "_bench" / f"multi-{name}")):
            kb = f"bench-{name}-half{i}"
            if not service.exists(kb) or not service.documents(kb):  # an ingest commits all or nothing
                service.ingest(kb, [half])
            halves.append(kb)
        one, two = scores(service.searcher(whole), questions), scores(service.searcher(",".join(halves)), questions)
        rows.append((name, len(questions), one, two))
    service.close()
    lines = ["| set | questions | one KB hit@1 / hit@5 / MRR@10 | two KBs together | p50 one / two (ms) |",
             "|---|---|---|---|---|"]
    for name, n, one, two in rows:
        lines.append(f"| {name} | {n} | {one['hit@1']:.3f} / {one['hit@5']:.3f} / {one['mrr@10']:.3f} | "
                     f"{two['hit@1']:.3f} / {two['hit@5']:.3f} / {two['mrr@10']:.3f} | "
                     f"{one['p50_ms']:.1f} / {two['p50_ms']:.1f} |")
    table = "\n".join(lines)
    print(table)
    (ROOT / "bench" / "multi_kb.md").write_text(
        "# One corpus in one KB vs split over two KBs searched together\n\n"
        "`bench/bench_multi_kb.py` (see its docstring). Halves: even / odd passages.\n\n" + table + "\n",
        encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
