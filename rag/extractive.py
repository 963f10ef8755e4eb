"""The extractive backend: no LLM, the best supporting sentences of the top passages, with their [n].

Instant on any machine, and the fallback when an LLM is unavailable. It applies the
verifier's alignment rule (``rag.align``) to every candidate sentence, so it never quotes a
sentence about another place, year or subject than the one asked.
"""
from __future__ import annotations

import re
from typing import Callable

from rag.align import align
from rag.cite import bigrams, split_sentences
from rag.clean import is_heading_line
from rag.focus import question_grams
from rag.frame import question_frame
from rag.retrieve import Hit
from rag.zh import REFUSAL, is_question

# What an answer to a "how long / how high / when ..." question usually contains: prefer
# sentences with these cues (and with a number) when the question asks for one.
_ANSWER_CUES = [
    (re.compile(r"多长|长度"), re.compile(r"长度|全长|总长|长约|千米|公里|米")),
    (re.compile(r"多高|高度|海拔"), re.compile(r"高度|海拔|高约|米")),
    (re.compile(r"多大|面积"), re.compile(r"面积|平方")),
    (re.compile(r"多久|多长时间"), re.compile(r"\d+\s*(?:年|个月|天|小时|分钟)")),
    (re.compile(r"哪年|哪一年|何时|什么时候|哪天"), re.compile(r"\d+\s*年|\d+\s*月|\d+\s*日")),
]
_QUANTITY_QUESTION = re.compile(r"多少|几|多长|多高|多大|多远|多久|多重|多宽|多深|哪年|何时|什么时候|比例|百分之")
_SENTENCE_END = re.compile(r"([。！？!?；;]?)$")


def passage_context(hit: Hit) -> str:
    """What a passage is about besides its text: document title and section path."""
    return f"{hit.chunk.title or ''} {hit.chunk.section or ''}".strip()


def extractive_answer(query: str, hits: list[Hit], place_of: Callable[[Hit], str | None],
                      numbers: list[int] | None = None) -> str:
    """Best supporting sentences from the top three passages, each ending with its [n].

    Args:
        query: the standalone question (or one part of a compound one).
        hits: the passages, best first.
        place_of: the place a passage's document is about (``Answerer.place_of``).
        numbers: the ``[n]`` of each hit (default 1, 2, 3...).

    Returns:
        One or two sentences with markers, or the refusal text when none is on topic.
    """
    q = question_grams(query)
    cues = [cue for asked, cue in _ANSWER_CUES if asked.search(query)]
    wants_number = bool(_QUANTITY_QUESTION.search(query))
    frame = question_frame(query)
    scored = []
    numbers = numbers or list(range(1, len(hits) + 1))
    for n, hit in zip(numbers[:3], hits[:3]):
        context, place = passage_context(hit), place_of(hit)
        for sentence in split_sentences(hit.chunk.text):
            grams = bigrams(sentence)
            # A title line or a question is not an answer, nor a sentence about another
            # place, year or subject than the one asked (the verifier's alignment rule).
            if grams and not is_heading_line(sentence) and not is_question(sentence) \
                    and align(sentence, hit.chunk.text, frame, context, place).aligned:
                coverage = len(q & grams) / max(1, len(q))
                # A coverage tie is broken by the kind of answer asked for, then by passage rank.
                bonus = 0.05 * (wants_number and bool(re.search(r"\d", sentence))) \
                    + 0.1 * any(cue.search(sentence) for cue in cues)
                scored.append((coverage + bonus if coverage else 0.0, -n, sentence.strip(), n))
    scored.sort(reverse=True)
    if not scored or scored[0][0] < 0.2:
        return REFUSAL
    best = [s for s in scored[:2] if s[0] >= 0.6 * scored[0][0]]
    return "".join(_SENTENCE_END.sub(rf"[{n}]\1", text, count=1) for _, _, text, n in best)
