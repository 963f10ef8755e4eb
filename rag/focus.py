"""Step 6b — focus: give the LLM the part of each passage that bears on the question.

On a 2-core CPU the local model reads its prompt at ~90-150 tokens/s, so every passage
token costs time to first token. A retrieved chunk (up to 300 tokens) usually answers
the question in one or two sentences; this keeps those sentences with their neighbours
(answers often follow the sentence that names the topic: "…包括：" then the list) and
marks what was left out with "……". The user still sees, and citations still point
into, the whole chunk.
"""
from __future__ import annotations

from rag.tokens import count_tokens
from rag.zh import CLAUSE as _CLAUSE
from rag.zh import QUESTION_WORDS, bigrams, is_question, sentence_spans

GAP = "……"
CLAUSE_TOKENS = 40  # longer sentences are weighed clause by clause (policy prose runs long)


def question_grams(question: str) -> set[str]:
    """Character bigrams of the question without its question words."""
    return bigrams(QUESTION_WORDS.sub(" ", question))


def _units(text: str) -> list[tuple[int, int]]:
    """Spans of the sentences of ``text``, long ones cut into their clauses."""
    spans = []
    for a, b in sentence_spans(text):
        if count_tokens(text[a:b]) <= CLAUSE_TOKENS:
            spans.append((a, b))
        else:
            spans += [(a + m.start(), a + m.end()) for m in _CLAUSE.finditer(text[a:b])]
    return spans


def focus(text: str, question: str, max_tokens: int) -> str:
    """The sentences of ``text`` most related to ``question``, in their original order,
    within ``max_tokens`` (tiktoken); the whole text when it already fits.

    Args:
        text: a retrieved passage.
        question: the (standalone) question.
        max_tokens: token budget for this passage.
    """
    if count_tokens(text) <= max_tokens:
        return text
    spans = _units(text)
    sentences = [text[a:b] for a, b in spans]
    if len(sentences) <= 1:
        return text  # one long sentence: never cut it in the middle
    wanted = question_grams(question)
    grams = [bigrams(s) & wanted for s in sentences]
    costs = [count_tokens(s) for s in sentences]
    keep: set[int] = set()
    used = 0

    def take(i: int) -> bool:
        nonlocal used
        if i in keep or not 0 <= i < len(sentences) or used + costs[i] > max_tokens:
            return False
        keep.add(i)
        used += costs[i]
        return True

    # 1. greedy cover: each pick adds the most question words not covered yet, so a sentence
    #    naming the topic and another holding the asked-for fact both get in
    covered: set[str] = set()
    while True:
        gains = [(len(g - covered), -i) for i, g in enumerate(grams) if i not in keep and used + costs[i] <= max_tokens]
        if not gains or max(gains)[0] == 0:
            break
        i = -max(gains)[1]
        take(i)
        covered |= grams[i]
    if not keep:
        return text  # nothing on topic fits: let the packer decide on the whole passage
    # 2a. a kept question (an FAQ's 问：…？) is answered by the whole next line (答：…；…。)
    for i in sorted(keep):
        if is_question(sentences[i]):
            j = i + 1
            while j < len(sentences) and take(j):
                end_of_line = "\n" in text[spans[j][1]:spans[j + 1][0] if j + 1 < len(spans) else len(text)]
                if end_of_line:
                    break
                j += 1
    # 2b. context: the sentence after each pick (answers often continue there), then the one before
    for offset in (1, -1):
        for i in sorted(keep):
            take(i + offset)
    parts, previous = [], -1
    for i in sorted(keep):
        if i != previous + 1:
            parts.append(GAP)
            parts.append(sentences[i].lstrip())
        else:  # adjacent units: keep the text between them (a line break after a heading)
            parts.append(text[spans[previous][1] if previous >= 0 else 0:spans[i][1]])
        previous = i
    if previous != len(sentences) - 1:
        parts.append(GAP)
    return "".join(parts).strip()
