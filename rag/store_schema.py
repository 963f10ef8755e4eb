"""The SQLite schema of a knowledge base and its version (``PRAGMA user_version``).

``SCHEMA_VERSION`` is the version this code reads and writes. ``MIGRATIONS[n]`` turns a
version-``n`` database into version ``n + 1``; opening an older KB runs the missing steps in
order, in one transaction, then stamps the new version, so a crash mid-migration leaves the
old version whole. A KB stamped newer than ``SCHEMA_VERSION`` is refused: this code could
misread or damage what a newer version wrote.

Version 0 is a new, empty file or a KB made before the schema had a version; the latter has
exactly version 1's tables, so its 0 → 1 step creates nothing and only stamps it. Version 2
adds the ``feedback`` table; version 3 the documents' metadata (``meta``, ``date``) for filters. A
new file goes through every step, so it has them too.

To change the schema: append a migration, bump ``SCHEMA_VERSION``, and never edit an
existing step (KBs on disk went through it as it was).
"""
from __future__ import annotations

import sqlite3
from typing import Callable

from rag.writers import KnowledgeBaseError

SCHEMA_VERSION = 3

# Version 1: the source of truth. ``IF NOT EXISTS``: a KB made before the version stamp has them.
TABLES_V1 = (
    "CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)",
    """CREATE TABLE IF NOT EXISTS documents (
    doc_id TEXT PRIMARY KEY, title TEXT NOT NULL, source TEXT NOT NULL,
    content_hash TEXT NOT NULL, text TEXT NOT NULL, page_starts TEXT NOT NULL,
    added_at REAL NOT NULL)""",
    """CREATE TABLE IF NOT EXISTS chunks (
    id INTEGER PRIMARY KEY AUTOINCREMENT, doc_id TEXT NOT NULL REFERENCES documents(doc_id),
    ord INTEGER NOT NULL, text TEXT NOT NULL, section TEXT NOT NULL,
    start INTEGER NOT NULL, "end" INTEGER NOT NULL, page INTEGER, tokens INTEGER NOT NULL,
    content_hash TEXT NOT NULL, lexical TEXT NOT NULL)""",
    "CREATE INDEX IF NOT EXISTS chunks_doc ON chunks(doc_id)",
    "CREATE INDEX IF NOT EXISTS chunks_hash ON chunks(content_hash)",
    "CREATE TABLE IF NOT EXISTS vectors (content_hash TEXT PRIMARY KEY, vector BLOB NOT NULL)",
)

# Writers register here while they hold vectors not yet linked to chunks (embedded or found in
# the cache for their coming commit); a commit never prunes a vector a live writer claims.
# Created inside write transactions only (``KnowledgeBase._write``), not by a migration: they
# hold nothing a reader needs, so opening a current KB to read never writes.
WRITER_TABLES = (
    ("CREATE TABLE IF NOT EXISTS writers (token TEXT PRIMARY KEY, pid INTEGER NOT NULL, host TEXT NOT NULL, "
     "started_at REAL NOT NULL)"),
    ("CREATE TABLE IF NOT EXISTS vector_claims (token TEXT NOT NULL, content_hash TEXT NOT NULL, "
     "PRIMARY KEY (token, content_hash)) WITHOUT ROWID"),
)


def _v0_to_v1(db: sqlite3.Connection) -> None:
    """Create version 1's tables where missing: all of them in a new file, none in a KB made
    before the version stamp (its tables are version 1's)."""
    for statement in TABLES_V1:
        db.execute(statement)  # one by one: executescript would commit the migration's transaction


# Version 2: answer feedback (``rag.feedback``). ``citations`` is a JSON list of
# ``{number, doc_id, quote}``; a removed document takes the feedback citing it along
# (``KnowledgeBaseTransaction.delete_document``). AUTOINCREMENT: an id is never reused, so
# exported question ids (``feedback-<id>``) stay stable.
TABLES_V2 = (
    """CREATE TABLE IF NOT EXISTS feedback (
    id INTEGER PRIMARY KEY AUTOINCREMENT, created_at REAL NOT NULL,
    question TEXT NOT NULL, query TEXT NOT NULL, answer TEXT NOT NULL, citations TEXT NOT NULL,
    backend TEXT NOT NULL, refused INTEGER NOT NULL DEFAULT 0,
    vote INTEGER NOT NULL CHECK (vote IN (1, -1)), comment TEXT NOT NULL DEFAULT '',
    correction TEXT NOT NULL DEFAULT '', should_refuse INTEGER NOT NULL DEFAULT 0 CHECK (should_refuse IN (0, 1)))""",
)


def _v1_to_v2(db: sqlite3.Connection) -> None:
    """Add the feedback table (``IF NOT EXISTS``: a current KB re-stamped 0 still has it)."""
    for statement in TABLES_V2:
        db.execute(statement)


def _v2_to_v3(db: sqlite3.Connection) -> None:
    """Add each document's metadata for filters (``rag.filters``): ``meta``, a JSON object of
    jsonl fields / front-matter keys, and ``date`` (ISO, or NULL). Documents stored before get
    ``{}`` and NULL; the next ingest of their files fills them in without re-indexing
    (``KnowledgeBaseTransaction.set_document_metadata``)."""
    columns = {row[1] for row in db.execute("PRAGMA table_info(documents)")}
    if "meta" not in columns:
        db.execute("ALTER TABLE documents ADD COLUMN meta TEXT NOT NULL DEFAULT '{}'")
    if "date" not in columns:
        db.execute("ALTER TABLE documents ADD COLUMN date TEXT")


# MIGRATIONS[n] takes a version-n database to version n + 1.
MIGRATIONS: tuple[Callable[[sqlite3.Connection], None], ...] = (_v0_to_v1, _v1_to_v2, _v2_to_v3)
assert len(MIGRATIONS) == SCHEMA_VERSION, "one migration per schema version"


def schema_version(db: sqlite3.Connection) -> int:
    """The schema version stamped in the database (0 when never stamped).

    Args:
        db: an open connection to ``kb.sqlite``.
    """
    return int(db.execute("PRAGMA user_version").fetchone()[0])


def _refuse_newer(version: int, where: object) -> None:
    if version > SCHEMA_VERSION:
        raise KnowledgeBaseError(
            f"知识库由更新版本创建，无法打开：{where}（数据结构版本 {version}，本程序支持 {SCHEMA_VERSION}），请升级本程序"
            f" / knowledge base {where} was created by a newer version (schema version {version},"
            f" this program supports {SCHEMA_VERSION}); upgrade to open it"
        )


def ensure_schema(db: sqlite3.Connection, where: object) -> None:
    """Bring the database to ``SCHEMA_VERSION``, or refuse one made by a newer version.

    A current database is only read (one pragma). An older one is migrated in a single
    ``BEGIN IMMEDIATE`` transaction: all steps and the new stamp commit together or not at
    all, and a second process opening it at the same time waits, then finds it migrated.

    Args:
        db: a connection to ``kb.sqlite`` in autocommit mode (``isolation_level=None``).
        where: the KB, for the error message.

    Raises:
        KnowledgeBaseError: the database is stamped newer than ``SCHEMA_VERSION``.
    """
    version = schema_version(db)
    _refuse_newer(version, where)
    if version == SCHEMA_VERSION:
        return
    db.execute("BEGIN IMMEDIATE")
    try:
        version = schema_version(db)  # another process may have migrated it while we waited
        _refuse_newer(version, where)
        for migrate in MIGRATIONS[version:SCHEMA_VERSION]:
            migrate(db)
        if version != SCHEMA_VERSION:
            db.execute(f"PRAGMA user_version = {int(SCHEMA_VERSION)}")  # pragmas take no parameters
    except BaseException:
        db.execute("ROLLBACK")
        raise
    db.execute("COMMIT")
