"""Evaluation metrics: answer normalisation and matching, retrieval scores, refusals.

Pure functions, no I/O. Used by ``rag.evaluate`` and the benchmarks.

Answer matching follows the RGB rule (every answer part matched by at least one of
its aliases, as a substring of the answer) after a normalisation that makes
equivalent spellings equal:

- NFKC (full-width ``１２３ＡＢＣ，`` → ``123ABC,``), lower case, Traditional → Simplified;
- punctuation and whitespace removed (a decimal point between digits and ``%`` kept,
  thousands separators ``1,296`` dropped);
- Chinese numerals → Arabic (``一千二百九十六`` → ``1296``, ``两`` → ``2``,
  ``二〇二四`` → ``2024``, ``百分之三十`` → ``30%``), and 万/亿 after a number expanded
  so ``3万``, ``三万`` and ``30000`` are equal; ``1.57亿`` and ``1.57亿元`` both
  become ``157000000…`` so the alias still matches inside the longer answer.

A numeric alias must not match inside a longer number (``12人`` does not match ``112人``).
"""
from __future__ import annotations

import math
import re
import unicodedata
from collections.abc import Callable, Iterable, Sequence
from decimal import Decimal, InvalidOperation

from rag import zh
from rag.zh import MARKER

# ----------------------------------------------------------------------------- normalisation
_DIGITS = {
    "零": 0, "〇": 0, "○": 0, "一": 1, "壹": 1, "二": 2, "贰": 2, "貳": 2, "两": 2, "兩": 2,
    "三": 3, "叁": 3, "參": 3, "四": 4, "肆": 4, "五": 5, "伍": 5, "六": 6, "陆": 6, "陸": 6,
    "七": 7, "柒": 7, "八": 8, "捌": 8, "九": 9, "玖": 9,
}
_SMALL_UNITS = {"十": 10, "拾": 10, "百": 100, "佰": 100, "千": 1000, "仟": 1000}
_BIG_UNITS = {"万": 10**4, "萬": 10**4, "亿": 10**8, "億": 10**8}
_CN_CHARS = "".join(_DIGITS) + "".join(_SMALL_UNITS) + "".join(_BIG_UNITS)
_ARABIC = r"\d+(?:\.\d+)?"
# A number expression: starts with a digit (Arabic or Chinese) or 十, then digits and units.
# Units alone (千岛湖, 万一) are words, not numbers, and stay as they are.
_NUMBER = re.compile(
    rf"(?:{_ARABIC}|[{''.join(_DIGITS)}十拾])(?:{_ARABIC}|[{_CN_CHARS}])*"
)
_PERCENT = re.compile(rf"百分之((?:{_ARABIC}|[{_CN_CHARS}])+)")
_THOUSANDS = re.compile(r"(?<=\d),(?=\d{3}(?!\d))")
_KEEP_PUNCT = {"%"}


def _format(value: Decimal) -> str:
    text = format(value.normalize(), "f")
    return text.rstrip("0").rstrip(".") if "." in text else text


def chinese_number(expr: str) -> str | None:
    """Value of a number expression mixing Chinese numerals and Arabic digits, as text.

    ``一千二百九十六`` → ``1296``, ``两万三千`` → ``23000``, ``一千二`` → ``1200``,
    ``一千零二`` → ``1002``, ``1.57亿`` → ``157000000``, ``二〇二四`` → ``2024``, ``十五`` → ``15``.
    Returns None for text without Chinese numerals (plain Arabic is left alone).
    """
    if not any(ch in _CN_CHARS for ch in expr):
        return None
    tokens = re.findall(rf"{_ARABIC}|[{_CN_CHARS}]", expr)
    if not any(t in _SMALL_UNITS or t in _BIG_UNITS for t in tokens):
        # digit by digit: 二〇二四 → 2024, 一九 → 19
        return "".join(t if t[0].isdigit() else str(_DIGITS[t]) for t in tokens)
    total = Decimal(0)  # completed 亿/万 groups
    section = Decimal(0)  # value below 万 of the group being read
    current: Decimal | None = None  # the last digit(s) read
    last_unit = 0
    after_zero = False
    for tok in tokens:
        if tok[0].isdigit():
            try:
                current = Decimal(tok)
            except InvalidOperation:
                return None
        elif tok in _DIGITS:
            if _DIGITS[tok] == 0:
                after_zero, current = True, None
            else:
                current = Decimal(_DIGITS[tok])
        elif tok in _SMALL_UNITS:
            section += (current if current is not None else Decimal(1)) * _SMALL_UNITS[tok]
            current, last_unit, after_zero = None, _SMALL_UNITS[tok], False
        else:  # 万 / 亿
            section += current or 0
            unit = _BIG_UNITS[tok]
            total = (total + section) * unit if unit == 10**8 else total + section * unit
            section, current, last_unit, after_zero = Decimal(0), None, unit, False
    if current is not None:
        # 一千二 = 1200, 两万三 = 23000: a bare trailing digit counts in the next lower unit
        if last_unit >= 100 and not after_zero and tokens[-1] in _DIGITS:
            current *= Decimal(last_unit) / 10
        section += current
    return _format(total + section)


def _replace_numbers(text: str) -> str:
    text = _PERCENT.sub(lambda m: (chinese_number(m.group(1)) or m.group(1)) + "%", text)
    return _NUMBER.sub(lambda m: chinese_number(m.group()) or m.group(), text)


def normalize_answer(text: str, numbers: bool = True) -> str:
    """Canonical form of an answer or alias for matching (see the module docstring).

    Args:
        text: answer or alias.
        numbers: convert Chinese numerals and expand 万/亿 (``numbers=False`` keeps them as
            written, for RGB's plain substring rule: "60.39" in "60.39亿").
    """
    text = zh.simplified(str(text)).lower()  # NFKC, Traditional → Simplified (rag.zh)
    text = _THOUSANDS.sub("", text)
    if numbers:
        text = _replace_numbers(text)
    out = []
    for i, ch in enumerate(text):
        cat = unicodedata.category(ch)
        if ch.isspace() or cat[0] in "ZC":
            continue
        if cat[0] in "PS" and ch not in _KEEP_PUNCT:
            if ch == "." and 0 < i < len(text) - 1 and text[i - 1].isdigit() and text[i + 1].isdigit():
                out.append(ch)
            continue
        out.append(ch)
    return "".join(out)


def contains(haystack: str, needle: str) -> bool:
    """Substring test on normalised text where a number never matches inside a longer number."""
    if not needle:
        return False
    start = haystack.find(needle)
    while start >= 0:
        end = start + len(needle)
        before_ok = not (needle[0].isdigit() and start > 0 and (haystack[start - 1].isdigit()
                                                                  or haystack[start - 1] == "."))
        after_ok = not (needle[-1].isdigit() and end < len(haystack) and (
            haystack[end].isdigit() or (haystack[end] == "." and end + 1 < len(haystack)
                                        and haystack[end + 1].isdigit())))
        if before_ok and after_ok:
            return True
        start = haystack.find(needle, start + 1)
    return False


def answer_correct(answer: str, answer_parts: Sequence[Sequence[str]] | Sequence[str]) -> bool:
    """True when every part is matched by at least one of its aliases after normalisation.

    Args:
        answer: the generated answer.
        answer_parts: ``[[alias, ...], ...]``; a flat ``[alias, ...]`` is one part with aliases.
            No parts at all → False (nothing can be checked).
    """
    parts = [list(p) if not isinstance(p, str) else [p] for p in answer_parts]
    if answer_parts and all(isinstance(p, str) for p in answer_parts):
        parts = [list(answer_parts)]
    parts = [p for p in parts if any(str(a).strip() for a in p)]
    if not parts:
        return False
    # "189[1]" must not read as 1891: citation markers are not part of the answer
    text = MARKER.sub(" ", answer)
    norm, plain = normalize_answer(text), normalize_answer(text, numbers=False)

    def matched(alias: str) -> bool:  # numbers compared as values (3万 = 30000), or as written (RGB's rule)
        return contains(norm, normalize_answer(alias)) or contains(plain, normalize_answer(alias, numbers=False))

    return all(any(matched(alias) for alias in part if str(alias).strip()) for part in parts)


# ----------------------------------------------------------------------------- refusals
is_refusal = zh.is_refusal  # one refusal detector for the answer step and the metrics (rag.zh)


# ----------------------------------------------------------------------------- retrieval
def hit_at(flags: Sequence[bool], k: int) -> float:
    """1.0 when any of the first ``k`` results is relevant."""
    return 1.0 if any(flags[:k]) else 0.0


def mrr_at(flags: Sequence[bool], k: int = 10) -> float:
    """Reciprocal rank of the first relevant result within the first ``k`` (0 if none)."""
    for rank, flag in enumerate(flags[:k], 1):
        if flag:
            return 1.0 / rank
    return 0.0


def recall_at(ranked_units: Sequence[Iterable[str]], gold: Iterable[str], k: int = 10) -> float:
    """|gold ∩ distinct gold found in the first k| / |gold|.

    Args:
        ranked_units: for each result, best first, the gold items it covers (empty = irrelevant).
        gold: all gold items of the question (ids, or quote keys).
    """
    gold = set(gold)
    if not gold:
        return 0.0
    found = set()
    for units in ranked_units[:k]:
        found.update(units)
    return len(found & gold) / len(gold)


def all_groups_at(ranked_ids: Sequence[str], groups: Sequence[Sequence[str]], k: int = 10,
                  match: Callable[[str, str], bool] | None = None) -> float:
    """1.0 when every evidence group has at least one member among the first ``k`` ids."""
    if not groups:
        return 0.0
    top = list(ranked_ids[:k])
    match = match or (lambda a, b: a == b)
    return 1.0 if all(any(match(r, g) for r in top for g in group) for group in groups) else 0.0


def retrieval_metrics(flags: Sequence[bool], ks: Iterable[int] = (1, 3, 5, 10), depth: int = 10) -> dict[str, float]:
    """``hit@k`` for each k and ``mrr@depth`` from a ranked list of relevance flags."""
    flags = [bool(f) for f in flags]
    scores = {f"hit@{k}": hit_at(flags, k) for k in ks}
    scores[f"mrr@{depth}"] = mrr_at(flags, depth)
    return scores


def mean(values: Iterable[float]) -> float | None:
    values = list(values)
    return sum(values) / len(values) if values else None


def percentile(values: Iterable[float], p: float) -> float | None:
    """The ``p``-th percentile (0–100) with linear interpolation (numpy's default); None if empty."""
    data = sorted(float(v) for v in values)
    if not data:
        return None
    if not 0 <= p <= 100:
        raise ValueError(f"percentile must be in [0, 100], got {p}")
    pos = (len(data) - 1) * p / 100
    lo, hi = math.floor(pos), math.ceil(pos)
    return data[lo] + (data[hi] - data[lo]) * (pos - lo)
