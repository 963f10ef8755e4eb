"""The state of one question on its way through the answer chain (``Turn``), and how a chain
step (``step``) passes it on: ``rag.answer`` builds the chain from these."""
from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Iterator

from langchain_core.runnables import Runnable, RunnableGenerator

from rag.answer_probe import PartAnswer
from rag.answer_types import AnswerResult, _LastWins
from rag.filters import Where
from rag.retrieve import Hit


@dataclass
class Turn(_LastWins):
    """One question on its way through the chain: each step fills in its part."""

    question: str
    history: list[dict]
    backend: str
    k: int
    max_tokens: int | None = None
    where: Where = field(default_factory=Where)  # a metadata filter on what may be retrieved
    started: float = field(default_factory=time.perf_counter)
    query: str = ""
    parts: list[str] = field(default_factory=list)
    hits: list[Hit] = field(default_factory=list)
    passages: list[dict] = field(default_factory=list)
    # One entry per part of the question (one for a single question): its numbered passages
    # (indices into ``hits``), their prompt text, and the model's answer to it.
    part_hits: list[list[int]] = field(default_factory=list)
    part_contexts: list[str] = field(default_factory=list)
    part_texts: list[str] = field(default_factory=list)
    part_relevant: list[bool] = field(default_factory=list)  # a part with nothing close is not answered
    part_answers: list[PartAnswer] = field(default_factory=list)  # what the answer probe read per part
    text: str = ""
    messages: list | None = None
    notice: str | None = None
    timings: dict[str, float] = field(default_factory=dict)
    result: AnswerResult | None = None
    # Set when the caller closes the stream (a client left): the steps then stop working. LCEL
    # drains a closed sequence through its later steps, so closing alone would not stop the LLM.
    cancelled: threading.Event = field(default_factory=threading.Event)

    def elapsed_ms(self) -> float:
        return (time.perf_counter() - self.started) * 1000

    @property
    def questions(self) -> list[str]:
        """What the model answers: each part of a compound question, else the query itself."""
        return self.parts if len(self.parts) > 1 else [self.query]


def step(name: str, work: Callable[[Turn], Iterator]) -> Runnable:
    """A named chain step: events from earlier steps pass through; the turn goes to ``work``,
    which yields its own events and then the turn for the next step."""
    def transform(items: Iterator) -> Iterator:
        for item in items:
            if isinstance(item, Turn) and not item.cancelled.is_set():
                yield from work(item)
            else:
                yield item
    return RunnableGenerator(transform, name=name)
