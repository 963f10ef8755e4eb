"""Answer feedback in the web UI, at the handler level with the real service and KB: 👍/👎
(the chatbot's like event) stored at once, the feedback panel refining that entry (or
refusing bad input with the reason, nothing cleared), and the 评测 tab's
「用反馈生成题集」 turning the stored feedback into a question set that runs.
"""
from __future__ import annotations

import json
from pathlib import Path

import gradio as gr
import pytest

from rag.feedback import DOWN, UP, FeedbackEntry
from ui.chat import new_votes

# Gradio's queue calls a pandas API that pandas 3 deprecates: not ours to fix.
pytestmark = pytest.mark.filterwarnings("ignore::pandas.errors.Pandas4Warning")

KB = "测试库"
SKIP = gr.skip()


@pytest.fixture
def fresh_feedback(ui_app):
    """Each test starts from a KB without feedback (the KB is shared by the module)."""
    app, _ = ui_app
    import sqlite3
    with sqlite3.connect(app.service.home / KB / "kb.sqlite") as db:
        db.execute("DELETE FROM feedback")
    return app


def ask(app, question: str, turns: list[dict] | None = None) -> list[dict]:
    """The turns after one answered question (the chat handler run to its end)."""
    *_, last = app.chat.respond(question, turns or [], KB, "extractive", 5, "", "", "", False)
    return last[1]


def like(index: int, liked) -> gr.LikeData:
    """The chatbot's like event for message ``index`` (answers sit at odd positions)."""
    return gr.LikeData(None, {"index": index, "value": ["…"], "liked": liked})


def test_from_record_matches_from_result(ui_app):
    app, _ = ui_app
    turns = ask(app, "青石市共有多少辆新能源公交车？")
    record = turns[0]["result"]
    entry = FeedbackEntry.from_record(record, "down", comment="太短", correction="3200辆")
    assert entry.vote == DOWN and entry.question == "青石市共有多少辆新能源公交车？"
    assert entry.answer == record["answer"] and entry.backend == "extractive" and not entry.refused
    assert [(c.number, c.doc_id, c.quote) for c in entry.citations] == [
        (c["number"], c["doc_id"], c["quote"]) for c in record["citations"]]
    assert entry.citations and entry.comment == "太短" and entry.correction == "3200辆"


def test_thumb_then_panel_refines_the_same_entry(fresh_feedback, toasts):
    app = fresh_feedback
    turns = ask(app, "城市图书馆每周几闭馆？")
    turns = ask(app, "青石市共有多少辆新能源公交车？", turns)

    votes, panel_vote, target = app.chat.vote(turns, new_votes(), like(3, False))  # 👎 on the 2nd answer
    assert panel_vote == "down" and "第 2 个回答" in target and "新能源公交车" in target
    [stored] = app.service.feedback(KB)
    assert stored.vote == DOWN and stored.question == "青石市共有多少辆新能源公交车？"
    assert stored.citations and stored.citations[0].doc_id.endswith("新能源公交发展报告.txt")
    assert stored.answer == turns[1]["result"]["answer"]
    assert toasts[-1][0] == "info" and "已记录反馈" in toasts[-1][1]

    # The panel applies to the voted answer and replaces its entry: one entry per answer.
    out = app.chat.submit_feedback(turns, votes, "down", "数字不对", "共有新能源公交车3200辆", False)
    votes, panel_vote, comment, correction, refuse, target = out
    assert (comment, correction, refuse) == ("", "", False) and "第 2 个回答" in target
    assert toasts[-1] == ("info", "已记录反馈 / feedback saved")
    [stored] = app.service.feedback(KB)
    assert (stored.id, stored.vote, stored.comment, stored.correction) == (
        votes["ids"][1], DOWN, "数字不对", "共有新能源公交车3200辆")

    # Changing the thumb on the first answer stores a second entry; a thumb clicked off changes nothing.
    votes, _, target = app.chat.vote(turns, votes, like(1, True))
    assert "第 1 个回答" in target
    assert app.chat.vote(turns, votes, like(1, "")) == (SKIP, SKIP, SKIP)
    entries = app.service.feedback(KB)
    assert [(e.question, e.vote) for e in entries] == [
        ("青石市共有多少辆新能源公交车？", DOWN), ("城市图书馆每周几闭馆？", UP)]


def test_bad_feedback_is_refused_and_nothing_is_lost(fresh_feedback, toasts):
    app = fresh_feedback
    turns = ask(app, "城市图书馆每周几闭馆？")
    votes = new_votes()

    # 👍 with "should have refused": the bilingual validation message, every field kept (skip).
    out = app.chat.submit_feedback(turns, votes, "up", "好", "", True)
    assert out == (SKIP,) * 6
    assert toasts[-1][0] == "warning" and "应当拒答" in toasts[-1][1] and "down vote" in toasts[-1][1]
    out = app.chat.submit_feedback(turns, votes, "down", "", "每周一", True)  # both at once
    assert out == (SKIP,) * 6 and "not both" in toasts[-1][1]
    out = app.chat.submit_feedback(turns, votes, None, "只有意见", "", False)  # no vote, nothing implying one
    assert out == (SKIP,) * 6 and "choose up or down" in toasts[-1][1]
    assert app.chat.submit_feedback([], votes, "up", "", "", False) == (SKIP,) * 6
    assert app.service.feedback(KB) == []

    # No thumb clicked: a correction goes to the last answer as a 👎.
    votes, panel_vote, *_ = app.chat.submit_feedback(turns, votes, None, "", "每周一闭馆", False)
    assert panel_vote == "down" and votes["last"] == 0
    [stored] = app.service.feedback(KB)
    assert (stored.vote, stored.correction) == (DOWN, "每周一闭馆")


def test_feedback_becomes_an_eval_question_set(fresh_feedback, toasts):
    app = fresh_feedback
    panel = app.eval_panel
    # Nothing stored yet: a warning and the counts, the questions file left alone.
    questions, source, status = panel.from_feedback(KB)
    assert (questions, source) == (SKIP, SKIP) and "写出 0 个问题" in status

    turns = ask(app, "城市图书馆每周几闭馆？")
    turns = ask(app, "青石市共有多少辆新能源公交车？", turns)
    turns = ask(app, "量子计算机最早是谁发明的？", turns)  # a refusal
    votes = app.chat.vote(turns, new_votes(), like(1, True))[0]
    votes = app.chat.vote(turns, votes, like(3, False))[0]
    app.chat.submit_feedback(turns, votes, "down", "", "共有新能源公交车3200辆", False)
    votes = app.chat.vote(turns, votes, like(5, True))[0]  # 👍 on a refusal: a negative

    questions, source, status = panel.from_feedback(KB)
    assert source == "current" and "写出 3 个问题" in status
    path = Path(questions)
    assert path.is_relative_to(panel.export_dir) and path.name == "feedback-questions.jsonl"
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
    assert sorted(r["type"] for r in rows) == ["fix", "negative", "regression"]
    fix = next(r for r in rows if r["type"] == "fix")
    assert fix["answers"] == ["共有新能源公交车3200辆"] and fix["gold_quotes"] == ["共有新能源公交车3200辆"]

    # The file the button filled in runs as the tab's questions file.
    status, metrics, *_ = panel.run(questions, "current", KB, None, True, "hybrid", 3, 0, "extractive", "", "", "")
    assert "评测完成" in status and "3 个问题" in status and "1 个无答案" in status
    assert ["前 1 段命中率 · hit@1", "1.000"] in metrics

    with pytest.raises(gr.Error, match="没有这个库"):
        panel.from_feedback("没有这个库")
