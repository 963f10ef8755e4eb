"""Event handlers of the chat side: answering (streamed), citation lookup, export.

They hold no per-user data: the conversation comes in and goes out through a
``gr.State`` (one per browser session); the shared knowledge bases come from
the ``RagService`` given at construction.
"""
from __future__ import annotations

import logging
import re
import tempfile
import time
from pathlib import Path

import gradio as gr

from rag.answer_types import Answered, Probing, Retrieved, Token
from rag.feedback import FeedbackEntry
from rag.filters import FilterError, Where
from rag.multi_kb import split_kbs
from rag.store import KnowledgeBaseError
from ui import render
from ui.conversation import find_source, history, make_turn, to_markdown
from rag.service import LLMChoice, RagService

log = logging.getLogger(__name__)


# What the feedback panel says before any 👍/👎 was clicked.
FEEDBACK_TARGET_HINT = "反馈对象：最后一个回答（点回答下的 👍/👎 可选择其他回答）"
# Plain text: a machine without an emoji font shows the thumbs as boxes.
VOTES = [("有帮助（赞）", "up"), ("有问题（踩）", "down")]
# What the filter panel says when nothing is filtered.
NO_FILTER = "未设置过滤：检索全部文档 / no filter: all documents are searched"


def filter_from_inputs(path: str | None = "", title: str | None = "", date_from: str | None = "",
                       date_to: str | None = "", conditions: str | None = "") -> Where:
    """The metadata filter the retrieval panel's inputs describe (all must hold).

    Args:
        path: path prefixes or globs (``news/``, ``*.pdf``), several separated by commas: any of them.
        title: text the title contains.
        date_from, date_to: inclusive bounds of the document date (``2024-01-01``, ``2024-05``, ``2024``).
        conditions: free conditions, ``;``-separated: ``字段=值`` (jsonl field / front matter), or any
            ``--where`` condition (``title~…``, ``date>=…``).

    Raises:
        FilterError: an input cannot be read (the message says what is wrong, in Chinese and English).
    """
    items = [f"path={p.strip()}" for p in re.split(r"[,，\n]", path or "") if p.strip()]
    if (title or "").strip():
        items.append(f"title~{title.strip()}")
    for op, value, what in ((">=", date_from, "起始日期"), ("<=", date_to, "截止日期")):
        if (value or "").strip():
            try:
                items.append(f"date{op}{value.strip()}")
                Where.parse(items[-1])
            except FilterError as exc:
                raise FilterError(f"{what}：{exc}") from exc
    items += [c for c in re.split(r"[;；\n]", conditions or "") if c.strip()]
    return Where.parse(items)


def filter_status(path: str = "", title: str = "", date_from: str = "", date_to: str = "",
                  conditions: str = "") -> str:
    """The line under the filter inputs: the active filter, or why it cannot be used."""
    try:
        where = filter_from_inputs(path, title, date_from, date_to, conditions)
    except FilterError as exc:
        return f"⚠ {exc}"
    return f"当前过滤（用于之后的提问）：{where.describe()}" if where else NO_FILTER


def feedback_kb(turn: dict) -> str:
    """The KB that keeps feedback on a turn: its first citation's, else the first KB searched."""
    result = turn["result"]
    cited = [c.get("kb") for c in result.get("citations") or [] if c.get("kb")]
    return cited[0] if cited else (result.get("kbs") or split_kbs(turn["kb"]) or [turn["kb"]])[0]


def new_votes() -> dict:
    """A session's feedback state: the answer the panel applies to (turn index, None: the last
    one), and per turn the id of the entry stored for it and its vote (one entry per answer)."""
    return {"last": None, "ids": {}, "votes": {}}


def chat_messages(turns: list[dict]) -> list[dict]:
    """The chatbot value for finished turns."""
    messages = []
    for i, turn in enumerate(turns):
        messages.append({"role": "user", "content": render.user_message(turn["question"])})
        messages.append({"role": "assistant", "content": render.answer_message(i, turn["result"])})
    return messages


class ChatHandlers:
    def __init__(self, service: RagService, export_dir: Path):
        self.service = service
        self.export_dir = export_dir

    def respond(self, message: str, turns: list[dict] | None, kb: str, backend: str, k: float,
                base_url: str, api_key: str, model: str, show_details: bool,
                search: list[str] | str | None = None, path: str | None = None, title: str | None = None,
                date_from: str | None = None, date_to: str | None = None, conditions: str | None = None):
        """Answer one question, streaming. Yields (chatbot, turns, textbox, details).

        Args:
            kb: the current KB (the one the 知识库 tab manages); searched when ``search`` is empty.
            search: the KBs the question searches (the multi-select; a list, or "a,b").
            path, title, date_from, date_to, conditions: the metadata filter (``filter_from_inputs``).
        """
        question = (message or "").strip()
        turns = list(turns or [])
        if not question:
            gr.Warning("请输入问题")
            return
        shown = chat_messages(turns) + [{"role": "user", "content": render.user_message(question)}]

        def frame(content: str):
            return shown + [{"role": "assistant", "content": content}], turns, "", gr.skip()

        names = split_kbs(search or []) or split_kbs(kb or "")
        try:  # a bad filter is the user's to fix: said before anything runs, the question kept
            where = filter_from_inputs(path, title, date_from, date_to, conditions)
        except FilterError as exc:
            yield shown + [{"role": "assistant", "content": render.problem_message(str(exc))}], turns, question, \
                gr.skip()
            return
        yield frame(render.streaming_message("", f"正在检索 {'、'.join(names)}…" if len(names) > 1 else "正在检索资料…"))
        choice = LLMChoice(backend or "extractive", (base_url or "").strip(), (api_key or "").strip(),
                           (model or "").strip())
        result, text = None, ""
        try:
            answerer = self.service.answerer(names, choice)
            for event in answerer.stream(question, history(turns), choice.backend, int(k), where=where):
                if isinstance(event, Probing):
                    status = f"问题包含 {len(event.parts)} 个部分，正在分别检索并预读各部分的答案…"
                    yield frame(render.streaming_message(text, status))
                elif isinstance(event, Retrieved):
                    status = (f"已找到 {len(event.passages)} 段资料，正在生成回答…" if event.passages
                              else "没有找到相关资料" + ("（已按过滤条件检索）" if where else ""))
                    yield frame(render.streaming_message(text, status))
                elif isinstance(event, Token):
                    text += event.text
                    yield frame(render.streaming_message(text, "正在生成…"))
                elif isinstance(event, Answered):
                    result = event.result
        except (KnowledgeBaseError, FilterError) as exc:  # e.g. KBs of different embedders: the reason, as is
            log.info("question refused: %s", exc)
            yield frame(render.problem_message(str(exc)))
            return
        except Exception as exc:  # shown in the chat; the session and the server keep going
            log.exception("answer failed")
            yield frame(render.error_message(str(exc)))
            return
        turns.append(make_turn(question, "+".join(result.kbs or names), result))
        details = render.details_html(turns[-1]) if show_details else gr.skip()
        yield chat_messages(turns), turns, "", details

    def cite(self, turns: list[dict] | None, evt: gr.EventData):
        """A citation link was clicked: show its passage in context. Returns (panel, source, full doc)."""
        key = (getattr(evt, "_data", None) or {}).get("key", "")
        source = find_source(turns or [], key)
        if source is None:
            return '<div class="warn">找不到这条引用（对话可能已清空）。</div>', None, gr.update(value="", visible=False)
        doc = self.service.document_text(source["kb"], source["doc_id"])
        return render.context_html(source, doc), source, gr.update(value="", visible=False)

    def open_full(self, source: dict | None):
        if source is None:
            return gr.update(value='<div class="muted">先点击一个引用。</div>', visible=True)
        doc = self.service.document_text(source["kb"], source["doc_id"])
        return gr.update(value=render.full_document_html(source, doc), visible=True)

    def details(self, turns: list[dict] | None, show: bool):
        """The 设置 tab's "show retrieval details": opens the panel (its filters are always there)
        and shows or hides the details of the last answer. Returns (panel, details)."""
        return (gr.update(open=True) if show else gr.skip(),
                gr.update(value=render.details_html(turns[-1] if turns else None), visible=bool(show)))

    @staticmethod
    def filter_status(path: str, title: str, date_from: str, date_to: str, conditions: str) -> str:
        return filter_status(path, title, date_from, date_to, conditions)

    def export(self, turns: list[dict] | None):
        if not turns:
            gr.Warning("还没有对话可以导出")
            return gr.update(value=None, visible=False)
        # A folder per export: two sessions exporting in the same second must not share a file.
        path = Path(tempfile.mkdtemp(dir=self.export_dir)) / f"对话-{time.strftime('%Y%m%d-%H%M%S')}.md"
        path.write_text(to_markdown(turns), encoding="utf-8")
        return gr.update(value=str(path), visible=True)

    # ------------------------------------------------------------ feedback
    def _store(self, turns: list[dict] | None, votes: dict | None, index: int, vote: str,
               comment: str = "", correction: str = "", should_refuse: bool = False) -> dict:
        """Store feedback on turn ``index`` (replacing this session's earlier entry on it); returns
        the new session feedback state. Raises ValueError / KnowledgeBaseError with the message to show."""
        turns, votes = turns or [], votes or new_votes()
        if not 0 <= index < len(turns):
            raise ValueError("找不到这条回答（对话可能已清空） / that answer is no longer in the conversation")
        turn = turns[index]
        entry = FeedbackEntry.from_record({"question": turn["question"], **turn["result"]}, vote, comment=comment,
                                          correction=correction, should_refuse=should_refuse)
        entry.id = votes["ids"].get(index)
        entry_id = self.service.add_feedback(feedback_kb(turn), entry)
        return {"last": index, "ids": {**votes["ids"], index: entry_id}, "votes": {**votes["votes"], index: vote}}

    @staticmethod
    def _target(turns: list[dict], index: int) -> str:
        return f"反馈对象：第 {index + 1} 个回答 ·「{turns[index]['question'][:40]}」"

    def vote(self, turns: list[dict] | None, votes: dict | None, evt: gr.LikeData):
        """👍/👎 under an answer: stored at once. Returns (feedback state, panel vote, panel target)."""
        index = evt.index[0] if isinstance(evt.index, (list, tuple)) else evt.index
        if not isinstance(evt.liked, bool):  # a thumb clicked off again: the stored vote stays
            return gr.skip(), gr.skip(), gr.skip()
        vote = "up" if evt.liked else "down"
        try:  # assistant messages sit at odd positions: [question, answer, question, answer, …]
            votes = self._store(turns, votes, int(index) // 2, vote)
        except (ValueError, KnowledgeBaseError) as exc:
            gr.Warning(str(exc))
            return gr.skip(), gr.skip(), gr.skip()
        gr.Info("已记录反馈 / feedback saved" + ("，可在下方“反馈”中补充纠正" if vote == "down" else ""))
        return votes, vote, self._target(turns, votes["last"])

    def submit_feedback(self, turns: list[dict] | None, votes: dict | None, vote: str | None, comment: str,
                        correction: str, should_refuse: bool):
        """The feedback panel's 提交反馈: applies to the last voted answer, else the last answer.

        Returns (feedback state, vote, comment, correction, should_refuse, target); on bad input a
        warning with the reason and every field left as it was.
        """
        turns, votes = turns or [], votes or new_votes()
        if not turns:
            gr.Warning("还没有回答可以反馈 / there is no answer to give feedback on yet")
            return (gr.skip(),) * 6
        index = votes["last"] if votes["last"] is not None and votes["last"] < len(turns) else len(turns) - 1
        if not vote:  # a correction or "should have refused" can only mean 👎
            if not ((correction or "").strip() or should_refuse):
                gr.Warning("请先选择“有帮助”或“有问题” / choose up or down first")
                return (gr.skip(),) * 6
            vote = "down"
        try:
            votes = self._store(turns, votes, index, vote, comment or "", correction or "", bool(should_refuse))
        except (ValueError, KnowledgeBaseError) as exc:
            gr.Warning(str(exc))
            return (gr.skip(),) * 6
        gr.Info("已记录反馈 / feedback saved")
        return votes, vote, "", "", False, self._target(turns, index)
