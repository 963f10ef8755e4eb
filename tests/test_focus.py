"""Focusing passages for the LLM: the sentences that answer stay, the rest becomes "……"."""
from __future__ import annotations

from rag.focus import GAP, focus
from rag.tokens import count_tokens

FILLER = "此外，该市还举办了多场文化活动，吸引了众多市民参与，现场气氛热烈。"
PASSAGE = (
    "宁波：轮值村主任\n\n"
    + FILLER * 3
    + "截至目前，全市已有128个村(社区)推行轮值村主任制度，帮助引进项目超90个、带动投资金额3.1亿元。"
    + "下一步，宁波将总结经验，在更多乡镇推广。"
    + FILLER * 3
)


def test_short_passage_is_left_whole():
    assert focus("宁波帮助引进项目超90个。", "宁波引进了多少个项目？", 100) == "宁波帮助引进项目超90个。"


def test_keeps_the_answering_clause_with_its_neighbour_and_marks_gaps():
    text = focus(PASSAGE, "宁波轮值村主任帮助引进了多少个项目？", 80)
    assert "帮助引进项目超90个" in text
    assert GAP in text
    assert count_tokens(text) <= 80 + count_tokens(GAP) * 4
    assert text.count(FILLER) < 6, "the filler was dropped"
    # every kept piece is verbatim text of the passage, in the original order
    pieces = [p for p in text.split(GAP) if p]
    positions = [PASSAGE.find(p) for p in pieces]
    assert all(p >= 0 for p in positions) and positions == sorted(positions)


def test_greedy_cover_takes_both_the_topic_and_the_fact():
    passage = ("温州坚持六大群体协同发力，全方位推进青蓝接力工程。" + FILLER * 4
               + "建成新生代温商培育“千名人才库”等六大领域数据库6000余人，其中青年占比超35%。" + FILLER * 4)
    text = focus(passage, "温州新生代温商培育千名人才库等六大领域数据库共有多少人？", 90)
    assert "6000余人" in text and "温州" in text


def test_nothing_on_topic_returns_the_passage_for_the_packer_to_judge():
    assert focus(FILLER * 10, "火星的卫星叫什么？", 40) == FILLER * 10
