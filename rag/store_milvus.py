"""A knowledge base whose index is a Milvus collection: the sync from SQLite (still the docstore and
the source of truth) to Milvus, run by ``KnowledgeBase._build_indexes`` instead of writing the
FAISS/bm25s files, and the shared connections (``rag.milvus_index.MilvusIndex``).

Which store a KB uses is recorded in its ``meta`` table, once:

- ``store = milvus`` marks a Milvus KB. It is written at the KB's first index build when
  ``RAG_STORE=milvus`` (the process's environment or ``.env``: the store has no ``Settings`` of its
  own), or by ``rag migrate --to milvus`` (``select_store``). A KB without it is a FAISS KB (so is
  every KB made before). ``RAG_STORE`` chooses for new KBs only; ``rag migrate`` moves one.
- ``milvus_uri``: where (absent: ``<kb_dir>/milvus.db``, milvus-lite); ``milvus_collection``: the
  KB's collection (``rag_<name>_<random>``). A token is never stored: ``RAG_MILVUS_TOKEN``.

The sync of generation ``n`` (SQLite's committed generation is ``s = n - 1``) runs under the KB's
write lock, inside its SQLite write transaction, so a failure rolls SQLite back: nothing changes.

Where BM25 is scored per segment (milvus-lite, embedded or behind ``milvus-lite server``; see
``REBUILD_LITE`` and ``rewrites``) every chunk is written into a fresh collection ``<base>_g<n>``,
flushed and checked; the KB's ``milvus_collection`` switches to it in the same SQLite commit; after the
commit (``finish_milvus``) the replaced collection is dropped.

On a Milvus server that scores BM25 with collection-wide statistics (checked once per process by
``rag.milvus_client.bm25_statistics_are_global``), incrementally, in the KB's one collection:

1. reconcile: when Milvus's committed generation is not ``s`` (a crash between the SQLite commit and
   Milvus's, a restored ``kb.sqlite``, a new or emptied collection), commit ``s`` in Milvus: rows
   beyond it are dropped by ``repair`` and step 2 rewrites whatever differs from SQLite;
2. diff ``chunk id → doc id`` of SQLite against the rows visible in Milvus at ``s``: documents whose
   chunks differ are written whole (new, changed, renamed), documents gone are deleted; when nothing
   differs (a reindex, new user words) every document is written again (that is the rebuild);
3. write generation ``n`` uncommitted (``upsert_documents(commit=False)``: new rows ``gen = n``,
   replaced rows ``gen_end = n``), check the collection holds exactly SQLite's chunks at ``n``; then
   SQLite commits ``n``;
4. after SQLite's commit (``finish_milvus``): Milvus commits ``n``, purges the replaced and deleted
   rows, flushes.

Queries (``rag.milvus_search``) read at SQLite's generation, passed to both channels, not at
Milvus's marker, and take the collection from the same SQLite snapshot: at ``s`` they see the old
rows (the new ones have ``gen > s``, or sit in a collection SQLite does not name yet), at ``n`` the
new ones. A crash at any point therefore leaves no half-visible document, and a query never shows
what SQLite has not committed. Vectors come from the SQLite cache, BM25 tokens from the stored
``chunks.lexical``: nothing is embedded or tokenised again.
"""
from __future__ import annotations

import json
import re
import sys
import threading
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from rag.config import Settings
from rag.milvus_client import MilvusIndexError, _is_local, _redact, bm25_statistics_are_global
from rag.milvus_index import MilvusIndex
from rag.store_transaction import set_meta
from rag.writers import KnowledgeBaseError

if TYPE_CHECKING:
    from rag.store import KnowledgeBase

MILVUS = "milvus"
MAX_LIMIT = 16_384  # Milvus's largest search/query window
_CLIP = {"title": 1000, "section": 2000, "source": 2000}  # bytes (the collection's VARCHAR limits)


class MilvusStoreError(KnowledgeBaseError):
    """A Milvus KB that cannot be used now (bad URI, server down, collection behind the KB)."""


@dataclass(frozen=True)
class Target:
    """Where a Milvus KB's collection is."""

    uri: str
    collection: str
    token: str | None = None

    @property
    def shown(self) -> str:
        return f"{_redact(self.uri)} ({self.collection})"


def kb_store(kb: KnowledgeBase) -> str:
    """``milvus`` or ``faiss``: the recorded choice; a KB that has an index and no record is a FAISS
    KB (made before the choice existed); a new one takes ``RAG_STORE``."""
    recorded = kb.meta("store")
    if recorded:
        return recorded
    return "faiss" if kb.generation > 0 else Settings().store


def _default_uri(kb: KnowledgeBase) -> str:
    return str(kb.path / "milvus.db")


def milvus_target(kb: KnowledgeBase, settings: Settings | None = None, state: dict | None = None) -> Target:
    """The KB's collection: recorded URI (else ``<kb_dir>/milvus.db``) and name, from ``state``
    (``milvus_state``) or the KB's meta; the token from ``settings`` (default: the environment)."""
    state = milvus_state(kb) if state is None else state
    collection = state.get("milvus_collection")
    if not collection:
        raise MilvusStoreError(f"知识库 {kb.path.name} 没有 Milvus 集合 / KB {kb.path.name} has no Milvus collection")
    token = (settings or Settings()).milvus_token
    return Target(state.get("milvus_uri") or _default_uri(kb), collection, token)


def select_store(kb: KnowledgeBase, store: str, uri: str | None = None) -> None:
    """Record the KB's store (inside ``kb.transaction()``: the choice commits with the index built
    for it, or not at all). For Milvus: a collection name when it has none, and the URI: ``uri``,
    else ``RAG_MILVUS_URI``, else the recorded one, else the default (not recorded: it moves with the
    KB folder). A local path is stored absolute; a URI with credentials in it is refused (a token
    lives in ``RAG_MILVUS_TOKEN`` only, never in the KB)."""
    set_meta(kb.db, "store", store)
    if store != MILVUS:
        return
    if not kb.meta("milvus_collection"):
        name = re.sub(r"\W", "_", kb.path.name, flags=re.ASCII)[:40]
        set_meta(kb.db, "milvus_collection", f"rag_{name}_{uuid.uuid4().hex[:8]}")
    uri = uri or Settings().milvus_uri or kb.meta("milvus_uri")
    if uri and not _is_local(uri) and _redact(uri) != uri:  # http://user:password@host: stored in kb.sqlite
        raise MilvusStoreError(f"Milvus 地址 {_redact(uri)} 含有用户名和密码，会被记录在知识库里；请把它们放在 "
                               "RAG_MILVUS_TOKEN（user:password），地址中去掉 / the Milvus URI "
                               f"{_redact(uri)} holds credentials, which would be stored in the KB: give them in "
                               "RAG_MILVUS_TOKEN (user:password) and the URI without them")
    if uri and _is_local(uri):
        uri = str(Path(uri).expanduser().absolute())
    if uri and uri != _default_uri(kb):
        set_meta(kb.db, "milvus_uri", uri)
    else:
        kb.db.execute("DELETE FROM meta WHERE key = 'milvus_uri'")


# ---------------------------------------------------------------- shared connections
# One MilvusIndex per collection per process, counted: milvus-lite runs one embedded server per
# .db per process, and closing any client of it stops that server for every other client.
_lock = threading.Lock()
_open: dict[tuple[str, str], list] = {}  # (uri, collection) -> [index, users]


def _tokens_come_from_sqlite(text: str) -> list[str]:
    raise RuntimeError("a KB's BM25 tokens are stored in SQLite (chunks.lexical); none are made here")


def acquire(target: Target, dim: int, embedder_id: str, replace: bool = False) -> MilvusIndex:
    """This process's connection to ``target`` (opened on first use); give it back with ``release``.
    ``replace``: a collection not open in this process is dropped and made again (``MilvusIndex.open``).

    Raises:
        MilvusStoreError: bad URI, server down, .db used by another process, other embedder.
    """
    key = (target.uri, target.collection)
    with _lock:
        if key in _open:
            _open[key][1] += 1
            return _open[key][0]
        try:
            index = MilvusIndex.open(target.uri, target.collection, dim, embedder_id, token=target.token,
                                     tokenize=_tokens_come_from_sqlite, replace=replace)
        except MilvusIndexError as exc:
            raise MilvusStoreError(str(exc)) from None
        _open[key] = [index, 1]
        return index


def release(index: MilvusIndex) -> None:
    """Give back a connection from ``acquire``; the last user closes it (and milvus-lite's server
    of that .db when no other collection of it is open, freeing the .db for other processes)."""
    key = (index.uri, index.collection)
    with _lock:
        entry = _open.get(key)
        if entry is None or entry[0] is not index:
            return
        entry[1] -= 1
        if entry[1] > 0:
            return
        del _open[key]
        shared = any(uri == index.uri for uri, _ in _open)
    try:
        index.client.close() if shared else index.close()
    except Exception:  # closing a connection to a server that went away
        pass


@contextmanager
def milvus_errors(target: Target, doing: str) -> Iterator[None]:
    """A Milvus failure inside becomes a ``MilvusStoreError`` naming the URI and what failed."""
    import grpc
    from pymilvus.exceptions import MilvusException

    try:
        yield
    except (MilvusException, MilvusIndexError, grpc.RpcError) as exc:
        raise MilvusStoreError(f"Milvus {target.shown} 出错 / failed while {doing}: "
                               f"{getattr(exc, 'message', exc)}") from None


# ---------------------------------------------------------------- reading both sides
def visible_chunks(index: MilvusIndex, generation: int, max_id: int) -> dict[int, str]:
    """``chunk id → doc id`` of the rows visible at ``generation``, read by ranges of chunk ids up
    to ``max_id`` (the largest id SQLite ever gave) and beyond it: each range holds fewer visible
    rows than Milvus's query window (a visible chunk id is unique). No query iterator: milvus-lite
    lacks the timestamp call it makes."""
    found: dict[int, str] = {}
    step = MAX_LIMIT - 384
    for low in range(0, max_id + step, step):
        last = low >= max_id
        expr = f"chunk_id >= {low}" + ("" if last else f" and chunk_id < {low + step}")
        rows = index.client.query(index.collection, filter=index._visible(generation, expr),
                                  output_fields=["chunk_id", "doc_id"], limit=MAX_LIMIT)
        found.update((int(r["chunk_id"]), r["doc_id"]) for r in rows)
        if last:
            break
    return found


def visible_count(index: MilvusIndex, generation: int) -> int:
    rows = index.client.query(index.collection, filter=index._visible(generation), output_fields=["count(*)"])
    return int(rows[0]["count(*)"]) if rows else 0


def _clip(text: str | None, limit: int) -> str:
    data = (text or "").encode("utf-8")
    return data[:limit].decode("utf-8", "ignore") if len(data) > limit else text or ""


def sqlite_documents(db, doc_ids: list[str], dim: int) -> Iterator[tuple[str, list[dict], np.ndarray]]:
    """``(doc_id, chunks, vectors)`` as ``MilvusIndex.upsert_documents`` takes them, read from SQLite
    a hundred documents at a time (chunks with their citation fields and stored BM25 tokens)."""
    for i in range(0, len(doc_ids), 100):
        part = doc_ids[i:i + 100]
        rows = db.execute(
            'SELECT c.id, c.doc_id, d.title, d.source, c.ord, c.text, c.section, c.start, c."end", c.page, '
            "c.tokens, c.content_hash, c.lexical, v.vector FROM chunks c JOIN documents d ON d.doc_id = c.doc_id "
            f"LEFT JOIN vectors v ON v.content_hash = c.content_hash WHERE c.doc_id IN ({','.join('?' * len(part))}) "
            "ORDER BY c.doc_id, c.ord", part).fetchall()
        missing = sum(r[13] is None for r in rows)
        if missing:
            raise KnowledgeBaseError(f"{missing} chunks have no vector; refusing to build an incomplete index")
        groups: dict[str, list] = {}
        for r in rows:
            groups.setdefault(r[1], []).append(r)
        for doc_id, group in groups.items():
            chunks = [{"chunk_id": r[0], "doc_id": r[1], "title": _clip(r[2], _CLIP["title"]),
                       "source": _clip(r[3], _CLIP["source"]), "ord": r[4], "text": r[5],
                       "section": _clip(r[6], _CLIP["section"]), "start": r[7], "end": r[8], "page": r[9],
                       "tokens": r[10], "content_hash": r[11], "lexical": json.loads(r[12])} for r in group]
            vectors = np.frombuffer(b"".join(r[13] for r in group), dtype=np.float32).reshape(len(group), dim)
            yield doc_id, chunks, vectors


def sqlite_chunks(db) -> dict[int, str]:
    """``chunk id → doc id`` of every chunk in SQLite (as the current transaction sees it)."""
    return dict(db.execute("SELECT id, doc_id FROM chunks").fetchall())


def plan(stored: dict[int, str], seen: dict[int, str]) -> tuple[set[str], set[str]]:
    """Documents to write and to delete so that Milvus's ``seen`` becomes SQLite's ``stored``."""
    documents = set(stored.values())
    write = {doc for cid, doc in stored.items() if seen.get(cid) != doc}
    stale = {doc for cid, doc in seen.items() if stored.get(cid) != doc}
    return write | (stale & documents), stale - documents


# ---------------------------------------------------------------- the sync
# milvus-lite scores BM25 with each segment's own statistics (its TODO; deleted rows still count):
# a document added incrementally sits in a small segment of its own and its BM25 scores collapse
# (measured: a new passage fell out of BM25's top 5 for its own words). So on milvus-lite (.db)
# every sync writes the whole KB into a fresh collection, switched in SQLite: one segment of exactly
# the live rows, scores as bm25s's. Tests flip this to cover the incremental path on milvus-lite.
REBUILD_LITE = True
# A server (http(s)://) is the same question, answered by measuring it (``rewrites``): `milvus-lite
# server` is the same engine behind gRPC and fails the check, so it is rewritten like a .db. None =
# measure; True / False forces the incremental sync / the rewrite on every server (tests).
SERVER_INCREMENTAL: bool | None = None
_global_bm25: dict[str, bool] = {}  # server URI -> measured once per process


def rewrites(target: Target) -> bool:
    """True when a sync writes the whole KB into a fresh collection, False when it writes only what
    changed: a ``.db`` path rewrites (``REBUILD_LITE``); a server is incremental only when it scores
    BM25 over the whole collection (``bm25_statistics_are_global``, measured once per process and
    URI), since an incremental write leaves new rows in segments of their own.

    Raises:
        MilvusStoreError: the server cannot be reached (naming its URI).
    """
    if _is_local(target.uri):
        return REBUILD_LITE
    if SERVER_INCREMENTAL is not None:
        return not SERVER_INCREMENTAL
    if target.uri not in _global_bm25:
        with milvus_errors(target, "checking how it scores BM25"):
            _global_bm25[target.uri] = bm25_statistics_are_global(target.uri, target.token)
    return not _global_bm25[target.uri]


_pending: dict[str, tuple] = {}  # KB folder -> (written index, its generation, collection to drop after the commit)


def _drop_pending(kb: KnowledgeBase) -> None:
    entry = _pending.pop(str(kb.path), None)
    if entry:
        release(entry[0])


def _check_count(index: MilvusIndex, target: Target, generation: int, expected: int) -> None:
    held = visible_count(index, generation)
    if held != expected:
        raise MilvusStoreError(f"Milvus {target.shown}: 写入后有 {held} 个片段，SQLite 有 {expected} 个"
                               f" / holds {held} chunks after the write, SQLite {expected}")


def sync_milvus(kb: KnowledgeBase, generation: int) -> bool:
    """``KnowledgeBase._build_indexes`` for a Milvus KB (the module docstring; a fresh collection
    per generation where BM25 is scored per segment, see ``rewrites``).

    Returns:
        False when the KB's store is FAISS (the caller writes the index files), True when done.

    Raises:
        MilvusStoreError: Milvus unreachable, or its collection disagrees after the write (the
            SQLite transaction then rolls back: nothing changed, nothing lost).
    """
    if kb_store(kb) != MILVUS:
        return False
    if kb.meta("store") != MILVUS:  # a new KB under RAG_STORE=milvus: recorded with this commit
        select_store(kb, MILVUS)
    _drop_pending(kb)  # left by a transaction that failed after its sync
    target = milvus_target(kb)
    dim, embedder_id = int(kb.meta("dim", "0") or 0), kb.embedder_id or ""
    if rewrites(target):
        _pending[str(kb.path)] = _rebuild(kb, target, generation, dim, embedder_id)
        return True
    index = acquire(target, dim, embedder_id)
    try:
        with milvus_errors(target, "writing"):
            committed = kb.generation
            if index.committed_generation() != committed:
                index.commit(committed)
            stored = sqlite_chunks(kb.db)
            top_id = kb.db.execute("SELECT MAX(seq) FROM sqlite_sequence WHERE name = 'chunks'").fetchone()[0]
            write, delete = plan(stored, visible_chunks(index, committed, max([top_id or 0, *stored])))
            if not write and not delete:
                write = set(stored.values())
            index.upsert_documents(sqlite_documents(kb.db, sorted(write), dim), generation,
                                   delete=sorted(delete), commit=False)
            _check_count(index, target, generation, len(stored))
    except BaseException:
        release(index)
        raise
    _pending[str(kb.path)] = (index, generation, None)
    return True


def _rebuild(kb: KnowledgeBase, current: Target, generation: int, dim: int, embedder_id: str) -> tuple:
    """Write every chunk into the collection ``<base>_g<generation>`` and record it as the KB's
    (SQLite commits the switch); this KB's collections left by a crash are dropped first."""
    base = re.sub(r"_g\d+$", "", current.collection)
    fresh = Target(current.uri, f"{base}_g{generation}", current.token)
    # Never committed: what a killed attempt at this generation left is dropped unread (it may not load).
    index = acquire(fresh, dim, embedder_id, replace=True)
    try:
        with milvus_errors(fresh, "writing"):
            rows = index.client.query(fresh.collection, filter='row_id != ""', output_fields=["count(*)"])
            if rows and rows[0]["count(*)"]:  # a crashed attempt at this generation: start it again
                index.client.drop_collection(fresh.collection)
                release(index)
                index = acquire(fresh, dim, embedder_id)
            with _lock:
                held = {name for uri, name in _open if uri == fresh.uri}
            for name in index.client.list_collections():
                if name.startswith(base + "_g") and name not in held | {fresh.collection, current.collection}:
                    index.client.drop_collection(name)
            # Segments of their own for the marker row and the chunks, so that BM25's statistics
            # count exactly the chunks (N and the mean length as bm25s's).
            index.commit(0)
            index.flush()
            stored = sqlite_chunks(kb.db)
            index.upsert_documents(sqlite_documents(kb.db, sorted(set(stored.values())), dim), generation,
                                   commit=False)
            index.flush()
            index.commit(generation)
            index.flush()
            _check_count(index, fresh, generation, len(stored))
    except BaseException:
        release(index)
        raise
    set_meta(kb.db, "milvus_collection", fresh.collection)
    return index, generation, current.collection


def finish_milvus(kb: KnowledgeBase) -> None:
    """After SQLite committed: Milvus commits the generation and purges what it replaced (on
    milvus-lite: the replaced collection is dropped).

    A failure only warns: queries read SQLite's generation, so they are already right; the next
    write commits and purges (step 1), or drops the leftover collection.
    """
    entry = _pending.pop(str(kb.path), None)
    if entry is None:
        return
    index, generation, replaced = entry
    try:
        if kb.generation == generation:
            if replaced is None:
                index.commit(generation)
                index.flush()
            elif replaced != index.collection and index.client.has_collection(replaced):
                index.client.drop_collection(replaced)
    except Exception as exc:
        print(f"警告 warning: Milvus {_redact(index.uri)}: 提交后清理未完成，下次写入时完成 / cleanup after the "
              f"commit failed, the next write completes it: {getattr(exc, 'message', exc)}", file=sys.stderr)
    finally:
        release(index)


def milvus_state(kb: KnowledgeBase) -> dict[str, str]:
    """``store``, ``generation``, ``milvus_uri``, ``milvus_collection`` read in one statement (one
    snapshot: a writer switches the collection and the generation in one commit)."""
    return dict(kb.db.execute("SELECT key, value FROM meta WHERE key IN ('store', 'generation', 'milvus_uri', "
                              "'milvus_collection', 'dim', 'embedder')").fetchall())
