"""Step 7 — answer: question in, grounded Chinese answer with verified citations out.

The answer flow is one LCEL chain of named steps, each a small generator that passes on
the events before it and hands the turn (``Turn``) to the next:

    rewrite → retrieve → pack → generate → verify → finalise

``Answerer.chain`` is that runnable, taking a ``Turn``; ``Answerer.as_runnable()`` takes a plain
``{"question", "history"?, "backend"?, "k"?, "max_tokens"?}``. ``.stream()`` yields typed events
(``rag.answer_types``: ``Rewritten``, ``Probing`` (a compound question's parts, before the answer
probe), ``Retrieved``, ``Token``..., ``Answered`` last) and
``.invoke()`` returns the final ``Answered``. The CLI, the
web UI, the HTTP API and ``rag eval`` all run it. Three backends: ``local`` (GGUF via
llama.cpp), ``openai`` (any OpenAI-compatible endpoint) and ``extractive`` (no LLM: the best
supporting sentences, instantly). The LLM falls back to the extractive answer through
``.with_fallbacks()`` when it fails before its first token (model missing, server down).
"""
from __future__ import annotations

import time
from dataclasses import asdict
from typing import Callable, Iterator

from langchain_core.output_parsers import StrOutputParser
from langchain_core.prompts import ChatPromptTemplate, PromptTemplate
from langchain_core.runnables import Runnable, RunnableGenerator, RunnableLambda

from rag.answer_probe import AnswerProbe, make_probe
from rag.answer_turn import Turn, step  # noqa: F401 (Turn: also imported from here)
from rag.answer_types import (  # noqa: F401 (AnswerEvent, eval_record: also imported from here)
    AnswerEvent, Answered, AnswerResult, Drafted, Probing, Retrieved, Rewritten, Token, eval_record)
from rag.cite import Citation, citations_for, verify
from rag.config import Settings
from rag.decompose import decompose
from rag.extractive import extractive_answer, passage_context
from rag.filters import Where
from rag.focus import focus
from rag.followup import rule_rewrite, user_turns
from rag.frame import part_labels
from rag.judge import support_probability
from rag.llm import ChatModels
from rag.places import dominant_place
from rag.retrieve import Hit, Retrieval, Searcher
from rag.templates import load_prompt
from rag.tokens import count_tokens
from rag.zh import REFUSAL, is_refusal, not_found

# Dense cosine of the best passage below which nothing is considered relevant. e5 cosines are
# compressed (unrelated Chinese text still scores ~0.75); measured on the shared sets (README).
MIN_DENSE_SCORE = 0.80
LLM_UNAVAILABLE = "大模型不可用，已改用抽取式回答 / LLM unavailable, extractive answer ({})"
LLM_FAILED = "大模型出错，已改用抽取式回答 / LLM failed, extractive answer ({})"


class Answerer:
    """Answers questions over one knowledge base.

    Args:
        settings: configuration (KB, backend, token budget...).
        searcher: an open ``Searcher`` to share (built from settings when omitted).
        chat_models: ``(settings, backend) -> chat model``, e.g. ``rag.service``'s process-wide
            ``ChatModels`` (one LLM in memory for every KB); without it the Answerer keeps its own.
    """

    def __init__(self, settings: Settings, searcher: Searcher | None = None,
                 chat_models: Callable[[Settings, str], object] | None = None):
        self.settings = settings
        self.searcher = searcher or Searcher(settings)
        self._chat_models = chat_models or ChatModels()
        system, answer = load_prompt("system"), load_prompt("answer")
        self.answer_prompt = ChatPromptTemplate.from_messages([("system", system), ("human", answer)])
        self._instruction_tokens = count_tokens(system + answer)  # read once, not per question
        self.passage_prompt = PromptTemplate.from_template(load_prompt("passage"))
        self.rewrite_prompt = ChatPromptTemplate.from_messages([("human", load_prompt("rewrite"))])
        self.judge_prompt = load_prompt("judge").strip()
        self._doc_places: dict[str, str | None] = {}  # doc id → the place it is about (rag.align)
        self._probes: dict[str, AnswerProbe | None] = {}  # per backend (rag.answer_probe)
        # The LLM, with the extractive answer as its fallback (the model's exception in "error").
        self.generator = RunnableGenerator(self._llm_tokens, name="llm").with_fallbacks(
            [RunnableLambda(self._extractive_fallback, name="extractive")], exception_key="error")
        self.chain = (step("rewrite", self._rewrite_step) | step("retrieve", self._retrieve_step)
                      | step("pack", self._pack_step) | step("generate", self._generate_step)
                      | step("verify", self._verify_step) | step("finalise", self._finalise_step)
                      ).with_config(run_name="answer")

    # ------------------------------------------------------------ pieces
    def chat_model(self, backend: str):
        """The LangChain chat model of a backend (from the shared cache, loaded once)."""
        return self._chat_models(self.settings, backend)

    def probe(self, backend: str | None = None) -> AnswerProbe | None:
        """The answer probe of a backend (None: ``RAG_PART_PROBE=false`` or ``extractive``)."""
        backend = backend or self.settings.llm_backend
        if backend not in self._probes:
            self._probes[backend] = make_probe(self.settings, lambda: self.chat_model(backend), backend)
        return self._probes[backend]

    def retrieve(self, query: str, k: int | None = None, mode: str = "hybrid", where: Where | None = None,
                 backend: str | None = None) -> Retrieval:
        """The retrieval the answer step reads, for every front end's search (CLI, API, MCP, eval):
        ``search_parts`` with the backend's answer probe on a compound question's parts."""
        return self.searcher.search_parts(query, k, mode, where=where, probe=self.probe(backend))

    def place_of(self, hit: Hit) -> str | None:
        """The place a passage's document is about (``rag.places.dominant_place``), cached per document."""
        key = (hit.chunk.kb, hit.chunk.doc_id)
        if key not in self._doc_places:
            doc = self.searcher.document_text(hit.chunk)
            if len(self._doc_places) > 256:
                self._doc_places.clear()
            self._doc_places[key] = dominant_place(doc[1]) if doc else None
        return self._doc_places[key]

    def judge(self, backend: str, messages, answer: str) -> float | None:
        """The model's probability that ``answer`` is backed by the passages (``rag.judge``);
        None when the backend gives no probabilities or the call fails (the verifier's word stands)."""
        try:
            return support_probability(self.chat_model(backend), messages, answer, self.judge_prompt)
        except Exception:
            return None

    def rewrite(self, question: str, history: list[dict], backend: str) -> str:
        """Standalone version of a follow-up question (unchanged without history).

        A follow-up that only names a new place, year or organisation ("那宜昌呢?") is the
        previous question about the new one (``rag.followup.resolve_followup``), for every
        backend and without an LLM call; anything else goes to the LLM's rewrite prompt.
        """
        ruled = rule_rewrite(question, history, use_llm=backend != "extractive")
        if ruled is not None:
            return ruled
        turns = user_turns(history)
        transcript = "\n".join(
            f"{'用户' if m['role'] == 'user' else '助手'}：{str(m['content'])[:300]}" for m in turns[-6:]
        )
        chain = self.rewrite_prompt | self.chat_model(backend).bind(max_tokens=96) | StrOutputParser()
        rewritten = chain.invoke({"history": transcript, "question": question}).strip().splitlines()
        rewritten = rewritten[0].strip() if rewritten else ""
        return rewritten.strip("“”\"' ") or question

    def _budget(self) -> int:
        s = self.settings
        return min(s.llm_passage_tokens, s.llm_context - s.llm_max_tokens - self._instruction_tokens - 64)

    def _passage_text(self, number: int, hit: Hit, query: str) -> str:
        s, c = self.settings, hit.chunk
        body = focus(c.text, query, s.llm_focus_tokens) if query and s.llm_focus_tokens else c.text
        return self.passage_prompt.format(number=number, title=c.title or c.doc_id,
                                          section=f"（{c.section}）" if c.section else "", text=body)

    def pack(self, hits: list[Hit], query: str = "", limit: int | None = None,
             numbered: list[Hit] | None = None) -> tuple[list[Hit], str]:
        """Number the passages that fit the token budget, each focused on the sentences that
        bear on ``query`` (``rag.focus``); never cut a sentence in the middle.

        Args:
            hits: candidates, best first.
            query: what the passages are focused on.
            limit: passages at most (``llm_passages`` by default).
            numbered: passages already numbered for other parts of the question (``[n]`` =
                ``numbered[n-1]``): a hit among them keeps its number, a new one is appended.

        Returns:
            The chosen hits and the prompt text of the numbered passages.
        """
        numbered = numbered if numbered is not None else []
        limit = limit or self.settings.llm_passages
        budget = self._budget()
        chosen, parts, used = [], [], 0
        for hit in hits:
            if len(chosen) >= limit:
                break
            known = next((i for i, h in enumerate(numbered) if h.chunk.key == hit.chunk.key), None)
            number = known + 1 if known is not None else len(numbered) + 1
            text = self._passage_text(number, hit, query)
            cost = count_tokens(text)
            if used + cost > budget:
                continue  # a later, shorter passage may still fit
            if known is None:
                numbered.append(hit)
            chosen.append(hit)
            parts.append(text)
            used += cost
        return chosen, "\n\n".join(parts)

    def citations_for(self, numbers: list[int], sentences, hits: list[Hit]) -> list[Citation]:
        return citations_for(numbers, sentences, [h.chunk for h in hits], self.searcher.document_text)

    def extractive_answer(self, query: str, hits: list[Hit], numbers: list[int] | None = None) -> str:
        """Best supporting sentences from the top passages, with their [n] (``rag.extractive``)."""
        return extractive_answer(query, hits, self.place_of, numbers)

    # ------------------------------------------------------------ the LLM and its fallback
    def _llm_tokens(self, inputs: Iterator[dict]) -> Iterator[str]:
        for item in inputs:
            turn: Turn = item["turn"]
            model = self.chat_model(turn.backend)
            if turn.max_tokens:
                model = model.bind(max_tokens=turn.max_tokens)
            turn.messages = self.answer_prompt.format_messages(context=item["context"], question=item["question"])
            for chunk in model.stream(turn.messages):
                piece = chunk.content if isinstance(chunk.content, str) else ""
                if piece:
                    yield piece

    def _extractive_fallback(self, item: dict) -> str:
        turn: Turn = item["turn"]
        if item.get("error") is not None:
            turn.notice = LLM_UNAVAILABLE.format(item["error"])
            turn.backend, turn.messages = "extractive", None
        return self.extractive_answer(item["question"], item["hits"], item["numbers"])

    # ------------------------------------------------------------ the chain's steps
    def _rewrite_step(self, turn: Turn) -> Iterator:
        try:
            turn.query = self.rewrite(turn.question, turn.history, turn.backend)
        except Exception as exc:  # the LLM is down: keep answering without it
            turn.notice = LLM_UNAVAILABLE.format(exc)
            turn.backend, turn.query = "extractive", self.rewrite(turn.question, turn.history, "extractive")
        turn.timings["rewrite"] = turn.elapsed_ms()
        yield Rewritten(turn.query)
        yield turn

    def _retrieve_step(self, turn: Turn) -> Iterator:
        t = time.perf_counter()
        if self.probe(turn.backend) is not None and (parts := decompose(turn.query)).compound:
            yield Probing(list(parts.parts))  # the probe's LLM calls come next: seconds, locally
        retrieval = self.retrieve(turn.query, turn.k, where=turn.where, backend=turn.backend)
        turn.hits, turn.part_answers = retrieval.hits, retrieval.part_answers
        turn.parts = list(retrieval.parts) if len(retrieval.parts) > 1 else []
        # Relevance per part by its own search's nearest passage: the rule a single question gets.
        turn.part_relevant = [best >= MIN_DENSE_SCORE for best in retrieval.best_dense] if turn.parts else []
        turn.timings["retrieve"] = (time.perf_counter() - t) * 1000
        yield turn

    def _pack_step(self, turn: Turn) -> Iterator:
        numbered: list[Hit] = []
        if not turn.parts:
            _, context = self.pack(turn.hits, turn.query, numbered=numbered)
            turn.part_hits, turn.part_contexts = [list(range(len(numbered)))], [context]
        else:
            # Each part gets its own passages (the ones retrieved for it) and, later, its own answer.
            per_part = max(1, self.settings.llm_passages - 1)
            for i, part in enumerate(turn.parts):
                serving = [h for h in turn.hits if i in h.parts] or turn.hits
                chosen, context = self.pack(serving, part, limit=per_part, numbered=numbered)
                keys = [h.chunk.key for h in numbered]
                turn.part_hits.append([keys.index(h.chunk.key) for h in chosen])
                turn.part_contexts.append(context)
        turn.hits = numbered
        turn.passages = [dict(h.to_dict(), number=i) for i, h in enumerate(turn.hits, 1)]
        yield Retrieved(turn.passages, turn.parts)
        yield turn

    def _generate_step(self, turn: Turn) -> Iterator:
        for i, question in enumerate(turn.questions):
            if turn.cancelled.is_set():
                break
            hits = [turn.hits[j] for j in turn.part_hits[i]]
            if i:  # the parts' answers are read as one text: one line each
                turn.text += "\n"
                yield Token("\n")
            relevant = bool(hits) and max((h.dense_score or 0.0) for h in hits) >= MIN_DENSE_SCORE
            if turn.parts:
                relevant = relevant and turn.part_relevant[i]
            text = yield from self._generate_part(turn, question, hits, [j + 1 for j in turn.part_hits[i]],
                                                  turn.part_contexts[i], relevant)
            turn.part_texts.append(text)
        yield Drafted(turn.text, turn.backend)
        yield turn

    def _generate_part(self, turn: Turn, question: str, hits: list[Hit], numbers: list[int], context: str,
                       relevant: bool):
        """Answer one question (or one part) from its numbered passages; yields tokens, returns the text."""
        text = ""
        if not relevant:
            text = REFUSAL
        elif turn.backend == "extractive":
            text = self.extractive_answer(question, hits, numbers)
            turn.timings.setdefault("first_token", turn.elapsed_ms())
            yield Token(text)
        else:
            pieces = self.generator.stream({"turn": turn, "question": question, "context": context,
                                            "hits": hits, "numbers": numbers})
            try:
                for piece in pieces:
                    if turn.cancelled.is_set():
                        break
                    turn.timings.setdefault("first_token", turn.elapsed_ms())
                    text += piece
                    turn.text += piece
                    yield Token(piece)
                return text
            except Exception as exc:  # failed mid-answer (after its first token): no fallback can run
                turn.notice = LLM_FAILED.format(exc)
                turn.backend, turn.messages = "extractive", None
                turn.text = turn.text[:len(turn.text) - len(text)]
                text = self.extractive_answer(question, hits, numbers)
                yield Token(text)
            finally:
                pieces.close()  # a closed chain (client gone) stops the LLM and frees its lock
        turn.text += text
        return text

    def _verify_step(self, turn: Turn) -> Iterator:
        hits = turn.hits
        result = AnswerResult(turn.question, turn.query, REFUSAL, backend=turn.backend, notice=turn.notice,
                              passages=turn.passages, refused=True, raw_answer=turn.text, parts=turn.parts,
                              part_answers=turn.part_answers)
        passages = [h.chunk.text for h in hits]
        contexts, places = [passage_context(h) for h in hits], [self.place_of(h) for h in hits]
        answers, sentences, used = [], [], []
        for question, text in zip(turn.questions, turn.part_texts):
            if is_refusal(text) or not text.strip():
                answers.append(None)
                continue
            check = verify(text, passages, question=question, contexts=contexts, places=places)
            sentences += check.sentences
            if not check.used_numbers:  # not one sentence is supported: an invented answer is worse than none
                answers.append(None)
                result.notice = result.notice or f"回答没有资料支持，已拒答 / unsupported answer withheld: {text.strip()[:200]}"
                continue
            answers.append(check.answer)
            used += [n for n in check.used_numbers if n not in used]
            result.unsupported_sentences += check.unsupported
        result.sentences = [asdict(s) for s in sentences]
        if any(answers):
            # A part the documents do not answer is said plainly; the answered parts stay.
            if turn.parts:
                labels = part_labels(turn.parts)
                result.answer = "\n".join((f"{label}：{a}" if label else a) if a else not_found(q)
                                          for q, a, label in zip(turn.parts, answers, labels))
            else:
                result.answer = answers[0]
            result.refused = False
            result.citations = self.citations_for(sorted(used), sentences, hits)
            self._judge(turn, result)
        turn.result = result
        yield turn

    def _judge(self, turn: Turn, result: AnswerResult) -> None:
        """Optional: withhold an answer the model itself judges unsupported (off by default)."""
        threshold = self.settings.llm_judge_threshold
        # One prompt, one answer: a compound question's parts each had their own prompt.
        if turn.backend == "extractive" or turn.messages is None or threshold <= 0 or turn.parts:
            return
        result.judge = self.judge(turn.backend, turn.messages, turn.text)
        if result.judge is not None and result.judge < threshold:
            result.notice = result.notice or (
                f"模型判断资料不支持该回答（{result.judge:.2f} < {threshold}），已拒答 / the model "
                f"judged its answer unsupported, withheld: {turn.text.strip()[:200]}")
            result.answer, result.refused, result.citations = REFUSAL, True, []

    def _finalise_step(self, turn: Turn) -> Iterator:
        turn.timings["total"] = turn.elapsed_ms()
        turn.result.timings = turn.timings
        turn.result.kbs = self.searcher.names
        turn.result.filters = turn.where.to_dict()
        yield Answered(turn.result)

    # ------------------------------------------------------------ running the chain
    def _start(self, question: str, history: list[dict] | None, backend: str | None, k: int | None,
               max_tokens: int | None = None, where: Where | None = None) -> Turn:
        return Turn(question, list(history or []), backend or self.settings.llm_backend, k or self.settings.top_k,
                    max_tokens if max_tokens and max_tokens < self.settings.llm_max_tokens else None,
                    where or Where())

    def stream(self, question: str, history: list[dict] | None = None, backend: str | None = None,
               k: int | None = None, max_tokens: int | None = None,
               where: Where | None = None) -> Iterator[AnswerEvent]:
        """Run the chain, yielding its events (``Answered`` last).

        Args:
            question: the user's question.
            history: earlier turns as ``[{"role": "user"|"assistant", "content": str}]``.
            backend: ``local``, ``openai`` or ``extractive`` (settings default when None).
            k: passages to retrieve.
            max_tokens: cap on the model's answer (below ``llm_max_tokens``; None: the setting).
            where: only passages of the documents this metadata filter lets through (``rag.filters``).
        """
        turn = self._start(question, history, backend, k, max_tokens, where)
        events = self.chain.stream(turn)
        try:
            for event in events:  # not ``yield from``: that would close the chain before the flag is set
                yield event
        finally:
            turn.cancelled.set()
            events.close()

    def ask(self, question: str, history: list[dict] | None = None, backend: str | None = None,
            k: int | None = None, max_tokens: int | None = None, where: Where | None = None) -> AnswerResult:
        """Answer without streaming (arguments as ``stream``)."""
        final = self.chain.invoke(self._start(question, history, backend, k, max_tokens, where))
        if not isinstance(final, Answered):
            raise RuntimeError("answer chain ended without a result")
        return final.result

    def as_runnable(self) -> Runnable:
        """The chain taking a plain dict: ``{"question", "history"?, "backend"?, "k"?, "max_tokens"?}``."""
        return RunnableLambda(lambda x: self._start(x["question"], x.get("history"), x.get("backend"), x.get("k"),
                                                    x.get("max_tokens")), name="start") | self.chain


def make_answer_fn(answerer: Answerer, backend: str | None = None, k: int | None = None):
    """``(question, history=None) -> dict`` for ``rag eval`` (CLI and UI alike): the chain's
    result as ``eval_record``.

    Args:
        answerer: the chain to run (the UI passes its shared one: one LLM in memory).
        backend: the answer backend (the answerer's settings when None).
        k: passages retrieved per question (``top_k`` when None).
    """
    def answer(question: str, history: list[dict] | None = None) -> dict:
        return eval_record(answerer.ask(question, history, backend=backend, k=k))
    return answer
