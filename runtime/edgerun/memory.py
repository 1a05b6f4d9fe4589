"""Keep the server's resident memory close to what its models need (glibc only; elsewhere these
do nothing): few malloc arenas, and freed heap pages handed back to the OS after work that leaves
megabytes of freed objects behind (loading a model, decoding a large JSON body)."""

from __future__ import annotations

import ctypes
from typing import Any


def _load_libc() -> Any:
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.malloc_trim  # noqa: B018 - present on glibc only
        return libc
    except (OSError, AttributeError):
        return None


_LIBC = _load_libc()


_M_ARENA_MAX = -8


def tune_malloc(arenas: int = 2) -> None:
    """Cap malloc arenas; call once, before threads start. glibc otherwise gives each thread (event
    loop, inference workers, ORT pool) an arena of its own, each holding its own freed pages."""
    if _LIBC is not None and hasattr(_LIBC, "mallopt"):
        _LIBC.mallopt(_M_ARENA_MAX, arenas)


def release_free_memory() -> None:
    if _LIBC is not None:
        _LIBC.malloc_trim(0)
