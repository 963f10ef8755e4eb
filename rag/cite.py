"""Step 8 — cite: check every cited sentence against its passage.

An LLM's ``[n]`` markers are claims, not facts. For each answer sentence we
score how well each passage supports it (character-bigram recall of the
sentence's content, and every number in the sentence must occur in the
passage), keep citations that hold, re-point those that cite the wrong passage,
attach the best passage to uncited sentences when it clearly supports them,
and mark the rest unsupported. The supporting quote is the passage sentence
that overlaps most, located in the original document for the UI.
"""
from __future__ import annotations

import re
import unicodedata
from dataclasses import asdict, dataclass, field
from typing import Callable

from rag.align import align
from rag.frame import question_frame
from rag.zh import (  # noqa: F401 (re-exported)
    MARKER,
    NUMBER,
    bigrams,
    has_number,
    marker_numbers,
    normalise,
    sentence_spans,
    split_sentences,
    split_trailing,
)

SUPPORT_THRESHOLD = 0.5  # bigram recall needed to call a sentence supported (see README)


def support_score(sentence: str, passage: str, question: str = "") -> float:
    """Share of the sentence's bigrams found in the passage; 0 when a number of the
    sentence is missing from the passage (a wrong number is never "supported").

    Bigrams the sentence merely repeats from the ``question`` do not count: an answer
    that echoes the question and adds an invented name must not pass on the echo.
    """
    clean = MARKER.sub("", sentence)
    numbers = NUMBER.findall(unicodedata.normalize("NFKC", clean))
    passage_norm = unicodedata.normalize("NFKC", passage)
    if any(not has_number(passage_norm, n) for n in numbers):
        return 0.0
    grams = bigrams(clean)
    novel = grams - bigrams(question)
    grams = novel or grams  # a sentence that only restates the question is judged as a whole
    if not grams:
        return 0.0
    return len(grams & bigrams(passage)) / len(grams)


def best_quote(sentence: str, passage: str) -> str:
    """The passage sentence that best supports ``sentence``."""
    candidates = split_sentences(passage) or [passage]
    grams = bigrams(MARKER.sub("", sentence))
    return max(candidates, key=lambda c: len(grams & bigrams(c))).strip()


def locate(original: str, start: int, end: int, quote: str) -> tuple[int, int] | None:
    """Original ``[start, end)`` of ``quote`` inside ``original[start:end]``, ignoring whitespace
    (cleaning may have re-joined wrapped lines)."""
    positions = [i for i in range(start, min(end, len(original))) if not original[i].isspace()]
    haystack = "".join(original[i] for i in positions)
    needle = re.sub(r"\s+", "", quote)
    at = haystack.find(needle) if needle else -1
    if at < 0:
        return None
    return positions[at], positions[at + len(needle) - 1] + 1


@dataclass
class Citation:
    number: int
    chunk_id: int
    doc_id: str
    title: str
    section: str
    page: int | None
    start: int  # span of the passage in the original document
    end: int
    quote: str  # the supporting sentence of the passage
    quote_start: int | None = None  # span of the quote in the original document
    quote_end: int | None = None
    kb: str = ""  # the knowledge base the document is in (a question may search several)


@dataclass
class SentenceCheck:
    text: str
    cited: list[int] = field(default_factory=list)  # passage numbers after verification
    support: float = 0.0
    supported: bool = False
    repointed: bool = False  # the model cited another passage, or nothing
    reason: str = ""  # why no passage backs it (e.g. "missing 宜昌"), for the UI and eval logs


@dataclass
class Verification:
    answer: str  # answer text with verified [n] markers
    sentences: list[SentenceCheck]
    used_numbers: list[int]  # passages cited in the final answer, in order of first use

    @property
    def unsupported(self) -> int:
        return sum(1 for s in self.sentences if not s.supported)

    def to_dict(self) -> dict:
        return asdict(self)


_MARKER_RUN = re.compile(rf"(?:{MARKER.pattern})+")


def answer_units(answer: str) -> list[str]:
    """The answer's sentences, each cut after every run of ``[n]`` that more text follows:
    "襄阳设立2837个[1]，荆门形成106个[2]。" is two units, each checked against its own passage."""
    units = []
    for sentence in split_sentences(answer):
        start = 0
        for m in _MARKER_RUN.finditer(sentence):
            if normalise(sentence[m.end():]) and normalise(MARKER.sub("", sentence[start:m.start()])):
                units.append(sentence[start:m.end()])
                start = m.end()
        units.append(sentence[start:])
    return [u for u in units if normalise(MARKER.sub("", u))]


def verify(answer: str, passages: list[str], threshold: float = SUPPORT_THRESHOLD, question: str = "",
           contexts: list[str] | None = None, places: list[str | None] | None = None) -> Verification:
    """Verify and repair the ``[n]`` citations of ``answer`` against ``passages`` (``[1]`` = passages[0]).

    A unit (a sentence, or the part of one that carries its own ``[n]``) is supported by a
    passage when its words are there (``support_score`` ≥ ``threshold``) and, given the
    question, the passage is *about* what was asked (``rag.align``): the sentence holding
    the answer, read with the sentence before it and the passage's title and section,
    names the question's places, times and organisations and shares its subject.

    Args:
        answer: the model's answer with its markers.
        passages: the numbered passage texts shown to the model.
        threshold: minimum support score to keep or attach a citation.
        question: the (standalone) question answered; what the answer only repeats from it is
            not evidence, and its frame is what the evidence must be about.
        contexts: per passage, its document title and section path (read as part of it).
        places: per passage, the place its document is about (``rag.places.dominant_place``).
    """
    frame = question_frame(question) if question.strip() else None
    contexts = contexts or [""] * len(passages)
    places = places or [None] * len(passages)
    checks: list[SentenceCheck] = []
    rebuilt: list[str] = []
    for unit in answer_units(answer):
        claimed = sorted({n for m in MARKER.finditer(unit) for n in marker_numbers(m)})
        body = MARKER.sub("", unit).rstrip()
        scores = [support_score(body, p, question) for p in passages]
        reasons = [""] * len(passages)
        if frame is not None:
            for i, passage in enumerate(passages):
                if scores[i] >= threshold:
                    verdict = align(body, passage, frame, contexts[i], places[i])
                    if not verdict.aligned:
                        scores[i], reasons[i] = 0.0, verdict.reason
        kept = [n for n in claimed if 1 <= n <= len(passages) and scores[n - 1] >= threshold]
        check = SentenceCheck(body.strip())
        if kept:
            check.cited, check.support = kept, max(scores[n - 1] for n in kept)
        elif scores and max(scores) >= threshold:
            best = max(range(len(scores)), key=scores.__getitem__)
            check.cited, check.support, check.repointed = [best + 1], scores[best], True
        else:
            check.support = max(scores, default=0.0)
            check.reason = next((reasons[n - 1] for n in claimed if 1 <= n <= len(passages) and reasons[n - 1]),
                                next((r for r in reasons if r), ""))
        check.supported = bool(check.cited)
        checks.append(check)
        head, tail = split_trailing(body)  # markers go before the closing punctuation
        markers = "".join(f"[{n}]" for n in check.cited)
        rebuilt.append(f"{head}{markers}{tail}")
    used: list[int] = []
    for check in checks:
        for n in check.cited:
            if n not in used:
                used.append(n)
    return Verification("".join(rebuilt).strip(), checks, used)


def citations_for(numbers: list[int], sentences: list[SentenceCheck], chunks: list,
                  document_text: Callable[[object], tuple[str, str] | None]) -> list[Citation]:
    """The citations of a verified answer: for each used ``[n]``, one contiguous quote of
    ``chunks[n-1]`` covering every sentence it supports, and that quote's span in the original file.

    Args:
        numbers: the passage numbers the verified answer cites.
        sentences: the verifier's per-sentence checks.
        chunks: the numbered passages (``StoredChunk``), ``[1]`` first.
        document_text: ``chunk -> (title, original text)`` of its document (None when it is gone).
    """
    citations = []
    for n in numbers:
        c = chunks[n - 1]
        quotes = {best_quote(s.text, c.text) for s in sentences if n in s.cited}
        found = [(c.text.find(q), q) for q in quotes if c.text.find(q) >= 0]
        if found:  # one contiguous quote covering every sentence this passage supports
            first = min(at for at, _ in found)
            quote = c.text[first:max(at + len(q) for at, q in found)]
        else:
            quote = c.text[:80]
        doc = document_text(c)
        span = locate(doc[1], c.start, c.end, quote) if doc else None
        citations.append(Citation(n, c.id, c.doc_id, c.title, c.section, c.page, c.start, c.end, quote,
                                  span[0] if span else None, span[1] if span else None, c.kb))
    return citations
