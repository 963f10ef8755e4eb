"""Metadata filters: which documents a search may return (``rag search --where``, the API's
``filters`` / ``metadata``, the UI's retrieval panel, the MCP ``search`` tool).

A :class:`Where` is a conjunction of conditions on a document's stored metadata:

- ``path``: the document id (its path from the ingested folder, or ``<file>.jsonl/<id>``) or its
  source path starts with the value at any folder level (``news/2024/`` matches
  ``docs/news/2024/a.md``), or matches it as a glob when it holds ``* ? [`` (``*.pdf``,
  ``2024/*/报告*``). Several paths: any of them;
- ``title``: the title contains the value (full-width/Traditional/case folded);
- ``date``: the document's date (``date`` from Markdown front matter or a jsonl field, else the
  file's modification time) lies in ``[date_from, date_to]``. A partial date means its whole
  period: ``date=2024-05`` is May 2024, ``date<=2024`` ends on 2024-12-31;
- any other field: equals the value (a jsonl field or a front-matter key, compared as text).

The filter is resolved to the allowed chunk ids (``KnowledgeBase.filter_chunk_ids``) and applied
*inside* each channel's search (``rag.retrieve``): a filtered query still returns k hits when
k chunks match.
"""
from __future__ import annotations

import calendar
import fnmatch
import re
from dataclasses import dataclass, field
from datetime import date as Date
from typing import Iterable, Mapping

from rag.zh import normalise, simplified


class FilterError(ValueError):
    """A filter that cannot be read; the message says what is wrong and how to write it."""


# 2024-05-01, 2024/5/1, 2024.5.1, 2024年5月1日, 2024-05, 2024年5月, 2024 (and ISO datetimes: the date part)
_DATE = re.compile(r"\s*(\d{4})(?:\s*[-/.年]\s*(\d{1,2})(?:\s*[-/.月]\s*(\d{1,2})\s*[日号]?|\s*月?)?)?\s*年?"
                   r"(?:[T\s]\d{1,2}:\d{2}(?::\d{2}(?:\.\d+)?)?(?:Z|[+-]\d{2}:?\d{2})?)?\s*")
_CONDITION = re.compile(r"\s*([^\s=<>~!]+)\s*(>=|<=|=|~|>|<)\s*(.*?)\s*", re.S)
_FIELD_NAME = re.compile(r"[^\W\d][\w.\-]{0,63}")
RESERVED = ("path", "title", "date")
HELP = ("条件写法 / syntax: path=news/ 或 path=*.pdf（前缀或通配）; title~关键词（标题包含）; "
        "date>=2024-01-01、date<=2024-06、date=2024（日期范围）; 字段=值（jsonl 字段或 front matter）")


def period(text: str) -> tuple[str, str]:
    """The first and last day (ISO) of the period a date names: ``2024`` → the year,
    ``2024-05`` → May, ``2024-05-03`` → that day.

    Raises:
        FilterError: the text is not a date.
    """
    match = _DATE.fullmatch(str(text))
    if not match:
        raise FilterError(f"无法识别的日期：{text!r}（如 2024-05-01、2024-05、2024）/ not a date")
    year, month, day = (int(g) if g else None for g in match.groups())
    try:
        if day is not None:
            one = Date(year, month, day).isoformat()
            return one, one
        if month is not None:
            return Date(year, month, 1).isoformat(), Date(year, month, calendar.monthrange(year, month)[1]).isoformat()
    except ValueError as exc:
        raise FilterError(f"日期不存在：{text!r} / no such date") from exc
    return f"{year:04d}-01-01", f"{year:04d}-12-31"


def parse_date(value: object) -> str | None:
    """A document's date as ISO ``YYYY-MM-DD`` (a partial date → its first day); None when
    ``value`` is not a date."""
    try:
        return period(str(value))[0] if value not in (None, "") else None
    except FilterError:
        return None


def _fold(text: str) -> str:
    return simplified(normalise(text)).casefold()


@dataclass(frozen=True)
class Where:
    """A metadata filter (hashable: it keys the allowed-id cache of a searcher).

    Attributes:
        paths: path prefixes or globs; a document matches any of them.
        titles: substrings the title must all contain.
        date_from, date_to: inclusive ISO bounds of the document date.
        fields: ``(name, value)`` pairs the document's metadata must all equal.
    """

    paths: tuple[str, ...] = ()
    titles: tuple[str, ...] = ()
    date_from: str | None = None
    date_to: str | None = None
    fields: tuple[tuple[str, str], ...] = field(default=())

    def __bool__(self) -> bool:
        return bool(self.paths or self.titles or self.date_from or self.date_to or self.fields)

    # ------------------------------------------------------------ reading
    @classmethod
    def parse(cls, conditions: Iterable[str] | str | None) -> "Where":
        """Read ``--where`` conditions (all must hold): ``path=news/``, ``path=*.pdf``,
        ``title~十堰``, ``date>=2024-01``, ``date<2024-07-01``, ``date=2024``, ``source=人民网``.
        A string may hold several conditions separated by ``;`` or ``；``."""
        if isinstance(conditions, str):
            conditions = [conditions]
        paths: list[str] = []
        titles: list[str] = []
        fields: list[tuple[str, str]] = []
        low: list[str] = []
        high: list[str] = []
        for text in conditions or ():
            for item in re.split(r"[;；]", text):
                if not item.strip():
                    continue
                match = _CONDITION.fullmatch(item)
                if not match or not match.group(3):
                    raise FilterError(f"无法识别的条件：{item.strip()!r}。{HELP}")
                name, op, value = match.group(1).lower(), match.group(2), match.group(3).strip("\"'“”")
                if name == "date":
                    start, end = period(value)
                    if op in (">", ">="):
                        low.append(start if op == ">=" else _next_day(end))
                    elif op in ("<", "<="):
                        high.append(end if op == "<=" else _previous_day(start))
                    elif op == "=":
                        low.append(start)
                        high.append(end)
                    else:
                        raise FilterError(f"日期条件用 = >= <= > <：{item.strip()!r} / use a comparison for dates")
                    continue
                if op not in ("=", "~"):
                    raise FilterError(f"{name} 只能用 = 或 ~：{item.strip()!r} / only dates take < >")
                if name == "path":
                    paths.append(value)
                elif name == "title":
                    titles.append(value)
                else:
                    fields.append((cls._field_name(match.group(1)), value))
        return cls(tuple(paths), tuple(titles), max(low) if low else None, min(high) if high else None,
                   tuple(fields))

    @classmethod
    def from_mapping(cls, data: Mapping | None) -> "Where":
        """Read the JSON form (API, MCP): ``{"path": "news/" | [...], "title": "…", "date_from":
        "2024-01", "date_to": "2024-06", "fields": {"source": "人民网"}}``, or ``{"where":
        ["title~…", …]}``. Unknown top-level keys are taken as fields."""
        if not data:
            return cls()
        if not isinstance(data, Mapping):
            raise FilterError("过滤条件应是一个对象 / filters must be a JSON object")
        conditions: list[str] = []
        for key, value in data.items():
            values = value if isinstance(value, (list, tuple)) else [value]
            if key == "where":
                conditions.extend(str(v) for v in values)
            elif key in ("path", "title"):
                conditions.extend(f"{key}={v}" for v in values if str(v).strip())
            elif key in ("date_from", "date_to"):
                if value not in (None, ""):
                    conditions.append(f"date{'>=' if key == 'date_from' else '<='}{value}")
            elif key == "date":
                conditions.extend(f"date={v}" for v in values if str(v).strip())
            elif key == "fields":
                if not isinstance(value, Mapping):
                    raise FilterError("fields 应是对象，如 {\"source\": \"人民网\"} / fields must be an object")
                conditions.extend(f"{cls._field_name(k)}={v}" for k, v in value.items())
            else:
                conditions.extend(f"{cls._field_name(key)}={v}" for v in values)
        return cls.parse(conditions)

    @staticmethod
    def _field_name(name: str) -> str:
        name = str(name).strip()
        if not _FIELD_NAME.fullmatch(name) or name.lower() in RESERVED:
            raise FilterError(f"字段名不合法：{name!r}（字母、数字、_、-、.）/ invalid field name")
        return name

    # ------------------------------------------------------------ using
    def to_dict(self) -> dict:
        """The JSON form (``from_mapping`` reads it back); empty parts left out."""
        out: dict = {}
        if self.paths:
            out["path"] = list(self.paths)
        if self.titles:
            out["title"] = list(self.titles)
        if self.date_from:
            out["date_from"] = self.date_from
        if self.date_to:
            out["date_to"] = self.date_to
        if self.fields:
            out["fields"] = dict(self.fields)
        return out

    def describe(self) -> str:
        """One line for logs and the UI: ``path=news/ · 标题含 十堰 · 2024-01-01 至 2024-06-30``."""
        parts = [f"path={p}" for p in self.paths] + [f"标题含 {t}" for t in self.titles]
        if self.date_from or self.date_to:
            parts.append(f"{self.date_from or '…'} 至 {self.date_to or '…'}")
        parts += [f"{k}={v}" for k, v in self.fields]
        return " · ".join(parts)

    def matches(self, doc_id: str, source: str, title: str, date: str | None, meta: Mapping) -> bool:
        """Whether a document with these stored fields passes."""
        if self.paths and not any(_path_matches(p, doc_id) or _path_matches(p, source) for p in self.paths):
            return False
        if self.titles and not all(_fold(t) in _fold(title or "") for t in self.titles):
            return False
        if (self.date_from or self.date_to) and not date:
            return False
        if self.date_from and date < self.date_from:
            return False
        if self.date_to and date > self.date_to:
            return False
        return all(name in meta and _text(meta[name]) == value for name, value in self.fields)


def _path_matches(pattern: str, path: str) -> bool:
    path = path.replace("\\", "/")
    pattern = pattern.replace("\\", "/")
    if any(ch in pattern for ch in "*?["):
        return fnmatch.fnmatchcase(path, pattern) or fnmatch.fnmatchcase(path, f"*/{pattern.lstrip('/')}")
    # from any folder level: "news/2024/" matches "docs/news/2024/a.md" (ids keep the ingested folder's name)
    return path.startswith(pattern) or (not pattern.startswith("/") and f"/{pattern}" in path)


def _text(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value).strip()


def _next_day(iso: str) -> str:
    return Date.fromordinal(Date.fromisoformat(iso).toordinal() + 1).isoformat()


def _previous_day(iso: str) -> str:
    return Date.fromordinal(Date.fromisoformat(iso).toordinal() - 1).isoformat()
