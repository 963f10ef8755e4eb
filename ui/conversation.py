"""A browser session's conversation: its turns, the history the Answerer needs, the
source behind a clicked citation, and the Markdown export.

A turn is plain data (``{"question", "kb", "result": AnswerResult.to_dict()}``) so it
can live in a ``gr.State`` and be deep-copied freely.
"""
from __future__ import annotations

import re
import time

from rag.answer import AnswerResult

# The key a citation link carries: "t<turn>-c<n>" for a cited source, "t<turn>-p<n>" for a
# retrieved passage (the closest passages offered with a refusal).
_KEY = re.compile(r"t(\d+)-([cp])(\d+)")


def make_turn(question: str, kb: str, result: AnswerResult) -> dict:
    return {"question": question, "kb": kb, "result": result.to_dict()}


def history(turns: list[dict]) -> list[dict]:
    """Earlier turns in the ``[{"role", "content"}]`` form ``Answerer.stream`` takes."""
    messages = []
    for turn in turns:
        messages.append({"role": "user", "content": turn["question"]})
        messages.append({"role": "assistant", "content": turn["result"]["answer"]})
    return messages


def cite_key(turn: int, kind: str, number: int) -> str:
    return f"t{turn}-{kind}{number}"


def find_source(turns: list[dict], key: str) -> dict | None:
    """The citation or passage a key points at, as one flat dict the side panel can show.

    Returns keys: kind ("citation"/"passage"), number, kb, doc_id, title, section, page,
    start, end (passage span in the original document), quote, quote_start, quote_end.
    """
    match = _KEY.fullmatch((key or "").strip())
    if not match:
        return None
    index, kind, number = int(match.group(1)), match.group(2), int(match.group(3))
    if index >= len(turns):
        return None
    turn = turns[index]
    result = turn["result"]
    if kind == "c":
        found = next((c for c in result["citations"] if c["number"] == number), None)
        if found is None:
            return None
        return dict(found, kind="citation", kb=found.get("kb") or turn["kb"])  # several KBs: the cited one
    if not 1 <= number <= len(result["passages"]):
        return None
    p = result["passages"][number - 1]
    return {"kind": "passage", "number": number, "kb": p.get("kb") or turn["kb"], "doc_id": p["doc_id"], "title": p["title"],
            "section": p["section"], "page": p["page"], "start": p["start"], "end": p["end"],
            "quote": "", "quote_start": None, "quote_end": None}


def where(title: str, section: str, page: int | None, doc_id: str = "") -> str:
    """``《标题》 · 章节 · 第3页`` (the parts that exist)."""
    parts = [f"《{title or doc_id}》"]
    if section:
        parts.append(section)
    if page:
        parts.append(f"第{page}页")
    return " · ".join(parts)


def describe_filters(filters: dict) -> str:
    """A stored result's filter (``Where.to_dict()``) as ``Where.describe()`` writes it."""
    from rag.filters import Where

    return Where.from_mapping(filters).describe()


def to_markdown(turns: list[dict]) -> str:
    """The whole conversation as Markdown: questions, answers with [n], and their sources."""
    lines = ["# 对话记录", "", f"导出时间：{time.strftime('%Y-%m-%d %H:%M:%S')}", ""]
    for i, turn in enumerate(turns, 1):
        r = turn["result"]
        shown = f" · 过滤：{describe_filters(r['filters'])}" if r.get("filters") else ""
        lines += [f"## {i}. {turn['question']}", "", f"*知识库：{turn['kb']} · 模型：{r['backend']}{shown}*", ""]
        several = len(r.get("kbs") or []) > 1
        if r["refused"]:
            lines += [f"> {r['answer']}", ""]
            if r["passages"]:
                lines += ["最接近的段落（仅供参考）：", ""]
                for p in r["passages"][:3]:
                    lines.append(f"- [{p['number']}] {where(p['title'], p['section'], p['page'], p['doc_id'])}"
                                 f"（{p['doc_id']}）")
                lines.append("")
            continue
        lines += [r["answer"], ""]
        unsupported = [s["text"] for s in r["sentences"] if not s["supported"]]
        if unsupported:
            lines += ["⚠ 以下句子没有在资料中找到依据：", ""] + [f"- {s}" for s in unsupported] + [""]
        if r["citations"]:
            lines += ["**来源**", ""]
            for c in r["citations"]:
                kb = f"〔{c['kb']}〕" if several and c.get("kb") else ""  # several KBs: each source names its own
                lines.append(f"[{c['number']}] {kb}{where(c['title'], c['section'], c['page'], c['doc_id'])}"
                             f"（{c['doc_id']}）")
                lines.append(f"> {c['quote']}")
                lines.append("")
        if r.get("notice"):
            lines += [f"*注意：{r['notice']}*", ""]
    return "\n".join(lines).rstrip() + "\n"
