"""Step 5 — store/index: one knowledge base on disk.

Layout of ``<home>/<kb>/``::

    kb.sqlite      documents, chunks, the embedding cache, meta (source of truth)
    gen-<N>/       derived indexes of generation N: dense.faiss, bm25 (bm25s), rows.npy

SQLite is the source of truth; the FAISS and BM25 files are rebuilt from it and
belong to a numbered generation (a Milvus KB syncs a collection instead:
``rag.store_milvus``). A write goes: new generation directory written
and fsynced under a temporary name, renamed, then the generation number is
committed in the same SQLite transaction as the rows. A crash at any point
leaves either the old or the new generation complete. Nothing is ever
unpickled: FAISS's own format, ``np.load(allow_pickle=False)``, JSON and SQLite.
All SQL lives here and in ``store_reads`` (document and chunk reads), ``store_transaction`` / ``store_schema`` (the versioned schema:
an older KB is migrated when opened, a newer one refused) / ``store_milvus`` (its reads) / ``feedback``.

One writer at a time per KB, across processes: ``write.lock`` (filelock) is held by
every ingest, removal and reindex (``KnowledgeBase.write_lock``); a second writer says
it is waiting and gives up after ``write_lock_timeout`` seconds. The code is safe
without the lock too: vectors an unfinished writer embedded or is about to reuse are
claimed (``writers`` / ``vector_claims``) and no commit deletes them while that
writer lives, and a generation folder is only deleted when it is older than the
committed one, or inside a write transaction (when nobody else can be writing one).
"""
from __future__ import annotations

import json
import os
import sqlite3
import sys
import threading
import time
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import filelock
import numpy as np

from rag.index_files import Indexes, clear_leftovers, read_generation, remove_older_generations, write_generation
from rag.store_milvus import finish_milvus, sync_milvus
from rag.store_reads import DocumentInfo, DocumentReads, StoredChunk  # noqa: F401 (re-exported)
from rag.store_schema import SCHEMA_VERSION, WRITER_TABLES, ensure_schema, schema_version  # noqa: F401 (re-exported)
from rag.store_transaction import KnowledgeBaseTransaction, get_meta, set_meta, stored_user_words
from rag.writers import HOST, LockReportingConnection, default_lock_timeout, writer_alive
from rag.writers import KnowledgeBaseBusyError, KnowledgeBaseError  # noqa: F401 (callers import them from here)


class KnowledgeBase(DocumentReads):
    """A knowledge base directory.

    Args:
        path: the KB directory (created when ``create`` is true).
        create: create an empty KB when missing.
        lock_timeout: seconds a writer waits for another writer (the lock file, then SQLite's
            own write lock) before failing with ``KnowledgeBaseBusyError``; default
            ``Settings().write_lock_timeout``.
    """

    def __init__(self, path: Path, create: bool = False, lock_timeout: float | None = None):
        self.path = Path(path)
        self._db_file = self.path / "kb.sqlite"
        if not self._db_file.exists() and not create:
            raise KnowledgeBaseError(
                f"知识库不存在：{self.path}（先运行 rag ingest）/ knowledge base not found: {self.path} (run rag ingest first)"
            )
        self.path.mkdir(parents=True, exist_ok=True)
        self.lock_timeout = float(default_lock_timeout() if lock_timeout is None else lock_timeout)
        self._lock_owner: int | None = None  # thread holding write_lock() through this object
        self._lock_depth = 0
        self._token: str | None = None  # this writer's registration in ``writers`` (while it claims vectors)
        self._retired: list[sqlite3.Connection] = []
        self.db = self._connect()

    def _connect(self) -> sqlite3.Connection:
        # check_same_thread=False: the UI and API read from worker threads; writes are
        # serialised by the lock file and SQLite's own lock (BEGIN IMMEDIATE). The busy
        # timeout makes a writer wait for SQLite's lock as long as for the lock file.
        db = sqlite3.connect(str(self._db_file), timeout=self.lock_timeout, isolation_level=None,
                             check_same_thread=False, factory=LockReportingConnection)
        db.kb_name, db.busy_seconds = self.path.name, self.lock_timeout
        try:
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA secure_delete=ON")  # deleted text is zeroed, not left in free pages
            db.execute("PRAGMA foreign_keys=ON")
            ensure_schema(db, self.path)  # migrates an older KB, refuses a newer one
            st = os.stat(self._db_file)
        except BaseException:
            db.close()
            raise
        self._identity = (st.st_dev, st.st_ino)
        return db

    def refresh(self) -> bool:
        """Follow the KB on disk: when ``kb.sqlite`` was deleted and built again since this
        object opened it (``rm -rf index/<kb>`` then a new ingest), reopen it and return True.
        Raises ``KnowledgeBaseError`` when the KB is gone. Costs one ``stat``.
        """
        try:
            st = os.stat(self._db_file)
        except FileNotFoundError:
            raise KnowledgeBaseError(
                f"知识库已被删除：{self.path}（重新运行 rag ingest）/ knowledge base was deleted: {self.path}"
            ) from None
        if (st.st_dev, st.st_ino) == self._identity:
            return False
        old, self.db = self.db, self._connect()
        self._retired.append(old)  # other threads may still be reading through it; closed in close()
        return True

    # ---------------------------------------------------------------- meta
    def meta(self, key: str, default: str | None = None) -> str | None:
        """One stored setting (``generation``, ``embedder``, ``dim``, ``user_words``), or ``default``."""
        return get_meta(self.db, key, default)

    def _set_meta(self, key: str, value: str) -> None:
        set_meta(self.db, key, value)

    @property
    def schema_version(self) -> int:
        """The schema version of ``kb.sqlite`` (``SCHEMA_VERSION`` once opened)."""
        return schema_version(self.db)

    def user_words(self) -> list[str]:
        """The words the KB's BM25 tokeniser keeps whole (the user dictionary of its ingests),
        stored so that query time tokenises exactly like index time."""
        return stored_user_words(self.db)

    @property
    def generation(self) -> int:
        return int(self.meta("generation", "0"))

    @property
    def embedder_id(self) -> str | None:
        return self.meta("embedder")

    def check_embedder(self, embedder_id: str, dim: int) -> None:
        """Refuse to mix vectors of different models in one KB."""
        known = self.embedder_id
        if known is None:
            with self._write():
                if self.embedder_id is None:  # another writer may have set it meanwhile
                    self._set_meta("embedder", embedder_id)
                    self._set_meta("dim", str(dim))
            known = self.embedder_id
        if known != embedder_id or self.meta("dim") != str(dim):
            raise KnowledgeBaseError(
                f"知识库 {self.path.name} 由嵌入模型 {known}（{self.meta('dim')} 维）建立，不能混用 {embedder_id}"
                f"（{dim} 维）；请新建知识库或用原模型。"
                f" / KB {self.path.name} was built with {known}; refusing to mix in {embedder_id}."
            )

    def cached_vectors(self, hashes: list[str]) -> dict[str, np.ndarray]:
        """Vectors already computed for these content hashes (never re-embed unchanged text).

        A writer that means to link them should ``claim_vectors`` first, so that another
        writer's commit cannot prune them in between.
        """
        found: dict[str, np.ndarray] = {}
        for i in range(0, len(hashes), 500):
            part = hashes[i:i + 500]
            marks = ",".join("?" * len(part))
            for h, blob in self.db.execute(
                f"SELECT content_hash, vector FROM vectors WHERE content_hash IN ({marks})", part
            ).fetchall():
                found[h] = np.frombuffer(blob, dtype=np.float32)
        return found

    # ---------------------------------------------------------------- writes
    @contextmanager
    def write_lock(self) -> Iterator[None]:
        """Hold ``<kb>/write.lock``: one writer per KB across processes (and threads).

        Re-entrant for the thread holding it through this object. A writer that finds the
        lock taken says so on stderr and waits up to ``lock_timeout`` seconds, then raises
        ``KnowledgeBaseBusyError``. The kernel frees the lock when its holder dies (kill -9).
        """
        me = threading.get_ident()
        if self._lock_owner == me:
            self._lock_depth += 1
            try:
                yield
            finally:
                self._lock_depth -= 1
            return
        lock = filelock.FileLock(str(self.path / "write.lock"))
        name = self.path.name
        try:
            lock.acquire(timeout=0)
        except filelock.Timeout:
            print(f"知识库 {name} 正被另一个写入进程使用，等待中…（最多 {self.lock_timeout:g} 秒）"
                  f" / KB {name} is being written by another process, waiting… (up to {self.lock_timeout:g} s)",
                  file=sys.stderr, flush=True)
            try:
                lock.acquire(timeout=max(self.lock_timeout, 0.0))
            except filelock.Timeout:
                raise KnowledgeBaseBusyError(
                    f"知识库 {name} 正被另一个写入进程使用，等待 {self.lock_timeout:g} 秒后放弃，请稍后再试"
                    f" / KB {name} is being written by another process; gave up after {self.lock_timeout:g} s,"
                    f" try again later") from None
        self._lock_owner, self._lock_depth = me, 1
        try:
            yield
        finally:
            self._lock_owner, self._lock_depth = None, 0
            lock.release()

    @contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        self.db.execute("BEGIN IMMEDIATE")
        try:
            for statement in WRITER_TABLES:
                self.db.execute(statement)
            yield self.db
        except BaseException:
            if self.db.in_transaction:
                self.db.execute("ROLLBACK")
            raise
        self.db.execute("COMMIT")

    def _register(self, db: sqlite3.Connection) -> str:
        if self._token is None:
            self._token = uuid.uuid4().hex
        db.execute("INSERT OR IGNORE INTO writers(token, pid, host, started_at) VALUES (?, ?, ?, ?)",
                   (self._token, os.getpid(), HOST, time.time()))
        return self._token

    def claim_vectors(self, hashes: list[str]) -> None:
        """Mark vectors this writer will link at its commit (found in the cache, or about to be
        embedded): until then, or until this writer closes or dies, no commit prunes them."""
        if not hashes:
            return
        with self._write() as db:
            token = self._register(db)
            db.executemany("INSERT OR IGNORE INTO vector_claims(token, content_hash) VALUES (?, ?)",
                           [(token, h) for h in hashes])

    def cache_vectors(self, hashes: list[str], vectors: np.ndarray) -> None:
        """Store one embedded batch (its own transaction, so an interrupted ingest resumes);
        the vectors stay claimed by this writer until its commit."""
        with self._write() as db:
            token = self._register(db)
            db.executemany(
                "INSERT OR REPLACE INTO vectors(content_hash, vector) VALUES (?, ?)",
                [(h, np.asarray(v, dtype=np.float32).tobytes()) for h, v in zip(hashes, vectors)],
            )
            db.executemany("INSERT OR IGNORE INTO vector_claims(token, content_hash) VALUES (?, ?)",
                           [(token, h) for h in hashes])

    def _release_claims(self, db: sqlite3.Connection) -> None:
        """Inside a write transaction: drop this writer's claims and those of dead writers."""
        gone = [token for token, pid, host, started in
                db.execute("SELECT token, pid, host, started_at FROM writers").fetchall()
                if token == self._token or not writer_alive(pid, host, started)]
        for token in gone:
            db.execute("DELETE FROM vector_claims WHERE token=?", (token,))
            db.execute("DELETE FROM writers WHERE token=?", (token,))
        db.execute("DELETE FROM vector_claims WHERE token NOT IN (SELECT token FROM writers)")
        self._token = None

    @contextmanager
    def transaction(self) -> Iterator["KnowledgeBaseTransaction"]:
        """Change documents atomically; the indexes are rebuilt before the commit.

        Holds the write lock (``write_lock``) for its duration. Usage::

            with kb.transaction() as tx:
                tx.put_document(...)
                tx.delete_document("old.txt")
        """
        with self.write_lock():
            with self._write() as db:
                # Nobody else can be writing index files now (they are only written inside a write
                # transaction): whatever a crashed writer left can go.
                self._clear_index_leftovers()
                tx = KnowledgeBaseTransaction(db)
                yield tx
                new_generation = self.generation
                if tx.changed:
                    new_generation += 1
                    self._build_indexes(new_generation)
                    self._set_meta("generation", str(new_generation))
                self._release_claims(db)  # this writer's vectors are linked now (or not needed)
                if tx.changed:
                    # Forget vectors no chunk uses any more (deleted text leaves nothing behind),
                    # except those an unfinished writer embedded or is about to reuse.
                    db.execute("DELETE FROM vectors WHERE content_hash NOT IN (SELECT content_hash FROM chunks) "
                               "AND content_hash NOT IN (SELECT content_hash FROM vector_claims)")
            if tx.changed:
                finish_milvus(self)  # a Milvus KB: commit there too, purge what it replaced
                self._checkpoint()
                self.remove_stale_generations(below=new_generation)

    def reindex(self) -> int:
        """Rebuild the derived FAISS/BM25 indexes from SQLite as a new generation.

        Repairs lost or damaged index files; open searchers pick the new generation up on
        their next query. Holds the write lock (waits for another writer, see ``write_lock``).

        Returns:
            The new generation; the current one, unbuilt, when nothing was ever indexed
            (no embedder recorded yet).
        """
        with self.write_lock():
            if self.embedder_id is None:
                return self.generation
            with self.transaction() as tx:
                tx.request_rebuild()
            return self.generation

    def mark_documents_stale(self) -> int:
        """Make the next ingest treat every stored document as changed, so it splits and
        tokenises them again (after the chunking code changed); their vectors stay cached,
        so unchanged chunk texts are not embedded again. The indexes are left as they are.

        Returns:
            How many documents were marked.
        """
        with self.write_lock(), self._write() as db:
            # No real content hash is "stale": every document's stored hash then differs.
            return db.execute("UPDATE documents SET content_hash = 'stale'").rowcount

    def _checkpoint(self) -> None:
        """Fold the WAL into the database file (deleted text must not stay in the -wal file);
        waits for readers at most 30 s."""
        wait_ms = int(min(self.lock_timeout, 30.0) * 1000)
        self.db.execute(f"PRAGMA busy_timeout = {wait_ms}")
        try:
            self.db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        except KnowledgeBaseBusyError:
            pass  # readers kept it busy: the next commit checkpoints
        finally:
            self.db.execute(f"PRAGMA busy_timeout = {int(self.lock_timeout * 1000)}")

    def _build_indexes(self, generation: int) -> None:
        if sync_milvus(self, generation):  # the KB's index is a Milvus collection: no files
            return
        rows = self.db.execute(
            "SELECT c.id, c.lexical, v.vector FROM chunks c JOIN vectors v ON v.content_hash = c.content_hash "
            "ORDER BY c.id"
        ).fetchall()
        missing = self.db.execute(
            "SELECT COUNT(*) FROM chunks WHERE content_hash NOT IN (SELECT content_hash FROM vectors)"
        ).fetchone()[0]
        if missing:
            raise KnowledgeBaseError(f"{missing} chunks have no vector; refusing to build an incomplete index")
        dim = int(self.meta("dim", "0") or 0)
        ids = np.array([r[0] for r in rows], dtype=np.int64)
        vectors = (np.frombuffer(b"".join(r[2] for r in rows), dtype=np.float32).reshape(len(rows), dim)
                   if rows else np.zeros((0, dim), dtype=np.float32))
        write_generation(self.path, generation, ids, vectors, [json.loads(r[1]) or [""] for r in rows])

    def _clear_index_leftovers(self) -> None:
        """Inside a write transaction only: delete every index folder but the committed one."""
        clear_leftovers(self.path, self.generation)

    def remove_stale_generations(self, below: int | None = None) -> None:
        """Delete index folders of generations older than the committed one (or ``below``).

        Never a newer or temporary folder: outside a write transaction another writer may be
        writing it (what crashed writers leave is cleared inside the next write transaction).
        """
        remove_older_generations(self.path, self.generation if below is None else min(below, self.generation))

    # ---------------------------------------------------------------- index loading
    def load_indexes(self) -> Indexes | None:
        """Load the current generation's indexes (None for an empty KB)."""
        for _ in range(3):  # a writer may swap generations while we read
            generation = self.generation
            if generation == 0:
                return None
            try:
                return read_generation(self.path, generation)
            except (RuntimeError, FileNotFoundError, OSError):
                time.sleep(0.05)
        raise KnowledgeBaseError(f"index files of generation {self.generation} are missing in {self.path}")

    def close(self) -> None:
        """Close the database; a writer that claimed vectors and did not commit gives them up."""
        if self._token is not None:
            try:
                with self._write() as db:
                    db.execute("DELETE FROM vector_claims WHERE token=?", (self._token,))
                    db.execute("DELETE FROM writers WHERE token=?", (self._token,))
            except (sqlite3.Error, KnowledgeBaseError):
                pass  # the next commit drops a dead writer's claims anyway
            self._token = None
        for db in (*self._retired, self.db):
            db.close()
        self._retired.clear()
