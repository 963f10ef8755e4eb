"""HTML for the chat messages, the citation side panel and the retrieval details.

Every piece of document or user text goes through ``esc`` first: documents are
untrusted input. Citation chips are ``<a class="cite" href="#cite-<key>">`` links
because the chatbot's sanitiser keeps ``href`` and ``class`` but strips ``data-*``
attributes; ``ui.assets.BRIDGE_JS`` turns a click on such a link into a server event.
"""
from __future__ import annotations

import html

from rag.filters import FilterError, Where
from rag.zh import MARKER, marker_numbers, split_trailing
from ui.conversation import cite_key, where

CONTEXT_CHARS = 160  # document text shown on each side of a cited passage


def esc(text: str) -> str:
    return html.escape(text or "").replace("\n", "<br>")


def _chip(turn: int, kind: str, number: int, title: str = "") -> str:
    tip = f' title="{html.escape(title, quote=True)}"' if title else ""
    return f'<a class="cite" href="#cite-{cite_key(turn, kind, number)}"{tip}>[{number}]</a>'


def user_message(question: str) -> str:
    return esc(question)


def _with_markers(text: str, chip) -> str:
    """Escape ``text`` and replace each [n] marker by ``chip(n)``."""
    out, at = [], 0
    for m in MARKER.finditer(text):
        out.append(esc(text[at:m.start()]))
        out.extend(chip(n) for n in marker_numbers(m))
        at = m.end()
    out.append(esc(text[at:]))
    return "".join(out)


def streaming_message(text: str, status: str = "") -> str:
    """The answer while it streams: markers are shown but not clickable yet (not verified)."""
    body = _with_markers(text, lambda n: f'<span class="cite pending">[{n}]</span>')
    note = f'<div class="status">{esc(status)}</div>' if status else ""
    return f'<div class="answer streaming">{body}</div>{note}'


def _sentence_html(turn: int, sentence: dict, titles: dict[int, str]) -> str:
    body, punct = split_trailing(sentence["text"])  # chips before the closing punctuation, as in the answer
    chips = "".join(_chip(turn, "c", n, titles.get(n, "")) for n in sentence["cited"])
    inner = f"{esc(body)}{chips}{esc(punct)}"
    if sentence["supported"]:
        return f'<span class="sent">{inner}</span>'
    why = f" ({sentence['reason']})" if sentence.get("reason") else ""
    title = esc(f"核对：资料中没有找到这句话的依据 / not supported by the sources{why}")
    return (f'<span class="sent unsupported" title="{title}">'
            f'{inner}<span class="flag">⚠未核实</span></span>')


def several_kbs(result: dict) -> bool:
    """Whether the answer searched more than one knowledge base (then every source names its KB)."""
    return len(result.get("kbs") or []) > 1


def source_name(result: dict, item: dict) -> str:
    """``《标题》 · 章节 · 第3页`` of a citation or passage, ``〔知识库〕`` first when several were searched."""
    name = where(item["title"], item["section"], item["page"], item["doc_id"])
    return f"〔{item['kb']}〕{name}" if several_kbs(result) and item.get("kb") else name


def filter_text(filters: dict | None) -> str:
    """One line for a stored filter (``AnswerResult.filters``), "" when none."""
    if not filters:
        return ""
    try:
        return Where.from_mapping(filters).describe()
    except FilterError:  # stored by an older version: show it raw rather than nothing
        return str(filters)


def scope_line(result: dict) -> str:
    """What the answer searched, under the answer: the KBs when several, the metadata filter if any."""
    parts = []
    if several_kbs(result):
        parts.append(f"检索了 {len(result['kbs'])} 个知识库：{'、'.join(result['kbs'])}")
    if described := filter_text(result.get("filters")):
        parts.append(f"过滤：{described}")
    return f'<div class="notice scope">{esc(" · ".join(parts))}</div>' if parts else ""


def answer_message(turn: int, result: dict) -> str:
    """A finished answer: clickable [n] chips, unsupported sentences marked, sources listed."""
    if result["refused"]:
        return refusal_message(turn, result)
    titles = {c["number"]: source_name(result, c) for c in result["citations"]}
    if result["sentences"]:
        body = "".join(_sentence_html(turn, s, titles) for s in result["sentences"])
    else:  # nothing to verify sentence by sentence: still make the markers clickable
        body = _with_markers(result["answer"], lambda n: _chip(turn, "c", n, titles.get(n, "")))
    parts = [f'<div class="answer">{body}</div>']
    if result["unsupported_sentences"]:
        parts.append(f'<div class="warn">⚠ {result["unsupported_sentences"]} 句没有在资料中找到依据，已标出，请谨慎参考。</div>')
    if result["citations"]:
        items = "".join(
            f'<li><a class="source" href="#cite-{cite_key(turn, "c", c["number"])}">'
            f'<b>[{c["number"]}]</b> {esc(titles[c["number"]])}'
            f'<span class="quote">「{esc(_clip(c["quote"], 60))}」</span></a></li>'
            for c in result["citations"])
        parts.append(f'<div class="sources"><div class="sources-title">来源（点击查看原文）</div><ol>{items}</ol></div>')
    parts.append(_notice(result))
    parts.append(scope_line(result))
    return "".join(parts)


def refusal_message(turn: int, result: dict) -> str:
    """A refusal says so, and still offers the closest passages to look at."""
    parts = [f'<div class="refusal">{esc(result["answer"])}</div>']
    if result["passages"]:
        items = "".join(
            f'<li><a class="source" href="#cite-{cite_key(turn, "p", p["number"])}">'
            f'<b>[{p["number"]}]</b> {esc(source_name(result, p))}'
            f'<span class="quote">{esc(_clip(p["text"], 50))}</span></a></li>'
            for p in result["passages"][:3])
        parts.append(f'<div class="sources closest"><div class="sources-title">最接近的段落（仅供参考，未必能回答问题）</div>'
                     f'<ol>{items}</ol></div>')
    parts.append(_notice(result))
    parts.append(scope_line(result))
    return "".join(parts)


def error_message(message: str) -> str:
    return f'<div class="refusal error">⚠ 出错了：{esc(message)}</div>'


def problem_message(message: str) -> str:
    """A question that cannot be searched as asked (a bad filter, KBs that cannot be searched
    together, a missing KB): the reason, to act on, not an error report."""
    return f'<div class="refusal problem">⚠ {esc(message)}</div>'


def _notice(result: dict) -> str:
    return f'<div class="notice">{esc(result["notice"])}</div>' if result.get("notice") else ""


def _clip(text: str, n: int) -> str:
    text = " ".join((text or "").split())
    return text if len(text) <= n else text[:n] + "…"


# ---------------------------------------------------------------- side panel
def _highlighted(text: str, source: dict, lo: int, hi: int, focus: bool) -> str:
    """``text[lo:hi]`` with the passage tinted and the supporting quote marked."""
    start, end = max(lo, source["start"]), min(hi, source["end"])
    qs, qe = source.get("quote_start"), source.get("quote_end")
    if qs is None or qe is None or not (start <= qs < qe <= end):
        qs = qe = None
    focus_cls = " rag-focus" if focus else ""
    if qs is None:  # no located quote: the passage itself is the thing to look at
        passage = f'<mark class="passage-only{focus_cls}">{esc(text[start:end])}</mark>'
    else:
        passage = (f"{esc(text[start:qs])}<mark class=\"quote{focus_cls}\">{esc(text[qs:qe])}</mark>"
                   f"{esc(text[qe:end])}")
    return f'{esc(text[lo:start])}<span class="passage">{passage}</span>{esc(text[end:hi])}'


def source_header(source: dict, doc: tuple[str, str] | None) -> str:
    title = doc[0] if doc else source["title"]
    kind = f'引用 [{source["number"]}]' if source["kind"] == "citation" else f'段落 [{source["number"]}]'
    rows = [("文档", f'{title or source["doc_id"]}'), ("文件", source["doc_id"]),
            ("章节", source["section"] or "—"), ("页码", f'第{source["page"]}页' if source["page"] else "—"),
            ("知识库", source["kb"])]
    items = "".join(f'<div><span class="k">{esc(k)}</span>{esc(str(v))}</div>' for k, v in rows)
    return f'<div class="cite-head"><span class="cite-kind">{kind}</span><div class="cite-meta">{items}</div></div>'


def context_html(source: dict, doc: tuple[str, str] | None) -> str:
    """The cited passage inside its neighbouring document text, quote highlighted."""
    if doc is None:
        return source_header(source, None) + '<div class="warn">该文档已从知识库删除，无法显示原文。</div>'
    text = doc[1]
    lo = max(0, source["start"] - CONTEXT_CHARS)
    hi = min(len(text), source["end"] + CONTEXT_CHARS)
    body = ("…" if lo > 0 else "") + _highlighted(text, source, lo, hi, focus=False) + ("…" if hi < len(text) else "")
    quote = (f'<div class="cite-quote">支持回答的原文：<mark class="quote">{esc(source["quote"])}</mark></div>'
             if source["kind"] == "citation" and source.get("quote") else "")
    return f'{source_header(source, doc)}{quote}<div class="context">{body}</div>'


def full_document_html(source: dict, doc: tuple[str, str] | None) -> str:
    """The whole document, the passage marked; ``ui.assets.SCROLL_TO_FOCUS_JS`` scrolls to it."""
    if doc is None:
        return '<div class="warn">该文档已从知识库删除。</div>'
    title, text = doc
    return (f'<div class="fulldoc-title">《{esc(title or source["doc_id"])}》全文 · {esc(source["doc_id"])}</div>'
            f'<div class="fulldoc">{_highlighted(text, source, 0, len(text), focus=True)}</div>')


# ---------------------------------------------------------------- retrieval details
def _num(value, digits: int) -> str:
    return "—" if value is None else f"{value:.{digits}f}"


def details_html(turn: dict | None) -> str:
    """Rewritten query, the parts of a compound question, per-channel ranks and scores of each passage, timings."""
    if turn is None:
        return '<div class="muted">提问后这里显示检索详情。</div>'
    r = turn["result"]
    rows = "".join(
        f'<tr><td>[{p["number"]}]</td><td>{esc(source_name(r, p))}</td>'
        f'<td>{_num(p["score"], 4)}</td>'
        f'<td>{"#" + str(p["dense_rank"]) if p["dense_rank"] else "—"} / {_num(p["dense_score"], 3)}</td>'
        f'<td>{"#" + str(p["bm25_rank"]) if p["bm25_rank"] else "—"} / {_num(p["bm25_score"], 2)}</td></tr>'
        for p in r["passages"])
    timings = " · ".join(f"{k} {v:.0f} ms" for k, v in r["timings"].items())
    parts = r.get("parts") or []
    split = (f'<div><b>拆分为 {len(parts)} 个子问题</b>（各自检索、各自回答）：'
             + "；".join(f"{i}. {esc(p)}" for i, p in enumerate(parts, 1)) + "</div>") if parts else ""
    probed = r.get("part_answers") or []
    if any(a["answer"] or a["error"] for a in probed):
        split += ('<div><b>预读答案</b>（大模型先从各子问题的前几段读出答案，含此答案的段落排前）：'
                  + "；".join(f"{i}. {esc(a['answer'] or '—')}"
                              + (f"（{a['holding']} 段含有）" if a["holding"] else f"（{esc(a['error'])}）" if a["error"] else "")
                              for i, a in enumerate(probed, 1)) + "</div>")
    scope = f'<div><b>知识库</b>：{esc("、".join(r.get("kbs") or [turn["kb"]]))}</div>'
    if described := filter_text(r.get("filters")):
        scope += f'<div><b>过滤</b>：{esc(described)}</div>'
    return (f'<div class="details"><div><b>检索用的问题</b>（改写后）：{esc(r["query"])}</div>{split}{scope}'
            f'<div><b>模型</b>：{esc(r["backend"])} · <b>用时</b>：{esc(timings)}</div>'
            f'<table><thead><tr><th>#</th><th>文档 · 章节</th><th>融合分</th><th>向量 排名/分数</th>'
            f'<th>BM25 排名/分数</th></tr></thead><tbody>{rows}</tbody></table></div>')
