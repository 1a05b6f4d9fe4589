"""TensorRT specifics of the runtime: engine cache keys and the serving limits a profile imposes.

A TensorRT engine is only valid for the model, the TensorRT and ONNX Runtime versions, the GPU
and the shape profiles it was built with, and ONNX Runtime does not check all of these when it
loads a cached engine. So every ``*_cache_path`` option is moved to a directory named by a key
over exactly those things: an upgrade, a new model or another GPU gets a fresh directory
instead of a stale engine. Everything here is stdlib-only so it is cheap to import.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.metadata
import json
import logging
import os
import re
import shutil
import subprocess
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from edgerun.errors import RequestError
from edgerun.provider_options import confined_cache_path

log = logging.getLogger("edgerun")

TENSORRT = "TensorrtExecutionProvider"
UNKNOWN = "unknown"
_PROFILE_PREFIX = "trt_profile_"
KEY_FILE = "key.json"
_warned_unknown: set[str] = set()

# Jetson boards have no discrete GPU for nvidia-smi to query on older JetPacks; the SoC name in
# the device tree fixes the GPU architecture.
_TEGRA_COMPUTE_CAPABILITY = {"tegra234": "8.7", "tegra194": "7.2", "tegra186": "6.2", "tegra210": "5.3"}
DEVICE_TREE_COMPATIBLE = Path("/proc/device-tree/compatible")


def engine_cache_key(
    *,
    model_sha256: str,
    onnxruntime_version: str,
    tensorrt_version: str,
    compute_capability: str,
    profile_shapes: Mapping[str, str],
    build_options: Mapping[str, Any] | None = None,
) -> str:
    """A short hex key that changes when anything an engine depends on changes.

    ``build_options`` are the provider's other options (precision flags, workspace size, ...):
    an fp16 engine must not be reused when int8 is asked for.
    """
    document = {
        "model_sha256": model_sha256,
        "onnxruntime": onnxruntime_version,
        "tensorrt": tensorrt_version,
        "compute_capability": compute_capability,
        "profile_shapes": dict(profile_shapes),
        "build_options": dict(build_options or {}),
    }
    text = json.dumps(document, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:24]


@functools.lru_cache(maxsize=1)
def onnxruntime_version() -> str:
    try:
        import onnxruntime

        return str(onnxruntime.__version__)
    except Exception:  # noqa: BLE001 - a key component, never a reason to fail a load
        return UNKNOWN


@functools.lru_cache(maxsize=1)
def tensorrt_version() -> str:
    """The TensorRT version, best effort: package metadata, the module, then the library file name."""
    for dist in ("tensorrt", "tensorrt-cu12", "tensorrt-cu11", "tensorrt-libs", "tensorrt-cu12-libs"):
        try:
            return importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            continue
    try:
        import tensorrt  # type: ignore[import-not-found,unused-ignore]  # JetPack: a system package, no pip metadata

        return str(tensorrt.__version__)
    except Exception:  # noqa: BLE001
        pass
    return _libnvinfer_version() or UNKNOWN


def _libnvinfer_version() -> str | None:
    """The version in the file name libnvinfer.so resolves to (what ONNX Runtime will load)."""
    ldconfig = shutil.which("ldconfig") or ("/sbin/ldconfig" if os.path.exists("/sbin/ldconfig") else None)
    if ldconfig is None:
        return None
    try:
        listing = subprocess.run([ldconfig, "-p"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    for line in listing.splitlines():
        if "libnvinfer.so" in line and "=>" in line:
            real = os.path.realpath(line.split("=>", 1)[1].strip())
            found = re.search(r"libnvinfer\.so\.(\d+(?:\.\d+)*)$", real)
            if found:
                return found.group(1)
    return None


@functools.lru_cache(maxsize=8)
def compute_capability(device_id: int = 0) -> str:
    """The GPU's compute capability (e.g. '8.7'), best effort: nvidia-smi, then the Jetson SoC name."""
    smi = shutil.which("nvidia-smi")
    if smi is not None:
        try:
            result = subprocess.run(
                [smi, "--query-gpu=compute_cap", "--format=csv,noheader"], capture_output=True, text=True, timeout=15
            )
            lines = [line.strip() for line in result.stdout.splitlines() if re.fullmatch(r"\d+\.\d+", line.strip())]
            if result.returncode == 0 and lines:
                return lines[device_id] if 0 <= device_id < len(lines) else lines[0]
        except (OSError, subprocess.SubprocessError):
            pass
    try:
        compatible = DEVICE_TREE_COMPATIBLE.read_bytes().decode(errors="replace")
    except OSError:
        return UNKNOWN
    for soc, capability in _TEGRA_COMPUTE_CAPABILITY.items():
        if soc in compatible:
            return capability
    return UNKNOWN


def cache_key_components(provider: str, options: Mapping[str, Any], model_sha256: str) -> dict[str, Any]:
    """Everything the engine cache key covers, for this machine."""
    try:
        device_id = int(options.get("device_id", 0))
    except (TypeError, ValueError):
        device_id = 0
    return {
        "model_sha256": model_sha256,
        "onnxruntime_version": onnxruntime_version(),
        "tensorrt_version": tensorrt_version() if provider == TENSORRT else "n/a",
        "compute_capability": compute_capability(device_id),
        "profile_shapes": {k: str(v) for k, v in sorted(options.items()) if k.startswith(_PROFILE_PREFIX)},
        # Cache switches and paths say where an engine lives, not what it is.
        "build_options": {
            k: v
            for k, v in sorted(options.items())
            if not k.startswith(_PROFILE_PREFIX) and not k.endswith(("_cache_path", "_cache_enable", "cache_dir"))
        },
    }


def relocate_cache_paths(
    provider: str,
    options: Mapping[str, Any],
    cache_dir: Path,
    model_sha256: str,
    paths: list[str] | None = None,
) -> dict[str, Any]:
    """Options with every cache path (``paths``, default the ``*_cache_path`` keys) moved to
    ``<cache_dir>/providers/<provider>/<key>/<leaf>``.

    The leaf is the last part of the manifest's path, so options that shared a directory (engine
    and timing caches) still do; a leaf that is not a plain name becomes ``cache``, and nothing
    resolves outside ``cache_dir``. ``model_sha256`` is the hash of the verified bytes the session
    is made from. A ``key.json`` beside the caches says what the key covers.
    """
    options = dict(options)
    if paths is None:
        paths = [k for k in options if k.endswith("_cache_path")]
    if not paths:
        return options
    components = cache_key_components(provider, options, model_sha256)
    blind = [name for name in ("tensorrt_version", "compute_capability") if components[name] == UNKNOWN]
    if blind and provider not in _warned_unknown:
        _warned_unknown.add(provider)
        log.warning(
            "%s engine caches: %s could not be determined, so a change of it will not invalidate cached "
            "engines; clear %s after upgrading TensorRT or moving the cache to another GPU",
            provider,
            " and ".join(blind),
            Path(cache_dir).expanduser() / "providers" / provider,
        )
    key = engine_cache_key(**components)
    keyed = confined_cache_path(cache_dir, "providers", provider, key)
    for name in paths:
        target = confined_cache_path(cache_dir, "providers", provider, key, Path(str(options[name])).name)
        target.mkdir(parents=True, exist_ok=True)
        options[name] = str(target)
    try:
        if not (keyed / KEY_FILE).is_file():
            tmp = keyed / f".{KEY_FILE}.tmp"
            tmp.write_text(json.dumps(components, indent=2, default=str) + "\n")
            tmp.replace(keyed / KEY_FILE)
    except OSError as exc:  # documentation only; the caches work without it
        log.debug("could not write %s in %s: %s", KEY_FILE, keyed, exc)
    return options


def serving_batch_limit(serving: Mapping[str, Any] | None) -> int | None:
    """The largest batch a request may have, when the manifest asks to reject out-of-profile requests."""
    if not serving or serving.get("out_of_profile") != "reject":
        return None
    limit = serving.get("max_batch")
    if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
        return None
    return limit


def check_batch(limit: int | None, feeds: Mapping[str, Any]) -> None:
    """Refuse a request whose batch is over ``limit``: the engine was built for that batch at most."""
    if limit is None or not feeds:
        return
    rows = max((len(value) for value in feeds.values() if getattr(value, "ndim", 0)), default=0)
    if rows > limit:
        raise RequestError(f"batch {rows} exceeds this model's max batch {limit} (TensorRT profile); split the request")
