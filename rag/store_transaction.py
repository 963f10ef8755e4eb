"""Document-level writes of a knowledge base, inside ``KnowledgeBase.transaction()`` (which
holds the write lock, and commits or rolls back): add, replace, rename, delete documents,
change the stored user words, ask for the derived indexes to be rebuilt."""
from __future__ import annotations

import json
import sqlite3
import time

from rag.feedback import drop_feedback_citing, rename_feedback_doc


def get_meta(db: sqlite3.Connection, key: str, default: str | None = None) -> str | None:
    """One value of the KB's ``meta`` table.

    Args:
        db: the KB's connection.
        key: the setting's name (``generation``, ``embedder``, ``dim``, ``user_words``).
        default: returned when the key is not set.
    """
    row = db.execute("SELECT value FROM meta WHERE key=?", (key,)).fetchone()
    return row[0] if row else default


def set_meta(db: sqlite3.Connection, key: str, value: str) -> None:
    """Set one value of the ``meta`` table (call inside a write transaction).

    Args:
        db: the KB's connection.
        key: the setting's name.
        value: its new value.
    """
    db.execute("INSERT OR REPLACE INTO meta(key, value) VALUES (?, ?)", (key, value))


def stored_user_words(db: sqlite3.Connection) -> list[str]:
    """The words the KB's BM25 tokeniser keeps whole (``meta.user_words``, a JSON list)."""
    return json.loads(get_meta(db, "user_words", "[]"))


def metadata_json(meta: dict) -> str:
    """A document's metadata as stored (keys sorted: equal metadata, equal text)."""
    return json.dumps(meta or {}, ensure_ascii=False, sort_keys=True)


class KnowledgeBaseTransaction:
    """Document-level changes inside ``KnowledgeBase.transaction()``.

    Args:
        db: the KB's connection, inside its write transaction.
    """

    def __init__(self, db: sqlite3.Connection):
        self.db = db
        # Read by the store at commit: rebuild the derived indexes as a new generation. Set it
        # through the methods below (``request_rebuild`` when no document changed).
        self.changed = False

    def request_rebuild(self) -> None:
        """Rebuild the FAISS/BM25 indexes from SQLite as a new generation at commit, even when
        no document changed (open searchers reload on a new generation)."""
        self.changed = True

    def set_user_words(self, words: list[str]) -> bool:
        """Store the words the KB's BM25 tokeniser keeps whole (``KnowledgeBase.user_words``).

        When they differ from the stored ones a new generation is built, so that every open
        searcher reloads its tokeniser with them (``rag.lexical.tokenizer_for``).

        Args:
            words: the complete new list (it replaces the stored one).

        Returns:
            Whether the stored words changed.
        """
        words = list(words)
        if words == stored_user_words(self.db):
            return False
        set_meta(self.db, "user_words", json.dumps(words, ensure_ascii=False))
        self.request_rebuild()
        return True

    def delete_document(self, doc_id: str) -> bool:
        """Remove a document, its chunks and the feedback citing it. Returns whether it existed."""
        removed = self._delete_rows(doc_id)
        if removed:
            drop_feedback_citing(self.db, doc_id)
        return removed

    def _delete_rows(self, doc_id: str) -> bool:
        # A replaced document (put_document) keeps its feedback; only a removal drops it.
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
            "INSERT INTO documents(doc_id, title, source, content_hash, text, page_starts, added_at, meta, date) "
            "SELECT ?, title, source, content_hash, text, page_starts, added_at, meta, date FROM documents WHERE doc_id=?",
            (new, old)).rowcount
        if not copied:
            return False
        self.db.execute("UPDATE chunks SET doc_id=? WHERE doc_id=?", (new, old))
        self.db.execute("DELETE FROM documents WHERE doc_id=?", (old,))
        rename_feedback_doc(self.db, old, new)
        return True

    def set_document_metadata(self, doc_id: str, meta: dict, date: str | None) -> bool:
        """Replace a stored document's metadata (its text unchanged: nothing is re-indexed).
        Bumps ``metadata_version`` so searchers re-resolve their filters. Returns whether it changed."""
        changed = self.db.execute("UPDATE documents SET meta=?, date=? WHERE doc_id=? AND (meta IS NOT ? OR date IS NOT ?)",
                                  (metadata_json(meta), date, doc_id, metadata_json(meta), date)).rowcount > 0
        if changed:
            set_meta(self.db, "metadata_version", str(int(get_meta(self.db, "metadata_version", "0")) + 1))
        return changed

    def put_document(self, doc, chunks, hashes: list[str], lexical: list[list[str]]) -> None:
        """Insert or replace a document with its chunks (their vectors must be cached).

        Args:
            doc: the ``RawDocument``.
            chunks: its ``Chunk`` list.
            hashes: content hash per chunk (keys into the vector cache).
            lexical: BM25 tokens per chunk.
        """
        self._delete_rows(doc.doc_id)
        self.db.execute(
            "INSERT INTO documents(doc_id, title, source, content_hash, text, page_starts, added_at, meta, date) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (doc.doc_id, doc.title, doc.source, doc.content_hash, doc.text, json.dumps(doc.page_starts), time.time(),
             metadata_json(doc.meta), doc.date),
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
