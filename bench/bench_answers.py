"""Answer benchmark (a script, not a test): accuracy, refusal, citation precision and latency of the
answer chain on the seeds dev set and the first N rgb_zh questions.

    .venv/bin/python bench/bench_answers.py [--llm local] [--rgb-limit 100] [--sets seeds rgb_zh]
    .venv/bin/python bench/bench_answers.py --sets rgb_zh_int seeds_twopart [--no-probe]

``--no-probe`` answers compound questions without the answer probe (``rag.answer_probe``), for
the before/after comparison in bench/README.md. "compound accuracy": over the answerable
questions ``rag.decompose`` splits.

Uses the evaluation KBs that `make bench` / `rag eval --corpus` build under index/ (built here when
missing). Prints a Markdown table and writes per-question records to bench/answers-<llm>.jsonl.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from rag import metrics as M  # noqa: E402
from rag.answer import Answerer, make_answer_fn  # noqa: E402
from rag.config import Settings  # noqa: E402
from rag.evaluate import ensure_corpus_kb  # noqa: E402

SHARED = ROOT.parent / "shared"
SETS = {
    "seeds": (SHARED / "corpus/seeds_eval/dev.jsonl", SHARED / "corpus/seeds"),
    "rgb_zh": (SHARED / "evaldata/rgb_zh/questions.jsonl", SHARED / "evaldata/rgb_zh/corpus.jsonl"),
    "rgb_zh_int": (SHARED / "evaldata/rgb_zh_int/questions.jsonl", SHARED / "evaldata/rgb_zh_int/corpus.jsonl"),
    "seeds_twopart": (ROOT / "eval/sets/seeds_twopart.jsonl", SHARED / "corpus/seeds"),
}


def parts_of(q: dict) -> list[list[str]]:
    if q.get("answer_parts"):
        return q["answer_parts"]
    return [q["answers"]] if q.get("answers") else []


def citation_precise(citation: dict, parts: list[list[str]]) -> bool:
    """A citation is precise when its passage contains an accepted form of some answer part."""
    return any(M.contains(citation["passage"], alias) for part in parts for alias in part)


def run_set(name: str, llm: str, limit: int | None, out, probe: bool = True, offset: int = 0) -> dict:
    from rag.decompose import decompose

    questions_file, corpus = SETS[name]
    questions = [json.loads(line) for line in questions_file.read_text(encoding="utf-8").splitlines() if line.strip()]
    questions = questions[offset:offset + limit] if limit else questions[offset:]
    settings, _ = ensure_corpus_kb(corpus, Settings(part_probe=probe))
    answer = make_answer_fn(Answerer(settings), backend=llm)
    rows = []
    for i, q in enumerate(questions, 1):
        negative = q.get("type") == "negative" or not (q.get("gold_ids") or q.get("gold_quotes"))
        started = time.perf_counter()
        result = answer(q["question"])
        parts = parts_of(q)
        row = {
            "set": name, "id": q["id"], "negative": negative, "refused": result["refused"],
            "correct": (not negative) and not result["refused"] and M.answer_correct(result["answer"], parts),
            "citations": len(result["citations"]),
            "precise": sum(citation_precise(c, parts) for c in result["citations"]) if not negative else 0,
            "unsupported": result["unsupported_sentences"], "sentences": result["sentences"],
            "first_token_ms": result["timings"].get("first_token"), "total_ms": result["timings"]["total"],
            "answer": result["answer"], "question": q["question"],
            "compound": decompose(q["question"]).compound, "part_answers": result["part_answers"],
        }
        rows.append(row)
        out.write(json.dumps(row, ensure_ascii=False) + "\n")
        out.flush()
        print(f"{name} {i}/{len(questions)} {q['id']} correct={row['correct']} refused={row['refused']} "
              f"{(time.perf_counter() - started):.1f}s  {result['answer'][:50]!r}", file=sys.stderr, flush=True)
    answerable = [r for r in rows if not r["negative"]]
    negatives = [r for r in rows if r["negative"]]
    cited_correct = [r for r in answerable if r["correct"]]
    compound = [r for r in answerable if r["compound"]]
    return {
        "set": name, "n": len(rows), "n_negative": len(negatives), "probe": probe,
        "accuracy": M.mean(r["correct"] for r in answerable),
        "n_compound": len(compound), "compound_accuracy": M.mean(r["correct"] for r in compound) if compound else None,
        "refusal_rate": M.mean(r["refused"] for r in negatives),
        "false_refusal_rate": M.mean(r["refused"] for r in answerable),
        "citation_precision": (sum(r["precise"] for r in cited_correct) / max(1, sum(r["citations"] for r in cited_correct))),
        "unsupported_sentence_rate": sum(r["unsupported"] for r in rows) / max(1, sum(r["sentences"] for r in rows)),
        "first_token_p50_ms": M.percentile([r["first_token_ms"] for r in rows if r["first_token_ms"]], 50),
        "first_token_p95_ms": M.percentile([r["first_token_ms"] for r in rows if r["first_token_ms"]], 95),
        "total_p50_ms": M.percentile([r["total_ms"] for r in rows], 50),
        "total_p95_ms": M.percentile([r["total_ms"] for r in rows], 95),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--llm", default="local", choices=["local", "openai", "extractive"])
    parser.add_argument("--sets", nargs="+", default=["seeds", "rgb_zh"], choices=list(SETS))
    parser.add_argument("--rgb-limit", type=int, default=100, help="N questions of rgb_zh / rgb_zh_int")
    parser.add_argument("--rgb-offset", type=int, default=0, help="skip the first N of rgb_zh / rgb_zh_int")
    parser.add_argument("--no-probe", action="store_true", help="compound questions without the answer probe")
    args = parser.parse_args()
    summaries = []
    tag = "-noprobe" if args.no_probe else ""
    with open(ROOT / "bench" / f"answers-{args.llm}{tag}.jsonl", "w", encoding="utf-8") as out:
        for name in args.sets:
            if not SETS[name][0].is_file():
                print(f"skipped {name}: {SETS[name][0]} not found", file=sys.stderr)
                continue
            rgb = name.startswith("rgb_zh")
            summaries.append(run_set(name, args.llm, args.rgb_limit if rgb else None, out, probe=not args.no_probe,
                                     offset=args.rgb_offset if rgb else 0))
    keys = ["n", "n_negative", "probe", "accuracy", "n_compound", "compound_accuracy", "refusal_rate", "false_refusal_rate", "citation_precision",
            "unsupported_sentence_rate", "first_token_p50_ms", "first_token_p95_ms", "total_p50_ms", "total_p95_ms"]
    fmt = lambda v: "–" if v is None else (f"{v:.0f}" if isinstance(v, float) and v > 10 else (f"{v:.3f}" if isinstance(v, float) else str(v)))
    print(f"\nanswers, backend {args.llm}{', no probe' if args.no_probe else ''}\n\n| set | " + " | ".join(keys) + " |\n|---|" + "---|" * len(keys))
    for s in summaries:
        print(f"| {s['set']} | " + " | ".join(fmt(s[k]) for k in keys) + " |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
