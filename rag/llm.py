"""Chat models for answer generation: a local GGUF via llama.cpp, or any OpenAI-compatible server.

The default local model file is assembled and verified by ``rag.gguf`` (re-exported here).

Public API:
    LlamaCppChat, make_chat_model, check_openai_endpoint, LLMUnavailable,
    and from rag.gguf: verify_file, ensure_default_gguf, resolve_gguf_path, ModelFileError
"""
from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from langchain_core.callbacks import CallbackManagerForLLMRun
from langchain_core.language_models import BaseChatModel, LangSmithParams
from langchain_core.messages import AIMessage, AIMessageChunk, BaseMessage
from langchain_core.messages.utils import convert_to_openai_messages
from langchain_core.outputs import ChatGeneration, ChatGenerationChunk, ChatResult
from pydantic import PrivateAttr

from rag.config import Settings
from rag.gguf import (  # noqa: F401 (re-exported: callers and tests import them from rag.llm)
    DEFAULT_GGUF_NAME, DEFAULT_GGUF_SHA256, DEFAULT_GGUF_SIZE, ModelFileError, ensure_default_gguf,
    resolve_gguf_path, verify_file)

_BACKENDS = ("local", "openai", "extractive")


class LLMUnavailable(RuntimeError):
    """The configured LLM endpoint cannot be used (message is Chinese + English)."""


# --------------------------------------------------------------------------- local chat model


class LlamaCppChat(BaseChatModel):
    """LangChain chat model over a local GGUF file, run in-process by llama.cpp.

    The prompt is rendered with the chat template stored in the GGUF, so any instruct
    model works without a per-model prompt format. The ``llama_cpp.Llama`` object is
    created on first use and reused; a lock serialises calls because one llama.cpp
    context cannot run two generations at once.
    """

    model_path: Path
    n_ctx: int = 4096
    n_threads: int = 2
    temperature: float = 0.1
    max_tokens: int | None = 512
    stop: list[str] | None = None

    _llama: Any = PrivateAttr(default=None)
    _lock: threading.Lock = PrivateAttr(default_factory=threading.Lock)

    @property
    def _llm_type(self) -> str:
        return "llama-cpp-chat"

    @property
    def _identifying_params(self) -> dict[str, Any]:
        return {
            "model_path": str(self.model_path),
            "n_ctx": self.n_ctx,
            "temperature": self.temperature,
            "max_tokens": self.max_tokens,
        }

    def _get_ls_params(self, stop: list[str] | None = None, **kwargs: Any) -> LangSmithParams:
        params = super()._get_ls_params(stop=stop, **kwargs)
        params["ls_provider"] = "llama_cpp"
        params["ls_model_name"] = Path(self.model_path).name
        return params

    def _load(self) -> Any:
        """Create the Llama object once. Call with ``self._lock`` held."""
        if self._llama is None:
            from llama_cpp import Llama  # imported lazily: a compiled extension, slow to load

            self._llama = Llama(
                model_path=str(self.model_path),
                n_ctx=self.n_ctx,
                n_threads=self.n_threads,
                # llama.cpp otherwise uses every CPU for prompt processing; respect the budget.
                n_threads_batch=self.n_threads,
                verbose=False,
            )
        return self._llama

    def next_token_probabilities(self, messages: list[BaseMessage], candidates: list[str]) -> dict[str, float]:
        """Probability of each candidate as the first token of the reply to ``messages``
        (softmax over the candidates' first tokens only).

        llama.cpp keeps the KV cache of the previous call, so a prompt that extends the
        last answer's conversation only evaluates its new tokens.

        Args:
            messages: the conversation; the reply's first token is scored.
            candidates: e.g. ``["是", "否"]``.
        """
        import numpy as np
        from llama_cpp.llama_chat_format import Jinja2ChatFormatter

        with self._lock:
            llama = self._load()
            template = llama.metadata.get("tokenizer.chat_template")
            if not template:
                raise LLMUnavailable("模型没有对话模板 / the GGUF has no chat template")
            formatter = Jinja2ChatFormatter(template=template, eos_token="", bos_token="")
            prompt = formatter(messages=convert_to_openai_messages(messages)).prompt
            tokens = llama.tokenize(prompt.encode("utf-8"), add_bos=False, special=True)
            cached = llama.input_ids[:llama.n_tokens].tolist()
            common = 0
            for a, b in zip(cached, tokens):
                if a != b:
                    break
                common += 1
            llama.n_tokens = min(common, len(tokens) - 1)  # at least one token to get logits from
            llama.eval(tokens[llama.n_tokens:])
            logits = np.ctypeslib.as_array(llama._ctx.get_logits(), shape=(llama.n_vocab(),)).astype(np.float64)
            ids = [llama.tokenize(c.encode("utf-8"), add_bos=False, special=False)[0] for c in candidates]
        chosen = logits[ids]
        weights = np.exp(chosen - chosen.max())
        return dict(zip(candidates, (weights / weights.sum()).tolist()))

    def _request(self, messages: list[BaseMessage], stop: list[str] | None, **kwargs: Any) -> dict:
        """Build ``create_chat_completion`` arguments; per-call kwargs override defaults."""
        return {
            "messages": convert_to_openai_messages(messages),
            "temperature": kwargs.get("temperature", self.temperature),
            "max_tokens": kwargs.get("max_tokens", self.max_tokens),
            "stop": stop if stop is not None else self.stop,
        }

    def _generate(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> ChatResult:
        """Run one non-streaming chat completion.

        Args:
            messages: Conversation so far.
            stop: Stop sequences (override the instance's ``stop``).
            run_manager: LangChain callback manager (unused; no streaming here).
            **kwargs: ``temperature`` / ``max_tokens`` override the instance values.
        """
        request = self._request(messages, stop, **kwargs)
        with self._lock:
            response = self._load().create_chat_completion(**request)
        choice = response["choices"][0]
        usage = response.get("usage") or {}
        message = AIMessage(
            content=choice["message"].get("content") or "",
            response_metadata={
                "finish_reason": choice.get("finish_reason"),
                "model_name": Path(self.model_path).name,
            },
            usage_metadata={
                "input_tokens": usage.get("prompt_tokens", 0),
                "output_tokens": usage.get("completion_tokens", 0),
                "total_tokens": usage.get("total_tokens", 0),
            },
        )
        return ChatResult(generations=[ChatGeneration(message=message)])

    def _stream(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> Iterator[ChatGenerationChunk]:
        """Stream the reply token by token as ``AIMessageChunk``s.

        Args:
            messages: Conversation so far.
            stop: Stop sequences (override the instance's ``stop``).
            run_manager: LangChain callback manager; receives ``on_llm_new_token``.
            **kwargs: ``temperature`` / ``max_tokens`` override the instance values.
        """
        request = self._request(messages, stop, **kwargs)
        # The lock is held for the whole stream; closing the generator early releases it.
        with self._lock:
            for part in self._load().create_chat_completion(**request, stream=True):
                choice = part["choices"][0]
                text = choice.get("delta", {}).get("content") or ""
                finish = choice.get("finish_reason")
                if not text and not finish:
                    continue  # the role-only first delta carries no text
                chunk = ChatGenerationChunk(
                    message=AIMessageChunk(
                        content=text,
                        response_metadata={"finish_reason": finish} if finish else {},
                    )
                )
                if run_manager and text:
                    run_manager.on_llm_new_token(text, chunk=chunk)
                yield chunk


# --------------------------------------------------------------------------- factory + preflight


def make_chat_model(settings: Settings, backend: str | None = None) -> BaseChatModel | None:
    """Build the chat model for a backend.

    Args:
        settings: Pipeline settings (model path, context, sampling, endpoint ...).
        backend: ``"local"`` (GGUF via llama.cpp), ``"openai"`` (any OpenAI-compatible
            server) or ``"extractive"`` (no LLM). Defaults to ``settings.llm_backend``.

    Returns:
        A LangChain chat model, or ``None`` for ``"extractive"``.

    Raises:
        ValueError: For an unknown backend name.
        ModelFileError: For ``"local"`` when the GGUF is missing or fails verification.
    """
    name = (backend or settings.llm_backend).strip().lower()
    if name == "extractive":
        return None
    if name == "local":
        return LlamaCppChat(
            model_path=resolve_gguf_path(settings),
            n_ctx=settings.llm_context,
            n_threads=settings.threads,
            temperature=settings.llm_temperature,
            max_tokens=settings.llm_max_tokens,
        )
    if name == "openai":
        from langchain_openai import ChatOpenAI  # only needed for this backend

        return ChatOpenAI(
            base_url=settings.llm_base_url,
            api_key=settings.llm_api_key or "EMPTY",  # local servers accept any key
            model=settings.llm_model,
            timeout=settings.llm_timeout,
            max_retries=settings.llm_retries,
            temperature=settings.llm_temperature,
            max_tokens=settings.llm_max_tokens,
            streaming=True,
        )
    raise ValueError(
        f"未知的 LLM 后端 / unknown LLM backend {backend!r}; "
        f"expected one of: {', '.join(_BACKENDS)}"
    )


def check_openai_endpoint(settings: Settings, timeout: float = 5.0) -> None:
    """Fail fast if the OpenAI-compatible endpoint is unreachable or rejects the key.

    Sends ``GET {llm_base_url}/models``, which every OpenAI-compatible server implements
    and which costs no tokens.

    Args:
        settings: Uses ``llm_base_url`` and ``llm_api_key``.
        timeout: Seconds for connect and read; keep short, this is a preflight.

    Raises:
        LLMUnavailable: Connection refused, timeout, 401/403 (wrong key) or another
            HTTP error; the message says which, in Chinese and English.
    """
    import httpx  # a dependency of openai; imported here to keep module import light

    url = settings.llm_base_url.rstrip("/") + "/models"
    headers = {"Authorization": f"Bearer {settings.llm_api_key}"}
    try:
        response = httpx.get(url, headers=headers, timeout=timeout)
    except httpx.TimeoutException as exc:
        raise LLMUnavailable(
            f"连接 LLM 服务超时（{timeout:g} 秒）/ LLM endpoint timed out after "
            f"{timeout:g}s: {url}. 请检查地址和网络 / check the URL and network."
        ) from exc
    except httpx.ConnectError as exc:
        raise LLMUnavailable(
            f"无法连接 LLM 服务（连接被拒绝或地址无法解析），请确认服务已启动且 "
            f"RAG_LLM_BASE_URL 正确 / cannot connect to LLM endpoint (connection refused "
            f"or host not found); is the server running and RAG_LLM_BASE_URL right? "
            f"{url} ({exc})"
        ) from exc
    except httpx.HTTPError as exc:
        raise LLMUnavailable(f"LLM 服务请求失败 / LLM endpoint request failed: {url} ({exc})") from exc

    if response.status_code in (401, 403):
        raise LLMUnavailable(
            f"LLM 服务拒绝了 API key（HTTP {response.status_code}），请检查 RAG_LLM_API_KEY / "
            f"LLM endpoint rejected the API key (HTTP {response.status_code}): "
            f"check RAG_LLM_API_KEY. {url}"
        )
    if response.status_code >= 400:
        hint = " 地址可能缺少 /v1 / the base URL may be missing /v1." if response.status_code == 404 else ""
        raise LLMUnavailable(
            f"LLM 服务返回错误 / LLM endpoint returned HTTP {response.status_code}: {url}.{hint}"
        )


# The settings that make one chat model differ from another, per backend.
_MODEL_FIELDS = {
    "local": ("llm_model_path", "llm_context", "threads", "llm_temperature", "llm_max_tokens"),
    "openai": ("llm_base_url", "llm_api_key", "llm_model", "llm_timeout", "llm_retries", "llm_temperature",
               "llm_max_tokens"),
}


class ChatModels:
    """One LangChain chat model per LLM configuration, shared by every KB, session and request."""

    def __init__(self):
        self._lock = threading.Lock()
        self._models: dict[tuple, object] = {}
        self.loads = 0  # models built so far (a cached call builds none)

    def __call__(self, settings: Settings, backend: str):
        key = (backend, *(getattr(settings, name) for name in _MODEL_FIELDS.get(backend, ())))
        with self._lock:  # held while loading, so two first requests never load the GGUF twice
            if key not in self._models:
                if backend == "openai":
                    check_openai_endpoint(settings)  # fail fast; a failure is not cached
                self._models[key] = make_chat_model(settings, backend)
                self.loads += 1
            return self._models[key]
