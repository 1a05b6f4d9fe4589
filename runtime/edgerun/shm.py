"""System shared memory (Triton's extension): a client on the same host passes tensors by reference.

Off unless ``edgerun serve --allow-shm``. Triton's own fixes in this extension (out-of-bounds offsets,
integer overflow in offset + size, internal keys leaked in errors: CVE-2025-23319/23320/23334) are the
threat model, so every region and every access is checked here:

- only loopback clients register, and only keys under an allow-listed prefix (``--shm-prefix``): one path
  component (an optional leading ``/`` as ``shm_open`` names have), letters, digits, ``_``, ``.``, ``-``,
  never ``.`` or ``..``;
- the segment is opened as ``/dev/shm/<key>`` with ``O_NOFOLLOW`` and mapped directly (Python 3.11's
  ``multiprocessing.shared_memory`` registers attached segments with its resource tracker, which can unlink
  the client's segment: cpython issue 82300); ``fstat`` on the open file must show a regular file owned by
  this server's user with mode 0600, and at least ``offset + byte_size`` bytes;
- every read and write is bounds-checked against the registered window (Python integers cannot
  overflow; negative values are refused);
- errors name the region, never its key; regions are unmapped on unregister and at shutdown; tensors
  read from a region are copied before inference, so the client cannot change them mid-run.

The trust boundary is the server's user: a process of that user could also truncate a mapped segment
(a later access would then fault), which is no more than it could do to the server anyway.
"""

from __future__ import annotations

import mmap
import os
import re
import stat
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edgerun.errors import ForbiddenError, RequestError

SHM_DIR = Path("/dev/shm")
MAX_REGIONS = 64
MAX_REGION_BYTES = 1 << 31  # a region larger than 2 GiB is not a tensor this server serves
_KEY = re.compile(r"/?([A-Za-z0-9_.\-]{1,200})")
_NAME = re.compile(r"[A-Za-z0-9_.\-]{1,128}")


def local_shm(shm: SharedMemory | None, client_host: str | None) -> SharedMemory:
    """The server's shared memory for a request from ``client_host``: only with --allow-shm, only on this host."""
    from edgerun.hosts import is_loopback

    if shm is None:
        raise ForbiddenError("system shared memory is off; start the server with --allow-shm")
    if not is_loopback(client_host or ""):
        raise ForbiddenError("system shared memory is for clients on this host (a loopback address) only")
    return shm


def _whole(value: Any, what: str, minimum: int) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise RequestError(f"{what} must be a whole number >= {minimum}, got {value!r}")
    return value


@dataclass
class Region:
    name: str
    offset: int
    byte_size: int
    key: str = field(repr=False)  # never in an error message
    buffer: mmap.mmap = field(repr=False)


class SharedMemory:
    """The registered regions of one server."""

    def __init__(self, prefix: str, shm_dir: Path = SHM_DIR):
        self.prefix = prefix
        self.shm_dir = shm_dir
        self._regions: dict[str, Region] = {}
        self._lock = threading.Lock()

    def register(self, name: str, key: str, offset: Any, byte_size: Any) -> None:
        if not _NAME.fullmatch(name or ""):
            raise RequestError("region name must be 1-128 letters, digits, '_', '.' or '-'")
        offset = _whole(offset, "offset", 0)
        byte_size = _whole(byte_size, "byte_size", 1)
        if offset + byte_size > MAX_REGION_BYTES:
            raise RequestError(f"region '{name}': offset + byte_size is over {MAX_REGION_BYTES} bytes")
        match = _KEY.fullmatch(key or "")
        if match is None or match.group(1) in (".", "..") or not match.group(1).startswith(self.prefix):
            raise ForbiddenError(
                f"region '{name}': its key is not allowed: one name (an optional leading '/') of letters, digits, "
                f"'_', '.' or '-' starting with '{self.prefix}' (--shm-prefix)"
            )
        with self._lock:
            if name in self._regions:
                raise RequestError(f"region '{name}' is already registered; unregister it first")
            if len(self._regions) >= MAX_REGIONS:
                raise RequestError(f"{MAX_REGIONS} regions are registered already; unregister one first")
            self._regions[name] = self._map(name, match.group(1), offset, byte_size)

    def _map(self, name: str, key: str, offset: int, byte_size: int) -> Region:
        try:
            # O_NONBLOCK: a FIFO or device planted under the key must not block the open (it is refused below).
            fd = os.open(self.shm_dir / key, os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
        except OSError:
            raise RequestError(f"region '{name}': no shared-memory segment this server can open has that key") from None
        try:
            info = os.fstat(fd)
            if not stat.S_ISREG(info.st_mode):
                raise ForbiddenError(f"region '{name}': the segment is not a regular shared-memory file")
            if info.st_uid != os.geteuid() or stat.S_IMODE(info.st_mode) != 0o600:
                raise ForbiddenError(
                    f"region '{name}': the segment must be owned by this server's user with mode 0600 (it is "
                    f"{'another user' if info.st_uid != os.geteuid() else 'yours'}'s, mode "
                    f"{stat.S_IMODE(info.st_mode):04o})"
                )
            if info.st_size < offset + byte_size:
                raise RequestError(
                    f"region '{name}': the segment has {info.st_size} bytes; offset {offset} + byte_size "
                    f"{byte_size} needs {offset + byte_size}"
                )
            buffer = mmap.mmap(fd, offset + byte_size, access=mmap.ACCESS_WRITE)
        finally:
            os.close(fd)
        return Region(name=name, offset=offset, byte_size=byte_size, key=key, buffer=buffer)

    def status(self, name: str | None = None) -> list[Region]:
        with self._lock:
            if name:
                return [self._get(name)]
            return list(self._regions.values())

    def unregister(self, name: str | None = None) -> None:
        """Unmap ``name`` (every region without a name)."""
        with self._lock:
            names = [name] if name else list(self._regions)
            for each in names:
                self._get(each).buffer.close()
                del self._regions[each]

    def close(self) -> None:
        self.unregister()

    def _get(self, name: str) -> Region:
        region = self._regions.get(name)
        if region is None:
            raise RequestError(f"no shared-memory region named '{name}' is registered")
        return region

    def _window(self, name: str, offset: Any, byte_size: Any) -> tuple[Region, int, int]:
        offset = _whole(offset, f"region '{name}': offset", 0)
        byte_size = _whole(byte_size, f"region '{name}': byte_size", 0)
        region = self._get(name)
        if offset + byte_size > region.byte_size:
            raise RequestError(
                f"region '{name}': offset {offset} + byte_size {byte_size} is past its {region.byte_size} bytes"
            )
        start = region.offset + offset
        return region, start, start + byte_size

    def read(self, name: str, offset: Any, byte_size: Any) -> bytes:
        """A copy of ``byte_size`` bytes at ``offset`` in the region (the client may change its memory any time)."""
        with self._lock:
            region, start, end = self._window(name, offset, byte_size)
            return bytes(region.buffer[start:end])

    def write(self, name: str, offset: Any, byte_size: Any, data: bytes) -> None:
        """Write ``data`` at ``offset``; the window the client named (``byte_size``) must hold it."""
        with self._lock:
            region, start, end = self._window(name, offset, byte_size)
            if len(data) > end - start:
                raise RequestError(
                    f"region '{name}': the output has {len(data)} bytes, the window given holds {end - start}"
                )
            region.buffer[start : start + len(data)] = data
