"""Container health check: exit 0 when the server reports ready, 1 otherwise.

The slim and L4T images have no curl, and the runtime already ships Python, so the check is
the standard library. EDGERUN_PORT follows a changed --port.
"""

import os
import sys
import urllib.error
import urllib.request


def main() -> int:
    port = os.environ.get("EDGERUN_PORT", "8000")
    url = f"http://127.0.0.1:{port}/v2/health/ready"
    try:
        with urllib.request.urlopen(url, timeout=3) as response:
            return 0 if response.status == 200 else 1
    except (urllib.error.URLError, OSError):
        return 1


if __name__ == "__main__":
    sys.exit(main())
