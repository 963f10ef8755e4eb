"""rag.milvus_index against a real milvus-lite: writes, searches, delete-means-gone, the embedder
check, clear errors, and crash safety (a writer killed with SIGKILL mid-upsert leaves no
half-visible document). Skipped when milvus-lite / pymilvus are not installed."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("pymilvus")
pytest.importorskip("milvus_lite")

from rag.milvus_index import MilvusIndex, MilvusIndexError, doc_prefix_filter

ROOT = Path(__file__).resolve().parent.parent
DIM = 8
OLD = list(range(1, 6))  # chunk ids of a.txt, version 1
NEW = list(range(10_000, 11_200))  # version 2: 1,200 chunks, three insert batches


def vectors(n: int, seed: int = 0) -> np.ndarray:
    v = np.random.default_rng(seed).random((n, DIM)).astype(np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def chunks(ids: list[int], word: str) -> list[dict]:
    return [{"chunk_id": i, "text": f"{word}{i} common {word}", "title": "T", "start": 0, "end": 5, "ord": n}
            for n, i in enumerate(ids)]


def open_index(uri: Path, embedder: str = "toy") -> MilvusIndex:
    return MilvusIndex.open(uri, "kb", DIM, embedder, tokenize=str.split)


def visible_ids(idx: MilvusIndex, doc_id: str) -> set[int]:
    rows = idx.client.query("kb", filter=idx._visible(None, f'doc_id == "{doc_id}"'),
                            output_fields=["chunk_id"], limit=5000)
    return {int(r["chunk_id"]) for r in rows}


def raw_rows(idx: MilvusIndex) -> int:
    return len(idx.client.query("kb", filter="gen >= 0 or gen < 0", output_fields=["row_id"], limit=10_000))


@pytest.fixture()
def uri(tmp_path: Path) -> Path:
    return tmp_path / "kb" / "milvus.db"


def test_write_search_replace_delete(uri: Path):
    idx = open_index(uri)
    try:
        assert idx.committed_generation() == 0 and idx.count() == 0
        assert idx.upsert_document("a.txt", chunks(OLD, "old"), vectors(len(OLD))) == 1
        idx.upsert_document("dir_x/b.txt", chunks([100], "bee"), vectors(1, 1))
        assert idx.count() == len(OLD) + 1
        assert idx.count(doc_prefix_filter("dir_x/")) == 1 and idx.count(doc_prefix_filter("dirx")) == 0
        top = idx.bm25_search("bee100", 5)
        assert [c for c, _ in top] == [100] and top[0][1] > 0
        dense = idx.dense_search(vectors(1, 1)[0], 3)
        assert dense[0][0] == 100 and dense[0][1] == pytest.approx(1.0, abs=1e-5)
        assert idx.chunks([1, 100])[1]["title"] == "T" and idx.chunks([1])[1]["page"] is None

        idx.upsert_document("a.txt", chunks([7, 8], "new"), vectors(2, 2))
        assert visible_ids(idx, "a.txt") == {7, 8}
        assert not idx.bm25_search("old1", 5)
        assert raw_rows(idx) == 3 + 1  # replaced rows purged; + the marker row

        assert idx.delete_document("a.txt") == 2 and idx.delete_document("a.txt") == 0
        gone = idx.client.query("kb", filter='doc_id == "a.txt"', output_fields=["row_id", "text"], limit=100)
        assert gone == [] and idx.count() == 1  # delete means gone: no row left, visible or not
    finally:
        idx.close()
    idx = open_index(uri)  # restart: everything persisted
    try:
        assert idx.count() == 1 and idx.committed_generation() == 4
    finally:
        idx.close()


def test_refuses_other_embedder_and_bad_uri(uri: Path, tmp_path: Path):
    open_index(uri).close()
    with pytest.raises(MilvusIndexError, match="toy.*other|refusing other"):
        open_index(uri, embedder="other")
    with pytest.raises(MilvusIndexError, match="19599"):
        MilvusIndex.open("http://127.0.0.1:19599", "kb", DIM, "toy", tokenize=str.split)
    with pytest.raises(MilvusIndexError, match=r"\.db"):
        MilvusIndex.open(tmp_path / "plainfile", "kb", DIM, "toy", tokenize=str.split)


CHILD = textwrap.dedent("""
    import sys, time
    import numpy as np
    sys.path.insert(0, {root!r})
    from rag.milvus_index import MilvusIndex
    uri, stage = sys.argv[1], sys.argv[2]
    idx = MilvusIndex.open(uri, "kb", {dim}, "toy", tokenize=str.split)
    def hold():
        print("READY", flush=True)
        time.sleep(120)
    if stage == "insert":  # killed after the 2nd of 3 insert batches
        insert, calls = idx.client.insert, []
        def patched(*a, **k):
            out = insert(*a, **k)
            calls.append(1)
            if len(calls) == 2:
                hold()
            return out
        idx.client.insert = patched
    elif stage == "retire":  # new rows written, old rows retired, not committed
        idx._commit = lambda n: hold()
    elif stage == "commit":  # committed, replaced rows not purged yet
        commit = idx._commit
        idx._commit = lambda n: (commit(n), hold())
    else:  # killed at a random moment by the parent
        print("READY", flush=True)
    ids = list(range(10_000, 11_200))
    rows = [{{"chunk_id": i, "text": f"new{{i}} common new", "title": "T"}} for i in ids]
    v = np.random.default_rng(5).random((len(ids), {dim})).astype(np.float32)
    idx.upsert_document("a.txt", rows, v / np.linalg.norm(v, axis=1, keepdims=True))
    print("DONE", flush=True)
""")


def kill_mid_upsert(uri: Path, stage: str, delay: float = 0.0) -> bool:
    """Run the child writer, SIGKILL it at ``stage``; True when it finished before the kill."""
    proc = subprocess.Popen([sys.executable, "-c", CHILD.format(root=str(ROOT), dim=DIM), str(uri), stage],
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, cwd=ROOT)
    try:
        line = proc.stdout.readline()
        assert line.strip() == "READY", f"child said {line!r}"
        time.sleep(delay)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    return "DONE" in proc.stdout.read()


@pytest.mark.parametrize("stage,expected", [("insert", OLD), ("retire", OLD), ("commit", NEW),
                                            ("random", None)])
def test_kill_9_mid_upsert_leaves_no_half_visible_document(uri: Path, stage: str, expected):
    idx = open_index(uri)
    idx.upsert_document("a.txt", chunks(OLD, "old"), vectors(len(OLD)))
    idx.upsert_document("b.txt", chunks([100], "bee"), vectors(1, 1))
    idx.close()  # frees the .db for the child writer

    kill_mid_upsert(uri, stage, delay=0.25 if stage == "random" else 0.0)

    idx = open_index(uri)
    try:
        seen = visible_ids(idx, "a.txt")
        assert seen in (set(OLD), set(NEW)), f"half-visible: {len(seen)} chunks"
        if expected is not None:
            assert seen == set(expected)
        hits = {c for c, _ in idx.bm25_search("common", 5000)}
        assert hits == seen | {100}  # searches see exactly one version too
        assert {c for c, _ in idx.dense_search(vectors(1)[0], 5000)} == seen | {100}
        assert idx.count() == len(seen) + 1
        idx.repair()  # what the next writer does first: the leftovers go
        assert raw_rows(idx) == len(seen) + 1 + 1
        assert visible_ids(idx, "a.txt") == seen
    finally:
        idx.close()


def test_second_process_gets_a_clear_error(uri: Path):
    idx = open_index(uri)
    try:
        code = (f"import sys; sys.path.insert(0, {str(ROOT)!r})\n"
                "from rag.milvus_index import MilvusIndex, MilvusIndexError\n"
                f"try:\n    MilvusIndex.open({str(uri)!r}, 'kb', {DIM}, 'toy', tokenize=str.split)\n"
                "except MilvusIndexError as e:\n    print(e)\n")
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                             check=False).stdout
        assert "another process" in out and str(uri) in out
    finally:
        idx.close()
