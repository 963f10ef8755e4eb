"""The review rules of the 评测 tab's 审核草稿 screen (``ui.review_panel``), as plain functions over
the rows of a KB's drafts file (``rag.eval_drafts``): decide (``set_status``), edit (``apply_edit``),
count what survives review (``survival_rows``, ``survival_line``), keep the accepted set
(``accepted_rows``), step through the list (``next_id``), find a draft's source passages
(``passages_for``) and drop drafts quoting deleted documents (``drop_documents``).
"""
from __future__ import annotations

import time

from rag import zh
from rag.eval_drafts import locate, row_kind, survival
from rag.eval_gen import KINDS
from rag.store import KnowledgeBase

KIND_NAMES = {"single": "单事实 single", "two-part": "两问 two-part", "negative": "无答案 negative"}
STATUS_NAMES = {"draft": "待审 draft", "accepted": "✓ 接受 accepted", "rejected": "✗ 拒绝 rejected"}
WINDOW = 120  # around a quote no source chunk holds
ALIAS_SPLIT = ("｜", "|")


class ReviewError(ValueError):
    """An edit or action that cannot be applied; the message says why (shown to the user)."""


# ============================================================================ review rules
def set_status(rows: list[dict], draft_id: str, status: str) -> dict:
    """Mark one draft ``accepted``, ``rejected`` or back to ``draft``; returns the row."""
    if status not in ("draft", "accepted", "rejected"):
        raise ReviewError(f"未知状态 unknown status: {status}")
    row = find(rows, draft_id)
    row["status"] = status
    if status == "draft":
        row.pop("reviewed_at", None)
    else:
        row["reviewed_at"] = time.strftime("%Y-%m-%dT%H:%M:%S")
    return row


def find(rows: list[dict], draft_id: str) -> dict:
    row = next((r for r in rows if r["id"] == draft_id), None)
    if row is None:
        raise ReviewError(f"没有这条草稿 no such draft: {draft_id}")
    return row


def _lines(text: str) -> list[str]:
    return [line.strip() for line in (text or "").splitlines() if line.strip()]


def _aliases(line: str) -> list[str]:
    for sep in ALIAS_SPLIT:
        line = line.replace(sep, "|")
    return [a.strip() for a in line.split("|") if a.strip()]


def answer_lines(row: dict) -> str:
    """The answers as the edit box shows them: one line per part, aliases joined by ｜."""
    if row.get("answer_parts"):
        return "\n".join("｜".join(part) for part in row["answer_parts"])
    return "｜".join(row.get("answers") or [])


def apply_edit(row: dict, question: str, answers_text: str, quotes_text: str,
               doc_texts: dict[str, str]) -> dict:
    """Apply an edit to ``row`` in place (the first edit keeps the drafted text under ``original``).

    ``answers_text``: one line per answer part (two-part: two lines), aliases split by ｜;
    ``quotes_text``: one gold quote per line, each a passage of one of ``doc_texts``
    (``doc_id -> original text``, whitespace ignored). Every answer must lie in a quote; a negative
    keeps no answer and no quote. Raises ``ReviewError`` saying what is wrong; ``row`` is then unchanged.
    """
    question = (question or "").strip()
    if not question:
        raise ReviewError("问题不能为空 / the question is empty")
    parts = [_aliases(line) for line in _lines(answers_text)]
    parts = [p for p in parts if p]
    quotes = _lines(quotes_text)
    kind = row_kind(row)
    update: dict = {"question": question}
    if kind == "negative":
        if parts or quotes:
            raise ReviewError("无答案题不能有答案或引文；如果文档里其实有答案，请拒绝这条草稿 / "
                              "a negative has no answer or quote: reject it if the documents answer it")
    else:
        if not parts or not quotes:
            raise ReviewError("需要答案和引文（每行一条） / answers and gold quotes are required, one per line")
        if kind == "two-part" and len(parts) != 2:
            raise ReviewError("两问题需要两行答案，每行一问 / a two-part question needs two answer lines")
        gold_docs = []
        for quote in quotes:
            doc = next((d for d, text in doc_texts.items() if locate(quote, text)), None)
            if doc is None:
                raise ReviewError(f"引文不在原文中 / quote not in the source documents: 「{quote}」")
            gold_docs.append(doc)
        quoted = zh.normalise("".join(quotes))
        for part in parts:
            if not any(zh.normalise(a) in quoted for a in part):
                raise ReviewError(f"答案不在引文中 / answer not inside a quote: {'｜'.join(part)}")
        update.update(answers=[a for part in parts for a in part], gold_quotes=quotes,
                      gold_docs=list(dict.fromkeys(gold_docs)))
        if kind == "two-part":
            update["answer_parts"] = parts
    before = {k: row.get(k) for k in ("question", "answers", "answer_parts", "gold_quotes", "gold_docs")}
    if all(before.get(k) == v for k, v in update.items()):
        return row  # nothing changed
    row.setdefault("original", {k: v for k, v in before.items() if v is not None})
    row.update(update)
    if kind == "single":
        row.pop("answer_parts", None)
    row["edited"] = True
    return row


def survival_rows(rows: list[dict]) -> list[list]:
    """The survival table: per kind and in all, drafted / reviewed / accepted (edited) / rejected and
    the share of reviewed drafts that were accepted."""
    counts = survival(rows)
    edited = {k: sum(1 for r in rows if r.get("edited") and r.get("status") == "accepted"
                     and (k == "all" or row_kind(r) == k)) for k in (*KINDS, "all")}
    out = []
    for kind in (*KINDS, "all"):
        c = counts[kind]
        if kind != "all" and not c["drafted"]:
            continue
        rate = f'{c["accepted"] / c["reviewed"]:.0%}' if c["reviewed"] else "–"
        out.append([KIND_NAMES.get(kind, "合计 all"), c["drafted"], c["reviewed"], c["accepted"], edited[kind],
                    c["rejected"], rate])
    return out


def survival_line(rows: list[dict]) -> str:
    """One line: accepted / reviewed / drafted, in all and per kind."""
    counts = survival(rows)
    per = "；".join(f'{KIND_NAMES[k].split()[0]} {counts[k]["accepted"]}/{counts[k]["reviewed"]}/{counts[k]["drafted"]}'
                   for k in KINDS if counts[k]["drafted"])
    a = counts["all"]
    return f'存活 survival（接受/已审/草稿 accepted/reviewed/drafted）：{a["accepted"]}/{a["reviewed"]}/{a["drafted"]}' + (
        f"（{per}）" if per else "")


def accepted_rows(rows: list[dict]) -> list[dict]:
    """The accepted drafts as ``rag eval`` question rows (``status: "accepted"``, review notes dropped)."""
    out = []
    for row in rows:
        if row.get("status") != "accepted":
            continue
        clean = {k: v for k, v in row.items() if k not in ("original",)}
        out.append(clean)
    return out


def list_rows(rows: list[dict]) -> list[list[str]]:
    return [[r["id"], KIND_NAMES.get(row_kind(r), row_kind(r)),
             STATUS_NAMES.get(r.get("status", "draft"), r.get("status")) + ("（已改 edited）" if r.get("edited") else ""),
             r["question"]] for r in rows]


def next_id(rows: list[dict], current: str | None, step: int = 1, unreviewed: bool = False) -> str | None:
    """The id ``step`` rows after ``current`` (wrapping); with ``unreviewed`` the next still-draft
    row after it (else ``current``). No ``current``: the first unreviewed row, else the first."""
    if not rows:
        return None
    ids = [r["id"] for r in rows]
    if current not in ids:
        return next((r["id"] for r in rows if r.get("status", "draft") == "draft"), ids[0])
    at = ids.index(current)
    if unreviewed:
        order = rows[at + 1:] + rows[:at]
        return next((r["id"] for r in order if r.get("status", "draft") == "draft"), current)
    return ids[(at + step) % len(ids)]


# ============================================================================ passages
def negative_places(row: dict) -> tuple[str, str] | None:
    """(place in the source passage, place the negative asks about) from its note "甲→乙 (id)"."""
    note = (row.get("note") or "").split(" ")[0]
    if "→" not in note:
        return None
    old, new = note.split("→", 1)
    return (old, new) if old and new else None


def passages_for(row: dict, store: KnowledgeBase) -> list[dict]:
    """The source passages of a draft, each ``{doc_id, title, text, start, end, quote_start,
    quote_end, quote}`` over the document's original text; ``{"doc_id", "quote", "missing": True}``
    for a quote no longer found. Answerable drafts: one per gold quote, inside the source chunk
    holding it; a negative: its source chunk with the place it replaced marked."""
    ids = [int(i) for i in row.get("sources") or [] if str(i).lstrip("-").isdigit()]
    chunks = list(store.chunks(ids).values()) if ids else []
    docs = list(dict.fromkeys([*(row.get("gold_docs") or []), *(row.get("source_docs") or []),
                               *(c.doc_id for c in chunks)]))
    texts: dict[str, tuple[str, str]] = {}
    for doc in docs:
        found = store.document_text(doc)
        if found:
            texts[doc] = found
    out = []
    if row_kind(row) == "negative":
        places = negative_places(row)
        own = set(row.get("source_docs") or [])
        for c in chunks:
            if c.doc_id not in texts or (own and c.doc_id not in own):  # a chunk id of another KB
                continue
            title, text = texts[c.doc_id]
            at = locate(places[0], text[c.start:c.end]) if places else None
            qs, qe = (c.start + at[0], c.start + at[1]) if at else (None, None)
            out.append(dict(doc_id=c.doc_id, title=title, text=text, start=c.start, end=c.end, quote_start=qs,
                            quote_end=qe, quote=places[0] if places else ""))
        return out or [{"doc_id": "、".join(row.get("source_docs") or []) or "?", "quote": "", "missing": True}]
    for quote in row.get("gold_quotes") or []:
        for doc, (title, text) in texts.items():
            at = locate(quote, text)
            if not at:
                continue
            qs, qe = at
            chunk = next((c for c in chunks if c.doc_id == doc and c.start <= qs and qe <= c.end), None)
            start, end = (chunk.start, chunk.end) if chunk else (max(0, qs - WINDOW), min(len(text), qe + WINDOW))
            out.append(dict(doc_id=doc, title=title, text=text, start=start, end=end, quote_start=qs, quote_end=qe,
                            quote=quote))
            break
        else:
            out.append({"doc_id": "、".join(row.get("gold_docs") or []) or "?", "quote": quote, "missing": True})
    return out


def drop_documents(rows: list[dict], doc_ids: set[str]) -> tuple[list[dict], int]:
    """The rows that quote none of ``doc_ids`` (gold or source documents), and how many were dropped."""
    kept = [r for r in rows if not ({*(r.get("gold_docs") or []), *(r.get("source_docs") or [])} & doc_ids)]
    return kept, len(rows) - len(kept)
