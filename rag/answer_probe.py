"""Step 6c — answer probe: for a question that asks several things, ask the LLM for each part's
short answer from the part's best passages, then move the chunks that hold that answer up the
part's ranking before the parts are merged (``rag.merge_parts``).

Why: a part's ranking mixes passages that hold its answer with passages on the same topic that
do not (last year's winner, the other city's figure). Passages that hold the answer share it:
once one is read, the others are found by the answer itself. No reranker installs offline here;
a short extraction by the LLM already in memory is the reader that tells them apart.

Cost: one LLM call per part, prompt 5 focused passages (~350–650 tokens), answer ≤ 24 tokens:
3.4–4.8 s per compound question with the local 1.5B model on 2 cores (bench/results.md). Single
questions never pay it; nor does anything when ``RAG_PART_PROBE=false`` or the backend is ``extractive``.

Measured and left out (README, *Compound questions*): reading weakly held answers a second time with
the passages reversed (rgb_zh_int recall@10 / all_groups@10 .447 / .74 against .433 / .73, no answer
changed, the first token 4.5 s later on a small KB, where every part is read twice); the answer's token
probability as its confidence.
"""
from __future__ import annotations

import re
import threading
from concurrent.futures import ThreadPoolExecutor
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable

from langchain_core.messages import HumanMessage, SystemMessage

from rag.focus import focus
from rag.templates import load_prompt
from rag.zh import answer_items, normalise, simplified

if TYPE_CHECKING:
    from langchain_core.language_models import BaseChatModel

    from rag.retrieve import Hit

PROBE_PASSAGES = 5  # best chunks of the part the model reads
PROBE_FOCUS_TOKENS = 110  # of each, the sentences nearest the part (rag.focus)
PROBE_DEPTH = 20  # chunks of the part's ranking that may move up
# The part's best chunks that keep their places: a wrong answer (the model reads last year's
# figure) must not push out what retrieval ranked first.
PROBE_KEEP = 2
PROBE_MAX_TOKENS = 24


@dataclass
class PartAnswer:
    """What the probe found for one part.

    Attributes:
        part: the part as searched.
        answer: the model's short answer ("" when it found none or failed).
        holding: how many of the part's top ``PROBE_DEPTH`` chunks hold it (they moved up).
        error: why the model could not be asked, or why its answer was set aside ("" when used).
        held_items: those chunks' keys, each with how many of the answer's items it holds (for
            the reordering and ``rag.merge_parts``; not in ``to_dict``).
        items: how many items the answer has (a list answer has several).
    """

    part: str
    answer: str = ""
    error: str = ""
    held_items: dict[tuple[str, int], int] = field(default_factory=dict, repr=False)
    items: int = 0

    @property
    def holding(self) -> int:
        return len(self.held_items)

    @property
    def held(self) -> frozenset[tuple[str, int]]:
        """The keys of the chunks that hold the answer."""
        return frozenset(self.held_items)

    @property
    def yields_turns(self) -> bool:
        """Whether the part may give its merge turns to parts whose next chunk holds their answer:
        only when its own answer is one item that chunks hold (an answer no chunk holds may be a
        misspelling, a list answer may be incomplete)."""
        return bool(self.held) and self.items == 1

    def to_dict(self) -> dict:
        return {"part": self.part, "answer": self.answer, "holding": self.holding, "error": self.error}


class AnswerProbe:
    """Reorders a part's ranking by the answer the LLM reads in its best chunks.

    Args:
        chat_model: returns the LangChain chat model (the local GGUF or an OpenAI-compatible
            endpoint); called at the first compound question, so a single one never loads it.
        passages: chunks the model reads.
        focus_tokens: tokens kept of each (its sentences nearest the part).
        depth: chunks of the ranking that may move up.
        cache_size: answers remembered per (part, chunks read), so a repeated question and the
            same part in a follow-up cost no second call.
    """

    def __init__(self, chat_model: Callable[[], BaseChatModel], passages: int = PROBE_PASSAGES,
                 focus_tokens: int = PROBE_FOCUS_TOKENS, depth: int = PROBE_DEPTH, cache_size: int = 256):
        self.chat_model = chat_model
        self.passages, self.focus_tokens, self.depth = passages, focus_tokens, depth
        self.system = load_prompt("probe_system").strip()
        self.template = load_prompt("probe").strip()
        self._cache: OrderedDict[tuple, str] = OrderedDict()
        self._cache_size = cache_size
        self._lock = threading.Lock()
        self.calls = 0  # model calls made (a cached answer makes none)

    def ask(self, part: str, hits: list[Hit]) -> str:
        """The model's short answer to ``part`` from the first ``passages`` hits ("" = none)."""
        read = hits[:self.passages]
        if not read:
            return ""
        key = (part, *(hit.chunk.key for hit in read))
        with self._lock:
            if key in self._cache:
                self._cache.move_to_end(key)
                return self._cache[key]
        body = "\n".join(f"[{n}] {focus(hit.chunk.text, part, self.focus_tokens)}" for n, hit in enumerate(read, 1))
        messages = [SystemMessage(self.system), HumanMessage(self.template.format(passages=body, part=part))]
        reply = self.chat_model().invoke(messages, max_tokens=PROBE_MAX_TOKENS, temperature=0)
        lines = str(reply.content).strip().splitlines()
        answer = lines[0].strip() if lines else ""
        with self._lock:
            self.calls += 1
            self._keep(key, answer)
        return answer

    def _keep(self, key: tuple, answer: str) -> None:
        """Remember an answer, forgetting the oldest beyond ``cache_size`` (caller holds the lock)."""
        self._cache[key] = answer
        while len(self._cache) > self._cache_size:
            self._cache.popitem(last=False)

    def answers(self) -> list[tuple[tuple, str]]:
        """The remembered answers, oldest first (to keep across runs: ``remember``)."""
        with self._lock:
            return list(self._cache.items())

    def remember(self, answers: list[tuple[tuple, str]]) -> None:
        """Take answers from an earlier run (``answers``), as if the model had given them."""
        with self._lock:
            for key, answer in answers:
                self._keep(key, answer)

    def read(self, part: str, hits: list[Hit]) -> PartAnswer:
        """The part's probed answer and which of its top ``depth`` hits hold it (by how many of a
        list answer's items, in ``held_items``). The model failing (endpoint down, ...) is an
        answer with ``error`` set: the part then keeps its ranking."""
        try:
            answer = self.ask(part, hits)
        except Exception as exc:  # the probe only reorders: without it the part keeps its ranking
            return PartAnswer(part, error=f"{type(exc).__name__}: {exc}"[:200])
        patterns = answer_patterns(answer, part)
        if not patterns:
            return PartAnswer(part, answer)
        items = {}
        for hit in hits[:self.depth]:
            text = simplified(hit.chunk.text)
            if n := sum(any(p.search(text) for p in forms) for forms in patterns):
                items[hit.chunk.key] = n
        return PartAnswer(part, answer, held_items=items, items=len(patterns))

    def reorder(self, hits: list[Hit], answer: PartAnswer) -> list[Hit]:
        """``hits`` with, after the first ``PROBE_KEEP``, the top ``depth`` that hold the answer
        first (more of a list answer's items first; stable otherwise)."""
        if not answer.held:
            return hits
        top, keep = hits[:self.depth], min(PROBE_KEEP, len(hits))
        rest = sorted(range(keep, len(top)), key=lambda i: (-answer.held_items.get(top[i].chunk.key, 0), i))
        return top[:keep] + [top[i] for i in rest] + hits[self.depth:]

    def rerank_parts(self, parts: list[str], rankings: list[list[Hit]]) -> tuple[list[list[Hit]], list[PartAnswer]]:
        """Probe every part of one question; parts that got the same answer are set aside
        (``set_aside_shared``); the others' rankings are reordered (``reorder``)."""
        # At once: a hosted model answers the parts in parallel; the local one takes them in turn
        # (its lock, rag.llm).
        with ThreadPoolExecutor(max_workers=max(1, len(parts))) as pool:
            read = list(pool.map(self.read, parts, rankings))
        answers = set_aside_shared(read)
        return [self.reorder(hits, answer) for hits, answer in zip(rankings, answers)], answers


def answer_patterns(answer: str, question: str = "") -> list[list[re.Pattern]]:
    """For each item of a short answer to ``question`` (``rag.zh.answer_items``), the patterns
    of its written forms: a number only as a whole number (``15`` not in ``2015``, ``6所`` not
    in ``16所``) and with two digits at least; a word with two characters at least, whatever the
    spaces. Empty for "无" and for anything else unusable."""
    out = []
    for forms in answer_items(answer, question):
        patterns = []
        for form in forms:
            form = form.replace(" ", "")
            if re.fullmatch(r"[\d.,%‰]+", form) and sum(ch.isdigit() for ch in form) < 2 or len(form) < 2:
                continue
            body = r"\s*".join(map(re.escape, form))  # spaces may differ: 骁龙8Gen2 / 骁龙8 Gen2
            head = r"(?<![\d.])" if form[0].isdigit() else ""  # 6所 is not in 16所
            tail = r"(?!\d)" if form[-1].isdigit() else ""  # 12 is not in 123
            patterns.append(re.compile(head + body + tail, re.IGNORECASE))
        if patterns:
            out.append(patterns)
    return out


def make_probe(settings, chat_model: Callable[[], BaseChatModel], backend: str,
               cache_size: int = 256) -> AnswerProbe | None:
    """The answer probe for an LLM backend, or None when it must not run: ``RAG_PART_PROBE=false``,
    or the ``extractive`` backend (no LLM at all)."""
    if not settings.part_probe or backend == "extractive":
        return None
    return AnswerProbe(chat_model, cache_size=cache_size)


def set_aside_shared(answers: list[PartAnswer]) -> list[PartAnswer]:
    """Parts asking different things (甲和乙分别…) that got the same answer: at least one is the
    model misreading, and which one is unknown, so neither moves chunks (their rankings stay
    as retrieval made them)."""
    keys = [normalise(a.answer) if a.held else "" for a in answers]
    out = []
    for i, answer in enumerate(answers):
        shared = [j for j, key in enumerate(keys) if j != i and key and keys[i]
                  and (key in keys[i] or keys[i] in key)]
        if shared:
            answer = PartAnswer(answer.part, answer.answer, f"same answer as part {shared[0] + 1}")
        out.append(answer)
    return out
