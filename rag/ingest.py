"""Ingest pipeline: load → clean → split → embed → store/index, with progress and a report.

Incremental: a document whose content hash is unchanged is skipped; a chunk whose
text was embedded before (in this KB) reuses its vector; vectors are cached per
batch, so an interrupted ingest resumes where it stopped.

One writer per KB: an ingest (and a removal) holds the KB's write lock from start to
commit, so a second one (CLI, UI upload or delete) waits for it, saying so.

Document ids (``document_files``): a file's path relative to the parent of the folder
given (``docs/a.txt`` for ``rag ingest docs/``), a single file's name; when two roots
would give the same id, those roots' ids take more of their path (``x/d/规.txt`` and
``y/d/规.txt``). A jsonl record's id is namespaced by its file: ``corpus.jsonl/<id>``.
"""
from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from tqdm import tqdm

from rag.clean import clean_text
from rag.config import Settings
from rag.embed import make_embedder
from rag.lexical import LexicalTokenizer
from rag.load import SUPPORTED_SUFFIXES, LoadError, RawDocument, iter_files, load_file
from rag.split import split_document
from rag.store import KnowledgeBase
from rag.store_transaction import metadata_json


@dataclass
class IngestReport:
    added: list[str] = field(default_factory=list)
    updated: list[str] = field(default_factory=list)
    unchanged: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)
    failed: list[tuple[str, str]] = field(default_factory=list)  # (path, message)
    skipped: list[str] = field(default_factory=list)  # unsupported types found in folders
    notes: list[tuple[str, str]] = field(default_factory=list)  # (path, why) left out of folders: hidden, symlinks…
    chunks: int = 0
    embedded: int = 0
    reused_vectors: int = 0
    embed_seconds: float = 0.0
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return not self.failed

    def summary(self) -> str:
        rate = self.embedded / self.embed_seconds if self.embed_seconds > 0 else 0.0
        lines = [
            f"新增 added {len(self.added)} · 更新 updated {len(self.updated)} · 未变 unchanged {len(self.unchanged)}"
            f" · 删除 removed {len(self.removed)} · 失败 failed {len(self.failed)}",
            f"片段 chunks {self.chunks} · 新嵌入 embedded {self.embedded} ({rate:.1f}/s)"
            f" · 复用向量 reused {self.reused_vectors} · 用时 {self.seconds:.1f}s",
        ]
        if self.skipped:
            lines.append(f"跳过不支持的文件 skipped unsupported: {len(self.skipped)}")
        if self.notes:
            lines.append(f"跳过 skipped {len(self.notes)}（隐藏文件、符号链接等 / hidden files, symbolic links…）:")
            lines += [f"  - {path}: {why}" for path, why in self.notes[:20]]
            if len(self.notes) > 20:
                lines.append(f"  … 另有 {len(self.notes) - 20} 项 / {len(self.notes) - 20} more")
        for path, message in self.failed:
            lines.append(f"  ✗ {message}" if path in message else f"  ✗ {path}: {message}")
        return "\n".join(lines)


def open_kb_for_writing(settings: Settings, embedder) -> KnowledgeBase:
    """Open (or create) the KB of ``settings`` and check it was built with ``embedder``.

    Hold ``kb.write_lock()`` around everything written through it (``Ingestor.ingest`` does).
    """
    kb = KnowledgeBase(settings.kb_dir, create=True, lock_timeout=settings.write_lock_timeout)
    try:
        with kb.write_lock():
            kb.check_embedder(embedder.model_id, embedder.dim)
    except BaseException:
        kb.close()
        raise
    return kb


def _parts(path: Path) -> tuple[str, ...]:
    """Components of the absolute path (symlinks not resolved: the names the user sees)."""
    return Path(os.path.abspath(path)).parts[1:]


def document_files(paths: list[Path], skipped: list[tuple[str, str]] | None = None
                   ) -> tuple[list[tuple[Path, str, str]], list[tuple[str, str]]]:
    """``(file, doc_id, former_id)`` for every file under ``paths``, with unique ids, and the
    files left out as ``(path, message)`` (only when two different files cannot be told apart).
    ``former_id`` is the id the file gets when ingested alone (what older versions always gave).

    A file named twice (``docs/`` and ``docs/a.txt``, or a folder given twice) is one
    document: the first naming wins. Ids are those of ``rag.load.iter_files`` (the folder's
    name plus the path inside it; a single file's name) unless two roots collide: then the
    colliding roots' ids take one more component of their absolute path, until they differ.
    """
    roots: list[tuple[Path, list[tuple[Path, str]]]] = []
    seen: set[str] = set()
    for root in map(Path, paths):
        entries = []
        for file, legacy in iter_files([root], skipped):
            real = os.path.realpath(file)
            if real not in seen:
                seen.add(real)
                entries.append((file, legacy))
        roots.append((root, entries))

    def doc_id(i: int, file: Path, legacy: str, level: int) -> str:
        if level == 0:
            return legacy
        root = roots[i][0]
        if root.is_dir():
            base = _parts(root)
            keep = len(Path(root.name).parts) + level
            return "/".join([*base[max(0, len(base) - keep):], *file.relative_to(root).parts])
        base = _parts(file)
        return "/".join(base[max(0, len(base) - 1 - level):])

    def max_level(i: int) -> int:
        root = roots[i][0]
        base = _parts(root)
        return max(0, len(base) - (len(Path(root.name).parts) if root.is_dir() else 1))

    levels = [0] * len(roots)
    while True:
        owners: dict[str, list[tuple[int, Path, str]]] = {}
        for i, (_, entries) in enumerate(roots):
            for file, legacy in entries:
                owners.setdefault(doc_id(i, file, legacy, levels[i]), []).append((i, file, legacy))
        clashes = {d: who for d, who in owners.items() if len(who) > 1}
        grow = {i for who in clashes.values() for i, _, _ in who if levels[i] < max_level(i)}
        if not clashes or not grow:
            break
        for i in grow:
            levels[i] += 1
    files, conflicts = [], []
    for d, who in owners.items():
        if len(who) > 1:
            names = " 与 / and ".join(str(f) for _, f, _ in who)
            message = f"{names}: 文档 id 相同（{d}），都未导入 / same document id {d!r}, none imported"
            conflicts += [(str(f), message) for _, f, _ in who]
        else:
            _, file, legacy = who[0]
            files.append((file, d, legacy))
    return files, conflicts


def _same_file(kb: KnowledgeBase, doc_id: str, source: str) -> bool:
    """Whether the stored document ``doc_id`` was read from the file ``source``."""
    stored = kb.document_source(doc_id)
    return stored is not None and os.path.realpath(stored) == os.path.realpath(source)


def _read_user_words(path: Path | None) -> list[str]:
    if not path:
        return []
    words = []
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        if line.strip() and not line.startswith("#"):
            words.append(line.split()[0])
    return words


class Ingestor:
    """Adds files to a knowledge base.

    Args:
        settings: the configuration (KB location, chunk sizes, embedder).
        embedder: an already loaded embedder (built from settings when omitted).
    """

    def __init__(self, settings: Settings, embedder=None):
        self.settings = settings
        self.embedder = embedder or make_embedder(settings.embedder, settings.threads, settings.embed_batch_size)

    def ingest(self, paths: list[Path], prune: bool = False, progress: bool = True) -> IngestReport:
        """Ingest files and folders; with ``prune``, documents not found under ``paths`` are removed."""
        started = time.perf_counter()
        report = IngestReport()
        kb = KnowledgeBase(self.settings.kb_dir, create=True, lock_timeout=self.settings.write_lock_timeout)
        try:
            # One writer per KB from the first read to the commit: another ingest, removal or UI
            # upload waits here (saying so), so none works from a state the other is changing.
            with kb.write_lock():
                kb.check_embedder(self.embedder.model_id, self.embedder.dim)
                self._ingest_locked(kb, paths, prune, progress, report)
        finally:
            kb.close()
        report.seconds = time.perf_counter() - started
        return report

    def _ingest_locked(self, kb: KnowledgeBase, paths, prune: bool, progress: bool, report: IngestReport) -> None:
        user_words = sorted(set(kb.user_words()) | set(_read_user_words(self.settings.user_dict)))
        tokenizer = LexicalTokenizer()
        tokenizer.add_words(user_words)
        docs, renames, relabelled = self._load_all(paths, kb, report, progress)
        prepared = []
        for doc in docs:
            clean = clean_text(doc.text)
            chunks = split_document(doc, clean, self.settings.chunk_tokens, self.settings.chunk_overlap_tokens)
            if not chunks:
                report.failed.append((doc.source, f"{doc.doc_id}: 没有可索引的文字 / nothing to index"))
                continue
            hashes = [c.content_hash(doc.title) for c in chunks]
            # tokenised here, not inside the transaction: SQLite's write lock is held briefly
            lexical = [tokenizer.tokenize(c.indexed_text(doc.title)) for c in chunks]
            prepared.append((doc, chunks, hashes, lexical))
        self._embed_missing(kb, prepared, report, progress)
        # unchanged documents were found too: prune must keep them
        seen = {doc.doc_id for doc in docs} | set(report.unchanged) | {p for p, _ in report.failed}
        with kb.transaction() as tx:
            tx.set_user_words(user_words)  # new words: a new generation, so searchers reload them
            for new, old in renames.items():  # same file, id given by an older version: keep its work
                tx.rename_document(old, new)
            for doc in relabelled:  # same text, new metadata (front matter, jsonl fields, mtime): no re-indexing
                tx.set_document_metadata(doc.doc_id, doc.meta, doc.date)
            for doc, chunks, hashes, lexical in prepared:
                tx.put_document(doc, chunks, hashes, lexical)
                report.chunks += len(chunks)
            if prune:
                for info in kb.documents():
                    if info.doc_id not in seen and info.source not in seen:
                        tx.delete_document(info.doc_id)
                        report.removed.append(info.doc_id)

    def _load_all(self, paths, kb: KnowledgeBase, report: IngestReport,
                  progress: bool) -> tuple[list[RawDocument], dict[str, str], list[RawDocument]]:
        """The documents to (re)index; ``{new id: stored id}`` for stored documents of the same
        file that an older version (or a lone ingest) gave another id; and the unchanged
        documents whose metadata changed."""
        files, conflicts = document_files([Path(p) for p in paths], report.notes)
        report.failed.extend(conflicts)
        explicit = {str(Path(p)) for p in paths}
        max_bytes = int(self.settings.max_file_mb * 1e6)
        docs: dict[str, RawDocument] = {}
        former: dict[str, str] = {}
        for file, doc_id, former_id in tqdm(files, desc="读取 loading", unit="file", disable=not progress or len(files) < 2,
                                 file=sys.stderr):
            if file.suffix.lower() not in SUPPORTED_SUFFIXES and str(file) not in explicit:
                report.skipped.append(str(file))
                continue
            try:
                loaded = load_file(file, doc_id, max_bytes, max_docx_bytes=int(self.settings.max_docx_inflated_mb * 1e6),
                                   max_html_nodes=self.settings.max_html_nodes)
            except LoadError as exc:
                report.failed.append((str(file), str(exc)))
                continue
            except Exception as exc:  # a parser bug must not lose the other files
                report.failed.append((str(file), f"{file.name}: 读取失败 / failed to read ({type(exc).__name__}: {exc})"))
                continue
            jsonl = file.suffix.lower() == ".jsonl"
            for doc in loaded:
                record_id = doc.doc_id
                if jsonl:
                    # a record's id lives in its file's namespace: it can never replace another file's
                    # document (rag eval's gold ids still match: evaluate.doc_matches takes path suffixes)
                    doc.doc_id = f"{doc_id}/{record_id}"
                if doc.doc_id in docs:  # never silently: the first one stays, the other is reported
                    first = docs[doc.doc_id]
                    what = (f"{file.name}: 重复的 id {doc.doc_id[len(doc_id) + 1:]!r}，只导入了第一条"
                            f" / duplicate id, only the first record was imported"
                            if first.source == doc.source else
                            f"{doc.source}: 与 {first.source} 的文档 id 相同（{doc.doc_id}），未导入"
                            f" / same document id as {first.source}, not imported")
                    report.failed.append((str(file), what))
                    continue
                docs[doc.doc_id] = doc
                former[doc.doc_id] = record_id if jsonl else former_id
        result, renames, relabelled = [], {}, []
        for doc in docs.values():
            known = kb.document_hash(doc.doc_id)
            old = former[doc.doc_id]
            if known is None and old != doc.doc_id and old not in docs and _same_file(kb, old, doc.source):
                renames[doc.doc_id] = old
                known = kb.document_hash(old)
            if known == doc.content_hash:
                report.unchanged.append(doc.doc_id)
                stored = kb.document_metadata(renames.get(doc.doc_id, doc.doc_id))
                if stored is not None and stored != (metadata_json(doc.meta), doc.date):
                    relabelled.append(doc)
                continue
            (report.updated if known else report.added).append(doc.doc_id)
            result.append(doc)
        return result, renames, relabelled

    def _embed_missing(self, kb: KnowledgeBase, prepared, report: IngestReport, progress: bool) -> None:
        texts: dict[str, str] = {}
        for doc, chunks, hashes, _ in prepared:
            for chunk, h in zip(chunks, hashes):
                texts.setdefault(h, chunk.indexed_text(doc.title))
        # claimed first: no other writer's commit may prune what this one is about to link
        kb.claim_vectors(list(texts))
        cached = kb.cached_vectors(list(texts))
        todo = [h for h in texts if h not in cached]
        report.reused_vectors = len(texts) - len(todo)
        todo.sort(key=lambda h: len(texts[h]))  # similar lengths per batch: even chunks per thread
        batch = max(1, self.settings.embed_batch_size)
        parts = [todo[i:i + batch] for i in range(0, len(todo), batch)]
        started = time.perf_counter()
        from concurrent.futures import ThreadPoolExecutor

        def embed(part: list[str]):
            return self.embedder.embed_passages([texts[h] for h in part])

        # Pipelined: the next batch is embedded (in C, GIL released) while this thread stores the
        # previous one's vectors, so the engine never waits for SQLite. Still one batch at a time
        # in the engine, and each batch is committed before the next is stored (resumable).
        with tqdm(total=len(todo), desc="嵌入 embedding", unit="passage", disable=not progress or not todo,
                  file=sys.stderr) as bar, ThreadPoolExecutor(max_workers=1) as pool:
            pending = pool.submit(embed, parts[0]) if parts else None
            for k, part in enumerate(parts):
                vectors = pending.result()
                if k + 1 < len(parts):
                    pending = pool.submit(embed, parts[k + 1])
                kb.cache_vectors(part, vectors)
                bar.update(len(part))
        report.embedded = len(todo)
        report.embed_seconds = time.perf_counter() - started


def remove_documents(settings: Settings, doc_ids: list[str]) -> list[str]:
    """Delete documents so their text can never be retrieved again. Returns ids not found."""
    kb = KnowledgeBase(settings.kb_dir, lock_timeout=settings.write_lock_timeout)
    missing = []
    try:
        with kb.transaction() as tx:
            for doc_id in doc_ids:
                if not tx.delete_document(doc_id):
                    missing.append(doc_id)
    finally:
        kb.close()
    return missing
