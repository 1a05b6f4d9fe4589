"""Write bundles atomically: stage in a temp dir next to the destination, then rename.

A failed build never leaves a half bundle, and an existing bundle is only replaced when the
caller asks (``force``). Checksums and sizes are filled in here, from the bytes written.
"""

from __future__ import annotations

import base64
import os
import shutil
import tarfile
import tempfile
from collections.abc import Callable
from pathlib import Path

from edgebuild.errors import UsageError
from edgebuild.signals import raise_if_stopped
from edgerun.bundle import sha256_file
from edgerun.manifest import MANIFEST_NAME, Manifest, is_one_path_component


def _archive_path(dest: Path) -> Path:
    return dest.parent / f"{dest.name}.tar.gz"


def check_bundle_name(name: str) -> None:
    """The runtime's name rule, checked before any work: the name is a folder and a URL segment."""
    if not is_one_path_component(name):
        raise UsageError(f"bundle name '{name}' must be one path component (no '/', '\\' or '..'); pass --name")


def check_destination(dest: Path, force: bool, archive: bool = False) -> None:
    """Fail early (before any work) when the destination cannot be written or exists and may not be replaced."""
    dest = Path(dest)
    nearest = next(p for p in (dest.parent, *dest.parent.parents) if p.exists())
    if not nearest.is_dir():
        raise UsageError(f"'{nearest}' is not a directory; choose another -o/--output-dir")
    if not os.access(nearest, os.W_OK | os.X_OK):
        raise UsageError(f"cannot write into '{nearest}' (permission denied); choose another -o/--output-dir")
    if dest.exists() and not force:
        raise UsageError(f"'{dest}' already exists; pass --force to replace it or choose another -o/--name")
    if dest.exists() and not (dest / MANIFEST_NAME).is_file():
        raise UsageError(f"'{dest}' exists and is not a bundle; refusing to replace it even with --force")
    if archive and _archive_path(dest).exists() and not force:
        raise UsageError(
            f"'{_archive_path(dest)}' already exists; pass --force to replace it or choose another -o/--name"
        )


def _finalise_manifest(stage: Path, manifest: Manifest) -> Manifest:
    for model in manifest.all_models():
        path = stage / model.path
        model.sha256 = sha256_file(path)
        model.size_bytes = path.stat().st_size
    files = {}
    for path in sorted(p for p in stage.rglob("*") if p.is_file()):
        relative = path.relative_to(stage).as_posix()
        if relative != MANIFEST_NAME:
            files[relative] = sha256_file(path)
    manifest.files = files
    return manifest


def sign_manifest(manifest: Manifest, private_key_pem: bytes) -> None:
    """Add an ed25519 signature over the manifest (which holds every file's sha256)."""
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
    from cryptography.hazmat.primitives.serialization import load_pem_private_key

    try:
        key = load_pem_private_key(private_key_pem, password=None)
    except (ValueError, TypeError) as exc:
        raise UsageError(f"signing key is not an unencrypted PEM private key ({exc})") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise UsageError("signing key must be an ed25519 private key (openssl genpkey -algorithm ed25519)")
    manifest.signature = None
    value = key.sign(manifest.signed_payload())
    manifest.signature = {"algorithm": "ed25519", "value": base64.b64encode(value).decode()}


def sign_bundle(dest: Path, private_key_pem: bytes) -> None:
    """Sign an existing bundle in place; it is verified first so a tampered one is never signed."""
    from edgerun.bundle import open_bundle

    manifest = open_bundle(dest).manifest
    sign_manifest(manifest, private_key_pem)
    tmp = Path(dest) / f".{MANIFEST_NAME}.tmp"
    tmp.write_text(manifest.to_json())
    tmp.replace(Path(dest) / MANIFEST_NAME)


def write_bundle(
    dest: Path,
    manifest: Manifest,
    files: dict[str, Path | bytes],
    *,
    force: bool = False,
    sign_key: bytes | None = None,
    archive: bool = False,
    check: Callable[[Path], None] | None = None,
) -> Path:
    """Write ``files`` (bundle-relative path -> source file or bytes) and the manifest to ``dest``.

    Fills in every model's sha256/size and the ``files`` map, optionally signs, runs ``check`` on
    the complete staged directory (an exception there leaves nothing written), then moves it
    into place in one rename. Returns ``dest``.
    """
    dest = Path(dest)
    check_destination(dest, force, archive)
    dest.parent.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", suffix=".tmp", dir=dest.parent))
    stage.chmod(0o755)  # mkdtemp is private (0700); a bundle is meant to be read by a service user
    staged_archive = dest.parent / f".{dest.name}.tar.gz.tmp"
    try:
        for relative, source in files.items():
            target = stage / relative
            target.parent.mkdir(parents=True, exist_ok=True)
            if isinstance(source, bytes):
                target.write_bytes(source)
            else:
                shutil.copyfile(source, target)
        _finalise_manifest(stage, manifest)
        if sign_key is not None:
            sign_manifest(manifest, sign_key)
        (stage / MANIFEST_NAME).write_text(manifest.to_json())
        if check is not None:
            check(stage)
        if archive:
            with tarfile.open(staged_archive, "w:gz") as tar:
                tar.add(stage, arcname=dest.name)
        raise_if_stopped()  # a stop whose exception was lost (see edgebuild.signals) publishes nothing
        _replace(stage, dest)
        if archive:
            staged_archive.replace(_archive_path(dest))
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        staged_archive.unlink(missing_ok=True)
        raise
    return dest


def _replace(stage: Path, dest: Path) -> None:
    if not dest.exists():
        stage.rename(dest)
        return
    backup = dest.parent / f".{dest.name}.old"
    shutil.rmtree(backup, ignore_errors=True)
    dest.rename(backup)
    try:
        stage.rename(dest)
    except BaseException:
        backup.rename(dest)
        raise
    shutil.rmtree(backup, ignore_errors=True)
