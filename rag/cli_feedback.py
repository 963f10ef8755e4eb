"""``rag feedback export --kb K [--out FILE]``: the KB's stored answer feedback as a ``rag eval``
question set (see ``rag.feedback.export_questions`` and ``docs/feedback.md``);
``rag feedback list --kb K [--json]``: what is stored.

The export prints its counts (written per kind, skipped per reason); with ``--out -`` the
questions go to stdout and the counts to stderr.
"""
from __future__ import annotations

import json
import sys
from contextlib import closing
from pathlib import Path

from rag.store import KnowledgeBase, KnowledgeBaseError


def _open(args) -> KnowledgeBase:
    from rag.cli import _settings

    settings = _settings(args)
    if not (settings.kb_dir / "kb.sqlite").is_file():
        raise KnowledgeBaseError(f"知识库不存在：{settings.kb_dir} / knowledge base not found: {settings.kb_dir}")
    return KnowledgeBase(settings.kb_dir, lock_timeout=settings.write_lock_timeout)


def cmd_export(args) -> int:
    from rag.feedback import export_questions

    with closing(_open(args)) as kb:
        questions, counts = export_questions(kb)
        name = kb.path.name
    text = "".join(json.dumps(q, ensure_ascii=False) + "\n" for q in questions)
    if args.out == "-":
        sys.stdout.write(text)
        print(counts.summary(), file=sys.stderr)
        return 0
    out = Path(args.out or f"feedback-{name}.jsonl")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(out)  # a reader (rag eval) never sees half a file
    print(counts.summary())
    print(f"已写入 written: {out}  (rag eval {out} --kb {name})")
    return 0


def cmd_list(args) -> int:
    from rag.feedback import FeedbackLog

    with closing(_open(args)) as kb:
        entries = FeedbackLog(kb).entries()
    if args.json:
        print(json.dumps([e.to_dict() for e in entries], ensure_ascii=False, indent=2))
        return 0
    print(f"{len(entries)} 条反馈 feedback entries")
    for e in entries:
        mark = "👍" if e.vote > 0 else "👎"
        extra = "应拒答 should refuse" if e.should_refuse else (f"纠正 correction: {e.correction}" if e.correction else "")
        print(f"{e.id:5d} {mark} {e.question}" + (f"  · {extra}" if extra else "") +
              (f"  · {e.comment}" if e.comment else ""))
    return 0


def register(sub, common) -> None:
    p = sub.add_parser("feedback", parents=[common], help="回答反馈 answer feedback (export as an eval set)")
    actions = p.add_subparsers(dest="action", required=True)
    e = actions.add_parser("export", parents=[common], help="导出为 rag eval 问题集 write a rag eval question set")
    e.add_argument("--out", help="输出文件 output file (default feedback-<kb>.jsonl; - for stdout)")
    e.set_defaults(func=cmd_export)
    ls = actions.add_parser("list", parents=[common], help="列出反馈 list stored feedback")
    ls.add_argument("--json", action="store_true")
    ls.set_defaults(func=cmd_list)
