"""Hand-made cases for rag/metrics.py (pure functions, no model needed)."""
from __future__ import annotations

import pytest

from rag.metrics import (
    all_groups_at,
    answer_correct,
    chinese_number,
    contains,
    hit_at,
    is_refusal,
    mrr_at,
    normalize_answer,
    percentile,
    recall_at,
    retrieval_metrics,
)


@pytest.mark.parametrize("expr, value", [
    ("一千二百九十六", "1296"),
    ("两万三千", "23000"),
    ("一千二", "1200"),
    ("一千零二", "1002"),
    ("十五", "15"),
    ("二十三万", "230000"),
    ("一亿二千万", "120000000"),
    ("1.57亿", "157000000"),
    ("3万", "30000"),
    ("二〇二四", "2024"),
    ("两", "2"),
    ("1296", None),  # plain Arabic stays as it is
])
def test_chinese_number(expr, value):
    assert chinese_number(expr) == value


@pytest.mark.parametrize("text, expected", [
    ("１２９６人", "1296人"),  # full-width digits
    ("ＡＢＣ，ｄｅｆ！", "abcdef"),  # full-width letters and punctuation
    ("Hello,  World. ", "helloworld"),
    ("1,296人", "1296人"),  # thousands separator
    ("1.57亿元", "157000000元"),  # decimal point kept, 亿 expanded
    ("三万余名", "30000余名"),
    ("百分之三十", "30%"),
    ("梵語", "梵语"),  # Traditional → Simplified
    ("千岛湖", "千岛湖"),  # a unit alone is a word, not a number
    ("「战史演武」&「争霸演武」", "战史演武争霸演武"),
])
def test_normalize_answer(text, expected):
    assert normalize_answer(text) == expected


def test_numerals_match_arabic_both_ways():
    assert answer_correct("温州招引归国留学人员一千二百九十六人。", [["1296"]])
    assert answer_correct("共1296人", [["一千二百九十六"]])
    assert answer_correct("两个项目", [["2个"]])
    assert answer_correct("已覆盖新乡贤3万余名", [["三万余", "3万"]])
    assert answer_correct("累计聚合共富基金1.57亿元。", [["1.57亿"]])
    assert answer_correct("１８００余场次", [["1800余", "1800"]])


def test_numbers_do_not_match_inside_longer_numbers():
    assert not answer_correct("死亡112人", [["12人"]])
    assert not answer_correct("共1296人", [["129"]])
    assert not answer_correct("约1.57亿", [["57亿"]])
    assert answer_correct("死亡12人", [["12人"]])
    assert contains("第12届", "12")
    assert not contains("2012年", "12")


def test_every_part_needs_an_alias():
    parts = [["东盟"], ["中国"], ["日本"], ["韩国"], ["澳大利亚", "澳洲"], ["新西兰"]]
    assert answer_correct("RCEP成员：东盟十国、中国、日本、韩国、澳洲和新西兰。", parts)
    assert not answer_correct("RCEP成员：东盟、中国、日本、韩国、新西兰。", parts)


def test_flat_alias_list_is_one_part():
    assert answer_correct("超过90个", ["超90", "90"])
    assert not answer_correct("80个", ["超90", "90"])


def test_no_parts_is_not_correct():
    assert not answer_correct("anything", [])
    assert not answer_correct("anything", [[""]])


def test_case_and_traditional_insensitive():
    assert answer_correct("答案是 AlphaGo", [["alphago"]])
    assert answer_correct("保留了悉昙体", [["悉曇體"]])


@pytest.mark.parametrize("text", [
    "文档中没有找到相关信息。",
    "抱歉，提供的文档中未提及该数据。",
    "根据已知信息无法回答该问题。",
    "无法根据提供的文档确定答案。",
    "文件中沒有找到相關資訊",  # Traditional
    "资料中并没有提到武汉市委统战部部长的名字。",
    "信息不足，无法判断。",
    "",
    "I don't know.",
])
def test_refusals(text):
    assert is_refusal(text)


@pytest.mark.parametrize("text", [
    "温州招引归国留学人员1296人[1]。",
    "长兴县委统战部部长是杨永章。",
    "没有人比他更了解这个项目：他负责了35个合作项目。",
])
def test_not_refusals(text):
    assert not is_refusal(text)


def test_ranked_metrics():
    flags = [False, False, True, False, True]
    assert hit_at(flags, 1) == 0.0
    assert hit_at(flags, 3) == 1.0
    assert mrr_at(flags, 10) == pytest.approx(1 / 3)
    assert mrr_at(flags, 2) == 0.0
    assert retrieval_metrics(flags) == {"hit@1": 0.0, "hit@3": 1.0, "hit@5": 1.0, "hit@10": 1.0,
                                        "mrr@10": pytest.approx(1 / 3)}
    assert retrieval_metrics([]) == {"hit@1": 0.0, "hit@3": 0.0, "hit@5": 0.0, "hit@10": 0.0, "mrr@10": 0.0}


def test_recall_counts_distinct_gold():
    ranked = [{"a"}, set(), {"a"}, {"b"}, set()]  # "a" twice counts once
    assert recall_at(ranked, {"a", "b", "c", "d"}, 10) == 0.5
    assert recall_at(ranked, {"a", "b", "c", "d"}, 3) == 0.25
    assert recall_at(ranked, set(), 10) == 0.0


def test_all_groups():
    groups = [["a1", "a2"], ["b1"]]
    assert all_groups_at(["x", "a2", "b1"], groups, 10) == 1.0
    assert all_groups_at(["x", "a2", "y"], groups, 10) == 0.0
    assert all_groups_at(["a1"] + ["x"] * 10 + ["b1"], groups, 10) == 0.0  # b1 below the cut
    assert all_groups_at(["dir/a1", "dir/b1"], groups, 10, match=lambda r, g: r.endswith(g)) == 1.0


def test_percentile():
    assert percentile([], 50) is None
    assert percentile([5], 95) == 5
    assert percentile([1, 2, 3, 4], 50) == 2.5
    assert percentile(range(1, 101), 95) == pytest.approx(95.05)  # numpy's linear interpolation
    with pytest.raises(ValueError):
        percentile([1], 101)


def test_citation_markers_are_not_part_of_the_answer():
    assert answer_correct("189[1]", [["189"]])  # not "1891"
    assert answer_correct("共有189人[1][2]。", [["189"]])
    assert answer_correct("COMAC919【1】", [["COMAC919"]])
    assert not answer_correct("1891", [["189"]])  # a longer number is still not a match
    assert not answer_correct("18[9]", [["189"]])


def test_a_unit_written_in_the_answer_but_not_in_the_gold_still_matches():
    """RGB's own rule is a plain substring match: gold "60.39" is in the answer "60.39亿"."""
    assert answer_correct("2022年春节档总票房60.39亿[1]", [["60.39", "60.4"]])
    assert answer_correct("约3万人", [["30000"]])  # and values still compare (3万 = 30000)
    assert not answer_correct("160.39亿", [["60.39"]])  # never inside a longer number
