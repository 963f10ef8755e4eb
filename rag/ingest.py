"""Ingest pipeline: load → clean → split → embed → store/index, with progress and a report.

Incremental: a document whose content hash is unchanged is skipped; a chunk whose
text was embedded before (in this KB) reuses its vector; vectors are cached per
batch, so an interrupted ingest resumes where it stopped.
"""
from __future__ import annotations

import json
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


@dataclass
class IngestReport:
    added: list[str] = field(default_factory=list)
    updated: list[str] = field(default_factory=list)
    unchanged: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)
    failed: list[tuple[str, str]] = field(default_factory=list)  # (path, message)
    skipped: list[str] = field(default_factory=list)  # unsupported types found in folders
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
        for path, message in self.failed:
            lines.append(f"  ✗ {message}" if path in message else f"  ✗ {path}: {message}")
        return "\n".join(lines)


def open_kb_for_writing(settings: Settings, embedder) -> KnowledgeBase:
    kb = KnowledgeBase(settings.kb_dir, create=True)
    try:
        kb.check_embedder(embedder.model_id, embedder.dim)
    except BaseException:
        kb.close()
        raise
    return kb


def tokenizer_for(kb: KnowledgeBase, settings: Settings) -> LexicalTokenizer:
    """The BM25 tokeniser of a KB: its user words are stored in the KB so query time
    tokenises exactly like index time."""
    tokenizer = LexicalTokenizer()
    tokenizer.add_words(json.loads(kb.meta("user_words", "[]")))
    return tokenizer


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
        kb = open_kb_for_writing(self.settings, self.embedder)
        try:
            user_words = sorted(set(json.loads(kb.meta("user_words", "[]")))
                                | set(_read_user_words(self.settings.user_dict)))
            tokenizer = LexicalTokenizer()
            tokenizer.add_words(user_words)
            docs = self._load_all(paths, kb, report, progress)
            prepared = []
            for doc in docs:
                clean = clean_text(doc.text)
                chunks = split_document(doc, clean, self.settings.chunk_tokens, self.settings.chunk_overlap_tokens)
                if not chunks:
                    report.failed.append((doc.source, f"{doc.doc_id}: 没有可索引的文字 / nothing to index"))
                    continue
                hashes = [c.content_hash(doc.title) for c in chunks]
                # tokenised here, not inside the transaction: the write lock is held briefly
                lexical = [tokenizer.tokenize(c.indexed_text(doc.title)) for c in chunks]
                prepared.append((doc, chunks, hashes, lexical))
            self._embed_missing(kb, prepared, report, progress)
            # unchanged documents were found too: prune must keep them
            seen = {doc.doc_id for doc in docs} | set(report.unchanged) | {p for p, _ in report.failed}
            with kb.transaction() as tx:
                if user_words != json.loads(kb.meta("user_words", "[]")):
                    kb._set_meta("user_words", json.dumps(user_words, ensure_ascii=False))
                    tx.changed = True
                for doc, chunks, hashes, lexical in prepared:
                    tx.put_document(doc, chunks, hashes, lexical)
                    report.chunks += len(chunks)
                if prune:
                    for info in kb.documents():
                        if info.doc_id not in seen and info.source not in seen:
                            tx.delete_document(info.doc_id)
                            report.removed.append(info.doc_id)
        finally:
            kb.close()
        report.seconds = time.perf_counter() - started
        return report

    def _load_all(self, paths, kb: KnowledgeBase, report: IngestReport, progress: bool) -> list[RawDocument]:
        files = list(iter_files([Path(p) for p in paths]))
        explicit = {str(Path(p)) for p in paths}
        max_bytes = int(self.settings.max_file_mb * 1e6)
        docs: dict[str, RawDocument] = {}
        for file, doc_id in tqdm(files, desc="读取 loading", unit="file", disable=not progress or len(files) < 2,
                                 file=sys.stderr):
            if file.suffix.lower() not in SUPPORTED_SUFFIXES and str(file) not in explicit:
                report.skipped.append(str(file))
                continue
            try:
                loaded = load_file(file, doc_id, max_bytes)
            except LoadError as exc:
                report.failed.append((str(file), str(exc)))
                continue
            except Exception as exc:  # a parser bug must not lose the other files
                report.failed.append((str(file), f"{file.name}: 读取失败 / failed to read ({type(exc).__name__}: {exc})"))
                continue
            for doc in loaded:
                docs[doc.doc_id] = doc
        result = []
        for doc in docs.values():
            known = kb.document_hash(doc.doc_id)
            if known == doc.content_hash:
                report.unchanged.append(doc.doc_id)
                continue
            (report.updated if known else report.added).append(doc.doc_id)
            result.append(doc)
        return result

    def _embed_missing(self, kb: KnowledgeBase, prepared, report: IngestReport, progress: bool) -> None:
        texts: dict[str, str] = {}
        for doc, chunks, hashes, _ in prepared:
            for chunk, h in zip(chunks, hashes):
                texts.setdefault(h, chunk.indexed_text(doc.title))
        cached = kb.cached_vectors(list(texts))
        todo = [h for h in texts if h not in cached]
        report.reused_vectors = len(texts) - len(todo)
        todo.sort(key=lambda h: len(texts[h]))  # similar lengths per batch: less padding
        batch = max(1, self.settings.embed_batch_size)
        started = time.perf_counter()
        with tqdm(total=len(todo), desc="嵌入 embedding", unit="passage", disable=not progress or not todo,
                  file=sys.stderr) as bar:
            for i in range(0, len(todo), batch):
                part = todo[i:i + batch]
                kb.cache_vectors(part, self.embedder.embed_passages([texts[h] for h in part]))
                bar.update(len(part))
        report.embedded = len(todo)
        report.embed_seconds = time.perf_counter() - started


def remove_documents(settings: Settings, doc_ids: list[str]) -> list[str]:
    """Delete documents so their text can never be retrieved again. Returns ids not found."""
    kb = KnowledgeBase(settings.kb_dir)
    missing = []
    try:
        with kb.transaction() as tx:
            for doc_id in doc_ids:
                if not tx.delete_document(doc_id):
                    missing.append(doc_id)
    finally:
        kb.close()
    return missing
