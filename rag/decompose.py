"""Step 6a — decompose: split a question that asks several things into standalone parts.

Rules only (no model call): a question is compound when it

- holds several questions (``…是什么？它的导演是谁？``, ``芯片是什么，起售价多少``): each clause that
  asks becomes a part; a clause without its own subject (``导演是谁``, ``它的导演``) gets the first
  clause's (``《心居》的导演是谁``);
- coordinates entities or years (``甲市和乙市``, ``A、B和C``, ``2022年和2023年``), parallel attributes
  (``主演和导演是谁``, ``时间和地点``, ``男单和女单冠军``) or ``男女`` before 单/双 (``男女单打``):
  each conjunct, with the shared words around it, becomes a part
  (``甲市和乙市去年分别新建了多少所学校?`` → ``甲市去年新建了多少所学校?`` + ``乙市去年…``);
- asks 分别 about the first quarters of a year (``前两季度营收分别是多少`` → ``一季度…`` + ``二季度…``;
  without 分别, ``前三季度GDP增长`` is the cumulative figure and stays whole).

The rules are conservative; a coordination is *not* split when it is inside a name (jieba keeps
``中华人民共和国``/``和平共处`` whole, ``《速度与激情》``), joins two verbs (``研究和开发``) without
分别, follows a count (``多少个国家和地区``), or the question is about how the two relate (之间, 关系,
区别, 相比, 签署, 哪个更…), asks why or how, or the conjuncts form a group (甲、乙等; 甲和乙都…).
Names jieba cut badly are mended first (``rag.decompose_rules._name_tokens``: 布林肯和耶伦 was
布|林肯|和耶伦). Measured (bench/results.md): 81 of rgb_zh_int's 85 questions that name two things
are split; of the 1,320 single-fact questions of rgb_zh, cmrc2018, drcd and the seeds dev set, 3
are (as before). Words are read with ``rag.places.pos_tagger`` (jieba POS) and
``rag.frame.question_frame`` (years, places, names); the coordination rules are in
``rag.decompose_rules``.

No model fallback. Of the 4 rgb_zh_int questions left whole, one has a typo (温单), one
coordinates two common nouns (谷歌和百度, tagged like 父亲和母亲), one asks 前两季度 without 分别, one
names no parts (…旗手是谁). The local model (Qwen2.5-Coder-1.5B) asked to split them in a strict
one-part-per-line format answered instead of splitting (2023年温网男单冠军是德约科维奇。) or returned
one part, in 0.5–1.4 s each (3.7 s with loading; 10–33 s on two seeds questions under load), and
a "looks compound" trigger (a conjunction the rules leave alone) also fires on 4 of the 20 seeds
dev questions and 69 of 500 DRCD questions, all single facts.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field

from rag.decompose_rules import _ENTITY_KINDS, _split_coordination
from rag.zh import MARKER, QUESTION_WORDS, simplified

MAX_PARTS = 5

# Cheap test first: a question without any of these is single (no tagging at all).
_MAYBE = re.compile(r"[和与及、跟，,？?；;]|男女|季度")
# A comma clause that starts so goes on from the one before: not a question of its own.
_CONNECTIVE = re.compile(r"(?:故|所以|因此|因而|但|但是|而|并|并且|且|然而|于是|因为|由于|如果|虽然|即使|以及|还是|或)")
_PRONOUN = re.compile(r"^(?:它们|他们|她们|它|其|他|她|该|这|此)(?:的)?")
_SENTENCE_END = re.compile(r"[？?；;。!！]+")
_CLAUSE_COMMA = re.compile(r"[，,]")


@dataclass(frozen=True)
class Decomposition:
    """A question and its standalone parts.

    Attributes:
        question: the question as asked.
        parts: the standalone questions, in the order asked; ``[question]`` when it is single.
        method: ``"single"`` (not compound) or ``"rules"``.
    """

    question: str
    parts: list[str] = field(default_factory=list)
    method: str = "single"

    @property
    def compound(self) -> bool:
        return len(self.parts) > 1



def decompose(question: str) -> Decomposition:
    """Split ``question`` into standalone parts by rules (see the module docstring).

    Single-fact questions return ``Decomposition(question, [question], "single")``; nothing
    but a regular-expression test runs for a question without a conjunction, comma or
    second question mark.
    """
    single = Decomposition(question, [question], "single")
    if not _MAYBE.search(question):
        return single
    text = simplified(MARKER.sub("", question)).strip()
    parts: list[str] = []
    for clause in _clauses(text):
        for part in _split_coordination(clause):
            if part not in parts:
                parts.append(part)
    parts = parts[:MAX_PARTS]
    return Decomposition(question, parts, "rules") if len(parts) > 1 else single


# ----------------------------------------------------------------------------- clauses
def _own_question(piece: str, first: bool) -> bool:
    """A comma clause that is a question of its own: it asks, and (after the first) does not go
    on from the one before (故有些业者哪来…, 而…, 因为…)."""
    return bool(QUESTION_WORDS.search(piece)) and (first or not _CONNECTIVE.match(piece))


def _topic(clause: str) -> tuple[str, bool]:
    """What the first clause is about, and whether 的 followed it: its words before 的 (``iPhone
    SE 3的芯片是什么`` → ``iPhone SE 3``), else the names it starts with (``黄冈市打造了多少…`` →
    ``黄冈市``, ``《李茂扮太子》是什么…``), else its words before the asking word."""
    from rag.frame import question_frame

    m = QUESTION_WORDS.search(clause)
    head = clause[:m.start()] if m else clause
    if "的" in head:
        return head[:head.index("的")].strip(" ，,"), True
    end = 0
    for c in question_frame(head).constraints:
        at = head.find(c.text, end)
        if c.kind in _ENTITY_KINDS and at >= 0 and not head[end:at].strip("《“\"「 "):
            end = at + len(c.text)
            end += head[end:end + 1] in "》”\"」" and end < len(head)
    if end:
        return head[:end].strip(" ，,"), False
    return re.sub(r"(?:是|为|有|在)$", "", head).strip(" ，,"), False


def _clauses(text: str) -> list[str]:
    """The questions of ``text``: sentences, and comma clauses when each of them asks."""
    sentences = [s.strip() for s in _SENTENCE_END.split(text) if s.strip()]
    clauses: list[str] = []
    for sentence in sentences:
        pieces = [p.strip() for p in _CLAUSE_COMMA.split(sentence) if p.strip()]
        if len(pieces) > 1 and all(_own_question(p, i == 0) for i, p in enumerate(pieces)):
            clauses.extend(pieces)
        else:
            clauses.append(sentence)
    if len(clauses) < 2:
        return [text.rstrip("？?。!！；; ")]
    if not all(QUESTION_WORDS.search(c) or re.search(r"(?:时间|日期|地点)$", c) for c in clauses):
        return [text.rstrip("？?。!！；; ")]
    topic, de = _topic(clauses[0])
    out = [clauses[0]]
    for clause in clauses[1:]:
        pronoun = _PRONOUN.match(clause)
        if pronoun and topic:
            clause = topic + ("的" if pronoun.group().endswith("的") else "") + clause[pronoun.end():]
        elif topic and not _has_subject(clause):
            clause = topic + ("的" if de and not QUESTION_WORDS.match(clause) else "") + clause
        out.append(clause)
    return out


def _has_subject(clause: str) -> bool:
    """A clause names what it is about (an entity, a title, a year) and is more than its asking."""
    from rag.frame import question_frame

    frame = question_frame(clause)
    return any(c.kind in _ENTITY_KINDS or c.kind == "time" for c in frame.constraints)
