"""Step 8a (1/2) — frame: what a question asks, read so evidence can be checked against it.

- **constraints**: places (jieba's POS tags plus the gazetteer of ``rag.places``), organisations,
  people, quoted names, times (2021年, 11月23日, 上半年, "2021-2022赛季"), numbers that identify
  the thing asked about (男子1500米), the national scope (我国, 全国);
- the **subject**: the remaining content words;
- the **target**: per asked-for item, the subject words that name it (多少个**服务站**,
  **部长**是谁), head last;
- what kind of answer is **asked**: an amount, a time, a person.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from functools import lru_cache

from rag.places import PLACE_SUFFIX, place_names, pos_tagger, word_frequencies
from rag.zh import MARKER, QUESTION_WORDS, normalise, simplified
from rag.zh import NUMBER as _NUMBER

# jieba POS tags that name a specific thing the evidence must be about.
# ("j", abbreviations, is left out: jieba gives it to 一共 and 政企 as much as to 冬奥会.)
_ENTITY_TAGS = {"ns": "place", "nt": "org", "nr": "person", "nrt": "person", "nrfg": "person",
                "nz": "name", "eng": "name"}

# Time expressions, longest first: 2021年11月23日, 2021年, 11月23日, 上半年, 一季度, 前三季度...
_TIME = re.compile(
    r"\d{4}\s*[-–—/至到]\s*\d{2,4}(?:\s*(?:赛季|年度|财年|学年|年))?|(?:19|20)\d{2}(?=[\u4e00-\u9fff])(?!年)|\d{4}\s*年(?:\s*\d{1,2}\s*月(?:\s*\d{1,2}\s*[日号])?)?|\d{1,2}\s*月\s*\d{1,2}\s*[日号]|\d{1,2}\s*月份?"
    r"|\d{4}(?=\s*(?:年|届|赛季|财年))|[上下]半年|[前后]?[一二三四1-4]\s*季度|第[一二三四1-4]\s*季度")

# A number that identifies what is asked about (男子1500米, iPhone SE 3): the evidence must carry
# it, and not only inside a longer number (500米, 3000元). One digit counts only after a Latin
# name: "3人" is as often written 三人; "00:30:00" is a time, not an identifier.
_QUESTION_NUMBER = re.compile(r"(?<![\d.:])(?:\d{2,}(?:\.\d+)?|(?<=[A-Za-z])\s?\d)(?![\d.:])")

# An ordinal identifies which one is asked about (第六任行政长官, 第三艘核潜艇, 第31任总理).
_ORDINAL = re.compile(r"第[一二三四五六七八九十百零〇两\d]+[任届次季期代轮艘个位名]")
_NATIONAL = re.compile(r"我国|全国|中国|国内")

_NATIONAL_FORMS = ("中国", "全国", "我国", "国内", "国家")

# A place followed by an institution is one organisation (湖州学院 is not 湖州师范学院): the
# evidence must name it whole, not the place and the word 学院 apart.
_INSTITUTION = re.compile(r"(?:师范|理工|科技|工业|农业|医科|财经|职业技术|职业|技术)?"
                          r"(?:学院|大学|中学|小学|医院|研究院|研究所|银行|集团)$")

_QUOTED = re.compile(r"[“\"《「『]([^”\"》」』]{2,20})[”\"》」』]")

# Coordination between two constraints of one kind: either may be the one a clause is about.
_COORDINATION = re.compile(r"^\s*(?:和|与|及|以及|跟|同|或|或者|还是|、|，|,|/)\s*$")
# A question that asks for an amount, or a time, or a person.
_ASKS_QUANTITY = re.compile(r"(?:人数|数量|金额|价格|售价|票价|产量|销量|交付量|票房|规模|总额|增速|增幅|增长率|出生率|死亡率|失业率|利率|涨幅|跌幅|营收|收入|利润|GDP|总值|排名|数)[？?]?$|多少|几[个位名项家次场人条所种天年月届倍成]|多长|多高|多大|多远|多重|多宽|多深|比例|百分之|增长率|增速")
_ASKS_TIME = re.compile(r"哪年|哪一年|哪天|何时|什么时候|什么时间|几月|几号|时间[？?]?$|的时间|日期")
_ASKS_PLACE = re.compile(r"在哪里|在哪儿|哪里|何地|何处|地点|位于哪")
_ASKS_WHO = re.compile(r"是谁|谁是|哪位|姓名|叫什么名字|由谁")
# Where the asked-for thing is named: after 多少/几 (+ measure word), or before 是谁/是多少/叫什么.
_TARGET_AFTER = re.compile(
    r"(?:多少|几)[个位名项家次场人条所种天年月届倍成元部支期批座户]?(.{2,12}?)(?=[？?。，,、；;]|和|以及|及|与|多少|几|$)")
_TARGET_BEFORE = re.compile(r"([^，,。？?]{2,10}?)(?:是谁|叫什么|是什么|是多少|有多少|增长了?多少|多少|的?时间|日期|是哪|在哪|什么时候)")
_CATEGORY = re.compile(r"(?:什么|哪一?种|哪一?个|哪一?类|哪一?间|哪些|哪一?方|哪一?项)(.{1,8}?)(?=[？?。，,的是在与和]|$)")
_NOUN_TAGS = ("n", "j", "l", "i", "x")  # jieba tags of nouns, names, abbreviations, idioms, unknown words
# Words that carry no subject: function words and words of asking.
_STOP_WORDS = set("的 了 是 在 和 与 及 也 就 都 而 或 被 把 对 为 这 那 个 有 共 共有 一共 总共 目前 现在 已经"
                  " 分别 各 其 该 之 等 中 年 月 日 时间 情况 数量 人数 多少".split())


@dataclass(frozen=True)
class Constraint:
    """A term of the question the evidence must mention.

    Attributes:
        text: the term as written in the question.
        kind: ``place``, ``org``, ``person``, ``name``, ``quoted`` or ``time``.
        forms: normalised spellings any one of which counts (宜昌市 → 宜昌市, 宜昌).
        group: constraints with the same group are alternatives ("襄阳和宜昌").
    """

    text: str
    kind: str
    forms: tuple[str, ...]
    group: int


@dataclass(frozen=True)
class QuestionFrame:
    """What a question is about: its constraints and the words of its subject."""

    question: str
    constraints: tuple[Constraint, ...]
    subject: tuple[str, ...]  # normalised content words (统战工作, 服务站, 设立)
    # Per asked-for item, its subject words, head last: (("基层", "统战", "品牌"),), (("部长",),)
    target: tuple[tuple[str, ...], ...] = ()
    asks: str = ""  # "quantity", "time", "who", "place" or "" (a fact, a name of a thing...)
    category: tuple[str, ...] = ()  # subject words after 什么/哪种: the kind of answer (族群, 方法)
    nouns: tuple[str, ...] = ()  # subject words tagged as nouns or names (not verbs: 仰赖, 插秧)

    @property
    def groups(self) -> list[list[Constraint]]:
        by_group: dict[int, list[Constraint]] = {}
        for c in self.constraints:
            by_group.setdefault(c.group, []).append(c)
        return list(by_group.values())


def _forms(term: str, kind: str) -> tuple[str, ...]:
    norm = normalise(term)
    forms = {norm}
    if kind == "place":
        core = PLACE_SUFFIX.sub("", norm)
        if len(core) >= 2:
            forms.add(core)
    if kind == "time":
        year = re.fullmatch(r"(\d{4})年?", norm)
        if year:
            forms.add(year.group(1))
        date = re.search(r"\d{1,2}月\d{1,2}[日号]", norm)
        if date:  # 2022年1月5日 is also written 1月5日
            forms.add(date.group())
    if kind == "national":
        forms.update(_NATIONAL_FORMS)
    return tuple(sorted(forms, key=len))


def _miscut(word: str) -> bool:
    """A two-character CJK word jieba hardly knows is mostly its mis-cut (中断电会 → 中断/电会)."""
    return len(word) == 2 and bool(re.fullmatch(r"[\u4e00-\u9fff]{2}", word)) and word_frequencies().get(word, 0) < 10


@lru_cache(maxsize=2048)
def question_frame(question: str) -> QuestionFrame:
    """Constraints and subject words of a (standalone) question.

    Args:
        question: the question as retrieval saw it (a rewritten follow-up included).
    """
    text = simplified(MARKER.sub("", question))
    found: list[tuple[int, int, str, str]] = []  # start, end, term, kind
    for m in _TIME.finditer(text):
        found.append((m.start(), m.end(), m.group(), "time"))
    for m in _QUOTED.finditer(text):
        found.append((m.start(1), m.end(1), m.group(1), "quoted"))
    for m in _ORDINAL.finditer(text):
        found.append((m.start(), m.end(), m.group(), "ordinal"))
    for m in _NATIONAL.finditer(text):
        found.append((m.start(), m.end(), m.group(), "national"))
    taken = [(a, b) for a, b, _, _ in found]
    for m in _QUESTION_NUMBER.finditer(text):
        if not any(a <= m.start() < b for a, b in taken):
            found.append((m.start(), m.end(), m.group(), "number"))
    taken = [(a, b) for a, b, _, _ in found]
    subject: list[str] = []
    tags: dict[str, str] = {}
    position = 0
    for word in pos_tagger().cut(text):
        start, end = position, position + len(word.word)
        position = end
        if any(a <= start < b or a < end <= b for a, b in taken):
            continue
        w = word.word.strip()
        if found and found[-1][3] == "place" and found[-1][1] == start and _INSTITUTION.fullmatch(w):
            place_start = found.pop()[0]
            found.append((place_start, end, text[place_start:end], "org"))
            continue
        kind = "place" if w in place_names() else _ENTITY_TAGS.get(word.flag)
        if kind and kind != "place" and word_frequencies().get(w, 0) >= 1000:
            kind = None  # an everyday word jieba happens to tag as a name (福利, 祖先, 东西)
        if kind and len(normalise(w)) >= 2 and not QUESTION_WORDS.search(w):
            found.append((start, end, w, kind))
        elif len(w) >= 2 and w not in _STOP_WORDS and normalise(w) and not QUESTION_WORDS.search(w) \
                and not _NUMBER.fullmatch(w) and not _miscut(w):
            subject.append(normalise(w))
            tags[normalise(w)] = word.flag
    found.sort()
    constraints: list[Constraint] = []
    group = -1
    previous_end, previous_kind = None, None
    for start, end, term, kind in found:
        coordinated = (previous_end is not None and kind == previous_kind
                       and _COORDINATION.match(text[previous_end:start]) is not None)
        if not coordinated:
            group += 1
        constraints.append(Constraint(term, kind, _forms(term, kind), group))
        previous_end, previous_kind = end, kind
    asks = ("quantity" if _ASKS_QUANTITY.search(text) else "time" if _ASKS_TIME.search(text)
            else "who" if _ASKS_WHO.search(text) else "place" if _ASKS_PLACE.search(text) else "")
    subject = list(dict.fromkeys(subject))
    target: list[str] = []
    for pattern in (_TARGET_AFTER, _TARGET_BEFORE):
        for m in pattern.finditer(text):  # one head per asked item ("多少服务站、多少品牌")
            phrase = normalise(m.group(1))
            named = sorted((w for w in subject if w in phrase), key=phrase.find)
            # the head must be a noun (净利润是多少, 多少头), not a verb (逃税了多少钱, 以多少来表示)
            if named and (asks != "quantity" or tags.get(named[-1], "").startswith("n")):
                target.append(tuple(named))  # in phrase order, so the head noun is last (…统战品牌 → 品牌)
        if target:
            break
    target = list(dict.fromkeys(target))
    # What 什么/哪种 asks for (什么族群 → 族群) is the answer's category, rarely its words.
    category = [w for m in _CATEGORY.finditer(text) for w in subject if w in normalise(m.group(1))]
    nouns = [w for w in subject if tags.get(w, "x")[:1] in _NOUN_TAGS or tags.get(w) in ("vn", "eng")]
    return QuestionFrame(question, tuple(constraints), tuple(subject), tuple(target), asks,
                         tuple(dict.fromkeys(category)), tuple(nouns))


def part_labels(parts: list[str]) -> list[str]:
    """What sets each part of a compound question apart from the others, to head its answer
    ("襄阳…服务站?" / "荆门…服务站?" → 襄阳 / 荆门; "2022年的冠军" / "2023年的冠军" → 2022年).

    Its own constraints (places, times, organisations...) first; else the text left when the
    parts' shared beginning and end are cut, widened to whole numbers. Empty when nothing short
    tells them apart (the caller then names the part in full).
    """
    frames = [{c.text for c in question_frame(p).constraints} for p in parts]
    labels = []
    for i, part in enumerate(parts):
        others = set().union(*(f for j, f in enumerate(frames) if j != i)) if len(parts) > 1 else set()
        own = [t for t in frames[i] if t not in others]
        labels.append("、".join(sorted(own, key=part.find)))
    if all(labels):
        return labels
    head = len(_common_prefix(parts))
    tail = len(_common_prefix([p[::-1] for p in parts]))
    labels = []
    for part in parts:
        start, end = head, len(part) - tail
        while start > 0 and part[start - 1].isdigit():
            start -= 1  # never cut a number: 2022 / 2023, not 2 / 3
        while end < len(part) and part[end].isdigit():
            end += 1
        label = part[start:end].strip("，,、和与及 ")
        labels.append(label if 0 < len(label) <= 12 else "")
    return labels if all(labels) else [""] * len(parts)


def _common_prefix(texts: list[str]) -> str:
    first = min(texts, key=len) if texts else ""
    for i, ch in enumerate(first):
        if any(t[i] != ch for t in texts):
            return first[:i]
    return first
