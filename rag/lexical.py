"""Lexical tokenisation for BM25 — the same function at index and query time.

- NFKC (full-width → half-width), lower case, Traditional → Simplified (OpenCC),
  so 臺灣/台湾 and ＡＢＣ/abc match;
- jieba in search mode (long words plus their sub-words), with an optional user
  dictionary so names such as 轮值村主任 stay whole;
- codes and numbers kept whole (``ppr-9087``, ``2099``, ``1.57``) as well as their parts;
- character bigrams of every CJK run, which rescues words jieba segments differently
  in question and passage (measured: +DRCD/CMRC hit@1, see README);
- punctuation and whitespace dropped.

Every regular expression here runs in linear time on any input (a 100k-character question
or passage tokenises in well under a second), and jieba's dictionary cache is read from a
private folder (``new_jieba(cache_dir)``), never from the shared, world-writable temp dir.
"""
from __future__ import annotations

import logging
import os
import re
import stat
import tempfile
import unicodedata
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING

import jieba

from rag.config import DEFAULT_HOME

if TYPE_CHECKING:  # rag.store is not imported at run time: the tokeniser needs no database
    from rag.store import KnowledgeBase

# Codes and numbers: ``ppr-9087``, ``a1b2``, ``1.57``. The ``(?<![a-z])`` guards change no
# match (no match of the unguarded pattern ever starts right after a letter: the scan would
# have matched or failed the whole letter run already) but stop the scan from re-reading a
# long letter run from each of its letters, which was quadratic (40,000 letters: 50 s).
_CODE = re.compile(r"(?<![a-z])[a-z0-9]+(?:[-_./:][a-z0-9]+)+|(?<![a-z])[a-z]+\d+[a-z0-9]*|\d+(?:\.\d+)?")
_CJK_RUN = re.compile(r"[\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff]+")
_WORDLIKE = re.compile(r"\w", re.UNICODE)
jieba.setLogLevel(logging.WARNING)


# Where jieba's dictionary cache (a marshal file: never read one another user could write) lives.
DEFAULT_CACHE_DIR = DEFAULT_HOME / "_cache"
CACHE_FILE = "jieba.cache"


def _is_private_dir(path: Path) -> bool:
    """A real directory (not a symlink) owned by this user that nobody else may write to."""
    try:
        st = os.lstat(path)
    except OSError:
        return False
    owner_ok = not hasattr(os, "getuid") or st.st_uid == os.getuid()
    return stat.S_ISDIR(st.st_mode) and owner_ok and not st.st_mode & (stat.S_IWGRP | stat.S_IWOTH)


def private_cache_dir(preferred: Path | None = None) -> Path:
    """A directory for jieba's cache that only this user can write.

    ``preferred`` (default ``DEFAULT_CACHE_DIR``, i.e. ``<default home>/_cache``) is created
    with mode 0700 when missing; if it cannot be created or is not private (another owner,
    group/world-writable, a symlink), a per-user ``rag-zh-<uid>`` folder in the temp dir is
    used under the same checks, and failing that a fresh ``mkdtemp`` folder.
    """
    uid = os.getuid() if hasattr(os, "getuid") else os.getpid()
    for candidate in (Path(preferred or DEFAULT_CACHE_DIR), Path(tempfile.gettempdir()) / f"rag-zh-{uid}"):
        try:
            candidate.mkdir(mode=0o700, parents=True, exist_ok=True)
        except OSError:
            continue
        if _is_private_dir(candidate):
            return candidate
    return Path(tempfile.mkdtemp(prefix="rag-zh-jieba-"))


@lru_cache(maxsize=4)
def _base_dictionary(cache_dir: Path) -> tuple[dict[str, int], int]:
    """jieba's main dictionary, loaded once per process and cache folder (loading takes ~2 s;
    from the cache ~0.5 s)."""
    tokenizer = jieba.Tokenizer()
    # jieba's default cache is <tempdir>/jieba.cache, read with marshal: in a world-writable
    # /tmp anyone could plant one. Ours lives in a folder only this user can write.
    tokenizer.tmp_dir, tokenizer.cache_file = str(private_cache_dir(cache_dir)), CACHE_FILE
    tokenizer.initialize()
    return tokenizer.FREQ, tokenizer.total


def new_jieba(cache_dir: Path | None = None) -> jieba.Tokenizer:
    """A jieba instance with its own copy of the dictionary, so added words stay local.

    Args:
        cache_dir: folder of jieba's dictionary cache (default ``DEFAULT_CACHE_DIR``); it is
            used only when private to this user (``private_cache_dir``).
    """
    cache_dir = Path(cache_dir or DEFAULT_CACHE_DIR)
    freq, total = _base_dictionary(cache_dir)
    tokenizer = jieba.Tokenizer()
    tokenizer.FREQ, tokenizer.total, tokenizer.initialized = dict(freq), total, True
    # Never used (the dictionary is already in memory), but a later initialize() must not
    # fall back to the shared temp dir either.
    tokenizer.tmp_dir, tokenizer.cache_file = str(private_cache_dir(cache_dir)), CACHE_FILE
    return tokenizer


class LexicalTokenizer:
    """Tokeniser for BM25.

    Args:
        user_dict: optional jieba user dictionary file (``word [freq [tag]]`` per line).
        bigrams: add CJK character bigrams to the jieba tokens.
        cache_dir: folder of jieba's dictionary cache (see ``new_jieba``).
    """

    def __init__(self, user_dict: Path | None = None, bigrams: bool = True, cache_dir: Path | None = None):
        import opencc

        self._t2s = opencc.OpenCC("t2s")
        self._jieba = new_jieba(cache_dir)
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


def tokenizer_for(kb: "KnowledgeBase") -> LexicalTokenizer:
    """The BM25 tokeniser of a KB: with the user words stored in it (by its ingests), so
    query time tokenises exactly like index time.

    Args:
        kb: the open knowledge base (its words, not ``settings.user_dict``, decide).
    """
    tokenizer = LexicalTokenizer()
    tokenizer.add_words(kb.user_words())
    return tokenizer
