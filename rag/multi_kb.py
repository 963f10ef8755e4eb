"""One question over several knowledge bases (``rag ask --kb a,b``, the UI's multi-select, the
API's ``model: "rag-a+b"``, MCP's ``kb: "a,b"``).

Each KB keeps its own indexes and searcher; a ``MultiSearcher`` pools their channels and fuses
them as one (``rag.retrieve.fused_hits``): every KB's dense list into one dense list (cosines of
one embedder compare across KBs), every BM25 list into one BM25 list, then the same z-score (or
RRF) fusion as across the two channels. Hits carry their KB (``StoredChunk.kb``), and so do the
citations. KBs built with different embedders cannot be searched together: their vectors do
not share a space (``check_same_embedder``).
"""
from __future__ import annotations

import re

import numpy as np

from rag.filters import Where
from rag.retrieve import Hit, Mode, PartSearch, Searcher, fused_hits
from rag.store import KnowledgeBaseError, StoredChunk

# What separates KB names in one choice: "a,b", "a+b", "a, b" (neither is allowed in a KB name).
SEPARATOR = re.compile(r"\s*[,+，、]\s*")


def split_kbs(spec: str | list[str] | tuple[str, ...]) -> list[str]:
    """The KB names of a choice ("a,b", "a+b" or a list), stripped, in order, without repeats."""
    names = spec if isinstance(spec, (list, tuple)) else SEPARATOR.split(spec or "")
    out: list[str] = []
    for name in names:
        name = str(name).strip()
        if name and name not in out:
            out.append(name)
    return out


class MixedEmbeddersError(KnowledgeBaseError):
    """KBs chosen together were built with different embedders."""


def check_same_embedder(embedders: dict[str, str | None]) -> None:
    """Refuse KBs whose vectors come from different embedders.

    Args:
        embedders: KB name → the embedder id it records (None: an empty KB, none yet).

    Raises:
        MixedEmbeddersError: two KBs name different embedders.
    """
    built = {name: model for name, model in embedders.items() if model}
    if len(set(built.values())) > 1:
        listed = "；".join(f"{name}：{model}" for name, model in built.items())
        raise MixedEmbeddersError(f"这些知识库的嵌入模型不同，不能一起检索（{listed}）"
                                  f" / these knowledge bases were built with different embedders ({listed})"
                                  f" and cannot be searched together")


class MultiSearcher(PartSearch):
    """Searches several KBs as one (the same interface as ``Searcher``).

    Args:
        searchers: one opened ``Searcher`` per KB, sharing one embedder (the first one's settings
            decide candidates, fusion and top k).
    """

    def __init__(self, searchers: list[Searcher]):
        if len(searchers) < 2:
            raise ValueError("MultiSearcher needs two KBs or more")
        check_same_embedder({s.name: s.kb.embedder_id for s in searchers})
        self.searchers = searchers
        self.settings = searchers[0].settings
        self.embedder = searchers[0].embedder
        self._by_name = {s.name: s for s in searchers}

    @property
    def name(self) -> str:
        return "+".join(self._by_name)

    @property
    def names(self) -> list[str]:
        return list(self._by_name)

    def document_text(self, chunk: StoredChunk) -> tuple[str, str] | None:
        searcher = self._by_name.get(chunk.kb)
        return searcher.document_text(chunk) if searcher else None

    def _search_one(self, query: str, k: int, mode: Mode, vector: np.ndarray | None = None,
                    bm25_weight: float | None = None, where: Where = Where()) -> list[Hit]:
        return fused_hits(self.searchers, query, k, mode, vector, bm25_weight, where)
