"""The 评测 tab's 审核草稿 screen: review drafted eval questions (``rag eval-gen``) before they are run.

Draft with the local model here (progress bar) or load a drafts file ``rag eval-gen`` wrote; read
each draft with its source passage, the gold quote highlighted; accept, reject or edit it; save the
accepted ones as a question set the 评测 tab runs at once. The count of drafts that survive review
(accepted / reviewed / drafted, per kind) stays on screen.

State lives on disk, not in the browser: the KB's drafts file ``<home>/<kb>/eval-drafts.jsonl``
(``rag.eval_gen.drafts_file``) is rewritten (atomically) after every decision, so a page reload or a
second browser sees the same review; the accepted set is ``<home>/<kb>/eval-accepted.jsonl``.
``rag.eval_questions.load_questions`` refuses a file that still holds unreviewed or rejected rows.

The review rules are plain functions (``set_status``, ``apply_edit``, ``survival_rows``,
``accepted_rows``, ``passages_for``, ``draft_html``) under thin Gradio handlers (``ReviewHandlers``).
"""
from __future__ import annotations

import logging
import re
import shutil
import tempfile
import threading
import time
from collections.abc import Iterable
from contextlib import closing
from pathlib import Path

import gradio as gr

from rag import zh
from rag.eval_gen import (KINDS, GenStats, accepted_file, as_rows, draft_questions, drafts_file, kb_text,
                          locate, read_rows, row_kind, survival, write_rows)
from rag.store import KnowledgeBase, KnowledgeBaseError
from ui.render import _highlighted, esc

log = logging.getLogger(__name__)

KIND_NAMES = {"single": "单事实 single", "two-part": "两问 two-part", "negative": "无答案 negative"}
STATUS_NAMES = {"draft": "待审 draft", "accepted": "✓ 接受 accepted", "rejected": "✗ 拒绝 rejected"}
LIST_HEADERS = ["编号", "类型", "状态", "问题"]
SURVIVAL_HEADERS = ["类型 kind", "草稿 drafted", "已审 reviewed", "接受 accepted", "含修改 edited", "拒绝 rejected",
                    "存活率 接受/已审"]
CONTEXT = 60  # document characters shown on each side of a source passage
WINDOW = 120  # around a quote no source chunk holds
DEFAULT_N = 20
EMPTY_HINT = ('<div class="muted">还没有草稿。点“生成草稿”用本地模型从当前知识库起草问题，或载入 '
              '<code>rag eval-gen</code> 写出的草稿文件。 / No drafts yet: generate or load some.</div>')
ALIAS_SPLIT = ("｜", "|")
_BLANK_LINES = re.compile(r"<br>(?:[ \t\u3000]*<br>)+")  # ui.render.esc writes a newline as <br>


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
def _negative_places(row: dict) -> tuple[str, str] | None:
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
        places = _negative_places(row)
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


def _passage_html(p: dict) -> str:
    if p.get("missing"):
        return (f'<div class="warn">⚠ 在知识库中找不到这段原文（文档已删除或已修改）：{esc(p["doc_id"])} '
                f'{esc("「" + p["quote"] + "」" if p["quote"] else "")} / source not found in the KB</div>')
    text = p["text"]
    lo, hi = max(0, p["start"] - CONTEXT), min(len(text), p["end"] + CONTEXT)
    body = ("…" if lo else "") + _highlighted(text, p, lo, hi, focus=False) + ("…" if hi < len(text) else "")
    body = _BLANK_LINES.sub("<br>", body)  # extracted text's empty lines would stretch the passage
    return (f'<div class="cite-meta" style="margin-top:8px">来源 source：<b>{esc(p["title"] or p["doc_id"])}</b> · '
            f'{esc(p["doc_id"])} [{p["start"]}:{p["end"]}]</div>'
            f'<div class="context" style="line-height:1.8;padding:8px 10px;border-radius:8px;background:#fafafa;'
            f'border:1px solid #e5e7eb">{body}</div>')


def draft_html(row: dict | None, passages: list[dict], mentions: int | None = None) -> str:
    """One draft: kind, status, question, answer, gold quotes, then each source passage with the
    quote marked. ``mentions``: how often a negative's new place occurs in the KB (should be 0)."""
    if row is None:
        return EMPTY_HINT
    kind = row_kind(row)
    status = STATUS_NAMES.get(row.get("status", "draft"), row.get("status"))
    head = (f'<div class="cite-meta"><b>{esc(row["id"])}</b> · {esc(KIND_NAMES.get(kind, kind))} · '
            f'状态 {esc(status)}{" · 已修改 edited" if row.get("edited") else ""}</div>'
            f'<div style="font-size:1.1em;font-weight:600;margin:6px 0">问题：{esc(row["question"])}</div>')
    if kind == "negative":
        body = '<div>答案：<span class="refusal">（无答案题：文档中没有这个信息，回答应当拒答 / should be refused）</span></div>'
        places = _negative_places(row)
        if places:
            seen = "" if mentions is None else (
                f"；知识库中出现 {mentions} 次" + ("（✓ 确实没有）" if mentions == 0 else "（⚠ 知识库提到了它）"))
            body += (f'<div class="cite-meta">原题问的是 <mark class="quote">{esc(places[0])}</mark>，'
                     f'草稿换成了 <b>{esc(places[1])}</b>{seen} · 请确认文档确实没有回答这个问题</div>')
    else:
        parts = row.get("answer_parts") or ([row.get("answers")] if row.get("answers") else [])
        answers = "；".join("｜".join(p) for p in parts)
        quotes = "".join(f'<div>· <mark class="quote">{esc(q)}</mark></div>' for q in row.get("gold_quotes") or [])
        body = f'<div>答案 answer：<b>{esc(answers)}</b></div><div class="cite-meta">标准引文 gold quotes：</div>{quotes}'
    if row.get("note") and kind == "two-part":
        body += f'<div class="cite-meta">由 {esc(row["note"])} 合成</div>'
    original = row.get("original")
    if original:
        body += (f'<div class="cite-meta">原稿 drafted：{esc(original.get("question", ""))} → '
                 f'{esc("；".join(original.get("answers") or []))}</div>')
    return (f'<div class="review-draft">{head}{body}'
            f'{"".join(_passage_html(p) for p in passages)}</div>')


def drop_documents(rows: list[dict], doc_ids: set[str]) -> tuple[list[dict], int]:
    """The rows that quote none of ``doc_ids`` (gold or source documents), and how many were dropped."""
    kept = [r for r in rows if not ({*(r.get("gold_docs") or []), *(r.get("source_docs") or [])} & doc_ids)]
    return kept, len(rows) - len(kept)


# ============================================================================ handlers
class ReviewHandlers:
    """Callbacks of the 审核草稿 screen. Every action reads the KB's drafts file, changes it and writes it
    back (one lock: two sessions reviewing one KB never lose each other's decisions).

    Args:
        service: the app's ``RagService`` (the KB registry and the local chat model).
        export_dir: where the accepted set is copied for the 评测 tab's file input (Gradio serves files
            from the working or temp directory only).
    """

    def __init__(self, service, export_dir: Path):
        self.service = service
        self.export_dir = Path(export_dir)
        self._lock = threading.Lock()
        self._mentions: dict[tuple, str] = {}  # (kb, its documents) -> normalised KB text

    # ------------------------------------------------------------ files
    def _kb_dir(self, kb: str) -> Path:
        try:
            return self.service.home / self.service.require(kb)
        except KnowledgeBaseError as exc:
            raise gr.Error(str(exc)) from exc

    def rows(self, kb: str) -> list[dict]:
        path = drafts_file(self._kb_dir(kb))
        if not path.is_file():
            return []
        try:
            return read_rows(path)
        except (ValueError, OSError) as exc:
            raise gr.Error(f"草稿文件有误 / bad drafts file {path}: {exc}") from exc

    def _replace(self, kb: str, rows: list[dict]) -> str:
        """Make ``rows`` the KB's drafts; a previous file with reviewed rows is kept as ``.bak``."""
        path = drafts_file(self._kb_dir(kb))
        note = ""
        with self._lock:
            if path.is_file():
                try:
                    old = read_rows(path)
                except ValueError:
                    old = []
                if any(r.get("status") != "draft" for r in old):
                    shutil.copyfile(path, path.with_name(path.name + ".bak"))
                    note = f"（之前的审核记录已备份为 {path.name}.bak / previous review kept as .bak）"
            write_rows(path, rows)
        return note

    def _change(self, kb: str, change) -> tuple[list[dict], dict | None]:
        """Read, ``change(rows)`` (may raise ReviewError), write back; returns the rows and change's result."""
        path = drafts_file(self._kb_dir(kb))
        with self._lock:
            rows = self.rows(kb)
            try:
                result = change(rows)
            except ReviewError as exc:
                raise gr.Error(str(exc)) from exc
            write_rows(path, rows)
        return rows, result

    # ------------------------------------------------------------ view
    def _mentions_of(self, kb: str, store: KnowledgeBase, place: str) -> int:
        key = (kb, tuple((d.doc_id, d.added_at) for d in store.documents()))
        if key not in self._mentions:
            self._mentions = {key: kb_text(store)}  # one KB's text at a time
        corpus = self._mentions[key]
        name = zh.normalise(place)
        return corpus.count(name) if name else 0

    def detail(self, kb: str, row: dict | None) -> str:
        if row is None:
            return EMPTY_HINT
        with closing(KnowledgeBase(self._kb_dir(kb))) as store:
            passages = passages_for(row, store)
            places = _negative_places(row) if row_kind(row) == "negative" else None
            mentions = self._mentions_of(kb, store, places[1]) if places else None
        return draft_html(row, passages, mentions)

    def view(self, kb: str, current: str | None, rows: list[dict] | None = None, status: str | None = None):
        """(status, survival table, draft list, current id, draft HTML, question, answers, quotes)."""
        rows = self.rows(kb) if rows is None else rows
        ids = {r["id"] for r in rows}
        current = current if current in ids else next_id(rows, None)
        row = next((r for r in rows if r["id"] == current), None)
        where = drafts_file(self.service.home / kb)
        if status is None:
            status = (f"知识库 **{kb}** · {len(rows)} 条草稿 · {survival_line(rows)} · 审核记录保存在 `{where}`"
                      if rows else f"知识库 **{kb}** 还没有草稿 / no drafts yet")
        return (status, survival_rows(rows), list_rows(rows), current, self.detail(kb, row),
                row["question"] if row else "", answer_lines(row) if row else "",
                "\n".join(row.get("gold_quotes") or []) if row else "")

    def open(self, kb: str, current: str | None = None):
        """The screen for ``kb`` from its drafts file (tab selected, KB changed, page reloaded)."""
        if not kb or not self.service.exists(kb):
            return (f"知识库不存在：{kb}" if kb else "请先选择知识库", [], [], None, EMPTY_HINT, "", "", "")
        return self.view(kb, current)

    def select(self, kb: str, evt: gr.SelectData):
        row = evt.row_value or []
        return self.view(kb, str(row[0]) if row else None)

    def step(self, kb: str, current: str | None, step: int):
        rows = self.rows(kb)
        return self.view(kb, next_id(rows, current, step), rows)

    # ------------------------------------------------------------ decisions
    def decide(self, kb: str, current: str | None, status: str):
        """Accept / reject / reset the current draft, then move on to the next unreviewed one."""
        if not current:
            raise gr.Error("没有选中的草稿 / no draft selected")
        rows, _ = self._change(kb, lambda rows: set_status(rows, current, status))
        nxt = next_id(rows, current, unreviewed=True) if status != "draft" else current
        word = {"accepted": "已接受", "rejected": "已拒绝", "draft": "已设回待审"}[status]
        return self.view(kb, nxt, rows, status=f"{word} {current} · {survival_line(rows)}")

    def edit(self, kb: str, current: str | None, question: str, answers: str, quotes: str):
        """Save the edit boxes into the current draft and accept it."""
        if not current:
            raise gr.Error("没有选中的草稿 / no draft selected")

        def change(rows):
            row = find(rows, current)
            texts = self._doc_texts(kb, row)
            apply_edit(row, question, answers, quotes, texts)
            return set_status(rows, current, "accepted")

        rows, _ = self._change(kb, change)
        return self.view(kb, next_id(rows, current, unreviewed=True), rows,
                         status=f"已修改并接受 {current} · {survival_line(rows)}")

    def _doc_texts(self, kb: str, row: dict) -> dict[str, str]:
        """``doc_id -> text`` of the documents an edited quote may come from: the draft's own, then the rest."""
        with closing(KnowledgeBase(self._kb_dir(kb))) as store:
            own = list(dict.fromkeys([*(row.get("gold_docs") or []), *(row.get("source_docs") or [])]))
            docs = own + [d.doc_id for d in store.documents() if d.doc_id not in own]
            out = {}
            for doc in docs:
                found = store.document_text(doc)
                if found:
                    out[doc] = found[1]
            return out

    # ------------------------------------------------------------ drafts in
    def generate(self, kb: str, n: float, seed: float, current: str | None = None,
                 progress=gr.Progress(), max_calls: int | None = None):
        """Draft ``n`` questions from the KB with the local model (minutes on CPU; Gradio runs this
        synchronous handler in a worker thread, off the event loop), replacing the KB's drafts."""
        kb_dir = self._kb_dir(kb)
        n = int(n or DEFAULT_N)
        if not 1 <= n <= 200:
            raise gr.Error("草稿数须在 1–200 之间 / drafts wanted: 1–200")
        stats = GenStats()
        progress(0, desc="正在加载本地模型… / loading the local model")

        def on_call(calls, limit, kept, need):
            progress(min(0.99, max(calls / max(limit, 1), kept / max(need, 1))),
                     desc=f"正在起草：LLM 调用 {calls}/{limit}，已得 {kept} 条 / drafting")

        try:
            drafts = draft_questions(self.service, kb, n, seed=int(seed or 0), stats=stats, on_call=on_call,
                                     max_calls=max_calls)
        except (KnowledgeBaseError, RuntimeError, OSError, ValueError) as exc:
            raise gr.Error(f"生成草稿失败 / drafting failed: {exc}") from exc
        if not drafts:
            raise gr.Error("模型没有写出合格的草稿 / no draft passed the checks\n" + stats.summary())
        note = self._replace(kb, as_rows(drafts))
        log.info("drafted %d eval questions for %s: %s", len(drafts), kb, stats.summary())
        rows = read_rows(drafts_file(kb_dir))
        summary = stats.summary().replace("\n", "  \n")
        return self.view(kb, None, rows, status=f"✓ 已生成 {len(drafts)} 条草稿{note}，请逐条审核  \n{summary}")

    def load_file(self, kb: str, path: str | None, current: str | None = None):
        """Load a drafts file ``rag eval-gen`` wrote (or an earlier review file), replacing the KB's drafts."""
        if not path:
            raise gr.Error("请先选择草稿文件（rag eval-gen 写出的 .jsonl） / choose a drafts file")
        self._kb_dir(kb)
        try:
            rows = read_rows(Path(path))
        except (ValueError, OSError) as exc:
            raise gr.Error(f"草稿文件有误 / bad drafts file: {exc}") from exc
        if not rows:
            raise gr.Error("草稿文件是空的 / the drafts file is empty")
        known = {d.doc_id for d in self.service.documents(kb)}
        foreign = [r["id"] for r in rows if (r.get("gold_docs") or r.get("source_docs"))
                   and not set(r.get("gold_docs") or []) | set(r.get("source_docs") or []) <= known]
        note = self._replace(kb, rows)
        status = f"✓ 已载入 {len(rows)} 条草稿{note} · {survival_line(rows)}"
        if foreign:
            status += (f"  \n⚠ {len(foreign)} 条草稿引用的文档不在知识库 **{kb}** 中（{'、'.join(foreign[:5])}）："
                       f"是否选错了知识库？ / drafts quote documents this KB lacks")
        return self.view(kb, None, rows, status=status)

    # ------------------------------------------------------------ accepted set out
    def save_accepted(self, kb: str):
        """Write the accepted drafts as ``<kb>/eval-accepted.jsonl`` and hand a copy to the 评测 tab.
        Returns (questions file, source, eval status, review status, selected sub-tab)."""
        kb_dir = self._kb_dir(kb)
        rows = self.rows(kb)
        keep = accepted_rows(rows)
        if not keep:
            raise gr.Error("还没有接受任何草稿 / no draft accepted yet")
        saved = write_rows(accepted_file(kb_dir), keep)
        # An ASCII name: the plot title shows the file stem, and matplotlib may have no CJK font.
        served = Path(tempfile.mkdtemp(dir=self.export_dir, prefix="review-")) / "reviewed-questions.jsonl"
        shutil.copyfile(saved, served)
        pending = survival(rows)["all"]["drafted"] - survival(rows)["all"]["reviewed"]
        line = (f"✓ 已保存 {len(keep)} 条已接受的题目到 `{saved}`（已填入“问题集”，点“开始评测”运行）· "
                f"{survival_line(rows)}" + (f" · 还有 {pending} 条待审，不在题集中" if pending else ""))
        gr.Info(f"已保存 {len(keep)} 条已接受的题目 / accepted set saved")
        return str(served), "current", line, line, gr.Tabs(selected="eval-run")

    # ------------------------------------------------------------ documents deleted
    def purge(self, kb: str, doc_ids: Iterable[str]) -> list[str]:
        """Drop the drafts and accepted questions quoting deleted documents; names what changed."""
        wanted = {d for d in doc_ids if d}
        kb_dir = self.service.home / kb
        changed = []
        with self._lock:
            for path in (drafts_file(kb_dir), accepted_file(kb_dir), drafts_file(kb_dir).with_name(
                    drafts_file(kb_dir).name + ".bak")):
                if not path.is_file() or path.is_symlink():
                    continue
                try:
                    rows = read_rows(path)
                except ValueError:
                    continue
                kept, dropped = drop_documents(rows, wanted)
                if dropped:
                    write_rows(path, kept)
                    changed.append(f"{path.name}（{dropped} 条题目 questions）")
        return changed


# ============================================================================ layout
def build_review_tab(handlers: ReviewHandlers, kb: gr.Dropdown, questions: gr.File, source: gr.Radio,
                     eval_status: gr.Markdown, tabs: gr.Tabs) -> None:
    """The 审核草稿 sub-tab of 评测; ``questions``/``source``/``eval_status``/``tabs`` are the run
    sub-tab's inputs, filled by 「保存已接受的题目」 so the set runs at once."""
    with gr.Tab("审核草稿 review", id="eval-review") as tab:
        gr.Markdown("用本地模型从知识库的段落起草评测问题（单事实、两问、无答案），或载入 `rag eval-gen` 写出的草稿文件；"
                    "逐条对照原文接受、拒绝或修改，再把接受的题目保存为题集。**未审核的草稿不会被评测。** "
                    "审核记录随时保存在知识库目录里，刷新页面不会丢失。")
        with gr.Row():
            n = gr.Number(value=DEFAULT_N, precision=0, minimum=1, maximum=200, label="草稿数 drafts", scale=1,
                          elem_id="rag-review-n")
            seed = gr.Number(value=0, precision=0, label="随机种子 seed", scale=1)
            generate = gr.Button("生成草稿（本地模型，需几分钟）", variant="primary", scale=2,
                                 elem_id="rag-review-generate")
        with gr.Row():
            drafts_in = gr.File(label="或载入草稿文件 rag eval-gen .jsonl", file_types=[".jsonl"], type="filepath",
                                scale=3, elem_id="rag-review-file")
            load = gr.Button("载入草稿", scale=1, elem_id="rag-review-load")
        status = gr.Markdown(elem_id="rag-review-status")
        counts = gr.Dataframe(headers=SURVIVAL_HEADERS, interactive=False, label="审核存活 survival",
                              elem_id="rag-review-survival")
        listing = gr.Dataframe(headers=LIST_HEADERS, interactive=False, wrap=True, max_height=300,
                               column_widths=["12%", "15%", "20%", "53%"], label="草稿（点击一行查看）",
                               elem_id="rag-review-list")
        detail = gr.HTML(EMPTY_HINT, elem_id="rag-review-draft")
        with gr.Row():
            prev = gr.Button("← 上一条", size="sm")
            accept = gr.Button("✓ 接受", variant="primary", size="sm", elem_id="rag-review-accept")
            reject = gr.Button("✗ 拒绝", variant="stop", size="sm", elem_id="rag-review-reject")
            reset = gr.Button("设回待审", size="sm", elem_id="rag-review-reset")
            nxt = gr.Button("下一条 →", size="sm")
        with gr.Accordion("修改后接受 edit", open=False):
            question = gr.Textbox(label="问题", lines=2, elem_id="rag-review-question")
            answers = gr.Textbox(label="答案（每行一问；同义写法用 ｜ 隔开；无答案题留空）", lines=2,
                                 elem_id="rag-review-answers")
            quotes = gr.Textbox(label="标准引文（每行一条，须为原文片段）", lines=3, elem_id="rag-review-quotes")
            save_edit = gr.Button("保存修改并接受", size="sm", elem_id="rag-review-save-edit")
        save = gr.Button("保存已接受的题目 → 评测", variant="primary", elem_id="rag-review-save")
        current = gr.State(None)

    view = [status, counts, listing, current, detail, question, answers, quotes]
    quick = dict(api_visibility="private", concurrency_limit=None)
    tab.select(handlers.open, [kb, current], view, **quick)
    kb.change(handlers.open, [kb], view, **quick)
    listing.select(handlers.select, [kb], view, **quick)
    prev.click(lambda k, c: handlers.step(k, c, -1), [kb, current], view, **quick)
    nxt.click(lambda k, c: handlers.step(k, c, 1), [kb, current], view, **quick)
    accept.click(lambda k, c: handlers.decide(k, c, "accepted"), [kb, current], view, **quick)
    reject.click(lambda k, c: handlers.decide(k, c, "rejected"), [kb, current], view, **quick)
    reset.click(lambda k, c: handlers.decide(k, c, "draft"), [kb, current], view, **quick)
    save_edit.click(handlers.edit, [kb, current, question, answers, quotes], view, **quick)
    load.click(handlers.load_file, [kb, drafts_in, current], view, **quick)
    # The local model keeps both cores busy: one drafting or evaluation at a time ("eval" group).
    generate.click(handlers.generate, [kb, n, seed, current], view, api_visibility="private",
                   concurrency_id="eval", concurrency_limit=1)
    save.click(handlers.save_accepted, [kb], [questions, source, eval_status, status, tabs], **quick)
