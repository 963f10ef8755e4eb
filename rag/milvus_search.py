"""The two retrieval channels of a Milvus knowledge base (``rag.store_milvus``), for
``rag.retrieve.Searcher``: the same ``(chunk ids, scores)`` lists, best first, as its FAISS and
bm25s channels, so fusion, per-channel ranks and scores, compound questions and citations (read
from SQLite, as on FAISS) are unchanged.

- dense: inner product over the same normalised vectors (FLAT: exact, as FAISS flat);
- BM25: Milvus's BM25 function over the KB's own tokens (``rag.lexical``, the query tokenised by
  the Searcher's tokeniser), k1 1.2, b 0.75, scores as bm25s's.

Both read at SQLite's committed generation (the ``Searcher`` follows it), not at Milvus's marker:
see ``rag.store_milvus`` for why a crash leaves nothing half-visible.
"""
from __future__ import annotations

import weakref
from typing import TYPE_CHECKING

import numpy as np

from rag import store_milvus
from rag.milvus_client import _is_local
from rag.store_milvus import (MAX_LIMIT, MILVUS, MilvusStoreError, Target, acquire, milvus_errors, milvus_state,
                              milvus_target, release)

if TYPE_CHECKING:
    from rag.config import Settings
    from rag.store import KnowledgeBase


class MilvusChannels:
    """What ``Searcher._current`` holds for a Milvus KB instead of the FAISS/bm25s ``Indexes``.

    Args:
        target: the KB's collection.
        dim: the embedder's dimension; embedder_id: its model id (the collection refuses others).
        generation: the SQLite generation to read at (updated by ``milvus_channels``).
    """

    def __init__(self, target: Target, dim: int, embedder_id: str, generation: int):
        self.target, self.generation = target, generation
        self.index = acquire(target, dim, embedder_id)
        self._release = weakref.finalize(self, release, self.index)  # also when dropped unclosed

    def at(self, generation: int) -> MilvusChannels:
        """Read at ``generation`` from now on, after checking that the collection is not behind the
        KB (lost, emptied, another one): on a server its committed generation may lag SQLite's by one
        (a writer between the two commits), not more; milvus-lite commits a KB's fresh collection
        before SQLite names it."""
        with milvus_errors(self.target, "opening"):
            held = self.index.committed_generation()
        lag = 0 if store_milvus.REBUILD_LITE and _is_local(self.target.uri) else 1
        if held < generation - lag:
            raise MilvusStoreError(
                f"Milvus {self.target.shown} 的索引落后于知识库（第 {held} 代，知识库第 {generation} 代），请运行 "
                f"rag migrate --to milvus 重建 / is behind the KB (generation {held}, the KB {generation}): "
                f"rebuild it with `rag migrate --kb <kb> --to milvus`")
        self.generation = generation
        return self

    def dense_ranking(self, query: str, n: int, vector, embedder, filter: str | None = None) -> tuple[list[int], list[float]]:
        """Dense top ``n`` (chunk ids, cosine scores); ``vector``: the query's embedding if known;
        ``filter``: a Milvus expression the chunks must match (metadata filters, inside the search)."""
        if vector is None:
            vector = embedder.embed_queries([query])
        vector = np.asarray(vector, dtype=np.float32).reshape(-1)
        with milvus_errors(self.target, "searching"):
            hits = self.index.dense_search(vector, min(n, MAX_LIMIT), filter, generation=self.generation)
        return [c for c, _ in hits], [s for _, s in hits]

    def bm25_ranking(self, tokens: list[str], n: int, filter: str | None = None) -> tuple[list[int], list[float]]:
        """BM25 top ``n`` (chunk ids, scores) for the query's tokens; only chunks sharing one (and
        matching ``filter``)."""
        if not tokens:
            return [], []
        with milvus_errors(self.target, "searching"):
            hits = self.index.bm25_search("", min(n, MAX_LIMIT), filter, generation=self.generation, tokens=tokens)
        return [c for c, _ in hits], [s for _, s in hits]

    def close(self) -> None:
        self._release()


def milvus_channels(kb: KnowledgeBase, settings: Settings, previous=None) -> MilvusChannels | None:
    """The channels of a Milvus KB at its current generation (``previous`` reused when it reads the
    same collection); None for a FAISS KB or an empty one (``previous`` is then closed). The
    generation and the collection are read together: on milvus-lite each generation has its own."""
    same = isinstance(previous, MilvusChannels)
    state = milvus_state(kb)
    generation = int(state.get("generation", "0"))
    if state.get("store") != MILVUS or generation == 0:
        if same:
            previous.close()
        return None
    target = milvus_target(kb, settings, state)
    if same and previous._release.alive and (previous.target.uri, previous.target.collection) == (
            target.uri, target.collection):
        channels = previous
    else:
        if same:
            previous.close()
        channels = MilvusChannels(target, int(state.get("dim", "0") or 0), state.get("embedder") or "", 0)
    try:
        return channels.at(generation)
    except BaseException:
        channels.close()  # a Searcher still holding it opens anew on its next query
        raise
