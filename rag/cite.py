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

MARKER = re.compile(r"\s*[\[【［](\d{1,2}(?:\s*[,，、]\s*\d{1,2})*)[\]】］]")
_SENTENCE = re.compile(r"[^。！？!?；;\n]+(?:[。！？!?；;]+(?:\s*[\[【［][\d,，、\s]+[\]】］])*)?")
_NUMBER = re.compile(r"\d+(?:\.\d+)?")
_DROP = re.compile(r"[\s\W_]+", re.UNICODE)
# Question/filler words that say nothing about support.
_FILLER = set("的了是在和与及也就都而且或被把对为这那个")
SUPPORT_THRESHOLD = 0.5  # bigram recall needed to call a sentence supported (see README)


def normalise(text: str) -> str:
    return _DROP.sub("", unicodedata.normalize("NFKC", text).lower())


def bigrams(text: str) -> set[str]:
    t = normalise(text)
    if len(t) < 2:
        return {t} if t else set()
    return {t[i:i + 2] for i in range(len(t) - 1) if not (t[i] in _FILLER and t[i + 1] in _FILLER)}


def support_score(sentence: str, passage: str, question: str = "") -> float:
    """Share of the sentence's bigrams found in the passage; 0 when a number of the
    sentence is missing from the passage (a wrong number is never "supported").

    Bigrams the sentence merely repeats from the ``question`` do not count: an answer
    that echoes the question and adds an invented name must not pass on the echo.
    """
    clean = MARKER.sub("", sentence)
    numbers = _NUMBER.findall(unicodedata.normalize("NFKC", clean))
    passage_norm = unicodedata.normalize("NFKC", passage)
    if any(not re.search(rf"(?<![\d.]){re.escape(n)}(?!\d)", passage_norm) for n in numbers):
        return 0.0
    grams = bigrams(clean)
    novel = grams - bigrams(question)
    grams = novel or grams  # a sentence that only restates the question is judged as a whole
    if not grams:
        return 0.0
    return len(grams & bigrams(passage)) / len(grams)


def sentence_spans(text: str) -> list[tuple[int, int]]:
    """``[start, end)`` of each sentence of ``text`` (line breaks end sentences too)."""
    return [m.span() for m in _SENTENCE.finditer(text) if normalise(MARKER.sub("", m.group()))]


def split_sentences(text: str) -> list[str]:
    return [text[a:b] for a, b in sentence_spans(text)]


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


@dataclass
class SentenceCheck:
    text: str
    cited: list[int] = field(default_factory=list)  # passage numbers after verification
    support: float = 0.0
    supported: bool = False
    repointed: bool = False  # the model cited another passage, or nothing


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


def verify(answer: str, passages: list[str], threshold: float = SUPPORT_THRESHOLD, question: str = "") -> Verification:
    """Verify and repair the ``[n]`` citations of ``answer`` against ``passages`` (``[1]`` = passages[0]).

    Args:
        answer: the model's answer with its markers.
        passages: the numbered passage texts shown to the model.
        threshold: minimum support score to keep or attach a citation.
        question: the question answered; what the answer only repeats from it is not evidence.
    """
    checks: list[SentenceCheck] = []
    rebuilt: list[str] = []
    for sentence in split_sentences(answer):
        claimed = sorted({int(n) for m in MARKER.finditer(sentence) for n in re.split(r"[,，、\s]+", m.group(1)) if n})
        body = MARKER.sub("", sentence).rstrip()
        scores = [support_score(body, p, question) for p in passages]
        kept = [n for n in claimed if 1 <= n <= len(passages) and scores[n - 1] >= threshold]
        check = SentenceCheck(body.strip())
        if kept:
            check.cited, check.support = kept, max(scores[n - 1] for n in kept)
        elif scores and max(scores) >= threshold:
            best = max(range(len(scores)), key=scores.__getitem__)
            check.cited, check.support, check.repointed = [best + 1], scores[best], True
        else:
            check.support = max(scores, default=0.0)
        check.supported = bool(check.cited)
        checks.append(check)
        tail = re.match(r"^(.*?)([。！？!?；;]*)$", body, re.S)
        markers = "".join(f"[{n}]" for n in check.cited)
        rebuilt.append(f"{tail.group(1)}{markers}{tail.group(2)}" if tail else body + markers)
    used: list[int] = []
    for check in checks:
        for n in check.cited:
            if n not in used:
                used.append(n)
    return Verification("".join(rebuilt).strip(), checks, used)
