"""The 评测 tab: a real ``run_eval`` over the UI test KB, called as the button's callback,
a click on a miss, and one run through the running app's ``/evaluate`` API with a
corpus upload and extractive answers.
"""
from __future__ import annotations

import json
from pathlib import Path

import gradio as gr
import pytest
from gradio_client import Client, handle_file

from conftest import UI_DOCS
from ui.eval_panel import read_records

# Gradio's queue calls a pandas API that pandas 3 deprecates: not ours to fix.
pytestmark = pytest.mark.filterwarnings("ignore::pandas.errors.Pandas4Warning")

KB = "测试库"
# Both gold formats; the KB ingested the folder "资料", so its ids are "资料/<file>" and the
# gold file names match as path suffixes. The tea question's gold is not in the KB: a sure miss.
QUESTIONS = [
    {"id": "lib", "question": "城市图书馆每周几闭馆？", "answers": ["每周一"], "gold_ids": ["城市图书馆服务指南.md"]},
    {"id": "bus", "question": "青石市共有多少辆新能源公交车？", "answers": ["3200辆"],
     "gold_docs": ["新能源公交发展报告.txt"], "gold_quotes": ["共有新能源公交车3200辆"]},
    {"id": "tea-miss", "question": "白岭村茶叶合作社现有多少户社员？", "gold_ids": ["已删除的旧文档.txt"]},
    {"id": "neg", "question": "火星基地有多少名宇航员？", "type": "negative"},
]
TWO_OF_THREE = round(2 / 3, 4)


@pytest.fixture
def questions_file(tmp_path) -> Path:
    # An ASCII name: the plot title shows the file stem, and matplotlib has no CJK font here.
    path = tmp_path / "mini-set.jsonl"
    path.write_text("".join(json.dumps(q, ensure_ascii=False) + "\n" for q in QUESTIONS), encoding="utf-8")
    return path


def run_args(questions, source="current", corpus=None, retrieval_only=True, kb=KB):
    """The button's inputs in order: questions, source, KB, corpus, retrieval only, mode, k, limit,
    then the settings tab's backend, base URL, API key, model."""
    return [questions, source, kb, corpus, retrieval_only, "hybrid", 3, 0, "extractive", "", "", ""]


def test_run_shows_report_plot_and_the_passages_of_a_miss(ui_app, questions_file):
    app, _ = ui_app
    panel = app.eval_panel
    status, metrics, plot, report_md, files, misses, run_dir, _ = panel.run(*run_args(str(questions_file)))

    run_dir = Path(run_dir)
    assert run_dir.parent == app.service.home / "_eval_runs"
    report = json.loads((run_dir / "report.json").read_text(encoding="utf-8"))
    assert (report["n"], report["n_negative"]) == (4, 1)
    assert report["retrieval"]["hit@1"] == report["retrieval"]["hit@10"] == TWO_OF_THREE
    assert "answer" not in report and report["config"]["kb"] == KB
    assert "评测完成" in status and "4 个问题" in status
    assert ["前 1 段命中率 · hit@1", "0.667"] in metrics
    assert Path(plot).read_bytes()[:4] == b"\x89PNG"
    assert report_md == (run_dir / "report.md").read_text(encoding="utf-8") and "tea-miss" in report_md
    assert sorted(Path(f).name for f in files) == ["report.json", "report.md"]

    assert misses[0][0] == "tea-miss" and misses[0][3] == ">10"
    assert [row[0] for row in misses] == ["tea-miss"]  # the two answerable hits rank first
    # A click on the row, as the Dataframe's select event delivers it.
    detail = panel.show_miss(str(run_dir), gr.SelectData(None, {"index": [0, 1], "value": misses[0][1],
                                                                "row_value": misses[0]}))
    assert "白岭村茶叶合作社现有多少户社员" in detail and "已删除的旧文档.txt" in detail  # question and gold
    assert "资料/白岭村茶叶合作社.md" in detail and "960万元" in detail  # what was retrieved instead
    tea = next(r for r in read_records(run_dir) if r["id"] == "tea-miss")
    bus = next(h for h in tea["retrieved"] if h["doc_id"].endswith("新能源公交发展报告.txt"))
    assert "氢燃料公交车150辆" not in bus["snippet"] and "氢燃料公交车150辆" in detail  # whole passage from the KB
    assert "含标准答案" not in detail
    assert "含标准答案" in panel.miss_details(run_dir, "lib")
    with pytest.raises(gr.Error):  # only run folders of this app are read
        panel.miss_details(run_dir.parent.parent, "lib")


def test_bad_input_is_refused_before_any_run(ui_app, questions_file, tmp_path):
    app, _ = ui_app
    runs = app.service.home / "_eval_runs"
    before = set(runs.iterdir()) if runs.exists() else set()
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"id": "x"}\n', encoding="utf-8")  # no "question"
    with pytest.raises(gr.Error, match="问题文件有误"):
        app.eval_panel.run(*run_args(str(broken)))
    with pytest.raises(gr.Error, match="请上传语料"):
        app.eval_panel.run(*run_args(str(questions_file), source="corpus"))
    with pytest.raises(gr.Error, match="知识库不存在"):
        app.eval_panel.run(*run_args(str(questions_file), kb="没有这个库"))
    assert (set(runs.iterdir()) if runs.exists() else set()) == before  # no empty run folders left behind


def test_evaluate_api_with_a_corpus_upload_and_answers(ui_app, questions_file, tmp_path):
    _, url = ui_app
    corpus = tmp_path / "小语料.jsonl"
    corpus.write_text("".join(json.dumps({"id": name, "title": Path(name).stem, "text": text}, ensure_ascii=False)
                              + "\n" for name, text in UI_DOCS.items()), encoding="utf-8")
    client = Client(url, verbose=False)
    try:
        args = run_args(handle_file(str(questions_file)), "corpus", handle_file(str(corpus)), retrieval_only=False)
        status, metrics, plot, report_md, files, misses, detail = client.predict(*args, api_name="/evaluate")
    finally:
        client.close()
    assert "评测完成" in status and "eval-" in status, status  # searched the KB built from the corpus
    values = dict(metrics["data"])
    assert values["前 1 段命中率 · hit@1"] == "0.667"
    assert values["回答 回答正确率 · accuracy"] == "1.000"  # extractive answers to lib and bus
    assert values["回答 回答题数 · n_answered"] == "4"
    # The UI's answers carry their passages and per-sentence checks, like rag eval's (one eval_record).
    assert values["回答 引用准确率 · citation_precision"] == "1.000"
    assert values["回答 无资料支持的句子比例 · unsupported_sentence_rate"] == "0.000"
    assert [row[0] for row in misses["data"]] == ["tea-miss"]
    assert Path(plot).is_file() and len(files) == 2 and "点击上表" in detail
