"""The derived index files of one knowledge base generation: ``gen-<N>/`` holding the FAISS
index (``dense.faiss``), the BM25 index (``bm25/``, bm25s) and the row → chunk id map
(``rows.npy``). Written under a temporary name, fsynced and renamed, so a crash leaves
either the old or the new generation whole; read back without unpickling anything.
``rag.store`` decides which generation is committed (in SQLite) and when these run.
"""
from __future__ import annotations

import os
import re
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path

import faiss
import numpy as np

# Above this many chunks an exact flat scan costs more than an HNSW graph (bench/scale.md, dense
# channel p50 at 100k: flat 11.4 ms, HNSW M=32 0.4–0.6 ms on 2 cores); below it, exact search is free.
HNSW_MIN_CHUNKS = 50_000
HNSW_M = 32
HNSW_EF_SEARCH = 128
_GENERATION = re.compile(r"gen-(\d+)")


@dataclass
class Indexes:
    """The loaded derived indexes of one generation."""

    generation: int
    dense: faiss.Index
    bm25: object  # bm25s.BM25
    bm25_rows: np.ndarray  # bm25 row -> chunk id


def _fsync_dir(path: Path) -> None:
    fd = os.open(str(path), os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_generation(kb_dir: Path, generation: int, ids: np.ndarray, vectors: np.ndarray,
                     corpus_tokens: list[list[str]]) -> None:
    """Write ``gen-<generation>/`` atomically: a temporary folder, fsynced, then renamed.

    Args:
        kb_dir: the KB directory.
        generation: the number the folder gets.
        ids: chunk ids, one per row of ``vectors`` and of ``corpus_tokens``.
        vectors: normalised float32 vectors ``(n, dim)``.
        corpus_tokens: BM25 tokens per chunk.
    """
    import bm25s

    tmp = kb_dir / f"tmp-gen-{generation}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    if len(ids) >= HNSW_MIN_CHUNKS:
        # 8-bit scalar-quantised vectors: a quarter of the memory (1M × 384: 0.38 GB, not 1.5 GB; an
        # HNSW walk touches most of them over many queries, so they end up resident either way).
        inner = faiss.IndexHNSWSQ(vectors.shape[1], faiss.ScalarQuantizer.QT_8bit, HNSW_M, faiss.METRIC_INNER_PRODUCT)
        inner.train(vectors)
    else:
        inner = faiss.IndexFlatIP(vectors.shape[1])
    dense = faiss.IndexIDMap2(inner)
    if len(ids):
        dense.add_with_ids(vectors, ids)
    faiss.write_index(dense, str(tmp / "dense.faiss"))
    bm25 = bm25s.BM25(k1=1.2, b=0.75)
    if corpus_tokens:
        bm25.index(corpus_tokens, show_progress=False)
        bm25.save(str(tmp / "bm25"), allow_pickle=False)
    np.save(tmp / "rows.npy", ids, allow_pickle=False)
    for file in tmp.rglob("*"):
        if file.is_file():
            with open(file, "rb+") as fh:
                os.fsync(fh.fileno())
    _fsync_dir(tmp)
    final = kb_dir / f"gen-{generation}"
    shutil.rmtree(final, ignore_errors=True)  # a leftover of a crashed attempt, never committed
    os.rename(tmp, final)
    _fsync_dir(kb_dir)


def read_generation(kb_dir: Path, generation: int) -> Indexes:
    """Load ``gen-<generation>/``; raises ``OSError``/``RuntimeError`` when its files are missing
    (a writer may be swapping generations: the caller retries)."""
    import bm25s

    folder = kb_dir / f"gen-{generation}"
    # Memory-mapped, not read: the vectors and the BM25 postings stay file pages the kernel can share
    # between processes serving one KB and reclaim under pressure, and a query reads only what it needs
    # (BM25: its terms' postings). A generation's files are never changed in place (written under a
    # temporary name, renamed), and an unlinked file stays mapped until released.
    dense = faiss.read_index(str(folder / "dense.faiss"), faiss.IO_FLAG_MMAP_IFC)
    rows = np.load(folder / "rows.npy", allow_pickle=False)
    bm25 = bm25s.BM25.load(str(folder / "bm25"), allow_pickle=False, mmap=True) if len(rows) else None
    if isinstance(inner := faiss.downcast_index(dense.index), faiss.IndexHNSW):
        inner.hnsw.efSearch = HNSW_EF_SEARCH
    return Indexes(generation, dense, bm25, rows)


def clear_leftovers(kb_dir: Path, committed: int) -> None:
    """Delete every index folder but the committed one (temporary and uncommitted ones of
    crashed writers, old generations). Only safe while holding the write lock."""
    keep = f"gen-{committed}"
    for entry in kb_dir.iterdir():
        if entry.is_dir() and entry.name.startswith(("gen-", "tmp-gen-")) and entry.name != keep:
            shutil.rmtree(entry, ignore_errors=True)


def remove_older_generations(kb_dir: Path, keep: int) -> None:
    """Delete generation folders numbered below ``keep``; never a newer or temporary one,
    which another writer may be writing."""
    for entry in kb_dir.iterdir():
        match = _GENERATION.fullmatch(entry.name)
        if match and entry.is_dir() and int(match.group(1)) < keep:
            shutil.rmtree(entry, ignore_errors=True)
