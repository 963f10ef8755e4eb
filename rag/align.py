"""Step 8a (2/2) — align: is a passage about what the question asks?

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

from rag.frame import Constraint, QuestionFrame, question_frame  # noqa: F401 (question_frame re-exported)
from rag.places import dominant_place, names_other_place, place_names, pos_tagger, word_frequencies  # noqa: F401
from rag.zh import MARKER, bigrams, is_question, normalise, sentence_spans, simplified
from rag.zh import NUMBER as _NUMBER

# A number stated as a plan or forecast does not answer what happened (特斯拉2022年的交付量需要超过140万辆).
_FORECAST = re.compile(r"预计|预期|计划|目标|需要|有望|力争|将达|将超|或将|规划|预测|估计|可能")

_ASKS_FORECAST = re.compile(r"预计|预期|计划|目标|规划|预测|估计")

KEY_TERM_FREQUENCY = 100  # see key_terms; measured on the answerable and unanswerable sets (README)

_YEAR_IN_CLAUSE = re.compile(r"(?<!\d)(\d{4})\s*年")

CLAUSE_OR_SENTENCE = re.compile(r"[^，,；;。！？!?]+")

# Offices, written next to the holder's name in Chinese news (统战部部长 杨永章, 总理阿尔巴内塞).
# Creative and sporting roles (导演, 主演, 冠军) are said in too many ways (由韩寒执导) to check so.
_INSTITUTION = re.compile(r"[委部局厅院校会党府省市县区州镇乡村队团司]$")
_ROLE = re.compile(r"(?:长|书记|主任|主席|总裁|总统|总理|首相|委员|经理|董事|大使|发言人|执行官|CEO|ceo)$")

_HAS_AMOUNT = re.compile(r"\d|百分之|[零〇一二两三四五六七八九十百千万亿]{2,}"
                         r"|[零〇一二两三四五六七八九十百千万亿]+(?:余|多)?[个位名项家次场人条所种天年月届倍成元部支期批座户亿万%]")

_HAS_TIME = re.compile(r"\d|[一二三四五六七八九十]+月|[上下]旬|年初|年底|年末|年中|当天|今年|去年|明年|前年|日前")

# "与2019年持平", "较2020年下降": a year named as a comparison does not date the sentence.
_COMPARISON = re.compile(r"(?:与|比|较|同比|相比|对比|超过|低于|高于|不及|超出)\s*(?:19|20)\d{2}\s*年?(?:同期)?")

_ANY_YEAR = re.compile(r"(?<!\d)(?:19|20)\d{2}(?!\d)")

_ANY_DATE = re.compile(r"\d{1,2}月\d{1,2}[日号]")

# Ways news names a winner: 冠军 ~ 金牌得主 ~ 夺冠 ~ 夺得金牌.
_WINNER = re.compile(r"冠军|金牌|夺冠|夺金|得主|折桂|第一名|摘得桂冠")


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


def _mentions(text_norm: str, constraint: Constraint) -> bool:
    if constraint.kind == "number":
        return any(re.search(rf"(?<![\d.]){re.escape(f)}(?![\d])", text_norm) for f in constraint.forms)
    return any(form in text_norm for form in constraint.forms)


def _time_contradicted(constraint: Constraint, text: str) -> bool:
    """A time the text does not state is missing only when the text dates itself otherwise:
    news says 今年 or 全年 as often as 2021年, but "2020年…" answers no question about 2021."""
    if re.search(r"月\s*\d", constraint.text):
        return bool(_ANY_DATE.search(text))
    if re.search(r"\d{4}", constraint.text):
        return bool(_ANY_YEAR.search(text))
    return True  # 上半年, 一季度: must be said


def _named_earlier(group: list[Constraint], prefix: str, frame: QuestionFrame) -> bool:
    """The passage named the term before the answer, and (for a place) named no other place
    since: an encyclopedia paragraph says 韓國 once, in its first sentence; a report that moves
    on from 杭州 to 温州 is about 温州 after that."""
    text = simplified(prefix).lower()
    found = [(text.rfind(form), form) for c in group for form in c.forms if form and text.rfind(form) >= 0]
    if not found:
        return False
    at, form = max(found)
    return not _names_other_place(text[at + len(form):], frame)


def missing_constraints(frame: QuestionFrame, text: str, evidence: str | None = None,
                        prefix: str = "") -> list[str]:
    """Constraint terms (one per coordinated group) that ``text`` does not mention.

    A year or date counts as missing only when ``evidence`` (the sentence holding the answer;
    default ``text``) states another one (``_time_contradicted``); the national scope
    (我国, 全国) only when ``text`` names a particular place instead; a place only when the
    passage before the answer (``prefix``) did not name it either (``_named_earlier``).
    """
    norm = normalise(text)
    flat = unicodedata.normalize("NFKC", text if evidence is None else evidence)
    missing = []
    for group in frame.groups:
        if any(_mentions(norm, c) for c in group):
            continue
        if prefix and all(c.kind == "place" for c in group) and _named_earlier(group, prefix, frame):
            continue
        if all(c.kind == "time" for c in group) and not any(_time_contradicted(c, flat) for c in group):
            continue
        if all(c.kind == "national" for c in group) and not _names_other_place(text, frame):
            continue
        missing.append(" / ".join(c.text for c in group))
    return missing


def key_terms(frame: QuestionFrame, max_frequency: int = KEY_TERM_FREQUENCY) -> list[str]:
    """Subject nouns rare in general Chinese (jieba's dictionary frequency below
    ``max_frequency``): 寺庙, 冬残奥会, 服务站. They say *which* event or thing is asked
    about, so the evidence must name them, where 事故 or 增长 may be paraphrased, and
    verbs (仰赖 ~ 依据, 插秧) or amounts (两成) are said in other words.

    Left out: the head of the asked-for thing, which ``target_named`` checks where
    the answer stands (with several items, "多少服务站、多少品牌", each clause answers one).
    """
    freq = word_frequencies()
    # the head is checked where the answer stands (target_named); the category is the answer's kind
    asked_for = {t[-1] for t in frame.target} | set(frame.category)
    return [w for w in frame.nouns
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


def target_named(frame: QuestionFrame, sentence: str, window: str | None = None) -> bool:
    """The evidence names an asked-for thing: its head word in ``sentence`` (or half of the
    head's bigrams: "资金投入" is named by "投入资金"), and a third of the whole phrase's
    bigrams ("人均可支配收入" is not named by "村集体经营性收入").

    For a person asked for, the head may be said another way (金牌得主 ~ 冠军: one bigram, or
    any winner word, in ``sentence``) and the phrase may sit in ``window`` (the sentence with
    the one before it).
    """
    if not frame.target or not frame.asks:
        return True  # "X的国籍是哪个国家" is answered by "X是一名巴西足球运动员": no head to check
    norm, grams = normalise(sentence), bigrams(sentence)
    wide = bigrams(window) if window else grams
    checked = False
    for words in frame.target:
        if frame.asks == "who" and _ROLE.search(words[-1]):
            return True  # an office is checked where the name stands (names_person_in_role)
        head, phrase = bigrams(words[-1]), bigrams("".join(words))
        if frame.asks == "who":
            # a winner must be said to have won, where the name is; an author, a director or a
            # flag-bearer is named in too many ways (《战栗游戏》是史蒂芬·金的小说) for its head
            if not _WINNER.search(words[-1]):
                continue  # key terms still name the event (冬残奥会)
            head_named, phrase_grams = bool(_WINNER.search(sentence)), wide
        else:
            head_named = words[-1] in norm or (len(head) > 1 and len(head & grams) >= 0.5 * len(head))
            phrase_grams = grams
        checked = True
        if head_named and len(phrase & phrase_grams) >= len(phrase) / 3:
            return True
    return not checked


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
            institutions = [q for q in role[:-1] if _INSTITUTION.search(q)]  # 市委, not 新任 or 首席
            qualified = all(q in lead or q in around for q in institutions) and all(
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


def _anchor_sentences(clause: str, sentences: list[str], question: str) -> list[int]:
    """Indexes of the passage ``sentences`` that hold the clause's answer: those containing its
    numbers not taken from the question, else the one covering most of its new bigrams."""
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
    if frame.asks == "place" and not _names_a_place(said):
        return Alignment(False, reason="the question asks where; the clause names no place")
    anchors = _anchor_sentences(clause, sentences, frame.question)
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
            prefix = passage[:spans[i][1]]  # the passage up to the answer
            missing = tuple(missing_constraints(frame, scope, _COMPARISON.sub(" ", window), prefix))
            norm_scope, scope_grams = normalise(scope), bigrams(scope)
            missing += tuple(w for w in key_terms(frame) if not names_term(w, norm_scope, scope_grams))
            # The subject may be named in the sentence before (a heading, an FAQ's question);
            # the asked-for thing of an amount must be named where the number is.
            overlap = subject_overlap(frame, window)
            on_target = target_named(frame, sentence if frame.asks in ("quantity", "time", "who") else window, window)
            person = names_person_in_role(frame, sentence, body, context)
            about_number = _number_clause_problem(frame, sentence, body)
            # An amount or a date must be about the asked subject ("another quantity of the same
            # subject"); a fact or a name is often stated without the question's words
            # ("X的国籍" → "X是一名巴西足球运动员").
            if frame.asks not in ("quantity", "time") or len(frame.subject) < 2:
                overlap = max(overlap, min_subject)  # one word (剩下) is too easily paraphrased (仅存)
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


def _names_other_place(text: str, frame: QuestionFrame) -> bool:
    """``text`` names a place the question does not ask about."""
    return names_other_place(text, {form for c in frame.constraints for form in c.forms})


def _names_a_place(text: str) -> bool:
    """A place name (jieba's place tag, or a gazetteer name inside a word: 山西人) is in ``text``."""
    norm = normalise(text)
    return any(w.flag == "ns" for w in pos_tagger().cut(simplified(text))) or any(n in norm for n in place_names())
