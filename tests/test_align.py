"""Question–evidence alignment (rag.align) and clause-level verification (rag.cite).

Pure text, no model: each case is one way a cited answer looked verified on bb824dd
while the passage was about another place, another thing, or only asked a question.
"""
from __future__ import annotations

from rag.align import align
from rag.followup import resolve_followup
from rag.frame import question_frame
from rag.places import dominant_place
from rag.cite import answer_units, verify

XIANGYANG = ("以基层统战工作规范化、制度化、标准化建设为着力点,设立统战工作服务站2837个,"
             "知联会、新联会、乡镇商会等统战组织实现全覆盖。")
JINGMEN = "聚焦“同心聚力·共同缔造”,形成基层统战品牌106个。"
CONTEXTS = ["汇聚基层统战力量 > 襄阳市", "汇聚基层统战力量 > 荆门市"]


def test_frame_reads_places_times_quoted_terms_and_the_asked_for_thing():
    frame = question_frame("2021年上半年孝感“政企商会会”举办了多少期？")
    kinds = {c.text: c.kind for c in frame.constraints}
    assert kinds["2021年"] == "time" and kinds["上半年"] == "time"
    assert kinds["孝感"] == "place"  # jieba alone tags 孝感 as a common noun
    assert kinds["政企商会会"] == "quoted"
    assert frame.asks == "quantity"
    assert question_frame("衢州市委统战部部长是谁？").target[0][-1] == "部长"
    # 新乡贤 (new village worthies) is not the city 新乡
    assert "新乡" not in {c.text for c in question_frame("“乡贤通”覆盖了多少新乡贤?").constraints}


def test_a_figure_of_another_place_is_not_an_answer():
    """The 宜昌 case: the 襄阳 section's 2837 passed verification on bb824dd."""
    question = "宜昌设立了多少个统战工作服务站?"
    for answer in ("2837个[1]", "宜昌设立了统战工作服务站2837个[1]。"):
        check = verify(answer, [XIANGYANG], question=question, contexts=CONTEXTS[:1])
        assert not check.used_numbers and check.unsupported == 1
        assert "宜昌" in check.sentences[0].reason
    right = verify("2837个[1]", [XIANGYANG], question="襄阳设立了多少个统战工作服务站?", contexts=CONTEXTS[:1])
    assert right.used_numbers == [1]


def test_two_facts_from_two_passages_in_one_sentence_are_each_checked_against_their_own():
    answer = "襄阳设立统战工作服务站2837个[1]，荆门形成基层统战品牌106个[2]。"
    assert len(answer_units(answer)) == 2
    check = verify(answer, [XIANGYANG, JINGMEN], question="襄阳和荆门分别设立了多少服务站、形成了多少品牌?",
                   contexts=CONTEXTS)
    assert check.unsupported == 0 and check.used_numbers == [1, 2]
    assert check.answer == answer


def test_a_closing_quote_and_the_marker_after_it_stay_with_their_sentence():
    # rag.zh.SENTENCE: 。” ends one sentence; the [1] after it is that sentence's, not the next one's
    answer = "发言人说：“全年增长5%。”[1]其余不详。"
    assert answer_units(answer) == ["发言人说：“全年增长5%。”[1]", "其余不详。"]
    check = verify(answer, ["发言人表示：“全年增长5%。”这是初步统计。"])
    assert [s.cited for s in check.sentences] == [[1], []]


def test_a_number_must_sit_in_a_clause_about_the_asked_subject():
    passage = "荆门实现7个县(市、区)知新联谊组织全覆盖。统战成员带动投入资金3.2亿元。"
    frame = question_frame("荆门统战成员带动了多少社会资金投入？")
    assert not align("7个", passage, frame, "荆门市").aligned
    assert align("3.2亿元", passage, frame, "荆门市").aligned


def test_a_question_line_or_a_restated_question_is_not_an_answer():
    faq = ("问：导入过程中断电或按了 Ctrl-C 会怎样？\n"
           "答：索引采用先写新文件、同步到磁盘、再原子重命名的方式更新，中断后知识库仍保持上一次成功导入时的完整状态。")
    question = "导入过程中断电会怎样？"
    echo = verify("导入过程中断电或按了 Ctrl-C 会怎样[1]。", [faq], question=question)
    assert not echo.used_numbers
    answer = verify("索引先写新文件再原子重命名，中断后知识库仍保持上一次成功导入时的完整状态[1]。", [faq],
                    question=question)
    assert answer.used_numbers == [1]


def test_a_quantity_question_needs_an_amount_and_a_who_question_the_asked_role():
    passage = "衢州市委统战部依托优势,积极开展“同心青年宣讲”工作。吴兴区委常委、统战部部长 丁鵾。"
    assert not align("衢州市委统战部积极开展宣讲工作", passage, question_frame("衢州市委统战部部长是谁？"),
                     "").aligned
    assert not align("开展“同心青年宣讲”工作", passage, question_frame("衢州开展了多少场宣讲？"), "").aligned


def test_coordinated_places_are_alternatives_and_the_document_place_counts():
    frame = question_frame("襄阳和宜昌分别设立了多少个统战工作服务站？")
    assert len(frame.groups) == 1 and len(frame.groups[0]) == 2
    report = "衢州市统一战线……" + "衢州" * 6 + "。全市49个民族村2021年人均可支配收入26465元。"
    assert dominant_place(report) == "衢州"
    assert dominant_place("襄阳。宜昌。荆门。") is None


def test_follow_up_naming_a_new_place_or_year_becomes_the_previous_question_about_it():
    previous = "襄阳设立了多少个统战工作服务站?"
    assert resolve_followup("那宜昌呢?", previous) == "宜昌设立了多少个统战工作服务站?"
    assert resolve_followup("那衢州有多少？", "温州招引了多少名归国留学人员?") == "衢州招引了多少名归国留学人员?"
    assert resolve_followup("那2022年呢？", "2021年中国电影市场总票房是多少？") == "2022年中国电影市场总票房是多少？"
    assert resolve_followup("它的部长是谁？", previous) is None  # more than a new name: the LLM rewrites it


def test_an_institution_is_named_whole():
    # 湖州学院 and 湖州师范学院 are two colleges: the place and the word 学院 apart prove nothing.
    passages = ["湖州师范学院党委委员、统战部部长何小青表示，将把学习贯彻会议精神落到实处。",
                "湖州学院党委委员、统战部部长施静龙表示，湖州学院统一战线工作将再接再厉。"]
    question = "湖州学院的统战部部长是谁"
    assert not verify("湖州学院的统战部部长是何小青[1]。", passages, question=question).used_numbers
    assert verify("湖州学院的统战部部长是施静龙[2]。", passages, question=question).used_numbers == [2]
    assert not verify("统战部部长何小青[1]。", passages, question=question).used_numbers
