"""Re-score logged answers with the current verifier, and choose the judge threshold.

`rag eval --llm local` logs, per question, the model's raw answer, the standalone query,
the numbered passages (text, title/section) and the judge's probability. Re-running the
verifier on those logs takes seconds, so alignment rules and the judge threshold can be
measured on every set without waiting for the LLM again.

    .venv/bin/python bench/tune_trust.py RUN_DIR [RUN_DIR ...] [--thresholds 0 0.3 0.5 0.7]

Prints, per run directory and threshold: accuracy and false refusals on answerable
questions, refusals on unanswerable ones, and (with --misses) what went wrong where.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from functools import lru_cache
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from rag import metrics as M  # noqa: E402
from rag.places import dominant_place  # noqa: E402
from rag.cite import verify  # noqa: E402
from rag.config import Settings  # noqa: E402
from rag.evaluate import Question  # noqa: E402
from rag.store import KnowledgeBase  # noqa: E402
from rag.zh import is_refusal  # noqa: E402


@lru_cache(maxsize=8)
def _kb(kb: str) -> KnowledgeBase:
    return KnowledgeBase(Settings().home / kb)


@lru_cache(maxsize=4096)
def _place(kb: str, doc_id: str) -> str | None:
    doc = _kb(kb).document_text(doc_id)
    return dominant_place(doc[1]) if doc else None


def rescore(record: dict, question: Question, kb: str, threshold: float) -> dict:
    """The answer the current verifier (and judge threshold) would give for a logged record."""
    answer = record["answer"]
    raw, passages = answer.get("raw_answer", ""), answer.get("passages") or []
    refused = is_refusal(raw) or not passages
    text = raw
    if not refused:
        check = verify(raw, [p["text"] for p in passages], question=answer.get("query") or question.question,
                       contexts=[p.get("context", "") for p in passages],
                       places=[_place(kb, p["doc_id"]) for p in passages])
        text = check.answer
        refused = not check.used_numbers
        judge = answer.get("judge")
        if not refused and judge is not None and judge < threshold:
            refused = True
    correct = (not question.negative and not refused and bool(question.parts)
               and M.answer_correct(text, question.parts))
    return {"refused": refused, "correct": correct, "text": text}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", type=Path)
    parser.add_argument("--thresholds", nargs="+", type=float, default=[0.0, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8])
    parser.add_argument("--misses", action="store_true", help="list what goes wrong at the first threshold")
    args = parser.parse_args()
    print("| run | threshold | n | accuracy | false refusal | refusal (unanswerable) | of which the model's own |")
    print("|---|---|---|---|---|---|---|")
    for run in args.runs:
        config = json.loads((run / "run.json").read_text(encoding="utf-8"))["config"]
        questions = {q["id"]: Question.from_dict(q) for q in map(json.loads, Path(config["questions"]).read_text(
            encoding="utf-8").splitlines()) if q}
        records = [json.loads(line) for line in (run / "log.jsonl").read_text(encoding="utf-8").splitlines()
                   if line.strip()]
        records = [r for r in records if "answer" in r and "error" not in r["answer"]]
        for threshold in args.thresholds:
            pos, neg = [], []
            for r in records:
                q = questions[r["id"]]
                out = rescore(r, q, config["kb"], threshold)
                (neg if q.negative else pos).append((r, out))
                if args.misses and threshold == args.thresholds[0]:
                    wrong = out["refused"] != q.negative or (not q.negative and not out["correct"])
                    if wrong:
                        print(f"  miss {r['id']} neg={q.negative} judge={r['answer'].get('judge')} "
                              f"{r['answer'].get('query')!r} -> {out['text'][:70]!r}", file=sys.stderr)
            acc = M.mean(o["correct"] for _, o in pos)
            false_refusal = M.mean(o["refused"] for _, o in pos)
            refusal = M.mean(o["refused"] for _, o in neg)
            own = M.mean(is_refusal(r["answer"].get("raw_answer", "")) for r, _ in neg)
            fmt = lambda v: "–" if v is None else f"{v:.3f}"  # noqa: E731
            print(f"| {run.name} | {threshold} | {len(pos)}+{len(neg)} | {fmt(acc)} | {fmt(false_refusal)} | {fmt(refusal)} | {fmt(own)} |")


if __name__ == "__main__":
    main()
