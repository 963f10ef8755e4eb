"""Distractor passages and their vectors for the scale benchmark (``bench/scale.py``).

Pool: every chunk of the shared sets' evaluation KBs (``index/eval-<set>-<hash8>``, read-only),
cut into sentences (``rag.zh.split_sentences``). A sentence whose normalised text (``rag.zh.normalise``:
NFKC, Simplified, lower case, no spaces or punctuation) contains any normalised gold string of any
shared set (every ``answers`` / ``answer_parts`` alias and every ``gold_quotes`` quote, of
cmrc2018, drcd, rgb_zh, rgb_zh_int, rgb_zh_neg and the seeds dev set) is left out; what is left
is de-duplicated.

A distractor: a random run of consecutive kept sentences of one random pool chunk, then runs of
further random chunks until it reaches a length drawn from the benchmarked KB's own chunk
lengths (at most 3 sources). BM25 tokens: each kept sentence is tokenised once by the KB's
tokeniser (``rag.lexical.tokenizer_for``); a distractor's tokens are its sentences' tokens
(jieba and the CJK bigrams never cross a 。, so this equals tokenising the joined text but for
codes that repeat).

Vector (derived, not embedded): ``normalise(m + e)``, ``m`` the source chunks' stored vectors
weighted by their share of the characters, ``e`` Gaussian noise scaled so that
``cos(result, m) = c`` (in expectation: ``|e| = |m|·sqrt(1/c² - 1)``), where ``c`` is the
median cosine between ``m`` and the real embedding of the same text, measured on a sample of
distractors embedded for real (``FIDELITY_SAMPLE``). Everything is cached under
``index/_bench/scale/`` (deterministic from ``SEED``; the first N of the 1M list make the 100k KB).
"""
from __future__ import annotations

import hashlib
import json
import sqlite3
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
SHARED = ROOT.parent / "shared"
CACHE = ROOT / "index" / "_bench" / "scale"
SEED = 14
FIDELITY_SAMPLE = 256
MAX_SOURCES = 3
VERSION = 1  # bump when the construction changes


def gold_strings() -> list[str]:
    """Normalised gold answers and quotes of every shared question set."""
    from rag.zh import normalise

    files = sorted((SHARED / "evaldata").glob("*/questions.jsonl")) + [SHARED / "corpus" / "seeds_eval" / "dev.jsonl"]
    found: set[str] = set()
    for path in files:
        for line in path.read_text(encoding="utf-8").splitlines():
            if not line.strip():
                continue
            row = json.loads(line)
            for alias in (row.get("answers") or []) + [a for part in row.get("answer_parts") or [] for a in part] \
                    + (row.get("gold_quotes") or []):
                if isinstance(alias, str) and normalise(alias):
                    found.add(normalise(alias))
    return sorted(found)


class GoldFilter:
    """``contains(sentence)``: its normalised text holds a gold string (substring, by length buckets)."""

    def __init__(self, gold: list[str]):
        self.by_len: dict[int, set[str]] = {}
        for g in gold:
            self.by_len.setdefault(len(g), set()).add(g)

    def contains(self, sentence: str) -> bool:
        from rag.zh import normalise

        t = normalise(sentence)
        for n, group in self.by_len.items():
            if any(t[i:i + n] in group for i in range(len(t) - n + 1)):
                return True
        return False


def pool_kbs() -> list[Path]:
    """The evaluation KBs present (one per corpus: the most recently changed when several)."""
    best: dict[str, Path] = {}
    for db in (ROOT / "index").glob("eval-*/kb.sqlite"):
        name = db.parent.name.rsplit("-", 1)[0]
        if name not in best or db.stat().st_mtime > best[name].stat().st_mtime:
            best[name] = db
    return sorted(best.values())


def read_pool(gold: GoldFilter) -> tuple[list[str], list[list[int]], np.ndarray, dict]:
    """Kept sentences, each pool chunk's kept sentence ids (in order), the chunks' vectors, stats."""
    from rag.zh import split_sentences

    sentences: list[str] = []
    sid: dict[str, int] = {}
    chunk_sents: list[list[int]] = []
    vectors: list[bytes] = []
    stats = {"kbs": [], "chunks": 0, "sentences": 0, "left_out": 0}
    for db_file in pool_kbs():
        db = sqlite3.connect(f"file:{db_file}?mode=ro", uri=True)
        rows = db.execute("SELECT c.text, v.vector FROM chunks c JOIN vectors v ON v.content_hash = c.content_hash "
                          "ORDER BY c.id").fetchall()
        gen = db.execute("SELECT value FROM meta WHERE key='generation'").fetchone()
        db.close()
        stats["kbs"].append({"kb": db_file.parent.name, "chunks": len(rows), "generation": gen[0] if gen else None})
        for text, blob in rows:
            stats["chunks"] += 1
            kept = []
            for s in split_sentences(text):
                s = s.strip()
                if not s:
                    continue
                stats["sentences"] += 1
                if s in sid:
                    kept.append(sid[s])
                elif gold.contains(s):
                    stats["left_out"] += 1
                else:
                    sid[s] = len(sentences)
                    sentences.append(s)
                    kept.append(sid[s])
            if kept:
                chunk_sents.append(kept)
                vectors.append(blob)
    stats["kept_unique_sentences"] = len(sentences)
    stats["source_chunks"] = len(chunk_sents)
    return sentences, chunk_sents, np.frombuffer(b"".join(vectors), dtype=np.float32).reshape(len(vectors), -1), stats


def compose(n: int, chunk_sents: list[list[int]], sent_len: np.ndarray, target_lengths: np.ndarray,
            rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """``n`` distractors: (sentence ids flat, offsets, source chunk ids (n, 3; -1 none), char weights (n, 3))."""
    flat: list[int] = []
    offsets = np.zeros(n + 1, dtype=np.int64)
    sources = np.full((n, MAX_SOURCES), -1, dtype=np.int32)
    weights = np.zeros((n, MAX_SOURCES), dtype=np.float32)
    picks = rng.integers(0, len(chunk_sents), size=(n, MAX_SOURCES))
    starts = rng.random((n, MAX_SOURCES))
    targets = rng.choice(target_lengths, size=n)
    for j in range(n):
        length = 0
        for k in range(MAX_SOURCES):
            sents = chunk_sents[picks[j, k]]
            i = int(starts[j, k] * len(sents))
            got = 0
            while i < len(sents) and length < targets[j]:
                flat.append(sents[i])
                got += int(sent_len[sents[i]])
                length += int(sent_len[sents[i]])
                i += 1
            if got:
                sources[j, k], weights[j, k] = picks[j, k], got
            if length >= targets[j]:
                break
        offsets[j + 1] = len(flat)
    weights /= np.maximum(weights.sum(axis=1, keepdims=True), 1)
    return np.asarray(flat, dtype=np.int32), offsets, sources, weights


def mean_vectors(sources: np.ndarray, weights: np.ndarray, pool_vectors: np.ndarray) -> np.ndarray:
    """The weighted mean of each distractor's source vectors (not normalised)."""
    out = np.zeros((len(sources), pool_vectors.shape[1]), dtype=np.float32)
    for k in range(sources.shape[1]):
        ok = sources[:, k] >= 0
        out[ok] += weights[ok, k, None] * pool_vectors[sources[ok, k]]
    return out


def derive(means: np.ndarray, c: float, rng: np.random.Generator) -> np.ndarray:
    """``normalise(m + e)`` with ``|e| = |m|·sqrt(1/c² - 1)`` in a random direction."""
    noise = rng.standard_normal(means.shape, dtype=np.float32)
    norm_m = np.linalg.norm(means, axis=1, keepdims=True)
    noise *= norm_m * np.sqrt(1 / c ** 2 - 1) / np.linalg.norm(noise, axis=1, keepdims=True)
    v = means + noise
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def text_of(j: int, flat: np.ndarray, offsets: np.ndarray, sentences: list[str]) -> str:
    return "".join(sentences[s] for s in flat[offsets[j]:offsets[j + 1]])


def prepare(set_name: str, kb_dir: Path, n: int, embedder, tokenizer, log=print) -> Path:
    """Build (or reuse) the distractor cache for ``n`` distractors against the KB ``kb_dir``."""
    gold = gold_strings()
    kbs = pool_kbs()
    key_src = json.dumps({"v": VERSION, "set": set_name, "kb": kb_dir.name, "seed": SEED,
                          "gold": hashlib.sha256("\n".join(gold).encode()).hexdigest(),
                          "pool": [(p.parent.name, p.stat().st_size) for p in kbs],
                          "embedder": embedder.model_id})
    key = hashlib.sha256(key_src.encode()).hexdigest()[:10]
    out = CACHE / f"distractors-{set_name}-{key}"
    if (out / "meta.json").exists() and json.loads((out / "meta.json").read_text())["n"] >= n:
        log(f"distractor cache reused: {out.relative_to(ROOT)}")
        return out
    started = time.perf_counter()
    sentences, chunk_sents, pool_vectors, stats = read_pool(GoldFilter(gold))
    stats["gold_strings"] = len(gold)
    log(f"pool: {stats['chunks']} chunks, {stats['sentences']} sentences, {stats['left_out']} left out "
        f"(hold a gold string), {len(sentences)} unique kept")
    db = sqlite3.connect(f"file:{kb_dir / 'kb.sqlite'}?mode=ro", uri=True)
    lengths = np.array([r[0] for r in db.execute("SELECT length(text) FROM chunks")], dtype=np.int32)
    db.close()
    rng = np.random.default_rng(SEED)
    sent_len = np.array([len(s) for s in sentences], dtype=np.int32)
    flat, offsets, sources, weights = compose(n, chunk_sents, sent_len, lengths, rng)
    log(f"composed {n} distractors ({time.perf_counter() - started:.0f} s)")
    # tokens: each kept sentence once
    vocab: dict[str, int] = {}
    tok_flat: list[int] = []
    tok_off = [0]
    for s in sentences:
        tok_flat.extend(vocab.setdefault(t, len(vocab)) for t in tokenizer.tokenize(s))
        tok_off.append(len(tok_flat))
    log(f"tokenised {len(sentences)} sentences, vocabulary {len(vocab)} ({time.perf_counter() - started:.0f} s)")
    # fidelity sample: real embeddings of some distractors against their source mean
    sample = rng.choice(n, size=min(FIDELITY_SAMPLE, n), replace=False)
    means = mean_vectors(sources[sample], weights[sample], pool_vectors)
    t = time.perf_counter()
    real = embedder.embed_passages([text_of(int(j), flat, offsets, sentences) for j in sample])
    embed_rate = len(sample) / (time.perf_counter() - t)
    m_hat = means / np.linalg.norm(means, axis=1, keepdims=True)
    cos = np.sum(real * m_hat, axis=1)
    c = float(np.median(cos))
    derived = derive(means, c, np.random.default_rng(SEED + 1))
    cos_derived = np.sum(real * derived, axis=1)
    # nearest real pool chunk of a real distractor embedding vs of its derived vector: same source?
    stats.update(fidelity_sample=len(sample), cos_real_mean_median=round(c, 4),
                 cos_real_mean_p10=round(float(np.percentile(cos, 10)), 4),
                 cos_real_derived_median=round(float(np.median(cos_derived)), 4),
                 fidelity_embed_rate=round(embed_rate, 1))
    log(f"fidelity: cos(real embedding, source mean) median {c:.4f}; cos(real, derived) median "
        f"{np.median(cos_derived):.4f} on {len(sample)} distractors ({embed_rate:.1f} passages/s)")
    tmp = out.with_name(out.name + ".tmp")
    tmp.mkdir(parents=True, exist_ok=True)
    vecs = np.lib.format.open_memmap(tmp / "vectors.npy", mode="w+", dtype=np.float32, shape=(n, pool_vectors.shape[1]))
    vrng = np.random.default_rng(SEED + 2)
    for i in range(0, n, 50_000):
        vecs[i:i + 50_000] = derive(mean_vectors(sources[i:i + 50_000], weights[i:i + 50_000], pool_vectors), c, vrng)
    vecs.flush()
    del vecs
    np.save(tmp / "sent_flat.npy", flat)
    np.save(tmp / "sent_offsets.npy", offsets)
    np.save(tmp / "sources.npy", sources)
    np.save(tmp / "tok_flat.npy", np.asarray(tok_flat, dtype=np.int32))
    np.save(tmp / "tok_offsets.npy", np.asarray(tok_off, dtype=np.int64))
    (tmp / "sentences.json").write_text(json.dumps(sentences, ensure_ascii=False))
    (tmp / "vocab.json").write_text(json.dumps(list(vocab), ensure_ascii=False))
    stats.update(n=n, seed=SEED, seconds=round(time.perf_counter() - started, 1),
                 mean_chars=round(float(np.mean([sent_len[flat[offsets[j]:offsets[j + 1]]].sum()
                                                 for j in range(min(n, 20000))])), 1),
                 mean_sources=round(float((sources[:20000] >= 0).sum(axis=1).mean()), 2))
    (tmp / "meta.json").write_text(json.dumps(stats, ensure_ascii=False, indent=1))
    for old in CACHE.glob(f"distractors-{set_name}-*"):
        if old != tmp:
            import shutil
            shutil.rmtree(old, ignore_errors=True)
    tmp.rename(out)
    log(f"distractor cache written: {out.relative_to(ROOT)} ({stats['seconds']:.0f} s)")
    return out


class Distractors:
    """The cached distractors: texts, BM25 tokens (as shared ``str`` objects) and vectors."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.meta = json.loads((folder / "meta.json").read_text())
        self.sentences = json.loads((folder / "sentences.json").read_text())
        self.flat = np.load(folder / "sent_flat.npy")
        self.offsets = np.load(folder / "sent_offsets.npy")
        self.vectors = np.load(folder / "vectors.npy", mmap_mode="r")
        self._tok_flat = np.load(folder / "tok_flat.npy")
        self._tok_off = np.load(folder / "tok_offsets.npy")
        self._vocab: list[str] | None = None
        self._sent_tokens: list[list[str]] | None = None

    def text(self, j: int) -> str:
        return text_of(j, self.flat, self.offsets, self.sentences)

    def tokens(self, j: int) -> list[str]:
        if self._sent_tokens is None:
            vocab = json.loads((self.folder / "vocab.json").read_text())
            self._sent_tokens = [[vocab[t] for t in self._tok_flat[a:b]]
                                 for a, b in zip(self._tok_off[:-1], self._tok_off[1:])]
        out: list[str] = []
        for s in self.flat[self.offsets[j]:self.offsets[j + 1]]:
            out.extend(self._sent_tokens[s])
        return out
