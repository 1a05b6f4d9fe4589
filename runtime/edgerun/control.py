"""Model control (repository load/unload over HTTP): off unless enabled, its own credential, and
loads confined to two places.

Like Triton's explicit model-control mode, a load names a bundle, it does not hand the server
an arbitrary path: a name (or path) inside the repository directory (``--watch DIR``), or a
kept version under ``<cache-dir>/models`` (what ``edgerun rollback`` restores). Paths are
resolved with ``realpath`` first, so ``..``, symlinks pointing out and ``/proc/...`` are refused
with a 403 that names the rule.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from edgerun.errors import ForbiddenError, ModelNotFoundError

ARCHIVE_SUFFIXES = (".tar.gz", ".tgz")


@dataclass(frozen=True)
class ModelControl:
    """Where model control may load from."""

    repository_dir: Path | None
    versions_dir: Path

    def _roots(self) -> list[tuple[str, Path]]:
        roots = [("kept versions", Path(os.path.realpath(self.versions_dir)))]
        if self.repository_dir is not None:
            roots.insert(0, ("repository directory", Path(os.path.realpath(self.repository_dir))))
        return roots

    def _rule(self) -> str:
        where = f"the repository directory {self.repository_dir} (--watch)" if self.repository_dir else None
        kept = f"kept versions under {self.versions_dir}"
        return f"model control loads only bundles in {where} or {kept}" if where else f"model control loads only {kept}"

    def _real(self, path: Path, requested: str) -> tuple[Path, bool]:
        """``realpath`` of ``path`` and whether it exists; a name no file system takes (a NUL, a
        component over NAME_MAX) is refused here instead of failing deeper as a server error."""
        try:
            real = Path(os.path.realpath(path))
            return real, real.exists()
        except (OSError, ValueError) as exc:
            reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
            shown = requested if len(requested) <= 80 else requested[:80] + "..."
            raise ForbiddenError(f"{self._rule()}; {shown!r} is not a bundle name ({reason})") from None

    def confine(self, path: Path, requested: str) -> Path:
        real, _ = self._real(path, requested)
        for _, root in self._roots():
            if real.is_relative_to(root) and real != root:
                return real
        raise ForbiddenError(f"{self._rule()}; '{requested}' resolves to {real}, outside them")

    def resolve(self, name: str, requested: str | None, served_source: Path | None) -> Path:
        """The bundle a load of model ``name`` may read, or ForbiddenError / ModelNotFoundError."""
        if requested is None:
            if served_source is not None:
                return served_source  # re-read the served model from where the device owner put it
            if self.repository_dir is not None:
                for candidate in (name, *(name + suffix for suffix in ARCHIVE_SUFFIXES)):
                    path = self.repository_dir / candidate
                    if self._real(path, candidate)[1]:
                        return self.confine(path, candidate)
            raise ModelNotFoundError(
                f"model '{name}' is not loaded and "
                + (
                    f"the repository directory {self.repository_dir} has no bundle named '{name}'"
                    if self.repository_dir
                    else "there is no repository directory (--watch DIR) to load it from"
                )
                + '; pass {"parameters": {"bundle": NAME}}'
            )
        if "/" not in requested and "\\" not in requested:
            if requested in ("", ".", ".."):
                raise ForbiddenError(f"{self._rule()}; '{requested}' is not a bundle name")
            if self.repository_dir is None:
                raise ForbiddenError(
                    f"{self._rule()}; '{requested}' names a bundle in a repository directory, "
                    f"but the server has none (start it with --watch DIR)"
                )
            return self.confine(self.repository_dir / requested, requested)
        path = Path(requested)
        if not path.is_absolute():
            if self.repository_dir is None:
                raise ForbiddenError(f"{self._rule()}; relative path '{requested}' has no repository directory")
            path = self.repository_dir / path
        return self.confine(path, requested)
