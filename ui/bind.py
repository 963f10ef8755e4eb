"""Where the web UI may listen: loopback freely, anywhere else only behind a password.

The rule itself is ``rag.netguard.check_bind`` (the API and the MCP server apply it with
their key); which ``Host`` headers the UI then answers is ``rag.netguard.HostGuard``'s business.
Kept free of heavy imports so ``rag serve`` refuses a bad bind instantly.
"""
from __future__ import annotations

from rag.netguard import BindError, is_loopback
from rag.netguard import check_bind as _check_bind

__all__ = ["AUTH_USER", "BindError", "check_bind", "is_loopback"]

AUTH_USER = "rag"  # the login name that goes with the access password


def check_bind(host: str, password: str | None) -> None:
    """Anyone who can reach a non-loopback address could read every document: require a password."""
    _check_bind(host, password, kind="password")
