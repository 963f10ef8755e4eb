"""Chinese text rules shared by every step: sentences, clauses, citation markers,
normalisation, question words and the refusal text.

One place for them, so the splitter, the verifier, the focus step, the aligner and
the metrics read a sentence, a ``[n]`` or a refusal the same way.
"""
from __future__ import annotations

import re
import unicodedata
from decimal import ROUND_HALF_UP, Decimal
from functools import lru_cache

REFUSAL = "文档中没有找到相关信息"

# Han ideographs (CJK Unified, Extension A, Compatibility), for a character class: f"[{CJK}]".
CJK = "\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff"
# What ends a sentence; closing quotes and brackets right after it still belong to it
# (“……增长5%。”). The chunker also ends a sentence at an ellipsis (ELLIPSIS).
SENTENCE_END = "。！？!?；;"
CLOSING = "”」』）)"
ELLIPSIS = "…"
# What a sentence or clause may end with that a citation goes before: "……增长5%[1]。"
TRAILING_PUNCT = SENTENCE_END + "，,"

# A citation marker: [1], [1,2], 【1】, ［1、2］ (an optional space before it).
# (?<!\s) keeps it linear: without it a long run of spaces is re-scanned from every position.
MARKER = re.compile(r"(?<!\s)\s*[\[【［](\d{1,2}(?:\s*[,，、]\s*\d{1,2})*)[\]】］]")
# A sentence (as the verifier, focus and aligner read one) ends at SENTENCE_END or a line
# break; closing quotes and the markers after its end stay with it.
SENTENCE = re.compile(rf"[^{SENTENCE_END}\n]+(?:[{SENTENCE_END}]+[{CLOSING}]*(?:{MARKER.pattern})*)?")
# A sentence as the chunker cuts a document: every character belongs to one span (line breaks
# to the sentence before them); an ellipsis ends one too, and so does a Latin full stop
# followed by a space (not the one in "3.1亿").
SENTENCE_CUT = re.compile(
    rf"(?:[^{SENTENCE_END}{ELLIPSIS}\n.]|\.(?!\s))*(?:[{SENTENCE_END}{ELLIPSIS}]+[{CLOSING}]*|\.+(?=\s)|\n+|$)")
# A clause ends at a comma or colon too.
CLAUSE = re.compile(r"[^，,：:]+[，,：:]*")
NUMBER = re.compile(r"\d+(?:\.\d+)?")
_DROP = re.compile(r"[\s\W_]+", re.UNICODE)
# Function words that say nothing about support.
_FILLER = set("的了是在和与及也就都而且或被把对为这那个")
# Words that ask rather than say: no evidence that a sentence is on topic.
QUESTION_WORDS = re.compile(
    r"多少|多长|多高|多大|多远|多久|多重|多宽|多深|什么时候|什么|哪些|哪个|哪里|哪一|哪|怎么样|怎样|怎么|如何|为什么"
    r"|是否|是谁|谁|吗|呢|请问|几")

# What a declining answer says (the model's own wording varies).
_REFUSAL = re.compile(
    r"文档中没有找到|没有找到相关信息|资料中没有|资料未提及|无法从资料|未提供相关信息|没有提到|未提及"
    r"|(文档|资料|材料|上下文|参考|检索|提供的(内容|信息|文本)|已知信息|知识库)[^。！？\n]{0,12}"
    r"(没有|未|并未|并没有|不)[^。！？\n]{0,6}(找到|提到|提及|包含|涉及|给出|记载|说明|相关|有关|这方面)"
    r"|(没有|未|无法)(找到|检索到|查到)[^。！？\n]{0,8}(相关|有关|答案|信息|内容)"
    r"|无法(根据|从|依据)[^。！？\n]{0,16}(回答|确定|得出|得知|判断|找到)"
    r"|(无法|不能)回答|信息不足|缺乏相关信息|没有相关信息|暂无相关信息|不知道"
    r"|i (do not|don't) know|not (found|mentioned|provided) in the (documents?|context)"
    r"|insufficient information|cannot (be )?answer",
    re.IGNORECASE,
)


@lru_cache(maxsize=1)
def t2s():
    """Traditional → Simplified converter (identity when OpenCC is missing)."""
    try:
        import opencc

        return opencc.OpenCC("t2s").convert
    except Exception:
        return lambda text: text


def is_refusal(text: str) -> bool:
    """True when an answer declines (「文档中没有找到相关信息」, 「无法根据提供的文档回答」…) or is empty."""
    if not text or not text.strip():
        return True
    return bool(_REFUSAL.search(t2s()(unicodedata.normalize("NFKC", text))))


def simplified(text: str) -> str:
    """NFKC and Traditional → Simplified: the form jieba, the gazetteer and the rules read."""
    return t2s()(unicodedata.normalize("NFKC", text))


def normalise(text: str) -> str:
    """NFKC, Simplified, lower case, without spaces and punctuation (for overlap tests):
    a Simplified answer (英国) matches a Traditional passage (英國)."""
    return _DROP.sub("", simplified(text).lower())


def bigrams(text: str) -> set[str]:
    """Character bigrams of ``normalise(text)`` (pairs of function words left out)."""
    t = normalise(text)
    if len(t) < 2:
        return {t} if t else set()
    return {t[i:i + 2] for i in range(len(t) - 1) if not (t[i] in _FILLER and t[i + 1] in _FILLER)}


def sentence_spans(text: str) -> list[tuple[int, int]]:
    """``[start, end)`` of each sentence of ``text`` (line breaks end sentences too)."""
    return [m.span() for m in SENTENCE.finditer(text) if normalise(MARKER.sub("", m.group()))]


def split_sentences(text: str) -> list[str]:
    """The sentences of ``text`` (``sentence_spans``), as strings."""
    return [text[a:b] for a, b in sentence_spans(text)]


def split_trailing(text: str) -> tuple[str, str]:
    """``(head, tail)``: ``text`` without, and its closing ``TRAILING_PUNCT`` (where markers go)."""
    head = text.rstrip(TRAILING_PUNCT)
    return head, text[len(head):]


def marker_numbers(marker: re.Match) -> list[int]:
    """The passage numbers of a ``MARKER`` match, in order: ``[1、3]`` → ``[1, 3]``."""
    return [int(n) for n in re.findall(r"\d+", marker.group(1))]


def has_number(text: str, number: str) -> bool:
    """``number`` (e.g. ``"3.1"``) occurs in ``text`` as a whole number, not inside a longer
    one (``12`` is not in ``112`` or ``3.12``). Compare NFKC text (full-width digits)."""
    return re.search(rf"(?<![\d.]){re.escape(number)}(?!\d)", text) is not None


def is_question(sentence: str) -> bool:
    """A sentence that asks (ends with ？ / ?): an FAQ's question line, not an answer."""
    return bool(re.search(r"[？?]\s*$", MARKER.sub("", sentence)))


def not_found(part: str) -> str:
    """What an answer says for a part of a compound question the documents do not answer."""
    return f"文档中没有找到“{part.strip().rstrip('?？。')}”的相关信息。"


# How a short answer lists several items: 海清、童瑶、张颂文 / A和B. A number keeps its commas.
_ITEM_SEPARATOR = re.compile(r"\s*(?:[、，,；;/]|以及)\s*")
_QUOTES = "《》「」『』“”\"'〈〉"
_NO_ANSWER = re.compile(r"^(无|没有|未知|不知道|none|n/?a)$", re.IGNORECASE)


# The measure word a question asks a count in: 多少所学校 → 所, 几个 → 个 (not 多少的 / 多少?).
_ASKED_UNIT = re.compile(rf"(?:多少|几)\s*([{CJK}])")
_NOT_UNITS = set("的是呢吗啊呀了")


def _one_decimal_less(piece: str) -> str:
    """``piece`` with its figure of five digits or more (``5545.52``) rounded to one decimal
    less (``5545.5``); "" when it has none."""
    figure = re.search(r"(?<![\d.])(\d+)\.(\d{2,})(?![\d.])", piece)
    if not figure or len(figure.group(1) + figure.group(2)) < 5:
        return ""
    decimals = len(figure.group(2)) - 1
    value = Decimal(figure.group(0)).quantize(Decimal(1).scaleb(-decimals), rounding=ROUND_HALF_UP)
    return piece[:figure.start()] + str(value) + piece[figure.end():]


def answer_items(answer: str, question: str = "") -> list[list[str]]:
    """The items of a short answer (an LLM's, ``rag.answer_probe``), each with the forms a
    passage may write it in (Simplified, NFKC: compare with ``simplified(text)``): ``2022年1月3日`` also as ``1月3日``, ``18.0%`` as ``18%``,
    ``2,213,795`` as ``2213795``, a figure of five digits or more with its last decimal rounded
    away (``5545.52亿`` as ``5545.5亿``: reports round large figures, and a ratio like ``7.52``
    is kept exact), 《满江红》 as 满江红, and a bare number with the measure word
    ``question`` asks it in (6 for 多少所学校: 6所). Empty for "无" and for a sentence (longer than
    30 characters: not a short answer)."""
    unit = _ASKED_UNIT.search(simplified(question))
    unit = unit.group(1) if unit and unit.group(1) not in _NOT_UNITS else ""
    text = simplified(answer).strip().strip("。.，,；;:：!！ ")
    if not text or len(text) > 30 or _NO_ANSWER.match(text) or is_refusal(text):
        return []
    pieces = [text] if re.fullmatch(r"[\d,.]+", text) else _ITEM_SEPARATOR.split(text)
    items = []
    for piece in pieces:
        piece = piece.strip().strip(_QUOTES).strip()
        if not piece:
            continue
        forms = {piece, re.sub(r"(\d)\.0+(?!\d)", r"\1", piece)}
        if re.fullmatch(r"\d{1,3}(?:,\d{3})+(?:\.\d+)?", piece):
            forms.add(piece.replace(",", ""))
        if rounded := _one_decimal_less(piece):
            forms.add(rounded)
        if unit and re.fullmatch(r"\d+(?:\.\d+)?", piece):
            forms.add(piece + unit)
        month_day = re.fullmatch(r"\d{4}\s*年\s*(\d{1,2}\s*月.*)", piece)
        if month_day:
            forms.add(month_day.group(1))
        items.append(sorted(forms, key=len, reverse=True))
    return items
