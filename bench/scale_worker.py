"""One step of the scale benchmark in its own process (``bench/scale.py`` runs it and samples the
memory of its process tree): ``prep``, ``assemble``, ``build`` or ``search``. Prints one JSON line
on stdout, prefixed ``RESULT``.

- ``prep``: the set's evaluation KB (``rag.evaluate.ensure_corpus_kb``, reused, never re-embedded
  while its vectors are cached), a private snapshot of it (SQLite backup: other sessions rebuild
  the eval KBs), and the distractor cache (``bench/scale_data.py``).
- ``assemble``: a KB of ``size`` chunks: the snapshot plus ``size - real`` distractor chunks in
  documents of 10 chunks (``_scale/dNNNNNNN``), SQLite only (text, spans; no vectors or tokens:
  query time never reads them).
- ``build``: the backend's index of that KB: ``faiss-flat`` gen-1 and ``faiss-hnsw`` gen-2 by
  ``rag.index_files.write_generation`` (its ``HNSW_MIN_CHUNKS`` set so it builds the asked kind),
  ``milvus-lite`` a collection at generation 3 in ``<kb>/milvus.db`` written as
  ``rag.store_milvus._rebuild`` writes one (FLAT, BM25 over the project's tokens).
- ``search``: points the KB's meta at that backend and runs the questions through
  ``rag.retrieve.Searcher`` exactly as ``rag eval --retrieval-only`` does (``evaluate_question``:
  ``search_parts``, query embedding included); then, per question, the query embedding alone and one
  hybrid ``_search_one`` with the vector given (embedding excluded), and the two channels alone.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import sqlite3
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # as bench_retrieval.py (bench/README.md)

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import numpy as np  # noqa: E402

GENERATION = {"faiss-flat": 1, "faiss-hnsw": 2, "milvus-lite": 3}
PER_DOC = 10  # distractor chunks per distractor document
CHANNEL_QUESTIONS = 100  # questions whose channels are also timed alone


def result(data: dict) -> None:
    data["ru_maxrss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    print("RESULT " + json.dumps(data, ensure_ascii=False), flush=True)


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) if path.exists() else 0


# ---------------------------------------------------------------- prep
def prep(args) -> None:
    from bench_retrieval import SETS
    from scale_data import CACHE, prepare

    from rag.config import Settings
    from rag.embed import make_embedder
    from rag.evaluate import ensure_corpus_kb
    from rag.lexical import tokenizer_for
    from rag.store import KnowledgeBase

    settings = Settings()
    embedder = make_embedder(settings.embedder, settings.threads, settings.embed_batch_size)
    corpus, _ = SETS[args.set]
    kb_settings, _ = ensure_corpus_kb(corpus, settings, embedder, progress=False, log=log)
    snap = CACHE / f"real-{args.set}"
    shutil.rmtree(snap, ignore_errors=True)
    snap.mkdir(parents=True)
    src = sqlite3.connect(f"file:{kb_settings.kb_dir / 'kb.sqlite'}?mode=ro", uri=True)
    dst = sqlite3.connect(snap / "kb.sqlite")
    src.backup(dst)
    src.close()
    dst.execute("PRAGMA journal_mode=DELETE")
    dst.close()
    kb = KnowledgeBase(snap)
    tokenizer = tokenizer_for(kb)
    chunks = kb.chunk_count()
    kb.close()
    folder = prepare(args.set, snap, args.n, embedder, tokenizer, log)
    result({"real_kb": kb_settings.kb, "snapshot": str(snap), "real_chunks": chunks, "distractors": str(folder),
            "meta": json.loads((folder / "meta.json").read_text())})


# ---------------------------------------------------------------- assemble
def assemble(args) -> None:
    from scale_data import Distractors

    started = time.perf_counter()
    snap, kb_dir = Path(args.snapshot), Path(args.kb_dir)
    shutil.rmtree(kb_dir, ignore_errors=True)
    kb_dir.mkdir(parents=True)
    shutil.copy(snap / "kb.sqlite", kb_dir / "kb.sqlite")
    db = sqlite3.connect(kb_dir / "kb.sqlite")
    real = db.execute("SELECT COUNT(*) FROM chunks").fetchone()[0]
    base = db.execute("SELECT MAX(id) FROM chunks").fetchone()[0] + 1
    n = max(0, args.size - real)
    d = Distractors(Path(args.distractors)) if n else None
    db.execute("BEGIN")
    for first in range(0, n, PER_DOC):
        texts = [d.text(j) for j in range(first, min(first + PER_DOC, n))]
        doc_id = f"_scale/d{first // PER_DOC:07d}"
        doc_text = "\n".join(texts)
        db.execute("INSERT INTO documents(doc_id, title, source, content_hash, text, page_starts, added_at) "
                   "VALUES (?, '', ?, ?, ?, '[]', 0)", (doc_id, doc_id, f"scale-{first}", doc_text))
        rows, pos = [], 0
        for k, text in enumerate(texts):
            rows.append((base + first + k, doc_id, k, text, "", pos, pos + len(text), None, len(text),
                         f"scale-{first + k}", "[]"))
            pos += len(text) + 1
        db.executemany('INSERT INTO chunks(id, doc_id, ord, text, section, start, "end", page, tokens, '
                       "content_hash, lexical) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)", rows)
    db.execute("COMMIT")
    db.close()
    (kb_dir / "scale.json").write_text(json.dumps({"real": real, "base_id": base, "distractors": n,
                                                   "distractor_cache": args.distractors}))
    result({"chunks": real + n, "real": real, "distractors": n, "seconds": round(time.perf_counter() - started, 1),
            "docstore_bytes": dir_bytes(kb_dir)})


# ---------------------------------------------------------------- build
def _corpus(kb_dir: Path, with_tokens: bool = True):
    """ids, vectors and BM25 tokens of every chunk: the real ones from SQLite (as
    ``KnowledgeBase._build_indexes`` reads them), the distractors from the cache."""
    from scale_data import Distractors

    info = json.loads((kb_dir / "scale.json").read_text())
    db = sqlite3.connect(f"file:{kb_dir / 'kb.sqlite'}?mode=ro", uri=True)
    rows = db.execute("SELECT c.id, c.lexical, v.vector FROM chunks c JOIN vectors v ON v.content_hash = c.content_hash "
                      "ORDER BY c.id").fetchall()
    db.close()
    n = info["distractors"]
    dim = len(rows[0][2]) // 4
    ids = np.concatenate([np.array([r[0] for r in rows], dtype=np.int64),
                          np.arange(info["base_id"], info["base_id"] + n, dtype=np.int64)])
    vectors = np.empty((len(ids), dim), dtype=np.float32)
    vectors[:len(rows)] = np.frombuffer(b"".join(r[2] for r in rows), dtype=np.float32).reshape(len(rows), dim)
    d = Distractors(Path(info["distractor_cache"])) if n else None
    if n:
        vectors[len(rows):] = d.vectors[:n]
    tokens = None
    if with_tokens:
        tokens = [json.loads(r[1]) or [""] for r in rows]
        tokens.extend(d.tokens(j) or [""] for j in range(n))
    return ids, vectors, tokens, info, d, rows


def _timed_bm25() -> list[float]:
    """Time what ``write_generation`` spends in bm25s (index + save); returns the running total."""
    import bm25s

    spent = [0.0]

    def timed(fn):
        def wrapper(*a, **k):
            t = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                spent[0] += time.perf_counter() - t
        return wrapper

    bm25s.BM25.index, bm25s.BM25.save = timed(bm25s.BM25.index), timed(bm25s.BM25.save)
    return spent


def build(args) -> None:
    kb_dir = Path(args.kb_dir)
    gen = GENERATION[args.backend]
    t0 = time.perf_counter()
    extra: dict = {}
    if args.backend.startswith("faiss"):
        from rag import index_files

        folder = kb_dir / f"gen-{gen}"
        shutil.rmtree(folder, ignore_errors=True)
        # HNSW after flat: the same bm25s files (same tokens) are linked from gen-1, not built twice;
        # the bm25 seconds of gen-1 are added to this build's time
        shared = args.backend == "faiss-hnsw" and (kb_dir / "gen-1" / "bm25").is_dir() \
            and (kb_dir / "bm25_build.json").exists()
        ids, vectors, tokens, _, _, _ = _corpus(kb_dir, with_tokens=not shared)
        prepared = time.perf_counter() - t0
        log(f"{args.backend}: {len(ids)} chunks read ({prepared:.0f} s); writing gen-{gen}")
        # the product's own writer, told which dense index to build
        index_files.HNSW_MIN_CHUNKS = 0 if args.backend == "faiss-hnsw" else 1 << 62
        bm25_spent = _timed_bm25()
        t1 = time.perf_counter()
        index_files.write_generation(kb_dir, gen, ids, vectors, [] if shared else tokens)
        seconds = time.perf_counter() - t1
        if shared:
            (folder / "bm25").mkdir()
            for f in (kb_dir / "gen-1" / "bm25").iterdir():
                os.link(f, folder / "bm25" / f.name)
            bm25_s = json.loads((kb_dir / "bm25_build.json").read_text())["bm25_seconds"]
            extra = {"dense_seconds": round(seconds, 1), "bm25_seconds": bm25_s, "bm25_shared": True}
            seconds += bm25_s
        else:
            extra = {"dense_seconds": round(seconds - bm25_spent[0], 1), "bm25_seconds": round(bm25_spent[0], 1)}
            (kb_dir / "bm25_build.json").write_text(json.dumps(extra))
        size = {"dense": (folder / "dense.faiss").stat().st_size, "bm25": dir_bytes(folder / "bm25"),
                "total": dir_bytes(folder)}
    else:
        size, seconds, prepared = build_milvus(kb_dir, gen)
    result({"backend": args.backend, "seconds": round(seconds, 1), "prepare_seconds": round(prepared, 1),
            "bytes": size, **extra})


def build_milvus(kb_dir: Path, gen: int):
    from rag.store_milvus import Target, acquire, release, sqlite_chunks, sqlite_documents

    t0 = time.perf_counter()
    uri = kb_dir / "milvus.db"
    shutil.rmtree(uri, ignore_errors=True)
    ids, vectors, _, info, d, rows = _corpus(kb_dir, with_tokens=False)
    del ids
    db = sqlite3.connect(f"file:{kb_dir / 'kb.sqlite'}?mode=ro", uri=True)
    dim = vectors.shape[1]
    embedder_id = db.execute("SELECT value FROM meta WHERE key='embedder'").fetchone()[0]
    # a copy of the real KB's vectors for sqlite_documents (it reads them joined to the chunks)
    real_docs = sorted({doc for cid, doc in sqlite_chunks(db).items() if cid < info["base_id"]})
    n, base = info["distractors"], info["base_id"]

    def documents():
        yield from sqlite_documents(db, real_docs, dim)
        for first in range(0, n, PER_DOC):
            doc_id = f"_scale/d{first // PER_DOC:07d}"
            chunks, pos = [], 0
            for k, j in enumerate(range(first, min(first + PER_DOC, n))):
                text = d.text(j)
                chunks.append({"chunk_id": base + j, "doc_id": doc_id, "title": "", "source": doc_id, "ord": k,
                               "text": text, "section": "", "start": pos, "end": pos + len(text), "page": None,
                               "tokens": len(text), "content_hash": f"scale-{j}", "lexical": d.tokens(j)})
                pos += len(text) + 1
            yield doc_id, chunks, vectors[len(rows) + first:len(rows) + first + len(chunks)]

    prepared = time.perf_counter() - t0
    t1 = time.perf_counter()
    target = Target(str(uri), f"scale_g{gen}")
    index = acquire(target, dim, embedder_id)
    try:  # as rag.store_milvus._rebuild writes a milvus-lite KB
        index.commit(0)
        index.flush()
        index.upsert_documents(documents(), gen, commit=False)
        index.flush()
        index.commit(gen)
        index.flush()
        count = index.count()
    finally:
        release(index)
    seconds = time.perf_counter() - t1
    db.close()
    if count != info["real"] + n:
        raise SystemExit(f"milvus-lite holds {count} chunks, expected {info['real'] + n}")
    (kb_dir / "milvus.json").write_text(json.dumps({"collection": target.collection, "generation": gen}))
    return {"total": dir_bytes(uri)}, seconds, prepared


# ---------------------------------------------------------------- search
def point_kb(kb_dir: Path, backend: str) -> None:
    """Make the KB's meta select ``backend`` (the benchmark's KB only; one process at a time)."""
    db = sqlite3.connect(kb_dir / "kb.sqlite")
    rows = {"generation": str(GENERATION[backend]), "store": "milvus" if backend == "milvus-lite" else "faiss"}
    if backend == "milvus-lite":
        rows["milvus_collection"] = json.loads((kb_dir / "milvus.json").read_text())["collection"]
    db.executemany("INSERT OR REPLACE INTO meta(key, value) VALUES (?, ?)", list(rows.items()))
    db.execute("DELETE FROM meta WHERE key = 'milvus_uri'")
    db.commit()
    db.close()


def pct(values: list[float], q: float) -> float | None:
    return round(float(np.percentile(values, q)), 2) if values else None


def search(args) -> None:
    from bench_retrieval import SETS

    from rag.config import Settings
    from rag.eval_questions import DEPTH, Judge, load_questions
    from rag.evaluate import evaluate_question
    from rag.retrieve import Searcher

    kb_dir = Path(args.kb_dir)
    point_kb(kb_dir, args.backend)
    questions = [q for q in load_questions(SETS[args.set][1]) if not q.negative][:args.questions]
    settings = Settings(home=kb_dir.parent, kb=kb_dir.name)
    t0 = time.perf_counter()
    searcher = Searcher(settings)
    judge = Judge(searcher.kb.document_text)
    searcher.search(questions[0].search_query, DEPTH)  # loads the indexes
    load_s = time.perf_counter() - t0
    incl, excl, emb, dense, bm25 = [], [], [], [], []
    hits: dict[str, list[float]] = {"hit@1": [], "hit@5": [], "mrr@10": []}
    for i, q in enumerate(questions):
        rec = evaluate_question(q, searcher, judge, "hybrid", DEPTH)
        incl.append(rec["latency_ms"]["retrieve"])
        for k in hits:
            hits[k].append(rec["metrics"][k])
        text = q.search_query
        t = time.perf_counter()
        vector = searcher.embedder.embed_queries([text])
        emb.append((time.perf_counter() - t) * 1000)
        t = time.perf_counter()
        searcher._search_one(text, DEPTH, "hybrid", vector)
        excl.append((time.perf_counter() - t) * 1000)
        if i < CHANNEL_QUESTIONS:
            t = time.perf_counter()
            searcher.dense_ranking(text, settings.candidates, vector)
            dense.append((time.perf_counter() - t) * 1000)
            t = time.perf_counter()
            searcher.bm25_ranking(text, settings.candidates)
            bm25.append((time.perf_counter() - t) * 1000)
        if (i + 1) % 25 == 0:
            log(f"  {args.backend}: {i + 1}/{len(questions)} questions, hybrid p50 {pct(incl, 50)} ms")
    searcher.close()
    result({"backend": args.backend, "questions": len(questions), "load_seconds": round(load_s, 2),
            **{k: round(float(np.mean(v)), 4) for k, v in hits.items()},
            "p50_incl_ms": pct(incl, 50), "p95_incl_ms": pct(incl, 95),
            "p50_excl_ms": pct(excl, 50), "p95_excl_ms": pct(excl, 95),
            "embed_p50_ms": pct(emb, 50), "dense_p50_ms": pct(dense, 50), "bm25_p50_ms": pct(bm25, 50),
            "channel_questions": len(dense), "hit5_per_question": hits["hit@5"]})


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("step", choices=["prep", "assemble", "build", "search"])
    ap.add_argument("--set", default="rgb_zh")
    ap.add_argument("--n", type=int, default=0, help="prep: distractors to make")
    ap.add_argument("--snapshot")
    ap.add_argument("--distractors")
    ap.add_argument("--kb-dir")
    ap.add_argument("--size", type=int, default=0)
    ap.add_argument("--backend", choices=sorted(GENERATION))
    ap.add_argument("--questions", type=int, default=300)
    args = ap.parse_args()
    {"prep": prep, "assemble": assemble, "build": build, "search": search}[args.step](args)


if __name__ == "__main__":
    main()
