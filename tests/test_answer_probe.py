"""The answer probe (``rag.answer_probe``): the LLM reads each part of a compound question in its
best chunks; the chunks holding that answer move up before the parts are merged. The rules on
answers and the merge are tested directly; the probe itself with the real local GGUF."""
from __future__ import annotations

import pytest

from conftest import SCHOOLS_QUESTION, free_port
from rag.answer_probe import AnswerProbe, PartAnswer, answer_patterns, set_aside_shared
from rag.zh import answer_items


# ---------------------------------------------------------------------------- answers as text
@pytest.mark.parametrize("answer, items", [
    ("2022年1月3日", [["2022年1月3日", "1月3日"]]),
    ("18.0%", [["18.0%", "18%"]]),
    ("2,213,795", [["2,213,795", "2213795"]]),
    ("5545.52亿", [["5545.52亿", "5545.5亿"]]),  # a large figure also rounded, as reports write it
    ("1480.56", [["1480.56", "1480.6"]]),
    ("7.52", [["7.52"]]),  # a ratio is kept exact
    ("《满江红》", [["满江红"]]),
    ("海清、童瑶、张颂文", [["海清"], ["童瑶"], ["张颂文"]]),
    ("無", []),  # Traditional 无: no answer
    ("资料中没有提到", []),
    ("", []),
])
def test_a_short_answer_splits_into_items_and_the_forms_a_passage_may_use(answer, items):
    assert answer_items(answer) == items


def test_a_bare_number_takes_the_measure_word_the_question_asks_in():
    assert answer_items("6", "白河市去年新建了多少所学校") == [["6所", "6"]]
    assert answer_items("6", "增长率是多少") == [["6"]] and answer_items("12", "多少的") == [["12"]]
    [[six]] = answer_patterns("6", "白河市去年新建了多少所学校")  # one digit, usable with its measure word
    assert six.search("去年白河市新建了6所学校") and not six.search("新建了16所学校")


def test_answers_match_passages_as_whole_numbers_and_whatever_the_spaces():
    [[six]] = answer_patterns("6所")
    assert six.search("去年白河市新建了6所学校") and not six.search("新建了16所学校")
    [forms] = answer_patterns("12")
    assert any(p.search("共12个") for p in forms) and not any(p.search("2012年") or p.search("3.12") for p in forms)
    assert answer_patterns("4") == []  # one digit matches everywhere: not used
    [[chip]] = answer_patterns("骁龙8gen2")
    assert chip.search("搭载高通骁龙8 Gen2处理器")


def test_parts_that_got_the_same_answer_are_set_aside():
    one, two = {("a.txt", 0): 1}, {("a.txt", 0): 1, ("b.txt", 0): 1}
    answers = [PartAnswer("CBA总冠军", "勇士", held_items=one, items=1),
               PartAnswer("NBA总冠军", "金州勇士", held_items=two, items=1),
               PartAnswer("MVP", "库里", held_items=two, items=1)]
    kept = set_aside_shared(answers)
    assert [a.holding for a in kept] == [0, 0, 2] and not kept[0].held and kept[2].held == frozenset(two)
    assert kept[0].error == "same answer as part 2" and kept[0].answer == "勇士"  # still shown


# ---------------------------------------------------------------------------- the merge
def _hit(cid: int):
    from rag.retrieve import Hit
    from rag.store import StoredChunk

    chunk = StoredChunk(f"text {cid}", "", 0, 10, None, 5, id=cid, doc_id=f"d{cid}.txt", title="", source="", ord=0)
    return Hit(chunk, 1.0 / cid)


def test_after_fair_turns_parts_whose_next_chunk_holds_their_answer_go_first():
    from rag.merge_parts import FAIR_TURNS, merge_parts

    assert FAIR_TURNS == 2
    whole = [_hit(1)]
    part0 = [_hit(i) for i in (1, 2, 3, 4, 5, 6)]  # five chunks hold part 0's answer
    part1 = [_hit(i) for i in (11, 12, 13, 14)]  # one holds part 1's
    held0 = {h.chunk.key for h in part0[:5]}
    held1 = {part1[0].chunk.key}
    plain = merge_parts(whole, [list(part0), list(part1)], 7)
    assert [h.chunk.id for h in plain] == [1, 11, 2, 12, 3, 13, 4]
    probed = merge_parts(whole, [list(part0), list(part1)], 7, [held0, held1])
    # two turns each (the whole question's top-1 counts for part 0), then part 0's holders
    assert [h.chunk.id for h in probed] == [1, 11, 2, 12, 3, 4, 5]
    # a part whose answer is unknown (None) keeps its turns
    kept = merge_parts(whole, [list(part0), list(part1)], 7, [held0, None])
    assert [h.chunk.id for h in kept] == [h.chunk.id for h in plain]


# ---------------------------------------------------------------------------- the real model
@pytest.fixture(scope="module")
def local_llm(gguf_path):
    from rag.llm import LlamaCppChat

    return LlamaCppChat(model_path=gguf_path, n_threads=2)


def test_the_probe_reads_each_parts_answer_and_moves_its_evidence_up(schools, local_llm):
    probe = AnswerProbe(lambda: local_llm)
    result = schools.search_parts(SCHOOLS_QUESTION, 3, probe=probe)
    first, second = result.part_answers
    assert "18" in first.answer and "6" in second.answer, result.part_answers
    assert first.holding >= 1 and second.holding >= 1 and not first.error and not second.error
    got = [h.chunk.doc_id for h in result.hits]
    assert {"docs/青石市新建学校.txt", "docs/白河市概况.txt"} <= set(got)
    assert result.to_dict()["part_answers"][1]["answer"] == second.answer
    assert probe.calls == 2

    again = schools.search_parts(SCHOOLS_QUESTION, 3, probe=probe)  # the answers are remembered
    assert probe.calls == 2 and [h.chunk.id for h in again.hits] == [h.chunk.id for h in result.hits]
    single = schools.search_parts("白河市去年接待了多少游客?", 3, probe=probe)  # a single question never pays
    assert probe.calls == 2 and single.part_answers == []


def test_a_probe_whose_model_is_down_leaves_the_rankings_as_retrieval_made_them(schools, schools_kb):
    from rag.llm import make_chat_model

    down = schools_kb.model_copy(update={"llm_backend": "openai", "llm_retries": 0, "llm_timeout": 3.0,
                                         "llm_base_url": f"http://127.0.0.1:{free_port()}/v1"})
    probe = AnswerProbe(lambda: make_chat_model(down, "openai"))
    result = schools.search_parts(SCHOOLS_QUESTION, 3, probe=probe)
    plain = schools.search_parts(SCHOOLS_QUESTION, 3)
    assert [h.chunk.id for h in result.hits] == [h.chunk.id for h in plain.hits]
    assert all(a.error and not a.answer and not a.held for a in result.part_answers)


def test_the_answer_step_reads_the_probed_retrieval_and_reports_it(schools, schools_kb, gguf_path):
    from rag.answer import Answerer

    settings = schools_kb.model_copy(update={"llm_model_path": gguf_path})
    answerer = Answerer(settings, schools)
    assert answerer.probe("extractive") is None
    assert Answerer(settings.model_copy(update={"part_probe": False}), schools).probe() is None
    events = list(answerer.stream(SCHOOLS_QUESTION))
    names = [type(e).__name__ for e in events]
    assert names[:3] == ["Rewritten", "Probing", "Retrieved"]  # front ends can say the probe is reading
    result = events[-1].result
    assert events[1].parts == result.parts and len(result.parts) == 2
    assert [a.part for a in result.part_answers] == result.parts
    assert "18" in result.answer and "6" in result.answer and not result.refused
    assert result.to_dict()["part_answers"][0]["answer"] == result.part_answers[0].answer
    plain = Answerer(settings.model_copy(update={"part_probe": False}), schools)
    assert "Probing" not in [type(e).__name__ for e in plain.stream(SCHOOLS_QUESTION, backend="extractive")]
