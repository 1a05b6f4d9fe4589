"""Container health check: exit 0 when the server reports ready, 1 otherwise.

The slim and L4T images have no curl, and the runtime already ships Python, so the check is
the standard library. It asks the address the server actually bound, which ``edgerun serve``
records in ``$EDGERUN_CACHE_DIR/run/serve.json`` (see ``edgerun.address``), so a port given
with ``--port`` or ``EDGERUN_PORT`` is followed without being set twice. Before that file
exists (or with a ``--cache-dir`` elsewhere) it falls back to ``EDGERUN_PORT``, then 8000.
"""

from __future__ import annotations

import json
import os
import sys
import urllib.error
import urllib.request
from pathlib import Path

# A wildcard bind is reached through the loopback of the same family.
_WILDCARD = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}


def server_address() -> tuple[str, int]:
    cache = Path(os.environ.get("EDGERUN_CACHE_DIR", "~/.cache/edgerun")).expanduser()
    try:
        recorded = json.loads((cache / "run" / "serve.json").read_text())
        host, port = str(recorded["host"]), int(recorded["port"])
    except (OSError, ValueError, KeyError, TypeError):
        return "127.0.0.1", int(os.environ.get("EDGERUN_PORT") or 8000)
    return _WILDCARD.get(host, host), port


def main() -> int:
    try:
        host, port = server_address()
        url = f"http://[{host}]:{port}/v2/health/ready" if ":" in host else f"http://{host}:{port}/v2/health/ready"
        with urllib.request.urlopen(url, timeout=3) as response:
            return 0 if response.status == 200 else 1
    except (urllib.error.URLError, OSError, ValueError):
        return 1


if __name__ == "__main__":
    sys.exit(main())
