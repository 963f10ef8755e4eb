"""Step 6a (2/2) — decompose_rules: split one clause at a coordination (甲市和乙市, A、B和C,
2022年和2023年, 主演和导演, 男女单打), the word-level rules of ``rag.decompose``.

A clause is read as jieba POS units (``rag.places.pos_tagger``) with years, dates and quoted
titles as single units; each conjunction's conjuncts are found by parallel words on both sides,
and the coordination is expanded only when ``_accept`` finds it asks several things (see the
``rag.decompose`` docstring for what stays whole). Before that, ``_name_tokens`` mends person
names jieba cut badly (布|林肯|和耶伦 → 布林肯|和|耶伦), and 前两季度…分别 becomes one part per quarter.
"""
from __future__ import annotations

import itertools
import re
from dataclasses import dataclass

from rag.zh import CJK, QUESTION_WORDS

_CONJ = {"和", "与", "及", "以及", "跟", "、"}
_GLUE = "和与及跟"  # conjunctions jieba may glue to a name it does not know (和耶伦)
_QUARTERS = re.compile(r"前([两二三23])个?季度")  # 前两季度…分别: one part per quarter
# The question is about how the conjuncts relate, or compares them: one question.
_RELATION = re.compile(
    r"之间|关系|区别|差别|差异|异同|不同|相比|比较|对比|差距|相差|之比|合作|联合|共同|一起|交流|往来|合并|"
    r"相同|一样|相似|签署|签订|达成|会谈|会见|会晤|谈判|建交|结婚|离婚|对阵|交手|对决|合资|合办|联手|"
    r"同时|两[线者国人地队个家方座所]|双方|二者|彼此|相互|互相|除了|除去|以外|之外|"
    r"(?:哪|谁).{0,6}(?:更|最|比较)|更(?:多|少|高|低|大|小|长|短|早|晚|快|慢|好|强)|"
    r"为什么|为何|怎么|怎样|如何")
# After the last conjunct: a group named as one (甲、乙等地; 甲和乙都…).
_JOINT = re.compile(r"^(?:等|与|跟|同|共|合计|总共|一共)|^[^，,]{0,8}?(?:都|也|均|皆)")
# Words that end a conjunct's reach: function words, copulas, the asking words.
_STOP_WORDS = {"的", "之", "是", "为", "有", "在", "于", "分别", "各", "各自", "都", "也", "了", "被", "把", "对",
               "由", "将", "从", "向", "给", "让", "比", "还", "又", "并", "而", "或", "或者", "还是", "中", "里",
               "上", "下", "时", "后", "前", "等"}
_DISTRIBUTIVE = re.compile(r"分别|各自|各(?=[有是为自])|各[个位家所]")
_DISTRIBUTIVE_WORD = re.compile(r"分别|各自")
# What a question asks after the coordinated words: (的)(分别)(是|有|为) + asking word, or nothing.
_ASKED = re.compile(r"^(?:的)?(?:分别|各自|各)?(?:是|为|有|在|叫)?(?:谁|什么|多少|哪|几|何|怎|如何|吗|呢)|^$")
# Attribute nouns: what a question asks about (an amount, a time, a role...). A conjunct that
# ends with one carries its own head ("发售日期和标准版国区价格"); otherwise a head after the
# last conjunct is shared ("考研和高考报名人数").
_HEAD = re.compile(
    r"(?:时间|日期|时候|地点|地址|举办地|所在地|价格|售价|票价|人数|人次|数量|金额|产量|销量|交付量|营收|收入|利润|"
    r"票房|规模|总额|增速|增幅|增长率|冠军|亚军|季军|得主|金牌|银牌|铜牌|成绩|排名|名次|比分|结果|主演|导演|编剧|"
    r"作者|主角|男主角|女主角|演员|人口|面积|长度|高度|总部|首都|省会|市长|书记|主席|总统|总理|校长|率|量|额)$")
_QUOTE = re.compile(r"《[^《》]{1,40}》|“[^“”]{1,40}”|「[^「」]{1,40}」|\"[^\"]{1,40}\"")
_YEAR_ONLY = re.compile(r"(?:19|20)\d{2}")
_ENTITY_KINDS = {"place", "org", "person", "name", "national", "quoted"}


@dataclass
class _Unit:  # a word of the question; kind: "time", "entity", "word", "conj", "stop" or "space"
    start: int
    end: int
    text: str
    flag: str
    kind: str



# ----------------------------------------------------------------------------- coordination
def _units(text: str) -> list[_Unit]:
    """jieba POS tokens of ``text``; years/dates and quoted titles are single units."""
    from rag.frame import question_frame
    from rag.places import pos_tagger

    frame = question_frame(text)
    fixed: list[tuple[int, int, str]] = [(m.start(), m.end(), "entity") for m in _QUOTE.finditer(text)]
    entities: set[str] = set()
    cursor = 0
    for c in frame.constraints:
        if c.kind == "time":
            at = text.find(c.text, cursor)
            if at >= 0 and not any(a <= at < b for a, b, _ in fixed):
                fixed.append((at, at + len(c.text), "time"))
                cursor = at + len(c.text)
        elif c.kind in _ENTITY_KINDS:
            entities.add(c.text)
    fixed.sort()
    units: list[_Unit] = []
    tokens, names = _name_tokens([(w.word, w.flag) for w in pos_tagger().cut(text)])
    entities |= names
    i = 0
    for a, b, kind in fixed + [(len(text), len(text), "")]:
        # tokens before this fixed span, cut at its start
        while i < len(tokens) and tokens[i][0] < a:
            s, e, _, f = tokens[i]
            e2 = min(e, a)
            units.append(_unit(s, e2, text[s:e2], f, entities))
            if e > a:
                tokens[i] = (a, e, text[a:e], f)
                break
            i += 1
        if kind:
            units.append(_Unit(a, b, text[a:b], "x", kind))
            while i < len(tokens) and tokens[i][1] <= b:
                i += 1
            if i < len(tokens) and tokens[i][0] < b:
                s, e, _, f = tokens[i]
                tokens[i] = (b, e, text[b:e], f)
    return units


def _name_tokens(words: list[tuple[str, str]]) -> tuple[list[tuple[int, int, str, str]], set[str]]:
    """(start, end, word, flag) of jieba's words, with two repairs where it cut a person's name
    badly, and the names so repaired.

    - a conjunction glued to a name jieba does not know (布林肯和耶伦 → 布|林肯|和耶伦): a word
      outside the dictionary that starts or ends with 和/与/及/跟 loses it to its own token;
    - a name in pieces (布|林肯, 吴|易|昺): neighbouring person-name words of which one is a
      single character are one name.
    """
    from rag.places import word_frequencies

    known = word_frequencies()
    split: list[tuple[str, str]] = []
    names: set[str] = set()
    for word, flag in words:
        if len(word) >= 3 and word not in known and flag.startswith("nr") and _GLUE.find(word[0]) >= 0:
            split += [(word[0], "c"), (word[1:], flag)]
            names.add(word[1:])
        elif len(word) >= 3 and word not in known and flag.startswith("nr") and _GLUE.find(word[-1]) >= 0:
            split += [(word[:-1], flag), (word[-1], "c")]
            names.add(word[:-1])
        else:
            split.append((word, flag))
    merged: list[tuple[str, str]] = []
    run_start = 0  # index in ``merged`` where the current run of person-name words starts
    for word, flag in split:
        if not (merged and flag.startswith("nr") and merged[-1][1].startswith("nr")):
            run_start = len(merged)
        # a run that follows a lone character (科|瓦特|尔) is the tail of a longer name: left alone
        clean = run_start == 0 or len(merged[run_start - 1][0]) > 1 or not re.fullmatch(rf"[{CJK}]", merged[run_start - 1][0])
        if merged and len(merged) > run_start and clean and min(len(word), len(merged[-1][0])) == 1 \
                and re.fullmatch(rf"[{CJK}]+", merged[-1][0] + word):
            names.discard(merged[-1][0])
            word = merged.pop()[0] + word
            names.add(word)
        merged.append((word, flag))
    tokens, position = [], 0
    for word, flag in merged:
        tokens.append((position, position + len(word), word, flag))
        position += len(word)
    return tokens, names


def _unit(start: int, end: int, word: str, flag: str, entities: set[str]) -> _Unit:
    if not word.strip():
        kind = "space"
    elif word in _CONJ and (flag == "c" or word == "、"):
        kind = "conj"
    elif word in _STOP_WORDS or QUESTION_WORDS.fullmatch(word) or flag in ("r", "p", "c", "d") or flag.startswith("u") \
            or (flag == "x" and not re.search(r"\w", word)):
        kind = "stop"
    elif word in entities or flag == "eng" or flag in ("ns", "nt", "nz") and len(word) >= 2:
        kind = "entity"
    else:
        kind = "word"
    return _Unit(start, end, word, flag, kind)


def _chars(units: list[_Unit]) -> int:
    return sum(len(u.text) for u in units)


def _parallel(a: _Unit, b: _Unit) -> bool:
    """Two words in the same slot of two conjuncts: the same word, two entities/years, or
    words of one length that share a character in one position (男单/女单, 最佳影片奖/最佳导演奖)."""
    if a.text == b.text:
        return True
    if a.kind == b.kind == "time":
        return True
    if a.kind == b.kind == "entity" and a.flag[:1] == b.flag[:1] == "n" and a.flag == b.flag:
        return True
    return len(a.text) == len(b.text) >= 2 and any(x == y for x, y in zip(a.text, b.text))


def _is_verb(u: _Unit) -> bool:
    return u.flag in ("v", "vn", "vd") and u.kind == "word"


def _reach_left(units: list[_Unit], c: int, kind: str) -> list[int]:
    """Indices of the units a conjunct left of ``units[c]`` may span, nearest last."""
    out = []
    i = c - 1
    while i >= 0:
        u = units[i]
        if u.kind == "space":
            i -= 1
            continue
        if u.kind in ("stop", "conj") or (u.kind == "time") != (kind == "time"):
            break
        out.append(i)
        i -= 1
    return out[::-1]


def _reach_right(units: list[_Unit], c: int, kind: str) -> list[int]:
    out = []
    i = c + 1
    while i < len(units):
        u = units[i]
        if u.kind == "space":
            i += 1
            continue
        if u.kind in ("stop", "conj") or (u.kind == "time") != (kind == "time"):
            break
        nxt = next((v for v in units[i + 1:] if v.kind != "space"), None)
        if out and u.flag == "v" and nxt is not None and nxt.text in ("的", "了", "过", "着"):
            break  # 推出的, 增长了: a verb of the predicate, not of the conjunct
        out.append(i)
        i += 1
    return out


def _conjuncts(units: list[_Unit], c: int) -> tuple[list[int], list[int]] | None:
    """The units of the left and right conjunct of the conjunction ``units[c]``, or None."""
    right0 = next((u for u in units[c + 1:] if u.kind != "space"), None)
    if right0 is None:
        return None
    kind = "time" if right0.kind == "time" else "other"
    left_max = _reach_left(units, c, kind)
    right_max = _reach_right(units, c, kind)
    if not left_max or not right_max:
        return None
    L = [units[i] for i in left_max]
    R = [units[i] for i in right_max]
    # the left conjunct starts at the nearest word parallel to the right conjunct's first word
    start = next((k for k in range(len(L) - 1, -1, -1) if _parallel(L[k], R[0])), None)
    left = left_max[start:] if start is not None else left_max[-1:]
    last = units[left[-1]]
    # the right conjunct ends at the first word parallel to the left conjunct's last word ...
    j = next((j for j in range(len(R)) if _parallel(last, R[j])), None)
    if j is None:
        if last.kind in ("entity", "time") and R[0].kind in ("entity", "time", "word") \
                and (R[0].kind != "word" or not _is_verb(R[0])):
            # ... an entity is as long as the other one (英特尔和英伟达全年营收: 英|伟达 → 英伟达)
            j, size = 0, len(R[0].text)
            while R[0].kind == "word" and size < len(last.text) and j + 1 < len(R) and R[j + 1].kind == "word" \
                    and not _HEAD.search(R[j + 1].text):
                j += 1
                size += len(R[j].text)
            if R[0].kind == "word" and j > 0:  # a name jieba cut in pieces (英|伟达, 吴|易|昺)
                for unit in R[:j + 1]:
                    unit.kind = "entity"
        elif _HEAD.search(last.text):
            j = len(R) - 1  # 发售日期和标准版国区价格: each conjunct has its own head
        else:
            j = len(R) - 1  # … a head after it is shared (考研和高考报名人数, 男单和女单冠军)
            while j > 0 and (_HEAD.search(R[j].text) or (_is_verb(R[j]) and j + 1 < len(R))):
                j -= 1
    right = right_max[:j + 1]
    if start is None and j > 0:
        # no parallel start: the left conjunct is as long as the right one (宣誓仪式及首次会议)
        size = _chars([units[i] for i in right])
        best = min(range(1, len(left_max) + 1),
                   key=lambda n: (abs(_chars([units[i] for i in left_max[-n:]]) - size), n))
        if units[left_max[-best]].kind not in ("entity", "time") or best == 1:
            left = left_max[-best:]
    return left, right


def _accept(text: str, units: list[_Unit], items: list[list[int]], conjs: list[int]) -> bool:
    """Whether a coordination makes the question ask several things (conservative)."""
    left, right = items[0], items[-1]
    L, R = units[left[-1]], units[right[0]]
    start, end = units[left[0]].start, units[right[-1]].end
    suffix = text[end:].strip()
    before = next((u for u in reversed(units[:left[0]]) if u.kind != "space"), None)
    counted = re.fullmatch(r"(?:多少|几)[个位名家所种项条类]?", before.text) if before is not None else None
    if counted or before is not None and before.flag == "q" and before.start > 0 and text[before.start - 1] in "少几":
        return False  # 多少个国家和地区: one counted kind
    if any(a <= units[conjs[0]].start < b for a, b in ((m.start(), m.end()) for m in _QUOTE.finditer(text))):
        return False
    if _JOINT.match(suffix):
        return False  # 甲和乙等地, 甲和乙都/也…: a group, asked about as one
    # the coordination must be in the clause that asks (not 由上到下分别是甲、乙、丙，而…是?)
    clause_start = max(text.rfind(",", 0, start), text.rfind("，", 0, start)) + 1
    clause_end = min([i for i in (text.find(",", end), text.find("，", end)) if i >= 0] or [len(text)])
    if clause_end < len(text) and not QUESTION_WORDS.search(text[clause_start:clause_end]):
        return False
    distributive = bool(_DISTRIBUTIVE.search(text))
    if L.kind == "time" and R.kind == "time":
        return True
    if _is_verb(L) and _is_verb(R):
        # 研究和开发: one activity, unless 分别 or the times of two events (开始和结束时间)
        return distributive or bool(re.match(r"(?:的)?(?:时间|日期)", suffix))
    if len(items) == 2 and all(units[k].text == "、" for k in conjs) and not distributive:
        return L.kind == R.kind == "entity"  # 区委常委、统战部部长: one person's two titles
    if R.kind == "entity" and (L.kind == "entity" or units[left[0]].kind == "entity") or distributive:
        return True
    # Other words: only where the question asks about them (主演和导演是谁, 时间和地点, 男单和女单冠军),
    # never inside a description the asking word follows (哪一个机关可…立法和监察市政).
    if QUESTION_WORDS.search(text[clause_start:start]):
        return False
    if not all(units[k].flag[:1] == "n" or units[k].flag == "eng" or _HEAD.search(units[k].text)
               for k in (left[-1], right[-1])):
        return False
    if _ASKED.match(suffix) or re.fullmatch(r"(?:的)?[\u4e00-\u9fffA-Za-z0-9]{0,6}", suffix) and (
            not suffix or _HEAD.search(suffix)):
        return True
    return _parallel(units[left[-1]], units[right[-1]]) and len(units[right[-1]].text) >= 2


def _split_coordination(clause: str, depth: int = 0) -> list[str]:
    """Parts of one clause: the first accepted coordination (a list ``A、B和C`` as a whole) is
    expanded, then each part again (two coordinations: 2×2 parts at most)."""
    if depth > 2 or not re.search(r"[和与及、跟]|男女|季度", clause):
        return [clause]
    quarters = _QUARTERS.search(clause)
    if quarters and _DISTRIBUTIVE_WORD.search(clause, quarters.end()) and "各" not in clause.replace("各自", ""):
        # 前两季度…分别 → 一季度, 二季度 (前三季度 alone is the cumulative figure; 各地…分别: the places)
        n = 3 if quarters.group(1) in "三3" else 2
        parts = [clause[:quarters.start()] + q + clause[quarters.end():] for q in ("一季度", "二季度", "三季度")[:n]]
        return [_DISTRIBUTIVE_WORD.sub("", p) for part in parts for p in _split_coordination(part, depth + 1)]
    men = re.search(r"男女(?=单|双)", clause)
    if men:  # 男女单打冠军 → 男单冠军, 女单冠军 (as the news writes them)
        rest = re.sub(r"^([单双])打", r"\1", clause[men.end():])
        parts = [clause[:men.start()] + sex + rest for sex in "男女"]
        return [p for part in parts for p in _split_coordination(part, depth + 1)]
    if _RELATION.search(clause):
        return [clause]
    units = _units(clause)
    consumed: set[int] = set()
    for c, unit in enumerate(units):
        if unit.kind != "conj" or c in consumed:
            continue
        items = _list_items(units, c)
        if items is None:
            continue
        conjuncts, conjs = items
        consumed.update(conjs)
        if not _accept(clause, units, conjuncts, conjs):
            continue
        start, end = units[conjuncts[0][0]].start, units[conjuncts[-1][-1]].end
        texts = [clause[units[ix[0]].start:units[ix[-1]].end] for ix in conjuncts]
        texts = _complete_years(texts)
        parts = [clause[:start] + t + clause[end:] for t in texts]
        parts = [_DISTRIBUTIVE_WORD.sub("", p) for p in parts]
        out: list[str] = []
        for part in parts:
            for p in _split_coordination(part, depth + 1):
                if p not in out:
                    out.append(p)
        return out
    return [clause]


def _list_items(units: list[_Unit], c: int) -> tuple[list[list[int]], list[int]] | None:
    """The conjuncts of the coordination starting at conjunction ``c``: two, or a list
    ``A、B、C和D`` whose middle items lie between conjunctions."""
    conjs = [c]
    i = c + 1
    while True:
        nxt = next((k for k in range(i, len(units)) if units[k].kind in ("conj", "stop")), None)
        if nxt is None or units[nxt].kind != "conj":
            break
        middle = [k for k in range(conjs[-1] + 1, nxt) if units[k].kind != "space"]
        if not middle or len(middle) > 3:
            break
        conjs.append(nxt)
        i = nxt + 1
    first = _conjuncts(units, conjs[0])
    last = first if len(conjs) == 1 else _conjuncts(units, conjs[-1])
    if first is None or last is None:
        return None
    items = [first[0]]
    for a, b in itertools.pairwise(conjs):
        items.append([k for k in range(a + 1, b) if units[k].kind != "space"])
    items.append(last[1])
    return items, conjs


def _complete_years(texts: list[str]) -> list[str]:
    """``2022和2023年`` → 2022年, 2023年."""
    if any(t.endswith("年") for t in texts):
        return [t + "年" if _YEAR_ONLY.fullmatch(t) else t for t in texts]
    return texts