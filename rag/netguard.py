"""Who may talk to a server of this project: loopback names and the ``Host`` header check.

Shared by the web UI (``rag serve``) and the HTTP API (``rag api``). Kept free of heavy
imports so a refused bind is reported instantly.

Why the ``Host`` header: a web page the user visits can make the browser send requests
to a server on 127.0.0.1 through DNS rebinding (its own name first resolves to the
attacker, then to 127.0.0.1). The browser then treats the loopback server as the
attacker's origin and lets the page read the answers, but it still sends the attacker's
name in ``Host``. So a server bound to loopback only answers requests whose ``Host`` is a
loopback name or address (``localhost``, ``127.x.y.z``, ``[::1]``) with the port it
listens on.

A server bound to any other address (``0.0.0.0``, a LAN address) is reachable under
names this module cannot know (the machine's names, its addresses, a reverse proxy), and
``rag serve`` only binds there behind a password: a rebound page has no session for the
attacker's name, so it gets the login page, not the documents. There **any Host is
accepted** unless the operator gives an allow-list (``rag serve --allowed-hosts`` /
``RAG_UI_ALLOWED_HOSTS``); with a list, only the listed names, loopback names and the bind
address itself (both with the right port) are accepted. On a loopback bind the list adds
names to the loopback ones (e.g. ``localhost:9000`` for an SSH tunnel
``-L 9000:127.0.0.1:7860``, or a local reverse proxy's name).

The HTTP API keeps its own rule (key-based, not bind-based): without ``RAG_API_KEY`` only
loopback ``Host`` names (any port) are answered; it uses ``is_loopback`` from here.

An allow-list entry is ``name`` (any port) or ``name:port``; ``[v6]:port`` for IPv6.
"""
from __future__ import annotations

import ipaddress
import re
from collections.abc import Callable, Iterable

ALLOWED_HOSTS_ENV = "RAG_UI_ALLOWED_HOSTS"
# A DNS name or an IPv4 literal (letters, digits, "-", "_", "."); IPv6 literals come bracketed.
_NAME = re.compile(r"[a-z0-9_\-.]+")
HOST_REFUSED = ("拒绝访问：请求的 Host 不是本机地址，只接受本机访问。"
                " / Host header not allowed: this server only answers requests addressed to this machine"
                f" (add the name to {ALLOWED_HOSTS_ENV} if it is yours).\n")


def split_host(value: str) -> tuple[str, int | None]:
    """``(host, port)`` of a ``Host`` header or a bind address, lowercased, brackets removed.

    ``"[::1]:7860"`` → ``("::1", 7860)``; ``"LocalHost"`` → ``("localhost", None)``; a bare
    IPv6 address (``"::1"``, as given to ``--host``) is one host without a port.

    Raises:
        ValueError: not a host name, an IP literal or a port (spaces, ``@``, an open bracket...).
    """
    text = value.strip().lower()
    port: str | None = None
    if text.startswith("["):
        end = text.find("]")
        if end < 0:
            raise ValueError(f"unclosed bracket in host {value!r}")
        host, rest = text[1:end], text[end + 1:]
        if rest:
            if not rest.startswith(":"):
                raise ValueError(f"invalid host {value!r}")
            port = rest[1:]
        ipaddress.IPv6Address(host)  # ValueError if it is not one
    elif text.count(":") > 1:  # a bare IPv6 address (bind addresses only; never valid in Host)
        host = str(ipaddress.IPv6Address(text))
    else:
        host, sep, port_text = text.partition(":")
        port = port_text if sep else None
        if not _NAME.fullmatch(host):
            raise ValueError(f"invalid host {value!r}")
    if port is not None:
        if not port.isdigit() or not 0 < int(port) < 65536:
            raise ValueError(f"invalid port in host {value!r}")
        return host, int(port)
    return host, None


def is_loopback(host: str) -> bool:
    """Whether a host name, IP literal, bind address or ``Host`` header value (a ``:port`` and
    ``[]`` are ignored, case too) names this machine: ``localhost`` or a loopback address
    (``127.0.0.0/8``, ``::1``, ``::ffff:127.x.y.z``). ``0.0.0.0`` and ``::`` are not loopback:
    they listen on every interface."""
    try:
        name, _ = split_host(host)
    except ValueError:
        return False
    if name == "localhost":
        return True
    try:
        address = ipaddress.ip_address(name)
    except ValueError:
        return False
    mapped = getattr(address, "ipv4_mapped", None)
    return address.is_loopback or bool(mapped and mapped.is_loopback)


class BindError(ValueError):
    """Refusing to listen beyond this machine without a secret (a password or an API key)."""


def check_bind(host: str, secret: str | None, kind: str = "api_key") -> None:
    """Anyone who can reach a non-loopback address could read every document: require a secret.

    Args:
        host: the address the server would listen on.
        secret: the password (web UI) or API key (HTTP API, MCP over HTTP); empty means none.
        kind: ``"password"`` (``rag serve``) or ``"api_key"`` (``rag api``, ``rag mcp``): which
            setting the message tells the operator to set.
    """
    if is_loopback(host) or secret:
        return
    if kind == "password":
        raise BindError(
            f"拒绝启动：监听 {host} 会让其他机器访问问答界面和全部文档，必须设置访问密码"
            f"（--password 或环境变量 RAG_UI_PASSWORD）；只在本机使用请去掉 --host。"
            f" / refusing to bind {host} without an access password (use --password or RAG_UI_PASSWORD).")
    raise BindError(
        f"拒绝在非本机地址 {host} 上无密钥提供服务：请设置 RAG_API_KEY，或使用 --host 127.0.0.1 / "
        f"refusing to listen on non-loopback address {host} without an API key: "
        f"set RAG_API_KEY or bind to 127.0.0.1")


def parse_allowed_hosts(text: str | Iterable[str] | None) -> list[str]:
    """A comma/space separated allow-list (or a list of entries), validated: ``["rag.lan", "localhost:9000"]``.

    Raises:
        ValueError: an entry that is not ``name`` or ``name:port``.
    """
    if text is None:
        return []
    items = re.split(r"[,\s]+", text) if isinstance(text, str) else list(text)
    entries = [item.strip() for item in items if item and item.strip()]
    for entry in entries:
        split_host(entry)
    return entries


def _listed(name: str, port: int, allowed: Iterable[str]) -> bool:
    for entry in allowed:
        try:
            entry_name, entry_port = split_host(entry)
        except ValueError:
            continue
        if entry_name == name and entry_port in (None, port):
            return True
    return False


def host_allowed(header: str | None, bind: str, port: int | None, allowed: Iterable[str] = (),
                 default_port: int = 80) -> bool:
    """Whether a request with this ``Host`` header may be answered by a server bound to ``bind:port``.

    Args:
        header: the ``Host`` header, None when the request has none (HTTP/1.0; browsers always
            send one, so this is never a rebound page: allowed).
        bind: the address the server listens on.
        port: the port it listens on; None while unknown (any port is then accepted).
        allowed: the operator's extra names (see the module docstring); on a non-loopback bind a
            non-empty list also turns "any Host" into "only these and loopback".
        default_port: the port a ``Host`` without one means (80 for http, 443 for https).
    """
    if header is None:
        return True
    try:
        name, given = split_host(header)
    except ValueError:
        return False
    given = default_port if given is None else given
    allowed = list(allowed)
    if not is_loopback(bind) and not allowed:
        return True  # behind the password: see the module docstring
    right_port = port is None or given == port
    if right_port and (is_loopback(name) or _same_address(name, bind)):
        return True  # loopback, or the address it listens on (Gradio's own start-up check uses it)
    return _listed(name, given, allowed)


def _same_address(name: str, bind: str) -> bool:
    try:
        bound, _ = split_host(bind)
    except ValueError:
        return False
    return name == bound


class HostGuard:
    """ASGI middleware: answers 403 (short Chinese/English text) to a request whose ``Host``
    is not allowed by ``host_allowed``; websockets are closed before they are accepted.

    Args:
        app: the wrapped ASGI app.
        bind: the address the server listens on.
        port: its port, or a callable returning it (the port may only be known once listening).
        allowed: the operator's allow-list (``parse_allowed_hosts``).
    """

    def __init__(self, app, bind: str, port: int | Callable[[], int | None] | None,
                 allowed: Iterable[str] = ()):
        self.app = app
        self.bind = bind
        self._port = port
        self.allowed = parse_allowed_hosts(allowed)

    @property
    def port(self) -> int | None:
        return self._port() if callable(self._port) else self._port

    def allows(self, scope) -> bool:
        hosts = [v.decode("latin-1") for k, v in scope.get("headers", []) if k.lower() == b"host"]
        if len(hosts) > 1:
            return False  # ambiguous: which one would a proxy or the app read?
        secure = scope.get("scheme") in ("https", "wss")
        return host_allowed(hosts[0] if hosts else None, self.bind, self.port, self.allowed,
                            default_port=443 if secure else 80)

    async def __call__(self, scope, receive, send):
        if scope["type"] not in ("http", "websocket") or self.allows(scope):
            return await self.app(scope, receive, send)
        if scope["type"] == "websocket":
            return await send({"type": "websocket.close", "code": 1008})  # before accept: HTTP 403
        body = HOST_REFUSED.encode("utf-8")
        await send({"type": "http.response.start", "status": 403,
                    "headers": [(b"content-type", b"text/plain; charset=utf-8"),
                                (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})
