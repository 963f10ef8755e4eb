"""Document-level writes of a knowledge base, inside ``KnowledgeBase.transaction()`` (which
holds the write lock, and commits or rolls back): add, replace, rename, delete documents."""
from __future__ import annotations

import json
import sqlite3
import time




class KnowledgeBaseTransaction:
    """Document-level changes inside ``KnowledgeBase.transaction()``."""

    def __init__(self, db: sqlite3.Connection):
        self.db = db
        self.changed = False

    def delete_document(self, doc_id: str) -> bool:
        """Remove a document and all its chunks. Returns whether it existed."""
        self.db.execute("DELETE FROM chunks WHERE doc_id=?", (doc_id,))
        removed = self.db.execute("DELETE FROM documents WHERE doc_id=?", (doc_id,)).rowcount > 0
        self.changed |= removed
        return removed

    def rename_document(self, old: str, new: str) -> bool:
        """Give a stored document another id, keeping its chunks (and so its index rows: the
        indexes hold chunk ids only, nothing needs rebuilding). False when ``old`` is missing
        or ``new`` is taken."""
        if self.db.execute("SELECT 1 FROM documents WHERE doc_id=?", (new,)).fetchone():
            return False
        copied = self.db.execute(
            "INSERT INTO documents(doc_id, title, source, content_hash, text, page_starts, added_at) "
            "SELECT ?, title, source, content_hash, text, page_starts, added_at FROM documents WHERE doc_id=?",
            (new, old)).rowcount
        if not copied:
            return False
        self.db.execute("UPDATE chunks SET doc_id=? WHERE doc_id=?", (new, old))
        self.db.execute("DELETE FROM documents WHERE doc_id=?", (old,))
        return True

    def put_document(self, doc, chunks, hashes: list[str], lexical: list[list[str]]) -> None:
        """Insert or replace a document with its chunks (their vectors must be cached).

        Args:
            doc: the ``RawDocument``.
            chunks: its ``Chunk`` list.
            hashes: content hash per chunk (keys into the vector cache).
            lexical: BM25 tokens per chunk.
        """
        self.delete_document(doc.doc_id)
        self.db.execute(
            "INSERT INTO documents(doc_id, title, source, content_hash, text, page_starts, added_at) "
            "VALUES (?, ?, ?, ?, ?, ?, ?)",
            (doc.doc_id, doc.title, doc.source, doc.content_hash, doc.text, json.dumps(doc.page_starts), time.time()),
        )
        self.db.executemany(
            'INSERT INTO chunks(doc_id, ord, text, section, start, "end", page, tokens, content_hash, lexical) '
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            [
                (doc.doc_id, i, c.text, c.section, c.start, c.end, c.page, c.tokens, h, json.dumps(toks, ensure_ascii=False))
                for i, (c, h, toks) in enumerate(zip(chunks, hashes, lexical))
            ],
        )
        self.changed = True
