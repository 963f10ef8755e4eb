"""Lexical tokenisation for BM25 — the same function at index and query time.

- NFKC (full-width → half-width), lower case, Traditional → Simplified (OpenCC),
  so 臺灣/台湾 and ＡＢＣ/abc match;
- jieba in search mode (long words plus their sub-words), with an optional user
  dictionary so names such as 轮值村主任 stay whole;
- codes and numbers kept whole (``ppr-9087``, ``2099``, ``1.57``) as well as their parts;
- character bigrams of every CJK run, which rescues words jieba segments differently
  in question and passage (measured: +DRCD/CMRC hit@1, see README);
- punctuation and whitespace dropped.
"""
from __future__ import annotations

import logging
import re
import unicodedata
from functools import lru_cache
from pathlib import Path

import jieba

_CODE = re.compile(r"[a-z0-9]+(?:[-_./:][a-z0-9]+)+|[a-z]+\d+[a-z0-9]*|\d+(?:\.\d+)?")
_CJK_RUN = re.compile(r"[\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff]+")
_WORDLIKE = re.compile(r"\w", re.UNICODE)
jieba.setLogLevel(logging.WARNING)


@lru_cache(maxsize=1)
def _base_dictionary() -> tuple[dict[str, int], int]:
    """jieba's main dictionary, loaded once per process (loading takes ~2 s)."""
    tokenizer = jieba.Tokenizer()
    tokenizer.initialize()
    return tokenizer.FREQ, tokenizer.total


def new_jieba() -> jieba.Tokenizer:
    """A jieba instance with its own copy of the dictionary, so added words stay local."""
    freq, total = _base_dictionary()
    tokenizer = jieba.Tokenizer()
    tokenizer.FREQ, tokenizer.total, tokenizer.initialized = dict(freq), total, True
    return tokenizer


class LexicalTokenizer:
    """Tokeniser for BM25.

    Args:
        user_dict: optional jieba user dictionary file (``word [freq [tag]]`` per line).
        bigrams: add CJK character bigrams to the jieba tokens.
    """

    def __init__(self, user_dict: Path | None = None, bigrams: bool = True):
        import opencc

        self._t2s = opencc.OpenCC("t2s")
        self._jieba = new_jieba()
        if user_dict:
            self._jieba.load_userdict(str(user_dict))
        self.bigrams = bigrams

    def add_words(self, words: list[str]) -> None:
        """Keep these words whole (in addition to the user dictionary)."""
        for word in words:
            self._jieba.add_word(self.normalise(word))

    def normalise(self, text: str) -> str:
        return self._t2s.convert(unicodedata.normalize("NFKC", text).lower())

    def tokenize(self, text: str) -> list[str]:
        text = self.normalise(text)
        tokens = [t for t in self._jieba.lcut_for_search(text) if _WORDLIKE.search(t) and not t.isspace()]
        seen = set(tokens)
        tokens.extend(code for code in (m.group() for m in _CODE.finditer(text)) if code not in seen)
        if self.bigrams:
            for run in _CJK_RUN.findall(text):
                tokens.extend("#" + run[i:i + 2] for i in range(len(run) - 1))
        return tokens
