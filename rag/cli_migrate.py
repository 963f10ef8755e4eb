"""``rag migrate --kb K --to milvus [--uri U]``: move a knowledge base's index to Milvus (or back
with ``--to faiss``) without embedding anything again.

The chunks, their cached vectors and their stored BM25 tokens are copied from SQLite (which stays
the KB's docstore and source of truth) as one new generation, in the same SQLite transaction that
records the choice in the KB (``meta.store``, see ``rag.store_milvus``): a failure leaves the KB as
it was. Later opens of the KB (search, ingest, UI, API, eval) use the recorded store whatever
``RAG_STORE`` says; ``RAG_STORE`` only chooses the store of new KBs. Run again on a Milvus KB it
rebuilds the collection from SQLite (the repair after a lost or damaged collection).

It reports documents, chunks and seconds, then checks that the collection holds exactly the KB's
chunks (every SQLite chunk id visible at the KB's generation, nothing else).
"""
from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass

from rag.config import Settings
from rag.store import KnowledgeBase, KnowledgeBaseError
from rag.store_milvus import (MILVUS, MilvusStoreError, acquire, kb_store, milvus_errors, milvus_target, release,
                              select_store, sqlite_chunks, visible_chunks)


@dataclass
class MigrateReport:
    kb: str
    store: str
    target: str  # where the index now is
    documents: int
    chunks: int
    seconds: float
    generation: int
    checked: bool  # the index holds exactly the KB's chunks

    def summary(self) -> str:
        check = "通过 ok" if self.checked else "失败 FAILED"
        return (f"知识库 {self.kb} 已迁移到 {self.store} / migrated to {self.store}: {self.target}\n"
                f"文档 documents {self.documents} · 片段 chunks {self.chunks} · 用时 {self.seconds:.1f}s"
                f" · 第 {self.generation} 代 generation\n"
                f"自检 self-check (every chunk in the index, nothing else): {check}\n"
                f"此后打开该知识库都使用 {self.store}（已记录在知识库中，与 RAG_STORE 无关）"
                f" / later opens of this KB use {self.store} (recorded in the KB, whatever RAG_STORE says)")


def migrate(settings: Settings, to: str, uri: str | None = None) -> MigrateReport:
    """Move ``settings.kb``'s index to ``to`` (``milvus`` or ``faiss``); see the module docstring.

    Raises:
        KnowledgeBaseError: no such KB, Milvus unreachable (``MilvusStoreError``), another writer.
    """
    started = time.perf_counter()
    kb = KnowledgeBase(settings.kb_dir, lock_timeout=settings.write_lock_timeout)
    try:
        before = kb_store(kb)
        with kb.transaction() as tx:
            select_store(kb, to, uri)
            if kb.embedder_id is not None:  # an empty KB only records the choice
                tx.request_rebuild()
        seconds = time.perf_counter() - started
        report = MigrateReport(kb.path.name, to, "", len(kb.documents()), kb.chunk_count(), seconds,
                               kb.generation, False)
        stored = sqlite_chunks(kb.db)
        if to == MILVUS:
            target = milvus_target(kb, settings)
            report.target = target.shown
            if kb.generation:
                index = acquire(target, int(kb.meta("dim", "0") or 0), kb.embedder_id or "")
                try:
                    with milvus_errors(target, "checking"):
                        report.checked = visible_chunks(index, kb.generation, max(stored, default=0)) == stored
                finally:
                    release(index)
            else:
                report.checked = not stored
        else:
            report.target = str(kb.path)
            indexes = kb.load_indexes()
            report.checked = (sorted(indexes.bm25_rows.tolist()) == sorted(stored) if indexes else not stored)
            if before == MILVUS:
                _drop_collection(kb, settings)
        return report
    finally:
        kb.close()


def _drop_collection(kb: KnowledgeBase, settings: Settings) -> None:
    """After a move back to FAISS: the KB's Milvus collection goes (deleted text must not linger)."""
    try:
        target = milvus_target(kb, settings)
        index = acquire(target, int(kb.meta("dim", "0") or 0), kb.embedder_id or "")
        try:
            with milvus_errors(target, "dropping the collection"):
                index.client.drop_collection(target.collection)
        finally:
            release(index)
    except MilvusStoreError as exc:
        print(f"警告 warning: 未能删除 Milvus 集合 / could not drop the Milvus collection: {exc}")


def cmd_migrate(args) -> int:
    from rag.cli import _settings

    settings = _settings(args)
    if not (settings.kb_dir / "kb.sqlite").is_file():
        raise KnowledgeBaseError(f"知识库不存在：{settings.kb_dir} / knowledge base not found: {settings.kb_dir}")
    report = migrate(settings, args.to, args.uri)
    print(json.dumps(asdict(report), ensure_ascii=False, indent=2) if args.json else report.summary())
    return 0 if report.checked else 1


def register(sub, common) -> None:
    p = sub.add_parser("migrate", parents=[common],
                       help="把知识库索引迁移到 Milvus（或 FAISS），不重新嵌入 move a KB's index to Milvus (or FAISS)")
    p.add_argument("--to", required=True, choices=["milvus", "faiss"], help="目标 target store")
    p.add_argument("--uri", default=None,
                   help="Milvus 地址：.db 文件（milvus-lite）或 http(s)://主机:19530 (default: RAG_MILVUS_URI, "
                        "else the KB's recorded one, else <kb>/milvus.db)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_migrate)
