"""A metadata filter applied inside the index searches (``rag.filters`` says which documents;
this module restricts each channel to their chunks before its top n is taken).

- FAISS flat: ``IDSelectorBatch`` in the search parameters (exact, over the allowed ids only);
- FAISS HNSW (≥ 50k chunks): when few chunks are allowed, an exact scan of their vectors read
  from the graph's flat storage (a graph walk that may only return allowed nodes can end with
  fewer than n of them); when many are, the selector with a wider ``efSearch``;
- bm25s: every other row's score set to 0 before the top n;
- Milvus: a ``chunk_id in [...]`` filter expression in the search request.

So a filtered query returns n hits whenever n chunks match.
"""
from __future__ import annotations

import threading

import faiss
import numpy as np

# Below this many allowed chunks an HNSW index is scanned exactly over their vectors (a 2-core
# matrix-vector product over 50k × 384 takes ~5 ms); above it the graph walk filters.
EXACT_SCAN_MAX = 50_000
MAX_EF_SEARCH = 1024


class AllowedChunks:
    """The chunk ids a filter lets through, with what each index needs to search only them.

    Args:
        ids: sorted allowed chunk ids (one KB generation's: a new generation resolves anew).
    """

    def __init__(self, ids: np.ndarray):
        self.ids = np.asarray(ids, dtype=np.int64)
        self._lock = threading.Lock()
        self._selector = None
        self._mask: np.ndarray | None = None
        self._positions: np.ndarray | None = None  # HNSW storage rows of the allowed ids
        self._scan_ids: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.ids)

    def bm25_mask(self, rows: np.ndarray) -> np.ndarray:
        """Per BM25 row (chunk id), whether it is allowed."""
        with self._lock:
            if self._mask is None or len(self._mask) != len(rows):
                self._mask = np.isin(rows, self.ids)
            return self._mask

    def milvus_filter(self) -> str:
        return f"chunk_id in [{','.join(map(str, self.ids.tolist()))}]"

    def dense_search(self, index: faiss.Index, vector: np.ndarray, n: int) -> tuple[list[int], list[float]]:
        """Top ``n`` allowed chunks of ``index`` (an ``IndexIDMap2`` over flat or HNSW) for ``vector``."""
        n = min(n, len(self.ids))
        if n == 0:
            return [], []
        inner = faiss.downcast_index(index.index)
        if isinstance(inner, faiss.IndexHNSW):
            if len(self.ids) <= EXACT_SCAN_MAX:
                return self._exact_scan(index, inner, vector, n)
            ef = int(min(MAX_EF_SEARCH, max(n, inner.hnsw.efSearch) * max(1.0, index.ntotal / len(self.ids))))
            params = faiss.SearchParametersHNSW(sel=self._id_selector(), efSearch=ef)
        else:
            params = faiss.SearchParameters(sel=self._id_selector())
        scores, ids = index.search(vector, n, params=params)
        keep = ids[0] >= 0
        return ids[0][keep].tolist(), scores[0][keep].tolist()

    def _id_selector(self):
        with self._lock:
            if self._selector is None:
                self._selector = faiss.IDSelectorBatch(self.ids)
            return self._selector

    def _exact_scan(self, index, inner, vector: np.ndarray, n: int) -> tuple[list[int], list[float]]:
        with self._lock:
            if self._positions is None:
                id_map = faiss.vector_to_array(index.id_map)
                order = np.argsort(id_map, kind="stable")
                found = np.searchsorted(id_map, self.ids, sorter=order)
                found = np.clip(found, 0, len(id_map) - 1)
                positions = order[found]
                self._positions = positions[id_map[positions] == self.ids]  # ids the index lacks drop out
                self._scan_ids = id_map[self._positions]
            positions, scan_ids = self._positions, self._scan_ids
        vectors = faiss.downcast_index(inner.storage).reconstruct_batch(positions)
        scores = vectors @ np.asarray(vector, dtype=np.float32).reshape(-1)
        top = np.argsort(-scores, kind="stable")[:n]
        return scan_ids[top].tolist(), scores[top].tolist()
