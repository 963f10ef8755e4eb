"""The drafts files of ``rag eval-gen`` and their review: reading, writing and survival counts.

Review (the 评测 tab's 审核草稿 screen, ``ui.review_panel``): the drafts live in one JSONL file per KB,
``<home>/<kb>/eval-drafts.jsonl`` (:func:`drafts_file`), each row's ``status`` turned from ``"draft"``
into ``"accepted"`` or ``"rejected"`` as a person reviews it (:func:`write_rows` replaces the file
atomically after every decision). The accepted rows are saved as ``eval-accepted.jsonl``
(:func:`accepted_file`); ``rag.eval_questions.load_questions`` refuses any file still holding a row
whose status is not ``"accepted"``. The drafts themselves are written by ``rag.eval_gen``.
"""
from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

from rag.eval_gen import KINDS, squash

# Review states of a drafted row; only "accepted" rows may be run (rag.eval_questions).
STATUSES: tuple[str, ...] = ("draft", "accepted", "rejected")
DRAFTS_FILE = "eval-drafts.jsonl"  # the KB's drafts under review, in the KB folder
ACCEPTED_FILE = "eval-accepted.jsonl"  # the accepted ones, a runnable question set


def drafts_file(kb_dir: Path) -> Path:
    """The KB's drafts under review (``<home>/<kb>/eval-drafts.jsonl``)."""
    return Path(kb_dir) / DRAFTS_FILE


def accepted_file(kb_dir: Path) -> Path:
    """The KB's reviewed question set: the accepted drafts (``<home>/<kb>/eval-accepted.jsonl``)."""
    return Path(kb_dir) / ACCEPTED_FILE


def write_rows(path: Path, rows: list[dict]) -> Path:
    """Write question rows as JSONL, replacing ``path`` atomically (a reader never sees half a file)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    tmp.replace(path)
    return path


def read_rows(path: Path) -> list[dict]:
    """Rows of a drafts file (``rag eval-gen`` output or a review file); ``ValueError`` naming the line
    when one is not a JSON object with ``id`` and ``question``, or repeats an id."""
    rows, seen = [], set()
    for line_no, line in enumerate(Path(path).read_text(encoding="utf-8-sig").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError as exc:
            raise ValueError(f"{Path(path).name}:{line_no}: not JSON ({exc})") from exc
        if not isinstance(row, dict) or not row.get("id") or not row.get("question"):
            raise ValueError(f"{Path(path).name}:{line_no}: a row needs 'id' and 'question'")
        if row["id"] in seen:
            raise ValueError(f"{Path(path).name}:{line_no}: duplicate id {row['id']!r}")
        seen.add(row["id"])
        row.setdefault("status", "draft")
        if row["status"] not in STATUSES:
            raise ValueError(f"{Path(path).name}:{line_no}: status {row['status']!r} is not one of {STATUSES}")
        rows.append(row)
    return rows


def row_kind(row: dict) -> str:
    """The draft kind of a row (``type``; a row without gold counts as negative)."""
    kind = row.get("type") or ""
    if kind in KINDS:
        return kind
    return "negative" if not (row.get("gold_quotes") or row.get("gold_ids")) else "single"


def survival(rows: list[dict]) -> dict[str, Counter]:
    """Per kind (and ``"all"``): drafted, reviewed, accepted, rejected counts."""
    out: dict[str, Counter] = {k: Counter() for k in (*KINDS, "all")}
    for row in rows:
        for key in (row_kind(row), "all"):
            c = out.setdefault(key, Counter())
            c["drafted"] += 1
            if row.get("status") in ("accepted", "rejected"):
                c["reviewed"] += 1
                c[row["status"]] += 1
    return out


def locate(quote: str, text: str) -> tuple[int, int] | None:
    """``(start, end)`` of ``quote`` in ``text`` ignoring whitespace on both sides, or None."""
    target = squash(quote)
    if not target:
        return None
    chars = [i for i, c in enumerate(text) if not c.isspace()]
    at = "".join(text[i] for i in chars).find(target)
    if at < 0:
        return None
    return chars[at], chars[at + len(target) - 1] + 1


__all__ = ["STATUSES", "DRAFTS_FILE", "ACCEPTED_FILE", "drafts_file", "accepted_file", "write_rows", "read_rows",
           "row_kind", "survival", "locate"]
