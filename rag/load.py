"""Step 1 — load: turn files into ``RawDocument`` objects.

Supported: .txt .md .pdf .docx .html/.htm, and ``.jsonl`` corpora of
``{"id", "title", "text"}`` (one document per line, ids kept for evaluation).
Every failure is a ``LoadError`` with a bilingual message so a bad file is
reported and skipped instead of aborting a whole ingest.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

from charset_normalizer import from_bytes

SUPPORTED_SUFFIXES = {".txt", ".md", ".markdown", ".pdf", ".docx", ".html", ".htm", ".jsonl"}
# Chinese punctuation counted as "everyday" text by ``_common_share``.
_CJK_PUNCT = set("，。、；：？！“”‘’（）《》【】「」『』…—·")


class LoadError(Exception):
    """A file could not be read; the message is shown to the user as is."""


@dataclass
class RawDocument:
    """One document as read from disk, before cleaning.

    Attributes:
        doc_id: stable id (the jsonl ``id`` or the path relative to the ingest root).
        title: document title (first heading, jsonl title, or file name).
        text: the original text; citations point at character offsets in it.
        source: path of the file it came from.
        page_starts: for PDFs, the offset in ``text`` where each page starts.
    """

    doc_id: str
    title: str
    text: str
    source: str
    page_starts: list[int] = field(default_factory=list)

    @property
    def content_hash(self) -> str:
        return hashlib.sha256(f"{self.title}\x00{self.text}".encode()).hexdigest()

    def page_at(self, offset: int) -> int | None:
        """1-based page number containing ``offset`` (None when not paged)."""
        if not self.page_starts:
            return None
        page = 0
        for i, start in enumerate(self.page_starts):
            if start <= offset:
                page = i
            else:
                break
        return page + 1


def decode_bytes(data: bytes, name: str) -> str:
    """Decode text bytes, detecting UTF-8 (with or without BOM), GBK/GB18030 and Big5.

    Raises ``LoadError`` for binary data instead of returning mojibake.
    """
    if b"\x00" in data[:8192] and not data.startswith((b"\xff\xfe", b"\xfe\xff")):
        raise LoadError(f"{name}: 二进制文件，不是文本 / binary file, not text")
    try:
        return data[3:].decode("utf-8") if data.startswith(b"\xef\xbb\xbf") else data.decode("utf-8")
    except UnicodeDecodeError:
        pass
    # Almost any Big5 file is also valid GB18030 (and short GBK files can be valid Big5):
    # decode with both and keep the reading made of everyday characters.
    candidates = []
    for enc in ("gb18030", "big5"):
        try:
            text = data.decode(enc)
        except UnicodeDecodeError:
            continue
        if _looks_like_text(text):
            candidates.append((_common_share(text, enc), enc == "gb18030", text))
    if candidates:
        return max(candidates)[2]
    best = from_bytes(data).best()
    if best is None or not _looks_like_text(str(best)):
        raise LoadError(f"{name}: 无法识别文本编码，可能是二进制文件 / cannot detect the text encoding (binary file?)")
    return str(best)


def _common_share(text: str, encoding: str) -> float:
    """Share of the non-ASCII characters that are everyday Chinese for ``encoding``:
    GB2312 ideographs for gb18030, Big5 level 1 (0xA440-0xC67E) for big5. The wrong
    codec yields rare ideographs, kana and private-use characters instead."""

    def common(ch: str) -> bool:
        if ch in _CJK_PUNCT:
            return True
        if not "\u4e00" <= ch <= "\u9fff":
            return False
        try:
            if encoding == "big5":
                return b"\xa4\x40" <= ch.encode("big5") <= b"\xc6\x7e"
            ch.encode("gb2312")
            return True
        except UnicodeEncodeError:
            return False

    wide = [ch for ch in text if ord(ch) > 127]
    return sum(map(common, wide)) / len(wide) if wide else 1.0


def _looks_like_text(text: str) -> bool:
    """Reject decodings full of control characters (a sign of the wrong codec)."""
    if not text:
        return True
    bad = sum(1 for ch in text if ord(ch) < 32 and ch not in "\r\n\t\f")
    return bad / len(text) < 0.001


def _title_from_text(text: str, fallback: str) -> str:
    for line in text.splitlines():
        line = line.strip().lstrip("#").strip()
        if line:
            return line[:80]
    return fallback


def _read_pdf(path: Path) -> tuple[str, list[int]]:
    from pypdf import PdfReader
    from pypdf.errors import PdfReadError

    try:
        reader = PdfReader(str(path))
        if reader.is_encrypted:
            try:
                if not reader.decrypt(""):
                    raise LoadError(f"{path.name}: PDF 已加密 / encrypted PDF")
            except Exception as exc:  # pypdf raises several types here
                raise LoadError(f"{path.name}: PDF 已加密 / encrypted PDF") from exc
        parts: list[str] = []
        starts: list[int] = []
        offset = 0
        for page in reader.pages:
            starts.append(offset)
            page_text = (page.extract_text() or "").rstrip() + "\n\n"
            parts.append(page_text)
            offset += len(page_text)
        return "".join(parts), starts
    except LoadError:
        raise
    except (PdfReadError, ValueError, KeyError, TypeError, OSError) as exc:
        raise LoadError(f"{path.name}: PDF 文件损坏 / corrupt PDF ({exc})") from exc


def _read_docx(path: Path) -> str:
    import docx

    try:
        document = docx.Document(str(path))
    except Exception as exc:  # python-docx raises zipfile/KeyError/ValueError
        raise LoadError(f"{path.name}: 无法读取 Word 文件 / unreadable .docx ({exc})") from exc
    lines = []
    for para in document.paragraphs:
        text = para.text.strip()
        if not text:
            continue
        style = (para.style.name or "").lower() if para.style is not None else ""
        if style.startswith("heading"):
            level = "".join(ch for ch in style if ch.isdigit()) or "1"
            text = "#" * int(level) + " " + text
        lines.append(text)
    for table in document.tables:
        for row in table.rows:
            lines.append(" | ".join(cell.text.strip() for cell in row.cells))
    return "\n\n".join(lines)


def _read_html(data: bytes, name: str) -> str:
    from bs4 import BeautifulSoup

    soup = BeautifulSoup(decode_bytes(data, name), "html.parser")
    for tag in soup(["script", "style", "noscript"]):
        tag.decompose()
    for level in range(1, 7):  # keep headings visible to the section detector
        for tag in soup.find_all(f"h{level}"):
            tag.insert_before("\n\n" + "#" * level + " ")
            tag.insert_after("\n\n")
    for tag in soup.find_all(["p", "div", "li", "br", "tr"]):
        tag.insert_after("\n")
    return soup.get_text()


def load_file(path: Path, doc_id: str, max_bytes: int) -> list[RawDocument]:
    """Read one file into documents (a .jsonl corpus yields many).

    Args:
        path: the file.
        doc_id: id to give a single-document file.
        max_bytes: files larger than this are refused.
    """
    suffix = path.suffix.lower()
    if not path.is_file():
        raise LoadError(f"{path}: 文件不存在 / no such file")
    if suffix not in SUPPORTED_SUFFIXES:
        raise LoadError(f"{path.name}: 不支持的文件类型 / unsupported file type '{suffix}'")
    size = path.stat().st_size
    if size > max_bytes:
        raise LoadError(
            f"{path.name}: 文件过大 ({size / 1e6:.1f} MB > {max_bytes / 1e6:.0f} MB) / file too large"
        )
    if size == 0:
        raise LoadError(f"{path.name}: 空文件 / empty file")
    page_starts: list[int] = []
    if suffix == ".jsonl":
        return list(_read_jsonl(path))
    if suffix == ".pdf":
        text, page_starts = _read_pdf(path)
    elif suffix == ".docx":
        text = _read_docx(path)
    elif suffix in (".html", ".htm"):
        text = _read_html(path.read_bytes(), path.name)
    else:
        text = decode_bytes(path.read_bytes(), path.name)
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    if not text.strip():
        raise LoadError(f"{path.name}: 没有可提取的文字 / no extractable text")
    return [RawDocument(doc_id, _title_from_text(text, path.stem), text, str(path), page_starts)]


def _read_jsonl(path: Path) -> Iterator[RawDocument]:
    with path.open("rb") as fh:
        for line_no, raw in enumerate(fh, 1):
            if not raw.strip():
                continue
            try:
                row = json.loads(decode_bytes(raw, path.name))
                text = str(row["text"])
                doc_id = str(row["id"])
            except (ValueError, KeyError, TypeError) as exc:
                raise LoadError(
                    f"{path.name}:{line_no}: 需要 {{\"id\",\"title\",\"text\"}} / "
                    f"expected a JSON object with id, title, text ({exc})"
                ) from exc
            if text.strip():
                yield RawDocument(doc_id, str(row.get("title") or ""), text, str(path))


def iter_files(paths: list[Path]) -> Iterator[tuple[Path, str]]:
    """Yield ``(file, doc_id)`` for files and folders (recursive, sorted, hidden skipped).

    The id of a file inside a folder is its path relative to that folder's parent,
    so ``docs/a.txt`` stays ``docs/a.txt`` wherever the command runs from.
    """
    for root in paths:
        root = Path(root)
        if root.is_dir():
            for file in sorted(root.rglob("*")):
                rel = file.relative_to(root)
                if file.is_file() and not any(p.startswith(".") for p in rel.parts):
                    yield file, str(Path(root.name) / rel)
        elif root.exists():
            yield root, root.name
        else:
            yield root, root.name  # load_file reports it missing
