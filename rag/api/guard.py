"""Who may call ``rag api``: the auth/Host/size guard (ASGI middleware) and the bounded queue in
front of the answer slots. (Where the API may listen is ``rag.netguard.check_bind``.)"""
from __future__ import annotations

import asyncio
import hmac

from rag.api.wire import ApiError
from rag.netguard import is_loopback

PUBLIC_PATHS = {"/healthz", "/docs", "/docs/oauth2-redirect", "/openapi.json", "/redoc"}


# ----------------------------------------------------------------------------- binding and the guard


class Guard:
    """ASGI middleware in front of the app: host check, auth, body size.

    It runs before routing and before the body is read, so an unauthenticated or oversized
    request costs nothing (no 1 MB buffered for a caller without a key, no JSON parsed).

    Args:
        app: the wrapped ASGI app.
        api_key: the bearer token, or None for an open loopback server. Without a key, only
            loopback ``Host`` headers are accepted: a web page the user visits could otherwise
            reach this server through DNS rebinding and read the documents.
        max_body_bytes: larger request bodies get 413.
    """

    def __init__(self, app, api_key: str | None, max_body_bytes: int):
        self.app = app
        self.key = api_key.encode() if api_key else None
        self.max_body_bytes = max_body_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        error = self._check_host(headers) or self._check_auth(scope["path"], headers) or self._check_length(headers)
        if error:
            return await error.response()(scope, receive, send)
        if scope["method"] not in ("POST", "PUT", "PATCH"):
            return await self.app(scope, receive, send)
        parts, size, more = [], 0, True
        while more:  # a chunked body has no Content-Length: count what arrives
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            parts.append(message.get("body", b""))
            size += len(parts[-1])
            more = message.get("more_body", False)
            if size > self.max_body_bytes:
                return await self._too_large().response()(scope, receive, send)
        body = b"".join(parts)
        replayed = False

        async def replay():
            nonlocal replayed
            if replayed:
                return await receive()  # later calls wait for the disconnect, as the server's would
            replayed = True
            return {"type": "http.request", "body": body, "more_body": False}

        await self.app(scope, replay, send)

    def _check_host(self, headers) -> ApiError | None:
        if self.key or "host" not in headers or is_loopback(headers["host"]):
            return None
        return ApiError(403, "没有密钥时只接受本机访问 / without an API key only loopback Host headers are served",
                        "host_not_allowed")

    def _check_auth(self, path: str, headers) -> ApiError | None:
        if self.key is None or path in PUBLIC_PATHS:
            return None
        scheme, _, token = headers.get("authorization", "").partition(" ")
        if scheme.lower() == "bearer" and hmac.compare_digest(token.strip().encode(), self.key):
            return None
        message = ("API key 不正确 / incorrect API key provided" if token else
                   "缺少 API key，请用 Authorization: Bearer <key> 发送 / missing API key: send Authorization: Bearer <key>")
        return ApiError(401, message, "invalid_api_key", headers={"WWW-Authenticate": "Bearer"})

    def _check_length(self, headers) -> ApiError | None:
        declared = headers.get("content-length")
        if declared is None:
            return None
        if not declared.isdigit():
            return ApiError(400, "Content-Length 不正确 / invalid Content-Length", "invalid_request")
        return self._too_large() if int(declared) > self.max_body_bytes else None

    def _too_large(self) -> ApiError:
        return ApiError(413, f"请求体超过 {self.max_body_bytes} 字节 / request body larger than "
                             f"{self.max_body_bytes} bytes", "request_too_large")


# ----------------------------------------------------------------------------- bounded queue


class Gate:
    """At most ``slots`` jobs run; at most ``queue`` more wait, each for at most ``timeout`` s.

    Why: the local LLM answers one request at a time (a lock inside its chat model). Without a
    bound, waiting requests pile up threads and sockets until clients time out blind; here a full
    queue answers 429 at once and a wait that runs out answers 503, both with Retry-After.
    """

    def __init__(self, name: str, slots: int, queue: int, timeout: float):
        self.name, self.slots, self.queue, self.timeout = name, max(1, slots), max(0, queue), timeout
        self.running = 0
        self.waiting = 0
        self._free = asyncio.Semaphore(self.slots)

    async def enter(self) -> None:
        if self.running >= self.slots and self.waiting >= self.queue:
            raise ApiError(429, f"服务繁忙，排队已满（{self.running} 个进行中，{self.waiting} 个等待），请稍后重试 / "
                                f"server busy: {self.name} queue is full, retry later", "queue_full",
                           headers={"Retry-After": "5"})
        self.waiting += 1
        try:
            async with asyncio.timeout(self.timeout):
                await self._free.acquire()
        except TimeoutError:
            raise ApiError(503, f"排队超过 {self.timeout:g} 秒，请稍后重试 / waited {self.timeout:g}s in the "
                                f"{self.name} queue, retry later", "queue_timeout",
                           headers={"Retry-After": "10"}) from None
        finally:
            self.waiting -= 1
        self.running += 1

    def leave(self) -> None:
        self.running -= 1
        self._free.release()
