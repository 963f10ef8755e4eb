"""The UI's pure pieces: answer/citation HTML, the conversation record and its export,
the bind rule. Answers come from the real verifier (``rag.cite.verify``), not fixtures."""
from __future__ import annotations

from dataclasses import asdict

import pytest

from rag.answer import AnswerResult
from rag.cite import Citation, verify
from ui import render
from ui.bind import BindError, check_bind, is_loopback
from ui.conversation import find_source, history, make_turn, to_markdown

DOC = "青石市新能源公交发展报告\n\n截至2024年底，青石市共有新能源公交车3200辆，占全市公交车总数的百分之九十二。<b>充电站</b>58座。"


def _result(answer: str) -> AnswerResult:
    """A result whose sentences were checked by the real verifier against DOC's passage."""
    passage = DOC
    check = verify(answer, [passage])
    start = DOC.index("截至")
    end = start + len("截至2024年底，青石市共有新能源公交车3200辆，占全市公交车总数的百分之九十二。")
    hit = {"number": 1, "doc_id": "docs/bus.txt", "title": "青石市新能源公交发展报告", "section": "概况", "page": 2,
           "start": 0, "end": len(DOC), "text": passage, "score": 0.03, "dense_rank": 1, "dense_score": 0.86,
           "bm25_rank": None, "bm25_score": None}
    citation = Citation(1, 7, "docs/bus.txt", "青石市新能源公交发展报告", "概况", 2, 0, len(DOC),
                        DOC[start:end], start, end)
    return AnswerResult("问题", "问题", check.answer, citations=[citation],
                        sentences=[asdict(s) for s in check.sentences], unsupported_sentences=check.unsupported,
                        passages=[hit])


def test_answer_html_has_clickable_chips_sources_and_marks_unsupported():
    result = _result("青石市共有新能源公交车3200辆[1]。青石市还有十条地铁线路[1]。")
    html = render.answer_message(3, result.to_dict())
    assert '<a class="cite" href="#cite-t3-c1"' in html  # chip in the text
    assert '<a class="source" href="#cite-t3-c1">' in html  # and in the sources list
    assert html.count('class="sent unsupported"') == 1 and "十条地铁线路" in html
    assert "1 句没有在资料中找到依据" in html
    assert "第2页" in html and "概况" in html


def test_chips_sit_before_the_closing_punctuation_as_in_the_verified_answer():
    # one rule (rag.zh.split_trailing) for the answer text and the UI, a trailing comma included
    result = _result("青石市共有新能源公交车3200辆，[1]")
    assert result.answer == "青石市共有新能源公交车3200辆[1]，"
    html = render.answer_message(1, result.to_dict())
    assert '3200辆<a class="cite" href="#cite-t1-c1"' in html and "</a>，</span>" in html


def test_document_text_is_escaped_everywhere():
    result = _result("充电站<b>58座</b>[1]。").to_dict()
    turn = {"question": "<script>x</script>", "kb": "库", "result": result}
    assert "<script>" not in render.user_message(turn["question"])
    assert "<b>58座" not in render.answer_message(0, result)
    source = find_source([turn], "t0-c1")
    assert "<b>充电站" not in render.context_html(source, ("标题", DOC))
    assert "&lt;b&gt;充电站" in render.full_document_html(source, ("标题", DOC))


def test_citation_lookup_shows_quote_inside_its_context():
    turns = [make_turn("青石市有多少新能源公交车？", "库", _result("青石市共有新能源公交车3200辆[1]。"))]
    source = find_source(turns, "t0-c1")
    assert source["kind"] == "citation" and source["kb"] == "库" and source["doc_id"] == "docs/bus.txt"
    html = render.context_html(source, ("青石市新能源公交发展报告", DOC))
    assert '<mark class="quote">截至2024年底，青石市共有新能源公交车3200辆' in html
    assert "青石市新能源公交发展报告" in html  # neighbouring text around the passage
    assert 'class="quote rag-focus"' in render.full_document_html(source, ("t", DOC))
    assert "已从知识库删除" in render.context_html(source, None)
    passage = find_source(turns, "t0-p1")
    assert passage["kind"] == "passage" and 'class="passage-only"' in render.context_html(passage, ("t", DOC))
    for bad in ("t1-c1", "t0-c9", "t0-p2", "x", ""):
        assert find_source(turns, bad) is None


def test_refusal_offers_closest_passages():
    result = AnswerResult("问", "问", "文档中没有找到相关信息", refused=True, passages=_result("x").passages)
    html = render.answer_message(0, result.to_dict())
    assert 'class="refusal"' in html and '<a class="source" href="#cite-t0-p1">' in html


def test_history_and_markdown_export():
    turns = [make_turn("青石市有多少新能源公交车？", "库", _result("青石市共有新能源公交车3200辆[1]。"))]
    assert history(turns) == [{"role": "user", "content": "青石市有多少新能源公交车？"},
                              {"role": "assistant", "content": "青石市共有新能源公交车3200辆[1]。"}]
    md = to_markdown(turns)
    assert "## 1. 青石市有多少新能源公交车？" in md
    assert "青石市共有新能源公交车3200辆[1]。" in md
    assert "[1] 《青石市新能源公交发展报告》 · 概况 · 第2页（docs/bus.txt）" in md
    assert "> 截至2024年底" in md


def test_details_show_both_channels():
    html = render.details_html(make_turn("q", "库", _result("青石市共有新能源公交车3200辆[1]。")))
    assert "#1 / 0.860" in html and "— / —" in html and "预读答案" not in html


def test_details_show_what_the_probe_read_for_each_part():
    from rag.answer_probe import PartAnswer

    result = _result("青石市共有新能源公交车3200辆[1]。")
    result.parts = ["青石市有多少新能源公交车", "青石市有多少充电站"]
    result.part_answers = [PartAnswer(result.parts[0], "3200辆", held_items={("docs/bus.txt", 0): 1}, items=1),
                           PartAnswer(result.parts[1], "", "ConnectError: 连接被拒绝 <refused>")]
    html = render.details_html(make_turn("q", "库", result))
    assert "拆分为 2 个子问题" in html and "预读答案" in html
    assert "1. 3200辆（1 段含有）" in html and "2. —（ConnectError: 连接被拒绝 &lt;refused&gt;）" in html


@pytest.mark.parametrize("host", ["127.0.0.1", "localhost", "::1", "127.0.0.2"])
def test_loopback_needs_no_password(host):
    assert is_loopback(host)
    check_bind(host, None)


@pytest.mark.parametrize("host", ["0.0.0.0", "192.168.1.5", "::", "example.org"])
def test_other_addresses_need_a_password(host):
    with pytest.raises(BindError, match="必须设置访问密码"):
        check_bind(host, None)
    check_bind(host, "secret")
