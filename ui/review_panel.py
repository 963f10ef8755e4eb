"""The 评测 tab's 审核草稿 screen: review drafted eval questions (``rag eval-gen``) before they are run.

Draft with the local model here (progress bar) or load a drafts file ``rag eval-gen`` wrote; read
each draft with its source passage, the gold quote highlighted; accept, reject or edit it; save the
accepted ones as a question set the 评测 tab runs at once. The count of drafts that survive review
(accepted / reviewed / drafted, per kind) stays on screen.

State lives on disk, not in the browser: the KB's drafts file ``<home>/<kb>/eval-drafts.jsonl``
(``rag.eval_drafts.drafts_file``) is rewritten (atomically) after every decision, so a page reload or a
second browser sees the same review; the accepted set is ``<home>/<kb>/eval-accepted.jsonl``.
``rag.eval_questions.load_questions`` refuses a file that still holds unreviewed or rejected rows.

The review rules are plain functions in ``ui.review_state`` (``set_status``, ``apply_edit``,
``survival_rows``, ``accepted_rows``, ``passages_for``); here are the HTML of one draft
(``draft_html``), thin Gradio handlers over them (``ReviewHandlers``) and the layout.
"""
from __future__ import annotations

import logging
import re
import shutil
import tempfile
import threading
from collections.abc import Iterable
from contextlib import closing
from pathlib import Path

import gradio as gr

from rag import zh
from rag.eval_drafts import accepted_file, drafts_file, read_rows, row_kind, survival, write_rows
from rag.eval_gen import GenStats, as_rows, draft_questions, kb_text
from rag.store import KnowledgeBase, KnowledgeBaseError
from ui.render import _highlighted, esc
from ui.review_state import (KIND_NAMES, STATUS_NAMES, ReviewError, accepted_rows, answer_lines, apply_edit,
                             drop_documents, find, list_rows, negative_places, next_id, passages_for, set_status,
                             survival_line, survival_rows)

log = logging.getLogger(__name__)

LIST_HEADERS = ["编号", "类型", "状态", "问题"]
SURVIVAL_HEADERS = ["类型 kind", "草稿 drafted", "已审 reviewed", "接受 accepted", "含修改 edited", "拒绝 rejected",
                    "存活率 接受/已审"]
CONTEXT = 60  # document characters shown on each side of a source passage
DEFAULT_N = 20
EMPTY_HINT = ('<div class="muted">还没有草稿。点“生成草稿”用本地模型从当前知识库起草问题，或载入 '
              '<code>rag eval-gen</code> 写出的草稿文件。 / No drafts yet: generate or load some.</div>')
_BLANK_LINES = re.compile(r"<br>(?:[ \t\u3000]*<br>)+")  # ui.render.esc writes a newline as <br>


# ============================================================================ draft HTML
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
        places = negative_places(row)
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
            places = negative_places(row) if row_kind(row) == "negative" else None
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
