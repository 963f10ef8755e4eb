"""One knowledge base as one Milvus collection: dense + BM25 channels, citation metadata,
crash-safe document writes. Works on milvus-lite (a ``….db`` path, embedded) and on a Milvus
server or cluster (``http(s)://host:19530``) with the same calls (pymilvus ≥ 3.0, milvus-lite ≥ 3.2);
connections, URIs and the BM25 statistics probe are in :mod:`rag.milvus_client`.

Rows: one per chunk *version*, primary key ``row_id = "<chunk_id>@<gen>"``. Scalars carry the
citation (doc id, title, section, source, page, start/end, ord, tokens, content hash); ``dense``
is the embedder's normalised vector (metric IP, so scores equal FAISS's); ``sparse`` is generated
by a Milvus BM25 function from the ``lex`` field. ``lex`` holds, by ``lexical`` mode:

- ``tokens`` (default): the project's own BM25 tokens (``rag.lexical``: OpenCC, jieba search
  mode, bigrams, whole codes), each hex-encoded and joined by spaces, analysed by Milvus's
  ``standard`` analyzer — so Milvus scores BM25 over exactly our tokens (k1 1.2, b 0.75 = bm25s);
- ``jieba``: the chunk's indexed text, analysed by Milvus's ``jieba`` tokenizer.

Crash safety (no half-visible document). A marker row (``row_id == "__meta__"``) holds the
committed generation ``G`` in its ``gen`` field. A chunk row is visible iff
``gen <= G and gen_end > G``. A write of generation ``n = G + 1``:

1. inserts the new rows with ``gen = n`` (invisible: ``n > G``);
2. rewrites the replaced rows with ``gen_end = n`` (still visible: ``n > G``);
3. commits: upserts the marker with ``gen = n`` — one single-row write that flips both sets;
4. purges the retired rows (``gen_end <= G``) physically, so deleted text is gone.

A crash before 3 leaves the old version whole and the new rows invisible; a crash after 3 leaves
the new version whole. The next write first repairs: deletes rows with ``gen > G``, resets
``gen_end`` of rows retired by an uncommitted write, purges committed retirements. Assumes one
writer per collection (the project's ``write.lock``). Readers read ``G`` once per query
(:meth:`committed_generation`) and pass it to both channels for a consistent snapshot; a query
that read ``G`` just before a commit may miss a replaced document (purged), never see a mix.
"""
from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Literal

import numpy as np

from rag.milvus_client import K1, MilvusIndexError, _is_local, _LoadingClient, _redact, open_client

META_ID = "__meta__"
LIVE = 1 << 62  # gen_end of a row nobody retired
BATCH = 500  # rows per insert/upsert request
LexicalMode = Literal["tokens", "jieba"]
_FIELDS = ("row_id", "chunk_id", "doc_id", "title", "section", "source", "page", "start", "end", "ord",
           "tokens", "content_hash", "gen", "gen_end", "text", "lex", "dense")
_CHUNK_KEYS = ("chunk_id", "doc_id", "title", "section", "source", "page", "start", "end", "ord",
               "tokens", "content_hash", "text")


def quote(value: str) -> str:
    """A Milvus filter string literal for ``value`` (backslash and double quote escaped)."""
    for raw, escaped in (("\\", "\\\\"), ('"', '\\"'), ("\n", "\\n"), ("\r", "\\r"), ("\t", "\\t")):
        value = value.replace(raw, escaped)
    return f'"{value}"'


def doc_prefix_filter(prefix: str) -> str:
    """Filter expression: documents whose id starts with ``prefix`` (``%`` and ``_`` literal)."""
    escaped = re.sub(r"([\\%_])", r"\\\1", prefix)
    return "doc_id like " + quote(escaped + "%")


def encode_tokens(tokens: Iterable[str]) -> str:
    """Tokens as text the ``standard`` analyzer splits back into exactly them (hex, space-joined)."""
    return " ".join(t.encode("utf-8").hex() for t in tokens if t)


class MilvusIndex:
    """The dense and BM25 indexes of one knowledge base in one Milvus collection.

    Use :meth:`open`; the constructor takes an already connected client.

    Args:
        client: a connected ``pymilvus.MilvusClient``.
        uri: where it is connected (for messages; a token in it is never shown).
        collection: the collection name.
        dim: dimension of the dense vectors.
        lexical: ``tokens`` or ``jieba`` (see the module docstring).
        tokenize: the BM25 tokeniser (``LexicalTokenizer.tokenize``); needed in ``tokens`` mode
            for queries and for chunks given without their ``lexical`` tokens.
    """

    def __init__(self, client, uri: str, collection: str, dim: int, lexical: LexicalMode,
                 tokenize: Callable[[str], list[str]] | None = None):
        self.client, self.uri, self.collection = client, uri, collection
        self.dim, self.lexical, self.tokenize = dim, lexical, tokenize

    # ------------------------------------------------------------------ open / create
    @classmethod
    def open(cls, uri: str | Path, collection: str, dim: int, embedder_id: str, token: str | None = None,
             lexical: LexicalMode = "tokens", tokenize: Callable[[str], list[str]] | None = None,
             dense_index: str = "FLAT", timeout: float = 10.0, replace: bool = False) -> MilvusIndex:
        """Connect, create the collection when missing, and check it was built with this embedder.

        Args:
            uri: a milvus-lite data path ending in ``.db`` (its folder is created) or
                ``http(s)://host:port`` of a Milvus server.
            collection: the collection (one per knowledge base).
            dim: the embedder's vector dimension.
            embedder_id: the embedder's model id; recorded at creation, other ids are refused.
            token: Milvus token (``user:password`` or an API key) for a server.
            lexical: how BM25 tokenises (``tokens`` or ``jieba``), fixed at creation.
            tokenize: the project's tokeniser, required in ``tokens`` mode.
            dense_index: ``FLAT`` (exact, like FAISS flat), ``HNSW`` or ``AUTOINDEX``; at creation.
            timeout: seconds for each request.
            replace: drop the collection first when it exists, unread: one that a killed writer
                left half-written may not even load (milvus-lite: "No data left in file").

        Raises:
            MilvusIndexError: bad URI, server down or data directory locked, or the collection
                was made with another embedder, dimension or lexical mode.
        """
        from pymilvus.exceptions import MilvusException

        if lexical == "tokens" and tokenize is None:
            raise ValueError("lexical='tokens' needs tokenize= (the rag.lexical tokeniser)")
        uri = str(uri)
        client = open_client(uri, token, timeout, private_jieba=lexical == "jieba")
        shown = _redact(uri)
        index = cls(_LoadingClient(client), uri, collection, dim, lexical, tokenize)
        try:
            if replace and client.has_collection(collection):
                client.drop_collection(collection)
            if not client.has_collection(collection):
                index._create(embedder_id, dense_index)
            index._check(embedder_id)
            client.load_collection(collection)
        except MilvusException as exc:
            client.close()
            raise MilvusIndexError(f"Milvus {shown} 出错 / failed: {getattr(exc, 'message', exc)}") from None
        except BaseException:
            client.close()
            raise
        return index

    def _create(self, embedder_id: str, dense_index: str) -> None:
        from pymilvus import DataType, Function, FunctionType, MilvusClient

        s = MilvusClient.create_schema(auto_id=False, enable_dynamic_field=False)
        s.add_field("row_id", DataType.VARCHAR, is_primary=True, max_length=64)
        s.add_field("chunk_id", DataType.INT64)
        for name, length in (("doc_id", 1024), ("title", 1024), ("section", 2048), ("source", 2048),
                             ("content_hash", 128)):
            s.add_field(name, DataType.VARCHAR, max_length=length)
        for name in ("page", "start", "end", "ord", "tokens", "gen", "gen_end"):
            s.add_field(name, DataType.INT64)
        s.add_field("text", DataType.VARCHAR, max_length=65535)
        analyzer = {"tokenizer": "standard"} if self.lexical == "tokens" else {"tokenizer": "jieba"}
        s.add_field("lex", DataType.VARCHAR, max_length=65535, enable_analyzer=True, analyzer_params=analyzer)
        s.add_field("dense", DataType.FLOAT_VECTOR, dim=self.dim)
        s.add_field("sparse", DataType.SPARSE_FLOAT_VECTOR)
        s.add_function(Function(name="bm25", function_type=FunctionType.BM25,
                                input_field_names=["lex"], output_field_names=["sparse"]))
        ip = self.client.prepare_index_params()
        # pymilvus 3 flattens params into top-level keys, which milvus-lite 3.2 ignores (it reads only a
        # JSON "params" key, as Milvus servers also accept): send both forms.
        dense_params = {"M": 32, "efConstruction": 200} if dense_index == "HNSW" else {}
        bm25_params = {"bm25_k1": K1, "bm25_b": 0.75}  # = bm25s (rag.index_files)
        ip.add_index(field_name="dense", index_type=dense_index, metric_type="IP",
                     params={**dense_params, "params": dense_params} if dense_params else {})
        ip.add_index(field_name="sparse", index_type="SPARSE_INVERTED_INDEX", metric_type="BM25",
                     params={**bm25_params, "params": bm25_params})
        props = {"rag.embedder": embedder_id, "rag.dim": str(self.dim), "rag.lexical": self.lexical,
                 "rag.layout": "1"}
        self.client.create_collection(self.collection, schema=s, index_params=ip, consistency_level="Strong",
                                      properties=props)

    def _check(self, embedder_id: str) -> None:
        info = self.client.describe_collection(self.collection)
        props = info.get("properties") or {}
        names = {f["name"] for f in info["fields"]}
        if props.get("rag.layout") != "1" or not {"row_id", "gen", "gen_end", "lex", "dense"} <= names:
            raise MilvusIndexError(f"集合 {self.collection} 不是本程序建立的知识库 / collection {self.collection} "
                                   f"at {_redact(self.uri)} was not made by this program")
        known, known_dim = props.get("rag.embedder"), props.get("rag.dim")
        if known != embedder_id or known_dim != str(self.dim):
            raise MilvusIndexError(
                f"集合 {self.collection} 由嵌入模型 {known}（{known_dim} 维）建立，不能混用 {embedder_id}（{self.dim} 维）；"
                f"请新建知识库或用原模型。 / collection {self.collection} was built with {known} ({known_dim}-d); "
                f"refusing {embedder_id} ({self.dim}-d).")
        if props.get("rag.lexical") != self.lexical:
            raise MilvusIndexError(f"集合 {self.collection} 的 BM25 分词方式是 {props.get('rag.lexical')}，不是 "
                                   f"{self.lexical} / collection {self.collection} uses lexical mode "
                                   f"{props.get('rag.lexical')}, not {self.lexical}")

    # ------------------------------------------------------------------ generations
    def committed_generation(self) -> int:
        """The committed generation ``G`` (0 before the first write); read it once per query and
        pass it to both channels so they see the same snapshot."""
        rows = self.client.get(self.collection, ids=[META_ID], output_fields=["gen"])  # a point lookup by key
        return int(rows[0]["gen"]) if rows else 0

    def _visible(self, generation: int | None, extra: str | None = None) -> str:
        g = self.committed_generation() if generation is None else int(generation)
        expr = f"gen <= {g} and gen_end > {g}"
        return f"({extra}) and {expr}" if extra else expr

    def _commit(self, generation: int) -> None:
        self.client.upsert(self.collection, [{
            "row_id": META_ID, "chunk_id": -1, "doc_id": "", "title": "", "section": "", "source": "",
            "page": -1, "start": 0, "end": 0, "ord": 0, "tokens": 0, "content_hash": "", "gen": generation,
            "gen_end": -1, "text": "", "lex": "", "dense": [1.0] + [0.0] * (self.dim - 1)}])

    def _rows(self, expr: str, limit: int = 1000) -> list[dict]:
        rows = self.client.query(self.collection, filter=expr, output_fields=list(_FIELDS), limit=limit)
        return [{k: r[k] for k in _FIELDS} for r in rows]

    def _set_gen_end(self, expr: str, gen_end: int) -> int:
        """Rewrite every row matching ``expr`` (which must stop matching) with ``gen_end``."""
        done = 0
        while rows := self._rows(expr):
            for r in rows:
                r["gen_end"] = gen_end
                r["dense"] = [float(x) for x in r["dense"]]
            for i in range(0, len(rows), BATCH):
                self.client.upsert(self.collection, rows[i:i + BATCH])
            done += len(rows)
        return done

    def repair(self) -> dict[str, int]:
        """Undo what an interrupted write left (see the module docstring); run before each write.

        Returns:
            Rows deleted as uncommitted, rows un-retired, retired rows purged.
        """
        g = self.committed_generation()
        gone = self._delete(f"gen > {g} and row_id != {quote(META_ID)}")
        restored = self._set_gen_end(f"gen_end > {g} and gen_end < {LIVE}", LIVE)
        purged = self._delete(f"gen_end >= 0 and gen_end <= {g}")
        return {"uncommitted": gone, "unretired": restored, "purged": purged}

    def _delete(self, expr: str) -> int:
        res = self.client.delete(self.collection, filter=expr)
        return len(res) if isinstance(res, list) else int(res.get("delete_count", 0))

    # ------------------------------------------------------------------ writes
    def upsert_document(self, doc_id: str, chunks: list[dict], vectors: np.ndarray,
                        generation: int | None = None) -> int:
        """Replace one document's chunks atomically (see :meth:`upsert_documents`); returns the
        committed generation."""
        return self.upsert_documents([(doc_id, chunks, vectors)], generation)

    def upsert_documents(self, documents: Iterable[tuple[str, list[dict], np.ndarray]],
                         generation: int | None = None, delete: Iterable[str] = (), commit: bool = True) -> int:
        """Replace (or add) documents and delete others, all visible at one commit.

        Args:
            documents: ``(doc_id, chunks, vectors)``, read lazily (rows go out in batches); a chunk
                is a dict with ``chunk_id`` (int, unique in the KB) and ``text``, and optionally
                ``title``, ``section``, ``source``, ``page`` (None = -1), ``start``, ``end``, ``ord``,
                ``tokens``, ``content_hash``, ``lexical`` (BM25 tokens, ``tokens`` mode) and
                ``indexed_text`` (what BM25 reads in ``jieba`` mode, and what is tokenised when
                ``lexical`` is missing; default ``text``).
            generation: the generation to commit; must exceed the committed one (default ``G + 1``).
            delete: ids of documents to remove in the same commit.
            commit: False stops after steps 1-2 (written, not visible at ``G``); the caller then
                commits with :meth:`commit` (or a reader passes the generation explicitly).

        Returns:
            The generation written (committed unless ``commit`` is False).
        """
        self.repair()
        g = self.committed_generation()
        n = g + 1 if generation is None else int(generation)
        if n <= g:
            raise ValueError(f"generation {n} is not above the committed generation {g}")
        rows, ids = [], list(delete)
        for doc_id, chunks, vectors in documents:
            ids.append(doc_id)
            vectors = np.asarray(vectors, dtype=np.float32).reshape(len(chunks), -1) if chunks else vectors
            if chunks and vectors.shape[1] != self.dim:
                raise MilvusIndexError(f"vectors have {vectors.shape[1]} dimensions, the collection {self.dim}")
            rows.extend(self._row(doc_id, c, v, n) for c, v in zip(chunks, vectors))
            while len(rows) >= BATCH:
                self.client.insert(self.collection, rows[:BATCH])
                del rows[:BATCH]
        if rows:
            self.client.insert(self.collection, rows)
        for i in range(0, len(ids), 200):
            names = ", ".join(quote(d) for d in ids[i:i + 200])
            self._set_gen_end(f"doc_id in [{names}] and gen <= {g} and gen_end == {LIVE}", n)
        if commit:
            self.commit(n)
        return n

    def commit(self, generation: int) -> None:
        """Steps 3-4: make ``generation`` the committed one, then purge the rows it retired."""
        self._commit(generation)
        self._delete(f"gen_end >= 0 and gen_end <= {int(generation)}")

    def _row(self, doc_id: str, chunk: dict, vector: np.ndarray, generation: int) -> dict:
        indexed = chunk.get("indexed_text") or chunk["text"]
        if self.lexical == "tokens":
            tokens = chunk.get("lexical")
            lex = encode_tokens(self.tokenize(indexed) if tokens is None else tokens)
        else:
            lex = indexed
        row = {k: chunk.get(k) for k in _CHUNK_KEYS}
        row.update(doc_id=doc_id, row_id=f"{int(chunk['chunk_id'])}@{generation}", gen=generation, gen_end=LIVE,
                   lex=lex, dense=[float(x) for x in vector])
        for k in ("title", "section", "source", "content_hash"):
            row[k] = row[k] or ""
        for k in ("start", "end", "ord", "tokens"):
            row[k] = int(row[k] or 0)
        row["page"] = -1 if row["page"] is None else int(row["page"])
        for k in ("text", "lex"):
            if len(row[k].encode("utf-8")) > 65535:
                raise MilvusIndexError(f"chunk {row['chunk_id']} of {doc_id}: {k} longer than 65535 bytes")
        return row

    def delete_document(self, doc_id: str) -> int:
        """Remove a document ``doc_id`` (committed as one generation, then purged from Milvus);
        returns how many chunks it had (0 when unknown)."""
        had = self.count(f"doc_id == {quote(doc_id)}")
        if had:
            self.upsert_documents([], delete=[doc_id])
        return had

    def flush(self) -> None:
        """Seal written rows into segments (milvus-lite rebuilds an in-memory BM25 index of unsealed
        rows at every search: flush after a bulk write)."""
        self.client.flush(self.collection)

    # ------------------------------------------------------------------ reads
    def dense_search(self, vector: np.ndarray, k: int, filter: str | None = None,
                     generation: int | None = None) -> list[tuple[int, float]]:
        """Nearest chunks by inner product (= cosine on normalised vectors), best first.

        Args:
            vector: the query vector, shape ``(dim,)``.
            k: how many.
            filter: an extra Milvus filter expression (e.g. ``doc_prefix_filter("faq/")``).
            generation: the snapshot to read (default: the committed one, read now).

        Returns:
            ``(chunk_id, score)`` pairs.
        """
        data = [[float(x) for x in np.asarray(vector, dtype=np.float32).reshape(-1)]]
        res = self.client.search(self.collection, data=data, anns_field="dense", limit=k,
                                 filter=self._visible(generation, filter), output_fields=["chunk_id"])
        return [(int(h["entity"]["chunk_id"]), float(h["distance"])) for h in res[0]]

    def bm25_search(self, text: str, k: int, filter: str | None = None, generation: int | None = None,
                    tokens: list[str] | None = None) -> list[tuple[int, float]]:
        """Best BM25 chunks for a query, best first (only chunks sharing a term).

        Args:
            text: the query text (tokenised like the chunks).
            k: how many.
            filter: an extra Milvus filter expression.
            generation: the snapshot to read (default: the committed one, read now).
            tokens: the query's BM25 tokens, already made (``tokens`` mode; ``text`` is then unused).

        Returns:
            ``(chunk_id, score)`` pairs; scores as bm25s's (milvus-lite reports BM25 negated).
        """
        if self.lexical == "tokens":
            query = encode_tokens(self.tokenize(text) if tokens is None else tokens)
        else:
            query = text
        if not query.strip():
            return []
        res = self.client.search(self.collection, data=[query], anns_field="sparse", limit=k,
                                 filter=self._visible(generation, filter), output_fields=["chunk_id"])
        # Milvus scores idf·tf·(k1+1)/(tf+k1·norm); bm25s (Lucene) leaves out the constant k1+1.
        return [(int(h["entity"]["chunk_id"]), abs(float(h["distance"])) / (K1 + 1)) for h in res[0]]

    def chunks(self, ids: list[int], generation: int | None = None) -> dict[int, dict]:
        """Citation metadata and text of visible chunks by id (missing ids are left out)."""
        out: dict[int, dict] = {}
        for i in range(0, len(ids), 500):
            part = ", ".join(str(int(x)) for x in ids[i:i + 500])
            for r in self.client.query(self.collection, filter=self._visible(generation, f"chunk_id in [{part}]"),
                                       output_fields=list(_CHUNK_KEYS)):
                row = {k: r[k] for k in _CHUNK_KEYS}
                row["page"] = None if row["page"] < 0 else row["page"]
                out[int(row["chunk_id"])] = row
        return out

    def vectors_for_hashes(self, hashes: list[str]) -> dict[str, np.ndarray]:
        """Vectors of visible chunks by content hash (the cache: unchanged text is not re-embedded)."""
        found: dict[str, np.ndarray] = {}
        g = self.committed_generation()
        for i in range(0, len(hashes), 200):
            names = ", ".join(quote(h) for h in hashes[i:i + 200])
            for r in self.client.query(self.collection, filter=self._visible(g, f"content_hash in [{names}]"),
                                       output_fields=["content_hash", "dense"], limit=1000):
                found[r["content_hash"]] = np.asarray(r["dense"], dtype=np.float32)
        return found

    def count(self, filter: str | None = None) -> int:
        """Visible chunks (matching ``filter`` when given)."""
        rows = self.client.query(self.collection, filter=self._visible(None, filter), output_fields=["count(*)"])
        return int(rows[0]["count(*)"]) if rows else 0

    def close(self) -> None:
        """Close the connection; for milvus-lite also stop the embedded server and free the
        ``.db`` folder's lock, so another process can open it."""
        self.client.close()
        if _is_local(self.uri):
            from milvus_lite.server_manager import server_manager_instance
            server_manager_instance.release_server(self.uri)
