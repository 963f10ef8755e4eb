"""Reports of ``rag eval`` runs: metrics aggregated from the per-question log, ``report.json``,
``report.md``, the hit@k plot, comparison with an older report, and ``--fail-under`` gates."""
from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Iterable

from rag import metrics as M
from rag.config import PROJECT_ROOT


from rag.eval_questions import DEPTH, KS


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


def read_log(path: Path) -> dict[str, dict]:
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
        old_records = read_log(old_log)
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
    "latency": ["retrieve_p50_ms", "retrieve_p95_ms", "answer_p50_ms", "answer_p95_ms", "first_token_p50_ms",
                "first_token_p95_ms"],
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
