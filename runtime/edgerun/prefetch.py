"""Read and hash a bundle directory's files ahead of its load, on a thread of their own.

``edgerun serve`` starts one for each bundle directory it is given before anything heavy is imported:
reading and hashing release the GIL, so they run on the core the two importing threads leave idle (only
one of them runs Python at a time), and on a device that just booted (a cold page cache, a model on
eMMC or an SD card) the read of the model no longer waits for the imports. The verification then takes
these bytes and digests instead of reading and hashing again: the bytes compared with the manifest's
checksums are the bytes used, as when it reads them itself. Nothing here trusts a file: a file not
prefetched (over the size bound, not a regular file, behind a linked directory) is read by the
verification as before.

Nothing heavier than the standard library is imported: this runs before the rest of edgerun loads.
"""

from __future__ import annotations

import hashlib
import os
import stat
import threading
from pathlib import Path

MAX_PREFETCH_BYTES = 2 << 30  # read ahead at most this much per bundle; the verification reads the rest


def fingerprint(entry: Path) -> tuple | None:
    """Every file of a bundle directory (or the archive file): any change while it is copied shows."""
    try:
        if entry.is_file():
            st = entry.stat()
            return ((entry.name, st.st_mtime_ns, st.st_size, st.st_ino),)
        if not (entry / "manifest.json").is_file():  # edgerun.manifest.MANIFEST_NAME (that module loads pydantic)
            return None
        parts = []
        for path in sorted(entry.rglob("*")):
            if path.is_file():
                st = path.stat()
                parts.append((str(path.relative_to(entry)), st.st_mtime_ns, st.st_size, st.st_ino))
        return tuple(parts)
    except OSError:  # removed while we looked: not a bundle right now
        return None


class BundlePrefetch:
    """The regular files under one bundle directory, read whole and hashed (sha256) on a thread.

    ``fingerprint`` is taken before the first byte is read, so a file replaced after the read shows as a
    change to the directory watcher (which compares against the fingerprint of each load)."""

    def __init__(self, root: Path, max_bytes: int = MAX_PREFETCH_BYTES) -> None:
        self.root = Path(root)
        self.max_bytes = max_bytes
        self.fingerprint: tuple | None = None
        self._files: dict[str, tuple[bytes, str]] = {}
        self._thread = threading.Thread(target=self._run, name="edgerun-prefetch", daemon=True)

    def start(self) -> BundlePrefetch:
        self._thread.start()
        return self

    def _run(self) -> None:
        self.fingerprint = fingerprint(self.root)
        budget = self.max_bytes
        for directory, _, names in os.walk(self.root):  # linked directories are not followed
            for name in sorted(names):
                path = Path(directory) / name
                read = _read_regular(path, budget)
                if read is not None:
                    budget -= len(read)
                    self._files[path.relative_to(self.root).as_posix()] = (read, hashlib.sha256(read).hexdigest())

    def take_fingerprint(self) -> tuple | None:
        """The directory's fingerprint from before the first read (see ``fingerprint``)."""
        self._thread.join()
        return self.fingerprint

    def take(self, relative: str) -> tuple[bytes, str] | None:
        """The bytes and sha256 read ahead for ``relative`` (once: the bytes are not kept here after),
        or None when it was not read ahead."""
        self._thread.join()
        return self._files.pop(relative, None)


def _read_regular(path: Path, budget: int) -> bytes | None:
    """The whole file when it is a regular file within ``budget`` bytes; never blocks on a FIFO."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    except OSError:
        return None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_size > budget:
            return None
        with os.fdopen(fd, "rb", closefd=False) as fh:
            data = fh.read()
        return data if len(data) == st.st_size else None  # changed while read: let the verification read it
    except OSError:
        return None
    finally:
        os.close(fd)
