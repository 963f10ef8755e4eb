"""Where the web UI may listen: loopback freely, anywhere else only behind a password.

Which ``Host`` headers it then answers is ``rag.netguard``'s business (``HostGuard``).

Kept free of heavy imports so ``rag serve`` refuses a bad bind instantly.
"""
from __future__ import annotations

from rag.netguard import is_loopback

__all__ = ["AUTH_USER", "BindError", "check_bind", "is_loopback"]

AUTH_USER = "rag"  # the login name that goes with the access password


class BindError(RuntimeError):
    """Refusing to expose the UI beyond this machine without a password."""


def check_bind(host: str, password: str | None) -> None:
    """Anyone who can reach a non-loopback address could read every document: require a password."""
    if not is_loopback(host) and not password:
        raise BindError(
            f"拒绝启动：监听 {host} 会让其他机器访问问答界面和全部文档，必须设置访问密码"
            f"（--password 或环境变量 RAG_UI_PASSWORD）；只在本机使用请去掉 --host。"
            f" / refusing to bind {host} without an access password (use --password or RAG_UI_PASSWORD)."
        )
