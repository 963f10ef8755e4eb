"""``rag eval-gen --kb K -n 50 [--out FILE] [--seed S] [--kinds single,two-part,negative]``:
draft a ``rag eval`` question set from the KB's own passages with the local LLM
(``rag.eval_gen``). Every question is written with ``"status": "draft"`` for review before use:
``rag eval`` refuses a file holding drafts. Review them in the UI (评测 → 审核草稿 loads this file),
which saves the accepted ones as a runnable set. The counts per kind and the rejected LLM drafts per
reason are printed.
"""
from __future__ import annotations

import sys
from pathlib import Path


def cmd_eval_gen(args) -> int:
    from rag.cli import _settings
    from rag.eval_drafts import write_rows
    from rag.eval_gen import KINDS, GenStats, as_rows, draft_questions
    from rag.service import RagService

    settings = _settings(args)
    kinds = tuple(k.strip() for k in (args.kinds or ",".join(KINDS)).split(",") if k.strip())
    bad = [k for k in kinds if k not in KINDS]
    if bad or args.n < 1:
        print(f"bad --kinds {bad} (use {','.join(KINDS)}) or -n < 1", file=sys.stderr)
        return 2
    service = RagService(settings)
    if not (settings.kb_dir / "kb.sqlite").is_file():
        print(f"知识库不存在 knowledge base not found: {settings.kb_dir}", file=sys.stderr)
        return 2
    stats = GenStats()
    say = (lambda line: print(line, file=sys.stderr)) if args.verbose else None
    drafts = draft_questions(service, settings.kb, args.n, kinds=kinds, seed=args.seed, stats=stats, progress=say,
                             max_calls=args.max_calls)
    out = write_rows(Path(args.out or f"eval-gen-{settings.kb}.jsonl"), as_rows(drafts))
    print(stats.summary())
    print(f"已写入 written: {out}  ({len(drafts)} 条草稿 drafts)\n"
          f"使用前请审核：rag serve --kb {settings.kb} → 评测 → 审核草稿 → 载入此文件；rag eval 不运行未审核的草稿"
          f" / review before use in the UI (评测 → 审核草稿, load this file): rag eval refuses unreviewed drafts")
    return 0


def register(sub, common) -> None:
    p = sub.add_parser("eval-gen", parents=[common], help="从知识库生成评测问题草稿 draft an eval question set")
    p.add_argument("-n", type=int, default=50, help="草稿数 drafts wanted (default 50)")
    p.add_argument("--out", help="输出文件 output file (default eval-gen-<kb>.jsonl)")
    p.add_argument("--seed", type=int, default=0, help="随机种子 seed for passage order and replacement places")
    p.add_argument("--kinds", help="single,two-part,negative (default all)")
    p.add_argument("--max-calls", type=int, help="LLM 调用上限 at most this many LLM calls (default 3n+6)")
    p.add_argument("-v", "--verbose", action="store_true", help="print each kept single draft")
    p.set_defaults(func=cmd_eval_gen)
