"""Where a running server listens, recorded in its cache directory for local tools.

``edgerun serve`` binds its socket first, then writes ``<cache-dir>/run/serve.json``:
``{"host": ..., "port": ..., "pid": ...}`` with the address it actually bound (the real port
also with ``--port 0``). The container health check reads it, so the port is set in one place
(``--port`` or ``EDGERUN_PORT``) and the check follows it. The file is removed when the server
stops; with several servers on one cache directory it names the last one started.
"""

from __future__ import annotations

import json
import logging
import os
import socket
from pathlib import Path

log = logging.getLogger("edgerun")

RUN_FILE = Path("run") / "serve.json"


def address_file(cache_dir: Path | str) -> Path:
    return Path(cache_dir).expanduser() / RUN_FILE


def write_address(path: Path, sock: socket.socket) -> bool:
    """Record ``sock``'s bound address in ``path`` (atomically); False when the directory is not writable."""
    host, port = sock.getsockname()[:2]
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_name(f".{path.name}.{os.getpid()}")
        partial.write_text(json.dumps({"host": host, "port": port, "pid": os.getpid()}) + "\n")
        partial.replace(path)
    except OSError as exc:
        # Serving matters more than the record: only a local health check would miss it.
        log.warning("could not record the server address in %s (%s)", path, exc.strerror)
        return False
    return True


def remove_address(path: Path) -> None:
    """Remove ``path`` if it still names this process (a later server may have replaced it)."""
    try:
        if json.loads(path.read_text()).get("pid") == os.getpid():
            path.unlink()
    except (OSError, ValueError):
        pass
