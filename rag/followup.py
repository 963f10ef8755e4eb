"""Follow-ups that only name a new place, year or organisation ("那宜昌呢?"), written as the
previous question about it, by rule: no LLM call, the same for every backend."""
from __future__ import annotations

import re
import unicodedata

from rag.frame import question_frame
from rag.places import PLACE_SUFFIX, place_names
from rag.zh import QUESTION_WORDS, normalise

_FOLLOWUP_HEAD = re.compile(r"^\s*(?:那么|那|还有|再问一下|另外|而)\s*(?:在)?")
# Endings of a follow-up, longest first. Stripped by hand, not by a regex: "…呢" + 1,000 spaces
# made the regex take seconds (it backtracks over the spaces), and questions come from users.
_TAIL_WORDS = sorted(("的情况", "的呢", "情况呢", "呢", "怎么样", "如何", "又如何", "又是多少", "有多少", "是多少",
                      "多少", "是谁", "是什么", "又是谁"), key=len, reverse=True)


def _strip_tail(text: str) -> str:
    """``text`` without its final punctuation and asking word (呢, 怎么样, 是多少…); linear time."""
    body = text.rstrip().rstrip("？?。！!").rstrip()
    for word in _TAIL_WORDS:
        if body.endswith(word):
            return body[:-len(word)]
    return body


def _drop_term(text: str, term: str) -> str:
    """``text`` without its first ``term`` and the 和/与/及/、 that joined it; linear time."""
    at = text.find(term)
    if at < 0:
        return text
    start = len(text[:at].rstrip())
    for joiner in ("以及", "和", "与", "及", "、"):
        if text[:start].endswith(joiner):
            start = len(text[:start - len(joiner)].rstrip())
            break
    return text[:start] + text[at + len(term):]
_ENTITY_KINDS = ("place", "org", "person", "name", "quoted")


def resolve_followup(question: str, previous: str) -> str | None:
    """A short follow-up that only names a new place, year or organisation, written as the
    previous question about it: "那宜昌呢?" after "襄阳设立了多少个统战工作服务站?" →
    "宜昌设立了多少个统战工作服务站?". None when the follow-up says more than that, or the
    previous question has no term of that kind to replace (then the LLM rewrites it).

    Args:
        question: the follow-up as typed.
        previous: the previous question, standalone.
    """
    core = _strip_tail(_FOLLOWUP_HEAD.sub("", unicodedata.normalize("NFKC", question))).strip()
    if not core or len(core) > 16:
        return None
    new = question_frame(core)
    if not new.constraints:
        return None
    rest = core
    for c in new.constraints:
        rest = rest.replace(c.text, " ")
    if normalise(QUESTION_WORDS.sub("", re.sub(r"[和与及、]", "", rest))):
        return None  # the follow-up says something besides the new terms
    old = question_frame(previous)
    result = previous
    for c in new.constraints:
        family = ("time",) if c.kind == "time" else _ENTITY_KINDS
        same = [o for o in old.constraints if o.kind == c.kind] or [o for o in old.constraints if o.kind in family]
        if not same:
            return None
        group = [o for o in old.constraints if o.group == same[0].group]
        first, *others = group
        at = result.find(first.text)
        after = result[at + len(first.text):at + len(first.text) + 1]
        # "襄阳市…" → "宜昌市…", not "宜昌市市"; "吴兴区委…" → "长兴县委…", not "长兴县区委"
        cut = 1 if c.text[-1:] in "区县市州" and after and after in "区县市州" else 0
        result = result[:at] + c.text + result[at + len(first.text) + cut:]
        for o in others:  # "襄阳和荆门…" followed by "那宜昌呢": the new term replaces the whole group
            result = _drop_term(result, o.text)
    for c in new.constraints:  # 吴兴区委… with 长兴 in its place reads 长兴县委… (the level 长兴 has)
        if c.kind == "place" and c.text == PLACE_SUFFIX.sub("", c.text):
            at = result.find(c.text) + len(c.text)
            level = result[at:at + 1]
            if level in "区县市" and level and c.text + level not in place_names():
                other = next((x for x in "县区市" if c.text + x in place_names()), None)
                if other:
                    result = result[:at] + other + result[at + 1:]
    return result if result != previous else None


_REFERS_BACK = re.compile(r"^\s*(?:那么|那|还有|另外|而|它|他|她|其|该|这个|这|此)")


def is_elliptical(question: str) -> bool:
    """A follow-up that leans on the previous turn ("那宜昌呢?", "它的部长是谁？", "有多少人？")
    rather than a question of its own ("持有读者证每次最多可以借阅多少册图书？")."""
    text = unicodedata.normalize("NFKC", question).strip()
    if _REFERS_BACK.match(text) or _strip_tail(text) != text.rstrip().rstrip("？?。！!").rstrip() and len(text) <= 12:
        return True
    frame = question_frame(text)
    return len(normalise(text)) < 6 or (not frame.constraints and len(frame.subject) < 2)


def user_turns(history: list[dict]) -> list[dict]:
    """The user/assistant messages of a history that have content (system messages are ours)."""
    return [m for m in history if m.get("role") in ("user", "assistant") and m.get("content")]


def rule_rewrite(question: str, history: list[dict], use_llm: bool) -> str | None:
    """The standalone question by rule, or None when only an LLM can rewrite it.

    Args:
        question: the follow-up.
        history: earlier turns as ``[{"role", "content"}]``.
        use_llm: whether an LLM is there to rewrite what the rules cannot (the extractive
            backend has none: it then carries the previous question's words instead).
    """
    turns = user_turns(history)
    if not turns:
        return question
    previous = ""
    for m in turns:  # the previous user question made standalone by the same rule
        if m["role"] == "user":
            previous = resolve_followup(str(m["content"]), previous) if previous else str(m["content"])
            previous = previous or str(m["content"])
    substituted = resolve_followup(question, previous) if previous else None
    if substituted:
        return substituted
    if use_llm:
        return None
    if not is_elliptical(question):
        return question  # a question that stands on its own is not mixed with the last one
    # No LLM: carry the previous question's words so the retriever keeps the topic.
    # The follow-up's places, years and organisations replace the previous question's.
    kinds = {c.kind for c in question_frame(question).constraints}
    for c in question_frame(previous).constraints:
        if c.kind in kinds:
            previous = previous.replace(c.text, "")
    return f"{previous} {question}".strip()
