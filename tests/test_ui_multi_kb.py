"""Several knowledge bases in one question and metadata filters in the web UI, at the handler
level with the real service, embedder and KBs (nothing mocked): a question answered from two
KBs with every source naming its KB, a citation opening the document of its own KB, feedback
stored in the cited KB, filters (date, path glob, a front-matter field) narrowing retrieval to
one document while still returning k hits, bad filters and KBs of different embedders refused
with their message in the chat, and the document list showing dates and fields.
"""
from __future__ import annotations

import sqlite3

import gradio as gr
import pytest

from conftest import ui_settings, write_ui_docs
from rag.feedback import DOWN, UP
from ui.chat import NO_FILTER, filter_from_inputs, filter_status, new_votes
from ui.render import details_html
from ui.conversation import to_markdown

# Gradio's queue calls a pandas API that pandas 3 deprecates: not ours to fix.
pytestmark = pytest.mark.filterwarnings("ignore::pandas.errors.Pandas4Warning")

A, B, C = "甲库", "乙库", "丙库"  # C: built with another embedder (its recorded id rewritten)
BOTH = [A, B]
# The second KB: Markdown with front matter (title, date, source), one fact per sentence.
B_DOCS = {
    "青石地铁建设.md": (
        "---\ntitle: 青石市地铁建设进展\ndate: 2023-06-15\nsource: 青石日报\n---\n"
        "# 青石市地铁建设进展\n\n"
        "## 线路\n青石市已开通地铁线路5条，运营里程达到186公里。地铁1号线于2015年开通，是青石市第一条地铁线路。\n\n"
        "## 车站\n青石市地铁共有车站142座，其中换乘站18座。2023年地铁日均客运量为96万人次。\n\n"
        "## 规划\n青石市计划到2027年建成地铁线路9条，新增运营里程120公里。地铁6号线预计2025年通车。\n\n"
        "## 票价\n青石市地铁起步票价为2元，可乘坐6公里。使用青石通卡乘车可享受九五折优惠。\n"
    ),
    "公交年报2022.md": (
        "---\ntitle: 青石市公交年报（2022）\ndate: 2022-03-01\nsource: 青石市统计局\n---\n"
        "# 青石市公交年报（2022）\n\n"
        "## 车辆\n2022年青石市共有公交车2800辆，其中新能源公交车2100辆。\n\n"
        "## 线路\n2022年青石市共有公交线路318条，线路总长度5200公里。\n\n"
        "## 客运\n2022年青石市公交全年客运量3.6亿人次，日均客运量98万人次。\n\n"
        "## 站点\n2022年青石市共设公交站点4100个，港湾式站台620个。\n"
    ),
}
REPORT = "乙资料/公交年报2022.md"  # the one document the filters narrow to
BUSES = "青石市共有多少辆新能源公交车？"


@pytest.fixture(scope="module")
def app(tmp_path_factory):
    """The UI app (not served: its handlers are called directly) over three KBs: 甲库 (the UI
    test documents), 乙库 (``B_DOCS``), 丙库 (one document, recorded as built by another model)."""
    from ui.app import create_app

    root = tmp_path_factory.mktemp("multi")
    app = create_app(ui_settings(root, kb=A))
    try:
        service = app.service
        assert service.ingest(A, [write_ui_docs(root)], progress=False).ok
        docs = root / "乙资料"
        docs.mkdir()
        for name, text in B_DOCS.items():
            (docs / name).write_text(text, encoding="utf-8")
        assert service.ingest(B, [docs], progress=False).ok
        other = root / "丙资料"
        other.mkdir()
        (other / "说明.txt").write_text("丙库只有这一份说明文档。", encoding="utf-8")
        assert service.ingest(C, [other], progress=False).ok
        # Real data, not a mock: the embedder id a KB built by another model records.
        with sqlite3.connect(service.home / C / "kb.sqlite") as db:
            db.execute("UPDATE meta SET value = 'BAAI/bge-small-zh-v1.5' WHERE key = 'embedder'")
        yield app
    finally:
        app.close()


def ask(app, question: str, search=None, turns=None, k: int = 5, **filters):
    """One question through the chat handler, run to its end; returns its last frame
    (chatbot messages, turns, textbox, details)."""
    *_, last = app.chat.respond(question, turns or [], A, "extractive", k, "", "", "", False, search, **filters)
    return last


def click(key: str) -> gr.EventData:
    """The bridge's "cite" event for a citation link ``#cite-<key>``."""
    return gr.EventData(None, {"key": key})


def test_one_question_over_two_kbs_cites_each_kb(app):
    question = "青石市共有多少辆新能源公交车？青石市开通了几条地铁线路？"
    chatbot, turns, box, _ = ask(app, question, BOTH)
    result = turns[-1]["result"]
    assert box == "" and result["kbs"] == BOTH and not result["refused"]
    assert "3200辆" in result["answer"] and "5条" in result["answer"]
    cited = {(c["kb"], c["doc_id"]) for c in result["citations"]}
    assert {(A, "资料/新能源公交发展报告.txt"), (B, "乙资料/青石地铁建设.md")} <= cited
    assert {p["kb"] for p in result["passages"]} == set(BOTH)

    # Every source names its KB: in the answer's source list, the chips' tips and the details.
    html = chatbot[-1]["content"]
    assert "〔甲库〕《青石市新能源公交发展报告》" in html and "〔乙库〕《青石市地铁建设进展》" in html
    assert "检索了 2 个知识库：甲库、乙库" in html
    details = details_html(turns[-1])
    assert "〔乙库〕" in details and "甲库、乙库" in details

    # A citation opens the document of ITS KB (the side panel and the full text).
    number = next(c["number"] for c in result["citations"] if c["doc_id"] == "乙资料/青石地铁建设.md")
    panel, source, _ = app.chat.cite(turns, click(f"t0-c{number}"))
    assert source["kb"] == B and source["doc_id"] == "乙资料/青石地铁建设.md"
    assert "运营里程达到186公里" in panel and "乙库" in panel and "已从知识库删除" not in panel
    assert "地铁6号线预计2025年通车" in app.chat.open_full(source)["value"]
    first = next(c["number"] for c in result["citations"] if c["kb"] == A)
    panel, source, _ = app.chat.cite(turns, click(f"t0-c{first}"))
    assert source["kb"] == A and "充电站58座" in panel
    # ...and so does a passage of the list (refusals offer them).
    passage = next(p["number"] for p in result["passages"] if p["kb"] == B)
    assert app.chat.cite(turns, click(f"t0-p{passage}"))[1]["kb"] == B
    # The exported conversation names each source's KB too.
    exported = to_markdown(turns)
    assert "〔乙库〕《青石市地铁建设进展》" in exported and "〔甲库〕《青石市新能源公交发展报告》" in exported


def test_feedback_on_a_multi_kb_answer_goes_to_the_cited_kb(app, monkeypatch):
    monkeypatch.setattr(gr, "Info", lambda *a, **k: None)
    before = {kb: len(app.service.feedback(kb)) for kb in BOTH}
    _, turns, _, _ = ask(app, "青石市开通了几条地铁线路？", BOTH)  # cites 乙库 only
    turns = ask(app, BUSES, BOTH, turns)[1]  # cites 甲库 first
    assert {c["kb"] for c in turns[0]["result"]["citations"]} == {B}
    assert turns[1]["result"]["citations"][0]["kb"] == A
    votes = app.chat.vote(turns, new_votes(), gr.LikeData(None, {"index": 1, "value": ["…"], "liked": True}))[0]
    app.chat.vote(turns, votes, gr.LikeData(None, {"index": 3, "value": ["…"], "liked": False}))
    stored_b, stored_a = app.service.feedback(B)[before[B]:], app.service.feedback(A)[before[A]:]
    assert [(e.question, e.vote) for e in stored_b] == [("青石市开通了几条地铁线路？", UP)]
    assert [(e.question, e.vote) for e in stored_a] == [(BUSES, DOWN)]


def test_a_filter_narrows_to_one_document_and_still_returns_k_hits(app):
    searcher = app.service.searcher(BOTH)
    assert next(d for d in app.service.documents(B) if d.doc_id == REPORT).chunks >= 5
    unfiltered = {h.chunk.doc_id for h in searcher.search(BUSES, 5)}
    assert "资料/新能源公交发展报告.txt" in unfiltered and len(unfiltered) > 1

    for inputs, shown in [
        (dict(date_from="2022", date_to="2022"), "2022-01-01 至 2022-12-31"),
        (dict(path="*公交年报*"), "path=*公交年报*"),
        (dict(conditions="source=青石市统计局"), "source=青石市统计局"),
        (dict(path="乙资料/, 资料/", title="年报", date_to="2022-12"), "标题含 年报"),
    ]:
        where = filter_from_inputs(**inputs)
        hits = searcher.search(BUSES, 5, where=where)
        assert len(hits) == 5 and {(h.chunk.kb, h.chunk.doc_id) for h in hits} == {(B, REPORT)}, inputs

        chatbot, turns, _, _ = ask(app, BUSES, BOTH, **inputs)
        result = turns[-1]["result"]
        assert "2100辆" in result["answer"] and "3200辆" not in result["answer"], inputs
        assert result["citations"] and {(c["kb"], c["doc_id"]) for c in result["citations"]} == {(B, REPORT)}
        assert {p["doc_id"] for p in result["passages"]} == {REPORT}
        # The active filter is shown with the answer, in the details, and under the inputs.
        assert f"过滤：{where.describe()}" in chatbot[-1]["content"] and shown in chatbot[-1]["content"]
        assert where.describe() in details_html(turns[-1])
        assert filter_status(**inputs) == f"当前过滤（用于之后的提问）：{where.describe()}"

    # One KB, no filter: no KB names or filter line in the way.
    chatbot, turns, _, _ = ask(app, BUSES)
    assert turns[-1]["result"]["kbs"] == [A] and "〔" not in chatbot[-1]["content"]
    assert "过滤：" not in chatbot[-1]["content"] and filter_status() == NO_FILTER


def test_a_filter_nothing_passes_is_a_refusal_that_says_it_filtered(app):
    chatbot, turns, _, _ = ask(app, BUSES, BOTH, date_from="1990", date_to="1991")
    result = turns[-1]["result"]
    assert result["refused"] and not result["passages"] and not result["citations"]
    assert "过滤：1990-01-01 至 1991-12-31" in chatbot[-1]["content"]


def test_a_bad_filter_shows_its_message_and_keeps_the_question(app):
    _, turns, _, _ = ask(app, BUSES)
    for inputs, expected in [(dict(date_from="2024-13"), "起始日期"), (dict(conditions="来源"), "无法识别的条件"),
                             (dict(date_to="明年"), "截止日期"), (dict(conditions="title>2024"), "只能用 = 或 ~")]:
        chatbot, after, box, details = ask(app, "青石市开通了几条地铁线路？", BOTH, turns, **inputs)
        message = chatbot[-1]["content"]
        assert expected in message and "refusal problem" in message and "出错了" not in message, inputs
        assert after == turns and box == "青石市开通了几条地铁线路？"  # nothing answered, the question kept
        assert chatbot[-2]["content"] == "青石市开通了几条地铁线路？" and details == gr.skip()
        assert filter_status(**inputs).startswith("⚠ ") and expected in filter_status(**inputs)


def test_kbs_of_different_embedders_are_refused_with_a_clear_message(app):
    chatbot, turns, box, _ = ask(app, BUSES, [A, C])
    message = chatbot[-1]["content"]
    assert turns == [] and "嵌入模型不同" in message and "different embedders" in message
    assert "BAAI/bge-small-zh-v1.5" in message and "丙库" in message
    assert "Traceback" not in message and "出错了" not in message
    # A KB that does not exist is named too, and "a,b" works as well as a list.
    missing = ask(app, BUSES, "甲库,无此库")[0][-1]["content"]
    assert "知识库不存在：无此库" in missing and "refusal problem" in missing
    assert ask(app, BUSES, "甲库,乙库")[1][-1]["result"]["kbs"] == BOTH


def test_document_list_shows_dates_and_fields_and_the_search_choice_follows_the_kb(app):
    from ui.kb_panel import DOC_HEADERS

    rows, _, _ = app.kb_panel.view(B)
    row = dict(zip(DOC_HEADERS, next(r for r in rows if r[0] == REPORT)))
    assert row["日期"] == "2022-03-01" and row["元数据"] == "source=青石市统计局" and row["片段数"] >= 5
    rows, _, _ = app.kb_panel.view(A)  # no front matter: the file's date
    assert all(len(r[2]) == 10 and r[2][:2] == "20" for r in rows)

    scope = app.kb_panel.scope(B, [A])  # one KB chosen (the default): follows the current KB
    assert scope["value"] == [B] and {A, B, C} <= set(scope["choices"])
    assert app.kb_panel.scope(C, [A, B])["value"] == [A, B]  # several: the user's choice stays
    assert app.kb_panel.scope(B, [])["value"] == [B]
