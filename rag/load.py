"""Step 1 — load: turn files into ``RawDocument`` objects.

Supported: .txt .md .pdf .docx .html/.htm, and ``.jsonl`` corpora of
``{"id", "title", "text"}`` (one document per line, ids kept for evaluation).
Every failure is a ``LoadError`` with a bilingual message so a bad file is
reported and skipped instead of aborting a whole ingest.

Hostile files are bounded: an HTML file is read in linear time and refused beyond
``max_html_nodes`` elements or ``MAX_HTML_DEPTH`` levels of nesting; a .docx whose zip
members inflate beyond ``max_docx_bytes`` is refused before it is parsed (declared sizes and
the bytes actually inflated are both counted); a folder walk never leaves its folder through
a symbolic link, and says what it skipped (``iter_files(..., skipped=[])``).
"""
from __future__ import annotations

import datetime
import hashlib
import json
import os
import re
import zipfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

from charset_normalizer import from_bytes

from rag.config import Settings
from rag.filters import parse_date

SUPPORTED_SUFFIXES = {".txt", ".md", ".markdown", ".pdf", ".docx", ".html", ".htm", ".jsonl"}
# Defaults of the bounds, from the one configuration object (``RAG_MAX_HTML_NODES``, ...).
DEFAULT_MAX_HTML_NODES: int = Settings.model_fields["max_html_nodes"].default
DEFAULT_MAX_DOCX_BYTES = int(Settings.model_fields["max_docx_inflated_mb"].default * 1e6)
# html.parser nests unclosed tags (<p>a<p>b… is p > p > …), so an old page of thousands of
# unclosed paragraphs is that deep and still a document; nesting beyond this is not.
MAX_HTML_DEPTH = 10_000
_HTML_ELEMENT = re.compile(r"<[A-Za-z]")  # what html.parser takes for a start tag (an upper bound)
# A document's date for filters: the first of these fields (jsonl) / front-matter keys that reads as a date.
DATE_FIELDS = ("date", "publish_date", "published", "pub_date", "日期", "发布日期", "发布时间", "time")
_FRONT_MATTER = re.compile(r"\A\ufeff?---[ \t]*\n(.*?)\n---[ \t]*(?:\n|\Z)", re.S)
_HTML_SKIP = frozenset(("script", "style", "noscript"))
_HTML_HEADINGS = {f"h{level}": "#" * level for level in range(1, 7)}
_HTML_LINE_AFTER = frozenset(("p", "div", "li", "br", "tr"))
_READ_CHUNK = 1 << 20
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
        meta: metadata fields for filters (``rag.filters``): a jsonl record's other fields, a
            Markdown/text file's front-matter keys.
        date: ISO ``YYYY-MM-DD``: the ``date`` field / front-matter key, else the file's mtime.
    """

    doc_id: str
    title: str
    text: str
    source: str
    page_starts: list[int] = field(default_factory=list)
    meta: dict = field(default_factory=dict)
    date: str | None = None

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


def _check_docx_size(path: Path, max_bytes: int) -> None:
    """Refuse a .docx (a zip) whose members inflate beyond ``max_bytes`` in all, before any
    XML parser holds them in memory: the sizes the zip declares first, then the bytes that
    actually come out, since a crafted header can understate them."""
    too_big = LoadError(f"{path.name}: Word 文件解压后超过 {max_bytes / 1e6:.0f} MB，可能是压缩炸弹 / "
                        f".docx inflates beyond {max_bytes / 1e6:.0f} MB (zip bomb?)")
    try:
        with zipfile.ZipFile(path) as archive:
            members = archive.infolist()
            if sum(m.file_size for m in members) > max_bytes:
                raise too_big
            inflated = 0
            for member in members:
                with archive.open(member) as stream:
                    while chunk := stream.read(_READ_CHUNK):
                        inflated += len(chunk)
                        if inflated > max_bytes:
                            raise too_big
    except LoadError:
        raise
    except (zipfile.BadZipFile, zlib.error, NotImplementedError, RuntimeError, ValueError, EOFError,
            OSError) as exc:  # corrupt, encrypted or exotic compression
        raise LoadError(f"{path.name}: 无法读取 Word 文件 / unreadable .docx ({exc})") from exc


def _read_docx(path: Path, max_bytes: int = DEFAULT_MAX_DOCX_BYTES) -> str:
    import docx

    _check_docx_size(path, max_bytes)
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


def _read_html(data: bytes, name: str, max_nodes: int = DEFAULT_MAX_HTML_NODES) -> str:
    """The text of an HTML page: no script/style/noscript, headings as Markdown ``#`` lines,
    a line break after each p/div/li/br/tr.

    One pass over the parsed tree with an explicit stack (no recursion, no tree edits: the
    inserted-string version cost a sibling search per tag, quadratic on wide pages). Refused:
    more than ``max_nodes`` elements, or nesting deeper than ``MAX_HTML_DEPTH``.
    """
    from bs4 import BeautifulSoup, CData, NavigableString, Tag

    text = decode_bytes(data, name)
    elements = sum(1 for _ in _HTML_ELEMENT.finditer(text))
    if elements > max_nodes:
        raise LoadError(f"{name}: HTML 元素过多（约 {elements} 个，上限 {max_nodes}）/ "
                        f"too many HTML elements (~{elements}, at most {max_nodes})")
    soup = BeautifulSoup(text, "html.parser")
    parts: list[str] = []
    stack = [iter(soup.contents)]
    closing = [""]  # what to write when the element on the stack ends
    while stack:
        node = next(stack[-1], None)
        if node is None:
            stack.pop()
            parts.append(closing.pop())
        elif isinstance(node, Tag):
            if node.name in _HTML_SKIP:
                continue
            if len(stack) > MAX_HTML_DEPTH:
                raise LoadError(f"{name}: HTML 嵌套超过 {MAX_HTML_DEPTH} 层 / HTML nested deeper than "
                                f"{MAX_HTML_DEPTH} levels")
            heading = _HTML_HEADINGS.get(node.name)
            if heading:  # keep headings visible to the section detector
                parts.append(f"\n\n{heading} ")
            stack.append(iter(node.contents))
            closing.append("\n\n" if heading else "\n" if node.name in _HTML_LINE_AFTER else "")
        elif type(node) in (NavigableString, CData):  # what get_text() reads: no comments, doctype...
            parts.append(str(node))
    return "".join(parts)


def load_file(path: Path, doc_id: str, max_bytes: int, *, max_docx_bytes: int = DEFAULT_MAX_DOCX_BYTES,
              max_html_nodes: int = DEFAULT_MAX_HTML_NODES) -> list[RawDocument]:
    """Read one file into documents (a .jsonl corpus yields many).

    Args:
        path: the file.
        doc_id: id to give a single-document file.
        max_bytes: files larger than this are refused.
        max_docx_bytes: a .docx whose zip members inflate beyond this is refused
            (``RAG_MAX_DOCX_INFLATED_MB``).
        max_html_nodes: an HTML file with more elements than this is refused (``RAG_MAX_HTML_NODES``).
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
        text = _read_docx(path, max_docx_bytes)
    elif suffix in (".html", ".htm"):
        text = _read_html(path.read_bytes(), path.name, max_html_nodes)
    else:
        text = decode_bytes(path.read_bytes(), path.name)
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    if not text.strip():
        raise LoadError(f"{path.name}: 没有可提取的文字 / no extractable text")
    meta: dict = {}
    if suffix in (".md", ".markdown", ".txt"):
        meta, text = front_matter(text)
        if not text.strip():
            raise LoadError(f"{path.name}: 只有 front matter，没有正文 / front matter only, no text")
    title = str(meta.get("title") or "").strip() or _title_from_text(text, path.stem)
    return [RawDocument(doc_id, title, text, str(path), page_starts, meta, _document_date(meta, path))]


def front_matter(text: str) -> tuple[dict[str, str], str]:
    """Split a leading ``---`` block (YAML-style front matter) from the text: its ``key: value``
    lines (values kept as text; lists and nesting are not read) and the text after it, which is
    what is stored, indexed and cited."""
    match = _FRONT_MATTER.match(text)
    if not match:
        return {}, text
    meta = {}
    for line in match.group(1).splitlines():
        key, sep, value = line.partition(":")
        key, value = key.strip(), value.strip().strip("\"'")
        if sep and key and value and not key.startswith(("#", "-", " ")):
            meta[key] = value
    return meta, text[match.end():]


def _document_date(meta: dict, path: Path) -> str | None:
    """A document's date: the first of ``DATE_FIELDS`` that reads as a date, else the file's mtime."""
    for name in DATE_FIELDS:
        if (found := parse_date(meta.get(name))) is not None:
            return found
    try:
        return datetime.date.fromtimestamp(path.stat().st_mtime).isoformat()
    except (OSError, ValueError, OverflowError):
        return None


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
                meta = {k: v for k, v in row.items() if k not in ("id", "title", "text")
                        and isinstance(v, (str, int, float, bool))}
                yield RawDocument(doc_id, str(row.get("title") or ""), text, str(path), meta=meta,
                                  date=_document_date(meta, path))


def _folder_files(root: Path, skipped: list[tuple[str, str]]) -> list[Path]:
    """The regular files under ``root``, sorted as ``sorted(root.rglob("*"))`` would give them.

    Hidden entries (``.git``, ``.DS_Store``) are not entered; a symbolic link is followed only
    to a file inside ``root`` (never to a folder: no loops, no second copy of a subtree); other
    special files (FIFOs, devices) are left alone. Each of these lands in ``skipped`` with why.
    """
    top = root.resolve()
    found: list[Path] = []
    folders = [root]
    while folders:  # iterative: no recursion limit on deep trees
        folder = folders.pop()
        try:
            with os.scandir(folder) as scan:
                entries = sorted(scan, key=lambda e: e.name)
        except OSError as exc:
            skipped.append((str(folder), f"无法读取文件夹 / cannot read the folder ({exc.strerror or exc})"))
            continue
        for entry in entries:
            path = Path(entry.path)
            try:
                if entry.name.startswith("."):
                    zh, en = ("文件夹", "folder") if entry.is_dir(follow_symlinks=False) else ("文件", "file")
                    skipped.append((str(path), f"隐藏的{zh}，未导入 / hidden {en}, not ingested"))
                elif entry.is_symlink():
                    target = path.resolve()
                    if not target.is_relative_to(top):
                        skipped.append((str(path), (f"符号链接指向导入文件夹之外（{target}），未跟随 / "
                                                    "symbolic link out of the ingested folder, not followed")))
                    elif target.is_dir():
                        skipped.append((str(path), ("指向文件夹的符号链接，未跟随 / symbolic link to a folder, "
                                                    "not followed")))
                    elif target.is_file():
                        found.append(path)
                    else:
                        skipped.append((str(path), ("符号链接无效或不指向普通文件 / broken symbolic link or not "
                                                    "a regular file")))
                elif entry.is_dir(follow_symlinks=False):
                    folders.append(path)
                elif entry.is_file(follow_symlinks=False):
                    found.append(path)
                else:
                    skipped.append((str(path), "不是普通文件（管道、设备…）/ not a regular file (pipe, device…)"))
            except (OSError, RuntimeError) as exc:  # unreadable entry, symlink loop
                skipped.append((str(path), f"无法读取 / cannot read ({exc})"))
    return sorted(found)


def iter_files(paths: list[Path], skipped: list[tuple[str, str]] | None = None) -> Iterator[tuple[Path, str]]:
    """Yield ``(file, doc_id)`` for files and folders (recursive, sorted, hidden skipped).

    The id of a file inside a folder is its path relative to that folder's parent,
    so ``docs/a.txt`` stays ``docs/a.txt`` wherever the command runs from (``docs/..``
    counts as the folder it names, never as ``..``).

    Args:
        paths: files and folders, as given by the user (a file named here is read even
            when it is a symbolic link: the user chose it).
        skipped: receives ``(path, reason)`` for what a folder walk leaves out: hidden
            entries, symbolic links out of the folder or to folders, special files.
    """
    skipped = skipped if skipped is not None else []
    for root in paths:
        root = Path(root)
        if root.is_dir():
            name = root.name if root.name != ".." else Path(os.path.abspath(root)).name
            for file in _folder_files(root, skipped):
                yield file, str(Path(name) / file.relative_to(root))
        else:
            yield root, root.name  # load_file reports a missing or special file
