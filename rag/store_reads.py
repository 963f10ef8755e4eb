"""The reads of a knowledge base's documents and chunks (``KnowledgeBase`` inherits them): document
lists and metadata, texts for citations, chunks by id, and the chunk ids a metadata filter lets
through. The types they return, ``StoredChunk`` and ``DocumentInfo``, live here too."""
from __future__ import annotations

import json
import sqlite3
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from rag.filters import Where
from rag.split import Chunk


@dataclass(kw_only=True)
class StoredChunk(Chunk):
    """A chunk as stored: its row id, its document and its place in it."""

    id: int
    doc_id: str
    title: str
    source: str
    ord: int
    kb: str = ""  # the KB's name: citations of a question over several KBs say which one

    @property
    def key(self) -> tuple[str, int]:
        """The chunk's identity across KBs (ids are per KB)."""
        return self.kb, self.id


@dataclass
class DocumentInfo:
    doc_id: str
    title: str
    source: str
    chunks: int
    added_at: float
    date: str | None = None  # ISO; what date filters compare (``rag.filters``)
    meta: dict = field(default_factory=dict)  # jsonl fields / front-matter keys


class DocumentReads:
    """Read queries over ``documents`` and ``chunks``; the class using it sets ``db``, ``path`` and ``meta``."""

    db: sqlite3.Connection
    path: Path

    def documents(self) -> list[DocumentInfo]:
        rows = self.db.execute(
            "SELECT d.doc_id, d.title, d.source, COUNT(c.id), d.added_at, d.date, d.meta FROM documents d "
            "LEFT JOIN chunks c ON c.doc_id = d.doc_id GROUP BY d.doc_id ORDER BY d.doc_id"
        ).fetchall()
        return [DocumentInfo(*row[:6], meta=json.loads(row[6] or "{}")) for row in rows]

    def document_metadata(self, doc_id: str) -> tuple[str, str | None] | None:
        """``(metadata JSON as stored, date)`` of a document; None when there is no such document."""
        row = self.db.execute("SELECT meta, date FROM documents WHERE doc_id=?", (doc_id,)).fetchone()
        return (row[0], row[1]) if row else None

    @property
    def metadata_version(self) -> int:
        """Bumped by metadata-only updates (a new generation covers every other change)."""
        return int(self.meta("metadata_version", "0"))

    def filter_chunk_ids(self, where: Where) -> np.ndarray:
        """The ids (sorted int64) of the chunks of the documents ``where`` lets through.

        The documents' fields are read once and matched in Python (title folding, globs);
        the chunk ids come from SQLite in batches of 900 documents.
        """
        docs = [doc_id for doc_id, source, title, date, meta in
                self.db.execute("SELECT doc_id, source, title, date, meta FROM documents")
                if where.matches(doc_id, source, title, date, json.loads(meta or "{}"))]
        ids: list[int] = []
        for i in range(0, len(docs), 900):
            batch = docs[i:i + 900]
            ids.extend(row[0] for row in self.db.execute(
                f"SELECT id FROM chunks WHERE doc_id IN ({','.join('?' * len(batch))})", batch))
        return np.array(sorted(ids), dtype=np.int64)

    def document_hash(self, doc_id: str) -> str | None:
        row = self.db.execute("SELECT content_hash FROM documents WHERE doc_id=?", (doc_id,)).fetchone()
        return row[0] if row else None

    def document_source(self, doc_id: str) -> str | None:
        """The path a stored document was read from (None when there is no such document)."""
        row = self.db.execute("SELECT source FROM documents WHERE doc_id=?", (doc_id,)).fetchone()
        return row[0] if row else None

    def document_text(self, doc_id: str) -> tuple[str, str] | None:
        """``(title, original text)`` of a document, for showing a citation in context."""
        row = self.db.execute("SELECT title, text FROM documents WHERE doc_id=?", (doc_id,)).fetchone()
        return (row[0], row[1]) if row else None

    def chunks(self, ids: list[int]) -> dict[int, StoredChunk]:
        if not ids:
            return {}
        marks = ",".join("?" * len(ids))
        rows = self.db.execute(
            f'SELECT c.text, c.section, c.start, c."end", c.page, c.tokens, c.id, c.doc_id, d.title, d.source, c.ord '
            f"FROM chunks c JOIN documents d ON d.doc_id = c.doc_id WHERE c.id IN ({marks})",
            [int(i) for i in ids],
        ).fetchall()
        return {row[6]: StoredChunk(*row[:6], id=row[6], doc_id=row[7], title=row[8], source=row[9], ord=row[10],
                                    kb=self.path.name) for row in rows}

    def chunk_count(self) -> int:
        return self.db.execute("SELECT COUNT(*) FROM chunks").fetchone()[0]
