"""Re-score fusion variants from cached dense/BM25 rankings (no searching).

``bench/bench_retrieval.py`` saves, per question, the dense and BM25 top-100 chunk
ids and scores under ``index/_bench/<kb>/rankings.jsonl``. This script fuses them
with every variant below and scores the result exactly like ``rag eval``
(hit@1/hit@5/MRR@10/recall@10/all_groups@10 over answerable questions).

Usage::

    .venv/bin/python bench/tune_fusion.py [--sets seeds,cmrc2018,...] [--out bench/fusion.md]
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from bench_retrieval import SETS  # noqa: E402
from rag import metrics as M  # noqa: E402
from rag.config import Settings  # noqa: E402
from rag.evaluate import DEPTH, Judge, corpus_kb_name, load_questions, score_question  # noqa: E402
from rag.retrieve import fuse, fuse_scores  # noqa: E402
from rag.store import KnowledgeBase  # noqa: E402

# Must-beat numbers (../shared/notes/retrieval-baselines.md; seeds: answerable hit@5 = 1.0).
TARGETS = {
    "rgb_zh": {"hit@1": 0.77, "hit@5": 0.98},
    "rgb_zh_int": {"recall@10": 0.27},
    "cmrc2018": {"hit@1": 0.94},
    "drcd": {"hit@1": 0.92},
    "seeds": {"hit@5": 1.0},
}


# ----------------------------------------------------------------------------- fusion variants
def rrf(rrf_k: int, bm25_weight: float):
    def f(d, ds, b, bs):
        return [cid for cid, _ in fuse(d, b, rrf_k, bm25_weight)]
    f.__name__ = f"rrf k={rrf_k} w={bm25_weight}"
    return f


def dense_only(d, ds, b, bs):
    return list(d)


def bm25_only(d, ds, b, bs):
    return list(b)


def normalise(scores, norm: str):
    """Channel scores mapped to a common scale; returns (values, value for an absent item)."""
    if not scores:
        return [], 0.0
    if norm == "minmax":
        lo, hi = min(scores), max(scores)
        return [(s - lo) / (hi - lo) if hi > lo else 1.0 for s in scores], 0.0
    if norm == "max":  # divide by the channel's best score
        top = scores[0] or 1.0
        return [s / top for s in scores], 0.0
    mu = sum(scores) / len(scores)
    sd = math.sqrt(sum((s - mu) ** 2 for s in scores) / len(scores)) or 1.0
    if norm == "z":
        values = [(s - mu) / sd for s in scores]
        return values, min(values)
    if norm == "dbsf":  # distribution-based: mu ± 3 sd → [0, 1]
        return [min(1.0, max(0.0, (s - (mu - 3 * sd)) / (6 * sd))) for s in scores], 0.0
    raise ValueError(norm)


def score_fusion(alpha: float, norm: str = "minmax", depth: int | None = None):
    """Convex combination of normalised channel scores (dense weight 1-alpha, BM25 alpha);
    ``depth`` limits each list before normalising."""
    def f(d, ds, b, bs):
        if depth:
            d, ds, b, bs = d[:depth], ds[:depth], b[:depth], bs[:depth]
        dn, d_absent = normalise(ds, norm)
        bn, b_absent = normalise(bs, norm)
        dmap, bmap = dict(zip(d, dn)), dict(zip(b, bn))
        total = {cid: (1 - alpha) * dmap.get(cid, d_absent) + alpha * bmap.get(cid, b_absent)
                 for cid in set(d) | set(b)}
        return [cid for cid, _ in sorted(total.items(), key=lambda kv: -kv[1])]
    f.__name__ = f"score-{norm}{'@' + str(depth) if depth else ''} α={alpha}"
    return f


def paste_ready(bm25_weight: float):
    def f(d, ds, b, bs):
        return [cid for cid, _ in fuse_scores(d, ds, b, bs, bm25_weight)]
    f.__name__ = f"fuse_scores w={bm25_weight}"
    return f


def confidence_rrf(rrf_k: int = 30, low: float = 0.8, high: float = 1.5, margin: float = 0.15):
    """RRF whose BM25 weight follows how sure BM25 is: a clear BM25 winner (top-1 score
    ``margin`` above top-2, relative) gets weight ``high``, otherwise ``low``."""
    def f(d, ds, b, bs):
        sure = len(bs) >= 2 and bs[0] > 0 and (bs[0] - bs[1]) / bs[0] >= margin or len(bs) == 1
        return [cid for cid, _ in fuse(d, b, rrf_k, high if sure else low)]
    f.__name__ = f"conf-rrf k={rrf_k} w={low}/{high} m={margin}"
    return f


def variants():
    out = [dense_only, bm25_only]
    out += [rrf(k, w) for k in (10, 30, 60) for w in (0.8, 1.0, 1.2, 1.5)]
    out += [score_fusion(a) for a in (0.3, 0.4, 0.45, 0.5, 0.55, 0.6)]
    out += [score_fusion(a, "minmax", 20) for a in (0.4, 0.5, 0.6)]
    out += [score_fusion(a, "max") for a in (0.3, 0.5)]
    out += [score_fusion(a, "z") for a in (0.4, 0.5, 0.6)]
    out += [score_fusion(a, "dbsf") for a in (0.4, 0.5, 0.6)]
    out += [paste_ready(w) for w in (0.5, 0.55, 0.6, 0.65)]
    out += [confidence_rrf(k, lo, hi, m) for k in (10, 30, 60) for lo, hi in ((0.8, 1.5), (1.0, 2.0), (1.0, 3.0))
            for m in (0.2, 0.3)]
    return out


# ----------------------------------------------------------------------------- scoring
class SetData:
    def __init__(self, name: str, settings: Settings):
        corpus, questions_path = SETS[name]
        self.name = name
        kb_name = corpus_kb_name(corpus, settings)
        path = ROOT / "index" / "_bench" / kb_name / "rankings.jsonl"
        if not path.exists():
            raise FileNotFoundError(f"{path}: run bench/bench_retrieval.py --sets {name} first")
        self.rankings = {r["id"]: r for r in map(json.loads, path.read_text(encoding="utf-8").splitlines())}
        self.questions = [q for q in load_questions(questions_path) if q.id in self.rankings and not q.negative]
        kb = KnowledgeBase(settings.model_copy(update={"kb": kb_name}).kb_dir)
        judge = Judge(kb.document_text)  # quote judging reads the documents' original text
        self.doc_of: dict[int, str] = {}
        # gold units of every (question, candidate chunk), computed once from the cached spans
        self.units = {}
        for q in self.questions:
            r = self.rankings[q.id]
            for cid in set(r["dense"] + r["bm25"]):
                doc_id, start, end = r["chunks"][str(cid)]
                self.doc_of[cid] = doc_id
                self.units[q.id, cid] = judge.units(q, doc_id, start, end)
        kb.close()

    def score(self, fusion) -> dict[str, float]:
        per_q = []
        for q in self.questions:
            r = self.rankings[q.id]
            ranked = fusion(r["dense"], r["dense_scores"], r["bm25"], r["bm25_scores"])[:DEPTH]
            per_q.append(score_question(q, [self.units[q.id, cid] for cid in ranked],
                                        [self.doc_of.get(cid, "") for cid in ranked]))
        keys = per_q[0].keys() if per_q else []
        return {k: M.mean(s[k] for s in per_q) for k in keys}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sets", default=",".join(SETS))
    parser.add_argument("--out", default=str(ROOT / "bench" / "fusion.md"))
    parser.add_argument("--top", type=int, default=12, help="rows in the overall ranking")
    args = parser.parse_args(argv)
    settings = Settings()
    data = [SetData(n.strip(), settings) for n in args.sets.split(",") if n.strip()]
    results = {}  # variant -> set -> metrics
    for fusion in variants():
        results[fusion.__name__] = {d.name: d.score(fusion) for d in data}

    def overall(name):
        """Macro mean over sets of (hit@1 + MRR@10 + recall@10) / 3."""
        return M.mean((m["hit@1"] + m["mrr@10"] + m["recall@10"]) / 3 for m in results[name].values())

    def beats(name):
        return all(results[name][s][k] >= v - 1e-9 for s, t in TARGETS.items() if s in results[name]
                   for k, v in t.items())

    ranking = sorted(results, key=lambda n: -overall(n))
    lines = ["# Fusion variants (cached rankings, top 100 per channel)", "",
             "overall = macro mean over sets of (hit@1 + MRR@10 + recall@10)/3; ✓ = meets every must-beat target",
             "", "| variant | overall | ✓ | " + " | ".join(f"{d.name} h1/h5/mrr/r10" + ("/grp" if d.name == "rgb_zh_int" else "")
                                                       for d in data) + " |",
             "|---|---|---|" + "---|" * len(data)]
    for name in ranking:
        cells = []
        for d in data:
            m = results[name][d.name]
            cell = f"{m['hit@1']:.3f}/{m['hit@5']:.3f}/{m['mrr@10']:.3f}/{m['recall@10']:.3f}"
            if "all_groups@10" in m:
                cell += f"/{m['all_groups@10']:.2f}"
            cells.append(cell)
        lines.append(f"| {name} | {overall(name):.4f} | {'✓' if beats(name) else ''} | " + " | ".join(cells) + " |")
    text = "\n".join(lines) + "\n"
    Path(args.out).write_text(text, encoding="utf-8")
    print("\n".join(lines[:6 + args.top]))
    (Path(args.out).with_suffix(".json")).write_text(json.dumps(results, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
