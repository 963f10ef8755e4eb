"""Step 3 — split: Chinese-aware chunks that never cross a section heading.

A document is cut at headings first (Markdown ``#`` lines, city/section lines
such as ``宁波:“轮值村主任”成乡村振兴好帮手``, short title lines), then each
section is packed sentence by sentence (。！？；… and paragraph breaks) into
chunks of at most ``chunk_tokens`` tiktoken tokens, with whole-sentence overlap.
Each chunk keeps its section path and its span in the *original* text.
"""
from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass

from rag.clean import CleanText, is_heading_line
from rag.load import RawDocument
from rag.tokens import count_tokens
from rag.zh import CJK, SENTENCE_CUT

_MD_HEADING = re.compile(r"^(#{1,6})\s*(.+)$")
# "宁波:…", "湖州：…" — a place or topic name followed by a colon starts a section.
_NAMED_SECTION = re.compile(rf"^[{CJK}]{{2,6}}[:：]")


@dataclass
class Chunk:
    """A retrievable passage.

    Attributes:
        text: cleaned chunk text (what the user reads).
        section: heading path, e.g. ``"宁波:“轮值村主任”成乡村振兴好帮手"`` or ``"安装 > 离线"``.
        start, end: character span in the original document text.
        page: 1-based PDF page of the start, or None.
        tokens: tiktoken count of ``text``.
    """

    text: str
    section: str
    start: int
    end: int
    page: int | None
    tokens: int

    def indexed_text(self, title: str) -> str:
        """What gets embedded and BM25-indexed: the context travels with the chunk,
        so a passage that never names its city or document still matches."""
        head = " ".join(part for part in (title, self.section) if part and part not in self.text[:80])
        return f"{head}\n{self.text}" if head else self.text

    def content_hash(self, title: str) -> str:
        return hashlib.sha256(self.indexed_text(title).encode()).hexdigest()


def _sections(clean: CleanText) -> list[tuple[str, int, int]]:
    """``(section path, start, end)`` ranges of the cleaned text, cut at headings."""
    paragraphs = []
    pos = 0
    for para in clean.text.split("\n\n"):
        paragraphs.append((para, pos))
        pos += len(para) + 2
    sections: list[tuple[str, int, int]] = []
    md_path: list[tuple[int, str]] = []  # (level, heading) stack for Markdown
    named = ""  # the open "宁波:…" section: a plain title line below it is its subsection
    current_name, current_start = "", 0

    def close(at: int) -> None:
        if at > current_start:
            sections.append((current_name, current_start, at))

    for idx, (para, start) in enumerate(paragraphs):
        md = _MD_HEADING.match(para)
        next_para = paragraphs[idx + 1][0] if idx + 1 < len(paragraphs) else ""
        if md:
            level, heading = len(md.group(1)), md.group(2).strip()
            md_path = [(lv, h) for lv, h in md_path if lv < level] + [(level, heading)]
            name, named = " > ".join(h for _, h in md_path), ""
        elif is_heading_line(para) and _NAMED_SECTION.match(para):
            named = para.strip()
            name = " > ".join([h for _, h in md_path] + [named])
        elif is_heading_line(para) and next_para and not is_heading_line(next_para):
            # "“初心之旅”多党合作精品研学线路" under "金华:…" is about 金华: keep the city in the path.
            name = " > ".join([h for _, h in md_path] + [named, para.strip()] if named else
                              [h for _, h in md_path] + [para.strip()])
        else:
            continue
        close(start)
        current_name, current_start = name, start
    close(len(clean.text))
    return sections


def _sentences(text: str, base: int) -> list[tuple[int, int]]:
    """Spans (offset by ``base``) of the sentences of ``text`` as the chunker cuts them
    (``rag.zh.SENTENCE_CUT``: end punctuation with its closing quotes, a Latin full stop
    before a space, line breaks)."""
    spans = []
    for m in SENTENCE_CUT.finditer(text):
        if m.end() > m.start() and text[m.start():m.end()].strip():
            spans.append((base + m.start(), base + m.end()))
    return spans


def split_document(
    doc: RawDocument, clean: CleanText, chunk_tokens: int = 300, overlap_tokens: int = 40
) -> list[Chunk]:
    """Cut one cleaned document into chunks.

    Args:
        doc: the loaded document (for page numbers).
        clean: its cleaned text with the offset map.
        chunk_tokens: maximum tokens per chunk (a longer single sentence is cut hard).
        overlap_tokens: at most this many tokens of whole sentences repeated from the previous chunk.
    """
    text = clean.text
    chunks: list[Chunk] = []

    def emit(section: str, start: int, end: int) -> None:
        while start < end and text[start].isspace():
            start += 1
        while end > start and text[end - 1].isspace():
            end -= 1
        if end <= start:
            return
        body = text[start:end]
        o_start, o_end = clean.span(start, end)
        chunks.append(Chunk(body, section, o_start, o_end, doc.page_at(o_start), count_tokens(body)))

    for section, s_start, s_end in _sections(clean):
        units: list[tuple[int, int, int]] = []  # (start, end, tokens), each within the limit
        for a, b in _sentences(text[s_start:s_end], s_start):
            while a < b:  # a run-on "sentence" is cut into pieces that fit
                cut, n = _fitting_prefix(text, a, b, chunk_tokens)
                units.append((a, cut, n))
                a = cut
        i = 0
        while i < len(units):
            j, total = i + 1, units[i][2]
            while j < len(units) and total + units[j][2] <= chunk_tokens:
                total += units[j][2]
                j += 1
            # token counts are not additive: shrink until the real text fits
            while j - 1 > i and count_tokens(text[units[i][0]:units[j - 1][1]].strip()) > chunk_tokens:
                j -= 1
            emit(section, units[i][0], units[j - 1][1])
            if j >= len(units):
                break
            # Step back over whole sentences for the overlap, always moving forward.
            k, back = j, 0
            while k - 1 > i and back + units[k - 1][2] <= overlap_tokens:
                k -= 1
                back += units[k][2]
            i = k
    return chunks


def _fitting_prefix(text: str, start: int, end: int, limit: int) -> tuple[int, int]:
    """``(cut, tokens)``: the longest ``text[start:cut]`` (cut <= end) of at most ``limit`` tokens.

    Looks at a window of ``4 * limit`` characters, widened only for unusually dense text
    (up to ``32 * limit``), so a megabyte without punctuation stays cheap to cut.
    """
    lo, hi = start + 1, min(end, start + 4 * limit)
    while True:
        n = count_tokens(text[start:hi])
        if n > limit:
            break
        if hi == end or hi - start >= 32 * limit:
            return hi, n
        lo, hi = hi, min(end, start + 2 * (hi - start))
    hi -= 1
    while lo < hi:  # text[start:lo] fits, text[start:hi + 1] does not
        mid = (lo + hi + 1) // 2
        if count_tokens(text[start:mid]) <= limit:
            lo = mid
        else:
            hi = mid - 1
    return lo, count_tokens(text[start:lo])
