"""Suite-wide set-up: tests leave no trace in the user's home directory or in the checkout.

Every cache a test run could write (the runtime's own default cache, ONNX Runtime's device id,
matplotlib's font list) is pointed into one scratch directory for the session, also for the
CLI subprocesses the tests start (they inherit the environment). A test that starts
``edgerun serve``/``verify``/``bench`` still passes ``--cache-dir`` itself; the session fails
if anything lands in the default cache directory, so a forgotten ``--cache-dir`` is caught.
"""

import os
import shutil
import sys
import tempfile
from pathlib import Path

import pytest

TESTS = Path(__file__).parent
sys.path.insert(0, str(TESTS))

SCRATCH = Path(tempfile.mkdtemp(prefix="edgebuild-tests-"))
DEFAULT_CACHE = SCRATCH / "default-edgerun-cache"
os.environ.update(
    {
        "EDGERUN_CACHE_DIR": str(DEFAULT_CACHE),  # what `edgerun` uses when no --cache-dir is given
        "XDG_CACHE_HOME": str(SCRATCH / "xdg-cache"),  # ONNX Runtime's device id, other tools' caches
        "XDG_CONFIG_HOME": str(SCRATCH / "xdg-config"),
        "MPLCONFIGDIR": str(SCRATCH / "matplotlib"),  # the report's font cache
        # The suite itself never phones home, even where a test imports onnxruntime first
        # (tests/runtime/test_telemetry.py strips these to test that the packages set them).
        "ORT_DISABLE_TELEMETRY": "1",
        "ORT_TELEMETRY_DISABLED": "1",
        "HYPOTHESIS_STORAGE_DIRECTORY": str(SCRATCH / "hypothesis"),  # else ./.hypothesis in the checkout
    }
)


def default_cache_entries() -> list[str]:
    return sorted(str(p.relative_to(DEFAULT_CACHE)) for p in DEFAULT_CACHE.rglob("*")) if DEFAULT_CACHE.exists() else []


@pytest.fixture(scope="session", autouse=True)
def nothing_in_the_default_cache():
    """Fails the session when a test let edgerun write into its default cache directory."""
    yield
    written = default_cache_entries()
    shutil.rmtree(SCRATCH, ignore_errors=True)
    assert not written, f"a test wrote into edgerun's default cache (pass --cache-dir): {written[:5]}"


@pytest.fixture
def cli_env():
    """Environment for CLI subprocesses: tests' tiny model module importable."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(TESTS), env.get("PYTHONPATH")]))
    return env
