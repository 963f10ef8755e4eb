"""Who may write a knowledge base: the errors a writer meets, SQLite connections that turn
"database is locked" into a message the user can act on, and whether a registered writer
still lives (``rag.store`` holds the lock file and the claims tables)."""
from __future__ import annotations

import os
import socket
import sqlite3
import time

DEFAULT_LOCK_TIMEOUT = 600.0  # Settings.write_lock_timeout's default
HOST = socket.gethostname()


class KnowledgeBaseError(RuntimeError):
    """Raised for a KB that cannot be used as asked (wrong model, missing, ...)."""


class KnowledgeBaseBusyError(KnowledgeBaseError):
    """Another writer kept the KB (its lock file or SQLite's write lock) past the timeout."""


def default_lock_timeout() -> float:
    try:
        from rag.config import Settings

        return float(Settings().write_lock_timeout)
    except Exception:  # a broken .env must not stop a read
        return DEFAULT_LOCK_TIMEOUT


def _busy_message(name: str, seconds: float) -> str:
    return (f"知识库 {name} 的数据库正忙（另一个进程正在写入），等待 {seconds:g} 秒后放弃，请稍后再试"
            f" / the database of KB {name} is busy (another process is writing); gave up after {seconds:g} s,"
            f" try again later")


class LockReportingConnection(sqlite3.Connection):
    """A connection whose lock errors ("database is locked", after the busy timeout) become a
    ``KnowledgeBaseBusyError`` with a message the user can act on, instead of a traceback."""

    kb_name = "?"
    busy_seconds = 0.0

    def _translate(self, exc: sqlite3.OperationalError) -> BaseException:
        text = str(exc).lower()
        if "locked" in text or "busy" in text:
            return KnowledgeBaseBusyError(_busy_message(self.kb_name, self.busy_seconds))
        return exc

    def execute(self, *args):
        try:
            return super().execute(*args)
        except sqlite3.OperationalError as exc:
            raise self._translate(exc) from exc

    def executemany(self, *args):
        try:
            return super().executemany(*args)
        except sqlite3.OperationalError as exc:
            raise self._translate(exc) from exc

    def executescript(self, *args):
        try:
            return super().executescript(*args)
        except sqlite3.OperationalError as exc:
            raise self._translate(exc) from exc


def writer_alive(pid: int, host: str, started_at: float) -> bool:
    """Whether a registered writer may still be running (unknown hosts: for a week)."""
    if host != HOST:
        return time.time() - started_at < 7 * 86400
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # EPERM: alive, someone else's
        return True
    return True
