"""Milvus connections for the store: URIs (a milvus-lite ``….db`` path, embedded, or a server
``http(s)://host:19530``), opening a client with user-fit errors, the client wrapper that reloads a
released collection, and the cross-segment BM25 probe (:func:`bm25_statistics_are_global`).

:class:`rag.milvus_index.MilvusIndex` opens its collection through :func:`open_client`; every client
of this program to a server is made by :func:`connect`, so it always has ``RECONNECT_OPTIONS``.
"""
from __future__ import annotations

import fcntl
import os
import re
from pathlib import Path

K1 = 1.2  # BM25 saturation, as bm25s in rag.index_files
# gRPC options of a server connection. pymilvus answers a failed call (server restarted) by opening a
# new channel and trying again; from gRPC's process-wide subchannel pool that channel would inherit
# the old one's reconnect back-off and fail too (measured: calls kept failing for a second or more
# after the server was back; the back-off grows while the server is down). With a private pool per
# channel the first call after a restart succeeds (tests/test_milvus_server.py).
RECONNECT_OPTIONS = {"grpc.use_local_subchannel_pool": 1}


class MilvusIndexError(RuntimeError):
    """A Milvus store problem with a message fit for the user (Chinese / English)."""


def _redact(uri: str) -> str:
    return re.sub(r"//[^/@]*@", "//***@", uri)


def _is_local(uri: str) -> bool:
    return "://" not in uri and not uri.startswith("unix:")


def connect(uri: str, token: str | None = None, timeout: float = 10.0):
    """A ``pymilvus.MilvusClient`` for ``uri``; to a server with ``RECONNECT_OPTIONS``. pymilvus
    shares one gRPC connection per address and token in a process, made by the first client: every
    client of this program to a server is made here, so that connection always has them."""
    from pymilvus import MilvusClient

    extra = {} if _is_local(uri) else {"grpc_options": dict(RECONNECT_OPTIONS)}
    return MilvusClient(uri=uri, token=token or "", timeout=timeout, **extra)


_READS = frozenset({"search", "query", "get"})
NOT_LOADED = 101  # Milvus's (and milvus-lite's) code for "collection not loaded"


def _not_loaded(exc: Exception) -> bool:
    message = str(getattr(exc, "message", exc)).lower()
    return getattr(exc, "code", None) == NOT_LOADED or "not loaded" in message or "'released'" in message


class _LoadingClient:
    """The client with one repair: a search, query or get on a collection that is not loaded loads
    it and runs once more. A restarted milvus-lite server comes back with every collection released
    (measured); a Milvus server whose collection someone released answers the same."""

    def __init__(self, client):
        self._client = client

    def __getattr__(self, name: str):
        method = getattr(self._client, name)
        if name not in _READS:
            return method

        def call(collection_name, *args, **kwargs):
            from pymilvus.exceptions import MilvusException

            try:
                return method(collection_name, *args, **kwargs)
            except MilvusException as exc:
                if not _not_loaded(exc):
                    raise
            self._client.load_collection(collection_name)
            return method(collection_name, *args, **kwargs)

        return call


def _lite_locked(path: str) -> bool:
    """True when another process holds milvus-lite's lock on this data directory."""
    try:
        fd = os.open(os.path.join(path, "LOCK"), os.O_RDWR)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        fcntl.flock(fd, fcntl.LOCK_UN)
        return False
    except OSError:
        return True
    finally:
        os.close(fd)


def open_client(uri: str, token: str | None = None, timeout: float = 10.0, private_jieba: bool = False):
    """A connected ``pymilvus.MilvusClient`` for ``uri`` (see :meth:`rag.milvus_index.MilvusIndex.open`).

    A local ``uri`` must end in ``.db``; its folder is created. ``private_jieba`` (``jieba`` lexical
    mode; used for a local ``uri`` only) first points the global jieba's cache at the project's
    private folder, as milvus-lite's jieba analyzer uses the global jieba.

    Raises:
        MilvusIndexError: bad URI, server down or data directory locked (the message names ``uri``,
            never the token).
    """
    from pymilvus.exceptions import MilvusException

    shown = _redact(uri)
    if _is_local(uri):
        if not uri.endswith(".db"):
            raise MilvusIndexError(f"Milvus 地址无效：{shown}（本地文件须以 .db 结尾，服务器用 http(s)://主机:端口）"
                                   f" / invalid Milvus URI {shown}: a local path must end in .db, a server "
                                   "is http(s)://host:port")
        Path(uri).parent.mkdir(parents=True, exist_ok=True)
        if private_jieba:  # milvus-lite's jieba analyzer uses the global jieba: keep its cache private
            import jieba

            from rag.lexical import private_cache_dir
            jieba.dt.tmp_dir = str(private_cache_dir())
    try:
        client = connect(uri, token, timeout)
    except MilvusException as exc:
        if _is_local(uri) and _lite_locked(uri):
            why = ("被另一个进程占用（milvus-lite 每个 .db 只允许一个进程，多进程请用 milvus-lite server 或 Milvus 服务器）"
                   " / is in use by another process (milvus-lite: one process per .db; for several, run "
                   "`milvus-lite server` or a Milvus server)")
        else:
            why = f"无法打开或连接 / cannot be opened or reached: {getattr(exc, 'message', exc)}"
        raise MilvusIndexError(f"Milvus {shown} {why}") from None
    return client


def bm25_statistics_are_global(uri: str, token: str | None = None, timeout: float = 10.0) -> bool:
    """Whether the Milvus at ``uri`` scores BM25 with one set of statistics for the whole collection
    (N, mean length, document frequencies summed over its segments), so that rows written later,
    into segments of their own, score as if every row had been written at once.

    Measured, not assumed: a throw-away collection gets the same text twice, once in a segment of
    five rows and once in a segment of two (each flushed); the two copies must score the same for
    a query. With per-segment statistics (milvus-lite, embedded or its ``milvus-lite server``) they
    do not. The collection is dropped again whatever happens.

    Returns:
        True when the two copies score equally; False when they differ, or when the check itself
        fails on the server (creating, flushing or searching refused: nothing is then verified).

    Raises:
        MilvusIndexError: the server cannot be reached (the message names ``uri``, never the token).
    """
    import uuid

    from pymilvus import DataType, Function, FunctionType, MilvusClient
    from pymilvus.exceptions import MilvusException

    shown = _redact(uri)
    try:
        client = connect(uri, token, timeout)
    except MilvusException as exc:
        raise MilvusIndexError(f"Milvus {shown} 无法打开或连接 / cannot be opened or reached: "
                               f"{getattr(exc, 'message', exc)}") from None
    name = f"rag_bm25_probe_{uuid.uuid4().hex[:12]}"
    try:
        s = MilvusClient.create_schema(auto_id=False, enable_dynamic_field=False)
        s.add_field("pk", DataType.INT64, is_primary=True)
        s.add_field("lex", DataType.VARCHAR, max_length=256, enable_analyzer=True,
                    analyzer_params={"tokenizer": "standard"})
        s.add_field("sparse", DataType.SPARSE_FLOAT_VECTOR)
        s.add_function(Function(name="bm25", function_type=FunctionType.BM25, input_field_names=["lex"],
                                output_field_names=["sparse"]))
        ip = client.prepare_index_params()
        params = {"bm25_k1": K1, "bm25_b": 0.75}
        ip.add_index(field_name="sparse", index_type="SPARSE_INVERTED_INDEX", metric_type="BM25",
                     params={**params, "params": params})
        client.create_collection(name, schema=s, index_params=ip, consistency_level="Strong")
        client.insert(name, [{"pk": 1, "lex": "ka kb"}, {"pk": 2, "lex": "kb kc kd"}, {"pk": 3, "lex": "kc kd ke kf"},
                             {"pk": 4, "lex": "ka kg"}, {"pk": 10, "lex": "ka kc"}])
        client.flush(name)
        client.insert(name, [{"pk": 20, "lex": "ka kc"}, {"pk": 21, "lex": "kh"}])
        client.flush(name)
        client.load_collection(name)
        hits = client.search(name, data=["ka"], anns_field="sparse", limit=10, output_fields=["pk"])[0]
        score = {int(h["entity"]["pk"]): abs(float(h["distance"])) for h in hits}
        return 10 in score and 20 in score and abs(score[10] - score[20]) <= 1e-5 * max(score[10], 1e-9)
    except MilvusException:
        return False
    finally:
        try:
            if client.has_collection(name):
                client.drop_collection(name)
        except MilvusException:
            pass
        client.close()
