"""Probe: how Milvus's BM25 (jieba analyzer, or over the project's own tokens) and dense search
rank the shared sets, next to the project's FAISS + bm25s channels on the same knowledge base.

Reads a private snapshot of an eval KB (``index/eval-<set>-*``, copied: other sessions rebuild
them): chunks, their BM25 tokens
and their cached vectors (nothing is embedded again but the questions). Fills milvus-lite
collections in a temporary folder and runs the set's questions through every channel:

- ``project bm25`` / ``project dense`` / ``project hybrid``: ``rag.retrieve.Searcher`` as today;
- ``milvus dense``: the same vectors, FLAT/IP, through ``rag.milvus_index.MilvusIndex``;
- ``milvus bm25 jieba``: Milvus's BM25 function over the indexed text, ``jieba`` analyzer;
- ``milvus bm25 tokens``: Milvus's BM25 function over the project's tokens (hex-encoded, ``standard``
  analyzer; ``MilvusIndex(lexical="tokens")``), in one segment, and written in 10 flushed batches
  (milvus-lite keeps BM25 statistics per segment);
- ``milvus sparse IP``: user sparse vectors holding the project's BM25 weights (doc side:
  saturated, length-normalised tf; query side: idf), plain inner product;
- ``milvus hybrid``: ``rag.retrieve.fuse_scores`` over ``milvus dense`` + ``milvus bm25 tokens``.

Relevance is ``rag eval``'s (``rag.eval_questions.Judge``: gold quote inside the chunk's span,
whitespace ignored; or gold document id). Prints hit@1 / hit@5 and the search p50 in ms per
channel (Milvus channel times include reading the committed generation; dense times exclude the
query embedding, reported on its own; ``project hybrid`` includes it, ``milvus hybrid`` does not).

    .venv/bin/python bench/milvus_probe.py --sets seeds rgb_zh [--limit 100]
"""
from __future__ import annotations

import argparse
import json
import math
import shutil
import sqlite3
import statistics
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from rag.config import Settings
from rag.eval_questions import Judge, load_questions
from rag.milvus_index import MilvusIndex
from rag.retrieve import Searcher, fuse_scores

QUESTIONS = {"seeds": Path("/work/shared/corpus/seeds_eval/dev.jsonl"),
             **{s: Path(f"/work/shared/evaldata/{s}/questions.jsonl") for s in ("rgb_zh", "drcd", "cmrc2018")}}
N = 100  # candidates per channel, as Settings.candidates
DEPTH = 10
K1, B = 1.2, 0.75  # bm25s in rag.index_files


def snapshot_kb(kb_dir: Path, into: Path) -> Path:
    """A private copy of a KB (SQLite backup + its current index generation): other sessions
    rebuild the eval KBs while this runs."""
    for _ in range(5):
        dst = into / kb_dir.name
        shutil.rmtree(dst, ignore_errors=True)
        dst.mkdir(parents=True)
        src = sqlite3.connect(f"file:{kb_dir / 'kb.sqlite'}?mode=ro", uri=True)
        copy = sqlite3.connect(dst / "kb.sqlite")
        src.backup(copy)
        src.close()
        generation = copy.execute("SELECT value FROM meta WHERE key = 'generation'").fetchone()[0]
        copy.close()
        try:
            shutil.copytree(kb_dir / f"gen-{generation}", dst / f"gen-{generation}")
            return dst
        except (FileNotFoundError, shutil.Error):
            time.sleep(1)
    raise RuntimeError(f"could not snapshot {kb_dir}: it keeps changing")


def read_kb(db_file: Path) -> tuple[list[dict], np.ndarray, dict[str, tuple[str, str]]]:
    """Chunks (as MilvusIndex takes them), their vectors, and ``doc_id -> (title, text)``."""
    db = sqlite3.connect(f"file:{db_file}?mode=ro", uri=True)
    rows = db.execute(
        'SELECT c.id, c.doc_id, d.title, d.source, c.ord, c.text, c.section, c.start, c."end", c.page, '
        "c.tokens, c.content_hash, c.lexical, v.vector FROM chunks c JOIN documents d ON d.doc_id = c.doc_id "
        "JOIN vectors v ON v.content_hash = c.content_hash ORDER BY c.id").fetchall()
    docs = {d: (t, x) for d, t, x in db.execute("SELECT doc_id, title, text FROM documents")}
    db.close()
    chunks, vectors = [], []
    for cid, doc_id, title, source, ord_, text, section, start, end, page, tokens, chash, lexical, blob in rows:
        head = " ".join(p for p in (title, section) if p and p not in text[:80])  # rag.split.Chunk.indexed_text
        chunks.append({"chunk_id": cid, "doc_id": doc_id, "title": title, "source": source, "ord": ord_,
                       "text": text, "section": section, "start": start, "end": end, "page": page,
                       "tokens": tokens, "content_hash": chash, "lexical": json.loads(lexical),
                       "indexed_text": f"{head}\n{text}" if head else text})
        vectors.append(np.frombuffer(blob, dtype=np.float32))
    return chunks, np.vstack(vectors), docs


def by_doc(chunks: list[dict], vectors: np.ndarray) -> list[tuple[str, list[dict], np.ndarray]]:
    groups: dict[str, list[int]] = {}
    for i, c in enumerate(chunks):
        groups.setdefault(c["doc_id"], []).append(i)
    return [(d, [chunks[i] for i in idx], vectors[idx]) for d, idx in groups.items()]


def fill(index: MilvusIndex, docs: list, batches: int = 1) -> float:
    """Write every document, in ``batches`` commits each sealed by a flush; returns seconds."""
    t = time.perf_counter()
    step = math.ceil(len(docs) / batches)
    for i in range(0, len(docs), step):
        index.upsert_documents(docs[i:i + step])
        index.flush()
    return time.perf_counter() - t


class SparseIP:
    """User sparse vectors with the project's BM25 weights in a plain IP sparse field."""

    def __init__(self, uri: str, chunks: list[dict]):
        from pymilvus import DataType, MilvusClient

        self.vocab: dict[str, int] = {}
        df: Counter = Counter()
        lengths = [len(c["lexical"]) for c in chunks]
        avgdl = sum(lengths) / len(lengths)
        for c in chunks:
            df.update(set(c["lexical"]))
        n = len(chunks)
        self.idf = {t: math.log(1 + (n - f + 0.5) / (f + 0.5)) for t, f in df.items()}
        rows = []
        for c, dl in zip(chunks, lengths):
            tf = Counter(c["lexical"])
            vec = {self._id(t): f * (K1 + 1) / (f + K1 * (1 - B + B * dl / avgdl)) for t, f in tf.items()}
            rows.append({"chunk_id": c["chunk_id"], "sparse": vec or {0: 1e-9}})
        self.client = MilvusClient(uri)
        s = MilvusClient.create_schema(auto_id=False, enable_dynamic_field=False)
        s.add_field("chunk_id", DataType.INT64, is_primary=True)
        s.add_field("sparse", DataType.SPARSE_FLOAT_VECTOR)
        ip = self.client.prepare_index_params()
        ip.add_index(field_name="sparse", index_type="SPARSE_INVERTED_INDEX", metric_type="IP")
        self.client.create_collection("kb", schema=s, index_params=ip, consistency_level="Strong")
        for i in range(0, len(rows), 500):
            self.client.insert("kb", rows[i:i + 500])
        self.client.flush("kb")

    def _id(self, token: str) -> int:
        return self.vocab.setdefault(token, len(self.vocab) + 1)

    def search(self, tokens: list[str], k: int) -> list[tuple[int, float]]:
        q: dict[int, float] = {}
        for t in tokens:
            if t in self.vocab:
                q[self.vocab[t]] = q.get(self.vocab[t], 0.0) + self.idf[t]
        if not q:
            return []
        res = self.client.search("kb", data=[q], anns_field="sparse", limit=k, output_fields=["chunk_id"])
        return [(int(h["entity"]["chunk_id"]), float(h["distance"])) for h in res[0]]


def timed(fn, *args):
    t = time.perf_counter()
    out = fn(*args)
    return out, (time.perf_counter() - t) * 1000


def run_set(name: str, limit: int | None) -> dict:
    tmp = Path(tempfile.mkdtemp(prefix="milvus-probe-"))
    kb_dir = snapshot_kb(max((ROOT / "index").glob(f"eval-{name}-*")), tmp / "home")
    questions = [q for q in load_questions(QUESTIONS[name], limit) if not q.negative]
    chunks, vectors, doc_text = read_kb(kb_dir / "kb.sqlite")
    meta = {c["chunk_id"]: c for c in chunks}
    judge = Judge(lambda d: doc_text.get(d))
    settings = Settings(home=kb_dir.parent, kb=kb_dir.name)
    searcher = Searcher(settings)
    tok = searcher.tokenizer
    emb = searcher.embedder
    docs = by_doc(chunks, vectors)
    print(f"\n## {name}: {len(chunks)} chunks, {len(docs)} documents, {len(questions)} answerable questions "
          f"({kb_dir.name})", flush=True)

    build: dict[str, float] = {}
    jieba_idx = MilvusIndex.open(tmp / "jieba.db", "kb", emb.dim, emb.model_id, lexical="jieba")
    build["jieba"] = fill(jieba_idx, docs)
    tok_idx = MilvusIndex.open(tmp / "tokens.db", "kb", emb.dim, emb.model_id, lexical="tokens",
                               tokenize=tok.tokenize)
    build["tokens"] = fill(tok_idx, docs)
    seg_idx = MilvusIndex.open(tmp / "tokens10.db", "kb", emb.dim, emb.model_id, lexical="tokens",
                               tokenize=tok.tokenize)
    build["tokens, 10 batches"] = fill(seg_idx, docs, batches=10)
    t = time.perf_counter()
    sparse_ip = SparseIP(str(tmp / "ip.db"), chunks)
    build["sparse IP"] = time.perf_counter() - t
    for k, v in build.items():
        print(f"build {k}: {v:.1f} s", flush=True)
    assert tok_idx.count() == len(chunks), (tok_idx.count(), len(chunks))

    channels = ["project bm25", "milvus bm25 jieba", "milvus bm25 tokens", "milvus bm25 tokens 10 batches",
                "milvus sparse IP", "project dense", "milvus dense", "project hybrid", "milvus hybrid"]
    hits = {c: [0, 0] for c in channels}
    times: dict[str, list[float]] = {c: [] for c in channels + ["query embedding", "milvus read G"]}
    for q in questions:
        text = q.search_query() if q.history else q.question
        ranked: dict[str, list[int]] = {}
        (b_ids, _), ms = timed(searcher.bm25_ranking, text, N)
        ranked["project bm25"], times["project bm25"] = b_ids, times["project bm25"] + [ms]
        qv, ms = timed(lambda t: emb.embed_queries([t]).astype(np.float32), text)
        times["query embedding"].append(ms)
        idx = searcher._current()
        (_, ids), ms = timed(idx.dense.search, qv, min(N, idx.dense.ntotal))
        ranked["project dense"], times["project dense"] = ids[0][ids[0] >= 0].tolist(), times["project dense"] + [ms]
        hy, ms = timed(searcher.search, text, DEPTH, "hybrid")
        ranked["project hybrid"] = [h.chunk.id for h in hy]
        times["project hybrid"].append(ms)
        _, ms = timed(tok_idx.committed_generation)
        times["milvus read G"].append(ms)
        for label, fn, arg in (("milvus bm25 jieba", jieba_idx.bm25_search, text),
                               ("milvus bm25 tokens", tok_idx.bm25_search, text),
                               ("milvus bm25 tokens 10 batches", seg_idx.bm25_search, text),
                               ("milvus dense", tok_idx.dense_search, qv[0])):
            res, ms = timed(fn, arg, N)
            ranked[label] = [c for c, _ in res]
            times[label].append(ms)
            if label == "milvus bm25 tokens":
                m_bm25 = res
            if label == "milvus dense":
                m_dense = res
        res, ms = timed(sparse_ip.search, tok.tokenize(text), N)
        ranked["milvus sparse IP"], times["milvus sparse IP"] = [c for c, _ in res], times["milvus sparse IP"] + [ms]
        fused = fuse_scores([c for c, _ in m_dense], [s for _, s in m_dense], [c for c, _ in m_bm25],
                            [s for _, s in m_bm25], settings.bm25_weight)
        ranked["milvus hybrid"] = [c for c, _ in fused]
        times["milvus hybrid"].append(times["milvus read G"][-1] + times["milvus dense"][-1]
                                      + times["milvus bm25 tokens"][-1])
        for label in channels:
            flags = [bool(judge.units(q, meta[c]["doc_id"], meta[c]["start"], meta[c]["end"]))
                     for c in ranked[label][:DEPTH]]
            hits[label][0] += any(flags[:1])
            hits[label][1] += any(flags[:5])
    n = len(questions)
    table = {c: {"hit@1": hits[c][0] / n, "hit@5": hits[c][1] / n,
                 "p50_ms": statistics.median(times[c]) if times[c] else None} for c in channels}
    print(f"\n| {name} | hit@1 | hit@5 | search p50 ms |\n|---|---|---|---|")
    for c, r in table.items():
        ms = "-" if r["p50_ms"] is None else f"{r['p50_ms']:.1f}"
        print(f"| {c} | {r['hit@1']:.3f} | {r['hit@5']:.3f} | {ms} |")
    print(f"| (query embedding) | | | {statistics.median(times['query embedding']):.1f} |")
    print(f"| (milvus read G) | | | {statistics.median(times['milvus read G']):.2f} |")
    sizes = {p.name: sum(f.stat().st_size for f in p.rglob("*") if f.is_file()) for p in tmp.glob("*.db")}
    print("on disk:", {k: f"{v / 1e6:.1f} MB" for k, v in sizes.items()}, flush=True)
    searcher.close()
    for i in (jieba_idx, tok_idx, seg_idx):
        i.close()
    sparse_ip.client.close()
    shutil.rmtree(tmp, ignore_errors=True)
    return {"chunks": len(chunks), "questions": n, "build_s": build, "channels": table}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sets", nargs="+", default=["seeds", "rgb_zh"], choices=sorted(QUESTIONS))
    ap.add_argument("--limit", type=int, default=None, help="first N questions of each set")
    ap.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = ap.parse_args()
    results = {name: run_set(name, args.limit) for name in args.sets}
    if args.json:
        args.json.write_text(json.dumps(results, ensure_ascii=False, indent=1))


if __name__ == "__main__":
    main()
