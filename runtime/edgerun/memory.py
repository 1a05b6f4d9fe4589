"""Hand freed heap pages back to the OS (glibc only): large decodes leave megabytes of freed
Python objects that glibc otherwise keeps mapped."""

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


def release_free_memory() -> None:
    if _LIBC is not None:
        _LIBC.malloc_trim(0)
