"""Step 2 — clean: repair Chinese text extracted from PDFs and web pages.

What it fixes:
- lines broken inside a sentence (a PDF wrap, sometimes with a blank line in
  between) are joined when the line does not end a sentence and the next one
  continues it;
- stray spaces between CJK characters (and CJK punctuation) inside prose are
  removed; Latin words wrapped across lines keep one space between them;
- paragraph breaks and short heading lines are kept.

Every character of the cleaned text remembers its offset in the original,
so a citation can point at the original characters (``CleanText.span``).
"""
from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np

from rag.zh import CJK as _CJK
from rag.zh import CLOSING, ELLIPSIS, SENTENCE_END

# A line ending with one of these ends its sentence (a title in 《》 or 【】, a full stop).
_SENTENCE_END = SENTENCE_END + ELLIPSIS + CLOSING + "》】.．"
_MID_PUNCT = "，,、：:（(“「『《【—-"
_PROSE_PUNCT = re.compile(r"[，,、；;。！？]")
_CONTINUES = re.compile(rf"^[{_CJK}0-9A-Za-z“”\"'‘’「」《》（(%％]")
# Ideographs plus CJK/full-width punctuation: a space next to them is PDF noise.
_CJK_WIDE = _CJK + r"\u3001-\u303f\uff00-\uffef"
_QUOTES = "“”‘’—…·"
_SPACE = r"[ \t\u3000\u00a0]+"
_CJK_SPACE_CJK = re.compile(
    rf"(?<=[{_CJK_WIDE}]){_SPACE}(?=[{_CJK_WIDE}{_QUOTES}])|(?<=[{_CJK_WIDE}{_QUOTES}]){_SPACE}(?=[{_CJK_WIDE}])"
)
# Latin words wrapped across lines are joined with a space (mapped to the original line break).
_LATIN_END = re.compile(r"[A-Za-z0-9,;:%)\]]")
_LATIN_START = re.compile(r"[A-Za-z0-9(\[]")
_MULTI_SPACE = re.compile(r"[ \t\u3000\u00a0]{2,}")
# A wrapped line in these documents is at least this long; headings and captions are shorter.
WRAP_MIN_CHARS = 40


@dataclass
class CleanText:
    """Cleaned text plus, for each of its characters, the offset in the original."""

    text: str
    origin: np.ndarray  # int32, len(text) + 1; last entry = end of the original

    def span(self, start: int, end: int) -> tuple[int, int]:
        """Original ``[start, end)`` offsets covering cleaned ``[start, end)``."""
        if end <= start:
            return int(self.origin[start]), int(self.origin[start])
        return int(self.origin[start]), int(self.origin[end - 1]) + 1


def is_heading_line(line: str) -> bool:
    """A short line with no sentence punctuation, or a Markdown heading."""
    s = line.strip()
    if s.startswith("#"):
        return True
    return 0 < len(s) < WRAP_MIN_CHARS and not _PROSE_PUNCT.search(s) and s[-1] not in _SENTENCE_END


def _is_wrapped(line: str, next_line: str) -> bool:
    """True when ``line`` stops mid-sentence and ``next_line`` continues it."""
    s = line.rstrip()
    if not s or s.lstrip().startswith("#") or next_line.lstrip().startswith("#"):
        return False
    if s[-1] in _SENTENCE_END or not _CONTINUES.match(next_line.lstrip()):
        return False
    if s[-1] in _MID_PUNCT:
        return True
    if s.count("“") > s.count("”"):  # an open quote continues on the next line
        return True
    return len(s) >= WRAP_MIN_CHARS or bool(_PROSE_PUNCT.search(s))


def clean_text(original: str) -> CleanText:
    """Clean ``original`` and keep the offset map.

    Args:
        original: text as loaded (newlines normalised to ``\\n``).
    """
    # Lines with their original start offsets; blank lines become paragraph breaks.
    lines: list[tuple[str, int]] = []
    pos = 0
    for raw in original.split("\n"):
        stripped = raw.strip()
        lead = len(raw) - len(raw.lstrip())
        lines.append((stripped, pos + lead))
        pos += len(raw) + 1
    paragraphs: list[list[tuple[str, int]]] = []
    current: list[tuple[str, int]] = []
    for idx, (line, start) in enumerate(lines):
        if not line:
            continue
        if current and _is_wrapped(current[-1][0], line):
            current.append((line, start))
            continue
        if current:
            paragraphs.append(current)
        current = [(line, start)]
    if current:
        paragraphs.append(current)

    out: list[str] = []
    origin: list[int] = []
    for para in paragraphs:
        if out:  # a paragraph break; both characters map to the whitespace around it
            out.append("\n\n")
            origin.extend((origin[-1] + 1, para[0][1] - 1))
        chars: list[str] = []
        offsets: list[int] = []
        for line, start in para:
            if chars and _LATIN_END.match(chars[-1]) and _LATIN_START.match(line):
                chars.append(" ")
                offsets.append(offsets[-1] + 1)  # the original line break
            chars.extend(line)
            offsets.extend(range(start, start + len(line)))
        if len(chars) >= WRAP_MIN_CHARS:  # prose: PDF spacing between CJK is noise
            joined = "".join(chars)
            keep = np.ones(len(chars), dtype=bool)
            for m in _CJK_SPACE_CJK.finditer(joined):
                keep[m.start():m.end()] = False
            for m in _MULTI_SPACE.finditer(joined):
                keep[m.start() + 1:m.end()] = False
            chars = [c for c, k in zip(chars, keep) if k]
            offsets = [o for o, k in zip(offsets, keep) if k]
        out.append("".join(chars))
        origin.extend(offsets)
    return CleanText("".join(out), np.array(origin + [len(original)], dtype=np.int32))
