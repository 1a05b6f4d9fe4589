"""The model repository: load, atomic swap, versions kept on disk, rollback, directory watch.

A reload runs the same path as a cold start (verify -> session -> golden -> warm) on the
side; only a model that passed replaces the served one, in one reference assignment.
Requests already holding the old ``ServedModel`` finish on it (its session lives in memory);
a broken bundle is refused and the old model keeps serving. What a replaced or refused
model held on disk (an archive's extracted copy) is removed, and so is everything at shutdown.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import threading
import time
from pathlib import Path
from typing import Any

from edgerun.errors import BundleError, EdgerunError, ModelNotFoundError
from edgerun.loader import LoadOptions, ServedModel, load_model
from edgerun.manifest import MANIFEST_NAME, is_one_path_component
from edgerun.prefetch import BundlePrefetch, fingerprint
from edgerun.trt_build import start_background_build

log = logging.getLogger("edgerun")

KEEP_VERSIONS = 3  # distinct versions kept per model and target
MAX_HISTORY = 20  # activations remembered per model and target


def _component(value: str, fallback: str) -> str:
    return value if is_one_path_component(value) else fallback


class VersionStore:
    """Copies of activated bundles under ``<cache-dir>/models/<name>/<target>/<version>/`` plus an
    activation history per model name and target (an x86 and a Jetson bundle of one model never
    roll back into each other).

    A copy is made once per version, with hard links where the file system allows (no extra
    space), and removed only when no entry of the history names its version any more.
    """

    def __init__(self, cache_dir: Path, keep: int = KEEP_VERSIONS):
        self.root = Path(cache_dir).expanduser() / "models"
        self.keep = keep

    def _dir(self, name: str, target: str) -> Path:
        return self.root / _component(name, "_") / _component(target, "any")

    def targets(self, name: str) -> list[str]:
        try:
            folder = self.root / _component(name, "_")  # the folder _dir() writes into
            return sorted(p.name for p in folder.iterdir() if (p / "history.json").is_file())
        except OSError:
            return []

    def resolve_target(self, name: str, target: str | None) -> str:
        """The target whose history to use: the one given, or the only one recorded."""
        if target is not None:
            return target
        targets = self.targets(name)
        if len(targets) > 1:
            raise BundleError(
                f"model '{name}' has kept versions for several targets ({', '.join(targets)}); pass --target"
            )
        return targets[0] if targets else "any"

    def history(self, name: str, target: str | None = None) -> list[dict[str, Any]]:
        path = self._dir(name, self.resolve_target(name, target)) / "history.json"
        try:
            return json.loads(path.read_text())
        except (OSError, ValueError):
            return []

    def _write_history(self, name: str, target: str, history: list[dict[str, Any]]) -> None:
        path = self._dir(name, target) / "history.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".history.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(history, indent=2))
        tmp.replace(path)

    def _keep_copy(self, served: ServedModel, target: Path) -> None:
        """Copy the bundle's files (hard links when possible) into ``target``, atomically."""
        if (target / MANIFEST_NAME).is_file():
            return
        staging = target.with_name(f".{target.name}.{os.getpid()}.tmp")
        shutil.rmtree(staging, ignore_errors=True)
        source = served.bundle.root
        for relative in [MANIFEST_NAME, *served.manifest.files]:
            destination = staging / relative
            destination.parent.mkdir(parents=True, exist_ok=True)
            try:
                os.link(source / relative, destination)
            except OSError:  # another file system, or links not supported: copy
                shutil.copy2(source / relative, destination)
        try:
            staging.replace(target)
        except OSError:  # kept meanwhile by another process
            shutil.rmtree(staging, ignore_errors=True)

    def record(self, served: ServedModel) -> Path | None:
        """Keep a copy of the activated bundle so a later rollback has it even if the source is replaced."""
        directory = self._dir(served.name, served.target)
        try:
            copy = directory / served.version
            self._keep_copy(served, copy)
            history = self.history(served.name, served.target)
            if not history or history[-1]["version"] != served.version:
                history.append(
                    {
                        "version": served.version,
                        "path": str(copy),
                        "source": str(served.source),
                        "activated": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                    }
                )
            history = self._trim(history)
            self._write_history(served.name, served.target, history)
            self._remove_unreferenced(directory, history)
            return copy
        except OSError as exc:  # versions are a convenience; never stop serving over them
            log.warning("could not keep a copy of %s %s in %s: %s", served.name, served.version, directory, exc)
            return None

    def _trim(self, history: list[dict[str, Any]]) -> list[dict[str, Any]]:
        history = history[-MAX_HISTORY:]
        while len({entry["version"] for entry in history}) > self.keep:
            history = history[1:]
        return history

    @staticmethod
    def _remove_unreferenced(directory: Path, history: list[dict[str, Any]]) -> None:
        referenced = {entry["version"] for entry in history}
        for child in directory.iterdir():
            if child.is_dir() and not child.name.startswith(".") and child.name not in referenced:
                shutil.rmtree(child, ignore_errors=True)

    def rollback(self, name: str, target: str | None = None) -> dict[str, Any]:
        """Drop the current version from the end of the history; return the previous distinct one (now current)."""
        target = self.resolve_target(name, target)
        history = self.history(name, target)
        if not history:
            raise BundleError(f"model '{name}' has no kept versions in {self._dir(name, target)}; nothing to roll back")
        current = history[-1]["version"]
        while history and history[-1]["version"] == current:
            history.pop()
        if not history:
            raise BundleError(
                f"model '{name}' has no previous version in {self._dir(name, target)} "
                f"(only {current} recorded); nothing to roll back to"
            )
        previous = history[-1]
        if not (Path(previous["path"]) / MANIFEST_NAME).is_file():
            raise BundleError(f"kept version {previous['version']} of '{name}' is missing at {previous['path']}")
        self._write_history(name, target, history)
        self._remove_unreferenced(self._dir(name, target), history)
        return previous


class ModelRepository:
    """Models by name; swaps are atomic and loads are serialised."""

    def __init__(self, options: LoadOptions | None = None, *, store: VersionStore | None = None, on_change=None):
        self.options = options or LoadOptions()
        self.store = store
        self.models: dict[str, ServedModel] = {}
        self._load_lock = threading.Lock()
        self._closed = False
        self.on_change = on_change  # called with the new ServedModel (metrics, logs)
        self.builds: dict[str, threading.Thread] = {}  # background TensorRT builds by model name
        # Each location's files as they were just before its last load (served or refused): the
        # directory watcher compares against this, never against a scan of its own, so a bundle
        # replaced after its load but before the watcher first looks is still seen as changed.
        self._tried: dict[str, tuple | None] = {}
        # Set once the bundles a server starts with are loaded (``edgerun.startup.StartupLoad`` clears
        # it while they load, behind a socket that already takes connections): ready waits for it.
        self.initial_load = threading.Event()
        self.initial_load.set()

    def tried(self, location: str | Path) -> tuple | None:
        """The fingerprint ``location`` had when a load of it last started (None: never tried)."""
        return self._tried.get(os.path.realpath(location))

    @property
    def default_name(self) -> str | None:
        return next(iter(self.models), None)

    def get(self, name: str | None = None) -> ServedModel:
        name = name or self.default_name
        model = self.models.get(name) if name else None
        if model is None:
            if not self.initial_load.is_set():
                what = f"model '{name}' is" if name else "no model is"
                raise ModelNotFoundError(f"{what} not served yet: the server is still loading its bundles")
            raise ModelNotFoundError(f"model '{name}' is not served here; available: {sorted(self.models)}")
        return model

    def add(self, served: ServedModel) -> None:
        # A new dict in one assignment: readers (handlers iterating on the event loop while a load
        # runs on a thread) keep a consistent snapshot and see the old or the new model, never half.
        old = self.models.get(served.name)
        self.models = {**self.models, served.name: served}
        if self.store is not None:
            self.store.record(served)
        if old is not None and old.bundle is not served.bundle:
            old.close()  # requests in flight keep its in-memory session; its extracted copy goes
        self.describe(served)

    def describe(self, served: ServedModel) -> None:
        """Tell listeners (metrics) about a model's new state."""
        if self.on_change is not None:
            self.on_change(served)

    def replace_if_current(self, old: ServedModel, new: ServedModel) -> bool:
        """Swap ``new`` in for ``old`` unless another load replaced ``old`` meanwhile."""
        with self._load_lock:
            if self.models.get(old.name) is not old or self._closed:
                return False
            self.add(new)
            return True

    def load(
        self, location: str | Path, expected_name: str | None = None, prefetched: BundlePrefetch | None = None
    ) -> ServedModel:
        """Load and check a bundle, then swap it in. Raises (old model untouched) when anything fails.
        ``prefetched``: its files read and hashed ahead (``edgerun.prefetch``), fingerprinted before."""
        with self._load_lock:
            if self._closed:  # stopped while the bundles a server starts with were loading
                raise BundleError("the server is shutting down; load refused")
            # Taken before a byte is read: files replaced during the load show as a change later.
            seen = prefetched.take_fingerprint() if prefetched is not None else fingerprint(Path(location))
            self._tried[os.path.realpath(location)] = seen
            served = load_model(location, self.options, prefetched)
            if expected_name is not None and served.name != expected_name:
                served.close()
                raise BundleError(
                    f"bundle at '{location}' is model '{served.name}', not '{expected_name}'; "
                    f"load it under its own name"
                )
            if self._closed:
                served.close()
                raise BundleError("the server is shutting down; load refused")
            old = self.models.get(served.name)
            self.add(served)
            log.info(
                "model %s: %s -> %s from %s", served.name, old.version if old else "none", served.version, location
            )
            build = start_background_build(self, served, previous=self.builds.get(served.name))
            if build is not None:
                self.builds[served.name] = build
            return served

    def reload(self, name: str, location: str | Path | None = None) -> ServedModel:
        """KServe repository ``load``: re-read the model from ``location`` or from where it came from."""
        if location is None:
            location = self.get(name).source
        return self.load(location, expected_name=name)

    def unload(self, name: str) -> ServedModel:
        """Stop serving ``name`` (requests holding it finish) and release what it held on disk."""
        with self._load_lock:
            served = self.get(name)
            self.models = {k: v for k, v in self.models.items() if k != name}
            served.close()
            log.info("model %s %s unloaded", served.name, served.version)
            return served

    def refuse_loads(self) -> None:
        """From now on every load is refused: one running ends refused, the next one at once (no lock:
        this must not wait for a load)."""
        self._closed = True

    def close(self) -> None:
        """Shutdown: release every model's extracted copy and cancel pending TensorRT builds (after the
        load running now, if any, ended refused)."""
        self.refuse_loads()
        with self._load_lock:
            for served in self.models.values():
                served.close()


def bundle_entries(directory: Path) -> dict[Path, tuple]:
    """Bundles in a watched directory and a fingerprint of all their files."""
    entries: dict[Path, tuple] = {}
    try:
        children = sorted(Path(directory).iterdir())
        root = Path(os.path.realpath(directory))
    except OSError:
        return entries
    for child in children:
        if child.name.startswith("."):
            continue  # bundle writers stage under dot-names, then rename
        if not Path(os.path.realpath(child)).is_relative_to(root):
            continue  # a link out of the directory is not a bundle dropped into it
        if child.is_file() and not child.name.endswith((".tar.gz", ".tgz")):
            continue
        seen = fingerprint(child)
        if seen is not None:
            entries[child] = seen
    return entries


async def watch_directory(repo: ModelRepository, directory: Path, interval_s: float = 1.0) -> None:
    """Poll ``directory``; load new or changed bundles, including those present at start that are not
    served yet. "Changed" is against the files each location had when the repository last tried it
    (``ModelRepository.tried``), whenever that was. A fingerprint must hold still for one interval
    before loading, so a bundle still being copied is not read half-way; one refused mid-copy is tried
    again once its files change."""
    import asyncio  # the web stack's: the thread that loads a server's first bundles never needs it

    loop = asyncio.get_running_loop()
    candidates: dict[Path, tuple] = {}
    while True:
        # Walking and stat-ing every bundle file runs off the event loop: requests keep flowing meanwhile.
        current = await loop.run_in_executor(None, bundle_entries, directory)
        for path, files in current.items():
            if repo.tried(path) == files:
                candidates.pop(path, None)
                continue
            if candidates.get(path) != files:
                candidates[path] = files
                continue
            candidates.pop(path, None)
            try:
                await loop.run_in_executor(None, repo.load, path)
            except EdgerunError as exc:
                log.error("watch: refused %s, keeping the served model: %s", path, exc)
            except Exception:  # a watcher that dies silently is worse than a logged bug
                log.exception("watch: unexpected error loading %s", path)
        await asyncio.sleep(interval_s)
