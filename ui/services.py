"""The knowledge bases behind the web UI, shared by every browser session.

One ``Searcher`` per KB (its indexes reload by themselves when the KB generation
changes, so a deleted document disappears from answers at once), one chat model
per LLM configuration (so the local GGUF is loaded once and its lock in
``rag.llm`` really serialises every generation), one ``Answerer`` per KB and
LLM configuration. Everything is created on first use, under a lock, and lives
in a ``KnowledgeBases`` instance owned by the app factory: no module globals.
"""
from __future__ import annotations

import re
import threading
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path

from rag.answer import Answerer
from rag.config import Settings
from rag.embed import make_embedder
from rag.ingest import IngestReport, Ingestor, remove_documents
from rag.load import SUPPORTED_SUFFIXES
from rag.retrieve import Searcher
from rag.store import DocumentInfo, KnowledgeBase, KnowledgeBaseError

# A KB name becomes a folder name: letters (any script), digits, "-", "_", "."; no leading
# "_" or "." because "_models"/"_bench" and hidden folders live next to the KBs.
_KB_NAME = re.compile(r"[^\W_][\w.\-]{0,63}")


# Sent instead of the operator's key to an endpoint the browser chose without a key of its own
# (the same placeholder rag.llm sends for an empty key; local servers accept any key).
NO_KEY = "EMPTY"


def same_endpoint(url: str, configured: str) -> bool:
    """Whether a base URL typed in the browser is the operator's configured one (trailing "/" aside).

    Deliberately exact: anything else (another host, port, path, scheme, user info) is another
    endpoint, which must never receive the operator's key.
    """
    return url.strip().rstrip("/") == configured.strip().rstrip("/")


@dataclass(frozen=True)
class LLMChoice:
    """What a session picked in the settings panel (hashable: it keys the caches)."""

    backend: str = "extractive"
    base_url: str = ""
    api_key: str = ""
    model: str = ""

    def settings_update(self, configured_base_url: str) -> dict:
        """The ``Settings`` fields this choice changes.

        Empty fields keep the operator's defaults (``RAG_LLM_BASE_URL`` ...), except the key:
        the operator's ``RAG_LLM_API_KEY`` only ever goes to the operator's
        ``configured_base_url``. A browser that names another endpoint sends its own key or none
        (``NO_KEY``): otherwise any UI user could have the server send the operator's key, with
        the retrieved passages, to a URL of their choice.
        """
        update: dict = {"llm_backend": self.backend}
        if self.backend == "openai":
            update.update({k: v for k, v in (("llm_base_url", self.base_url), ("llm_model", self.model)) if v})
            if self.api_key:
                update["llm_api_key"] = self.api_key
            elif self.base_url and not same_endpoint(self.base_url, configured_base_url):
                update["llm_api_key"] = NO_KEY
        return update

    def cache_key(self) -> tuple:
        # Only the OpenAI endpoint fields change the model; the other backends share one.
        return (self.backend, self.base_url, self.api_key, self.model) if self.backend == "openai" else (self.backend,)


class ChatModels:
    """One LangChain chat model per LLM configuration, shared by all KBs and sessions."""

    def __init__(self):
        self._lock = threading.Lock()
        self._models: dict[tuple, object] = {}

    def get(self, settings: Settings, choice: LLMChoice):
        key = choice.cache_key()
        with self._lock:  # held while loading, so two first requests never load the GGUF twice
            if key not in self._models:
                from rag.llm import check_openai_endpoint, make_chat_model

                if choice.backend == "openai":
                    check_openai_endpoint(settings)  # fail fast; a failure is not cached
                self._models[key] = make_chat_model(settings, choice.backend)
            return self._models[key]


class SharedModelAnswerer(Answerer):
    """An ``Answerer`` whose chat model comes from the app-wide ``ChatModels``."""

    def __init__(self, settings: Settings, searcher: Searcher, models: ChatModels, choice: LLMChoice):
        super().__init__(settings, searcher)
        self._shared_models = models
        self._choice = choice

    def chat_model(self, backend: str):
        if backend != self._choice.backend:  # not used by Answerer today; keep the base behaviour
            return super().chat_model(backend)
        return self._shared_models.get(self.settings, self._choice)


class UploadError(ValueError):
    """An uploaded file that cannot be accepted; the message is shown as is."""


class KnowledgeBases:
    """All knowledge bases under ``settings.home``.

    Args:
        settings: the base configuration; ``settings.kb`` is only the UI's default choice.
    """

    def __init__(self, settings: Settings):
        self.settings = settings
        self._lock = threading.Lock()
        self._embedder = None
        self._searchers: dict[str, Searcher] = {}
        self._answerers: dict[tuple, Answerer] = {}
        self._write_locks: dict[str, threading.Lock] = {}
        self.models = ChatModels()

    # ------------------------------------------------------------ naming
    @property
    def home(self) -> Path:
        return Path(self.settings.home)

    def settings_for(self, kb: str, **update) -> Settings:
        return self.settings.model_copy(update={"kb": self.check_name(kb), **update})

    @staticmethod
    def check_name(name: str) -> str:
        name = (name or "").strip()
        if not _KB_NAME.fullmatch(name):
            raise KnowledgeBaseError(
                f"知识库名称不合法：{name!r}（可用中文、字母、数字、-、_、.，不能以 _ 或 . 开头，最多 64 个字符）"
                f" / invalid knowledge base name")
        return name

    def names(self) -> list[str]:
        if not self.home.is_dir():
            return []
        return sorted(p.name for p in self.home.iterdir()
                      if (p / "kb.sqlite").is_file() and _KB_NAME.fullmatch(p.name))

    def exists(self, kb: str) -> bool:
        return (self.home / kb / "kb.sqlite").is_file()

    def create(self, name: str) -> str:
        name = self.check_name(name)
        if self.exists(name):
            raise KnowledgeBaseError(f"知识库已存在：{name} / knowledge base already exists")
        with closing(KnowledgeBase(self.home / name, create=True)):
            pass
        return name

    # ------------------------------------------------------------ shared readers
    def embedder(self):
        with self._lock:
            if self._embedder is None:
                s = self.settings
                self._embedder = make_embedder(s.embedder, s.threads, s.embed_batch_size)
            return self._embedder

    def searcher(self, kb: str) -> Searcher:
        kb = self.check_name(kb)
        if not self.exists(kb):
            raise KnowledgeBaseError(f"知识库不存在：{kb}（请先新建并上传文件）/ knowledge base not found: {kb}")
        embedder = self.embedder()
        with self._lock:
            if kb not in self._searchers:
                self._searchers[kb] = Searcher(self.settings_for(kb), embedder=embedder)
            return self._searchers[kb]

    def answerer(self, kb: str, choice: LLMChoice) -> Answerer:
        searcher = self.searcher(kb)
        key = (kb, choice.cache_key())
        with self._lock:
            if key not in self._answerers:
                settings = self.settings_for(kb, **choice.settings_update(self.settings.llm_base_url))
                self._answerers[key] = SharedModelAnswerer(settings, searcher, self.models, choice)
            return self._answerers[key]

    def documents(self, kb: str) -> list[DocumentInfo]:
        if not kb or not self.exists(kb):
            return []
        with closing(KnowledgeBase(self.home / self.check_name(kb))) as store:
            return store.documents()

    def document_text(self, kb: str, doc_id: str) -> tuple[str, str] | None:
        """``(title, original text)``, or None when the KB or the document is gone."""
        if not kb or not self.exists(kb):
            return None
        with closing(KnowledgeBase(self.home / self.check_name(kb))) as store:
            return store.document_text(doc_id)

    # ------------------------------------------------------------ writers (one at a time per KB)
    def _write_lock(self, kb: str) -> threading.Lock:
        with self._lock:
            return self._write_locks.setdefault(kb, threading.Lock())

    def check_upload(self, path: Path) -> None:
        """Refuse a file before indexing starts, with a message the user can act on."""
        suffix = path.suffix.lower()
        if suffix not in SUPPORTED_SUFFIXES:
            kinds = " ".join(sorted(SUPPORTED_SUFFIXES))
            raise UploadError(f"{path.name}：不支持的文件类型 {suffix or '（无扩展名）'}，支持 {kinds}"
                              f" / unsupported file type")
        size = path.stat().st_size
        limit = self.settings.max_file_mb * 1e6
        if size > limit:
            raise UploadError(f"{path.name}：文件过大（{size / 1e6:.1f} MB，上限 {self.settings.max_file_mb:g} MB）"
                              f" / file too large")
        if size == 0:
            raise UploadError(f"{path.name}：空文件 / empty file")

    def ingest(self, kb: str, paths: list[Path], progress: bool = True) -> IngestReport:
        """Add files; ``progress`` drives the tqdm bars the UI mirrors as a progress bar."""
        kb = self.check_name(kb)
        with self._write_lock(kb):
            return Ingestor(self.settings_for(kb), embedder=self.embedder()).ingest(paths, progress=progress)

    def remove(self, kb: str, doc_ids: list[str]) -> list[str]:
        """Delete documents; returns the ids that were not found."""
        kb = self.check_name(kb)
        with self._write_lock(kb):
            return remove_documents(self.settings_for(kb), doc_ids)

    def reindex(self, kb: str) -> int:
        """Rebuild the derived FAISS/BM25 indexes from SQLite as a new generation.

        Repairs lost or damaged index files; every Searcher picks the new generation up
        on its next query. Returns the new generation number.
        """
        kb = self.check_name(kb)
        with self._write_lock(kb), closing(KnowledgeBase(self.home / kb)) as store:
            if store.embedder_id is None:  # nothing was ever indexed: nothing to rebuild
                return store.generation
            with store.transaction() as tx:
                tx.changed = True  # the same switch ingest uses to force a rebuild
            return store.generation

    def close(self) -> None:
        with self._lock:
            for searcher in self._searchers.values():
                searcher.close()
            self._searchers.clear()
            self._answerers.clear()
