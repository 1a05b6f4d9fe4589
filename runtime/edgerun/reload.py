"""The model repository: load, atomic swap, versions kept on disk, rollback, directory watch.

A reload runs the same path as a cold start (verify -> session -> golden -> warm) on the
side; only a model that passed replaces the served one, in one reference assignment.
Requests already holding the old ``ServedModel`` finish on it; a broken bundle is refused
and the old model keeps serving.
"""

from __future__ import annotations

import asyncio
import json
import logging
import shutil
import threading
import time
from pathlib import Path
from typing import Any

from edgerun.errors import BundleError, EdgerunError, ModelNotFoundError
from edgerun.loader import LoadOptions, ServedModel, load_model
from edgerun.manifest import MANIFEST_NAME
from edgerun.trt_build import start_background_build

log = logging.getLogger("edgerun")

KEEP_VERSIONS = 3


class VersionStore:
    """Copies of activated bundles under ``<cache-dir>/models/<name>/`` plus an activation history."""

    def __init__(self, cache_dir: Path, keep: int = KEEP_VERSIONS):
        self.root = Path(cache_dir).expanduser() / "models"
        self.keep = keep

    def _history_path(self, name: str) -> Path:
        return self.root / name / "history.json"

    def history(self, name: str) -> list[dict[str, Any]]:
        try:
            return json.loads(self._history_path(name).read_text())
        except (OSError, ValueError):
            return []

    def _write_history(self, name: str, history: list[dict[str, Any]]) -> None:
        path = self._history_path(name)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(history, indent=2))
        tmp.replace(path)

    def record(self, served: ServedModel) -> Path | None:
        """Keep a copy of the activated bundle so a later rollback has it even if the source is replaced."""
        try:
            target = self.root / served.name / served.version
            if not (target / MANIFEST_NAME).is_file():
                staging = target.with_name(f".{served.version}.tmp")
                shutil.rmtree(staging, ignore_errors=True)
                shutil.copytree(served.bundle.root, staging)
                staging.replace(target)
            history = self.history(served.name)
            if not history or history[-1]["version"] != served.version:
                history.append(
                    {
                        "version": served.version,
                        "path": str(target),
                        "source": str(served.source),
                        "activated": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                    }
                )
            for old in history[: -self.keep]:
                shutil.rmtree(old["path"], ignore_errors=True)
            self._write_history(served.name, history[-self.keep :])
            return target
        except OSError as exc:  # versions are a convenience; never stop serving over them
            log.warning("could not keep a copy of %s %s in %s: %s", served.name, served.version, self.root, exc)
            return None

    def rollback(self, name: str) -> dict[str, Any]:
        """Drop the current version from the history; return the previous one (now current)."""
        history = self.history(name)
        if len(history) < 2:
            raise BundleError(
                f"model '{name}' has no previous version in {self.root / name} "
                f"({len(history)} recorded); nothing to roll back to"
            )
        current = history.pop()
        self._write_history(name, history)
        shutil.rmtree(current["path"], ignore_errors=True)
        return history[-1]


class ModelRepository:
    """Models by name; swaps are atomic and loads are serialised."""

    def __init__(self, options: LoadOptions | None = None, *, store: VersionStore | None = None, on_change=None):
        self.options = options or LoadOptions()
        self.store = store
        self.models: dict[str, ServedModel] = {}
        self._load_lock = threading.Lock()
        self.on_change = on_change  # called with the new ServedModel (metrics, logs)
        self.builds: dict[str, threading.Thread] = {}  # background TensorRT builds by model name

    @property
    def default_name(self) -> str | None:
        return next(iter(self.models), None)

    def get(self, name: str | None = None) -> ServedModel:
        name = name or self.default_name
        model = self.models.get(name) if name else None
        if model is None:
            raise ModelNotFoundError(f"model '{name}' is not served here; available: {sorted(self.models)}")
        return model

    def add(self, served: ServedModel) -> None:
        # A new dict in one assignment: readers (handlers iterating on the event loop while a load
        # runs on a thread) keep a consistent snapshot and see the old or the new model, never half.
        self.models = {**self.models, served.name: served}
        if self.store is not None:
            self.store.record(served)
        self.describe(served)

    def describe(self, served: ServedModel) -> None:
        """Tell listeners (metrics) about a model's new state."""
        if self.on_change is not None:
            self.on_change(served)

    def replace_if_current(self, old: ServedModel, new: ServedModel) -> bool:
        """Swap ``new`` in for ``old`` unless another load replaced ``old`` meanwhile."""
        with self._load_lock:
            if self.models.get(old.name) is not old:
                return False
            self.add(new)
            return True

    def load(self, location: str | Path, expected_name: str | None = None) -> ServedModel:
        """Load and check a bundle, then swap it in. Raises (old model untouched) when anything fails."""
        with self._load_lock:
            served = load_model(location, self.options)
            if expected_name is not None and served.name != expected_name:
                raise BundleError(
                    f"bundle at '{location}' is model '{served.name}', not '{expected_name}'; "
                    f"load it under its own name"
                )
            old = self.models.get(served.name)
            self.add(served)
            log.info(
                "model %s: %s -> %s from %s", served.name, old.version if old else "none", served.version, location
            )
            build = start_background_build(self, served)
            if build is not None:
                self.builds[served.name] = build
            return served

    def reload(self, name: str, location: str | Path | None = None) -> ServedModel:
        """KServe repository ``load``: re-read the model from ``location`` or from where it came from."""
        if location is None:
            location = self.get(name).source
        return self.load(location, expected_name=name)


def bundle_entries(directory: Path) -> dict[Path, tuple]:
    """Bundles in a watched directory and a fingerprint that changes when one is replaced."""
    entries = {}
    try:
        children = sorted(Path(directory).iterdir())
    except OSError:
        return entries
    for child in children:
        if child.name.startswith("."):
            continue  # bundle writers stage under dot-names, then rename
        marker = child / MANIFEST_NAME if child.is_dir() else child
        if child.is_dir() and not marker.is_file():
            continue
        if child.is_file() and not child.name.endswith((".tar.gz", ".tgz")):
            continue
        try:
            stat = marker.stat()
        except OSError:
            continue
        entries[child] = (stat.st_mtime_ns, stat.st_size, stat.st_ino)
    return entries


async def watch_directory(
    repo: ModelRepository, directory: Path, interval_s: float = 1.0, seen: dict[Path, tuple] | None = None
) -> None:
    """Poll ``directory``; load new or replaced bundles. A fingerprint must hold still for one
    interval before loading, so a file still being copied is not read half-way."""
    seen = dict(seen or {})
    candidates: dict[Path, tuple] = {}
    loop = asyncio.get_running_loop()
    while True:
        await asyncio.sleep(interval_s)
        current = bundle_entries(directory)
        for path, fingerprint in current.items():
            if seen.get(path) == fingerprint:
                continue
            if candidates.get(path) != fingerprint:
                candidates[path] = fingerprint
                continue
            candidates.pop(path, None)
            seen[path] = fingerprint
            try:
                await loop.run_in_executor(None, repo.load, path)
            except EdgerunError as exc:
                log.error("watch: refused %s, keeping the served model: %s", path, exc)
            except Exception:  # a watcher that dies silently is worse than a logged bug
                log.exception("watch: unexpected error loading %s", path)
