"""Open and verify a bundle: directory or ``.tar.gz``, checksums, format version, signature."""

from __future__ import annotations

import base64
import hashlib
import shutil
import tarfile
import tempfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from edgerun.errors import BundleError
from edgerun.manifest import MANIFEST_NAME, Manifest, read_manifest

_CHUNK = 1 << 20


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


@dataclass(frozen=True)
class Bundle:
    """A verified bundle on disk."""

    root: Path
    manifest: Manifest

    def path(self, relative: str) -> Path:
        return self.root / relative

    @property
    def sha256(self) -> str:
        """Identity of the bundle: the hash of its manifest (which hashes every file)."""
        return hashlib.sha256((self.root / MANIFEST_NAME).read_bytes()).hexdigest()


def _safe_member_path(name: str) -> PurePosixPath:
    path = PurePosixPath(name)
    if path.is_absolute() or ".." in path.parts:
        raise BundleError(f"archive member '{name}' escapes the bundle directory (absolute path or '..'); refusing it")
    return path


# Bundles hold single-file models under 2 GB plus a few variants; anything bigger is not a bundle
# (and a tar bomb must not fill a device's disk before it is refused).
MAX_ARCHIVE_BYTES = 8 << 30


def extract_archive(archive: Path, dest: Path, max_bytes: int = MAX_ARCHIVE_BYTES) -> Path:
    """Extract a bundle archive safely; return the directory holding ``manifest.json``.

    Refuses absolute paths, ``..``, links and device files instead of trusting the archive.
    """
    try:
        tar = tarfile.open(archive, "r:*")
    except (tarfile.TarError, OSError) as exc:
        raise BundleError(f"{archive}: not a readable tar archive ({exc})") from None
    with tar:
        members = tar.getmembers()
        for member in members:
            _safe_member_path(member.name)
            if not (member.isfile() or member.isdir()):
                raise BundleError(
                    f"archive member '{member.name}' is a link or special file; bundles hold only regular files"
                )
        total = sum(member.size for member in members if member.isfile())
        if total > max_bytes:
            raise BundleError(
                f"{archive}: unpacks to {total} bytes, over the {max_bytes} byte limit for a bundle; refusing it"
            )
        tar.extractall(dest, members=members, filter="data")
    manifests = sorted(dest.rglob(MANIFEST_NAME), key=lambda p: len(p.parts))
    if not manifests:
        raise BundleError(f"{archive}: archive holds no {MANIFEST_NAME}")
    return manifests[0].parent


def verify_files(root: Path, manifest: Manifest) -> None:
    """Check every file the manifest lists (and every file it uses) against its sha256."""
    used = [model.path for model in manifest.all_models()]
    used += [path for path in (manifest.golden.path if manifest.golden else None, manifest.labels) if path]
    for relative in used:
        if relative not in manifest.files:
            raise BundleError(f"manifest uses '{relative}' but 'files' has no checksum for it; rebuild the bundle")
    for relative, expected in manifest.files.items():
        _safe_member_path(relative)
        path = root / relative
        if not path.is_file():
            raise BundleError(f"bundle file '{relative}' is missing from {root}")
        actual = sha256_file(path)
        if actual != expected:
            raise BundleError(
                f"bundle file '{relative}' does not match its checksum (expected sha256 {expected[:12]}…, "
                f"got {actual[:12]}…): the bundle was modified or damaged; rebuild or re-copy it"
            )


def verify_signature(manifest: Manifest, trusted_public_key: bytes) -> None:
    """Check the manifest's ed25519 signature against a trusted public key (PEM or raw 32 bytes)."""
    from cryptography.exceptions import InvalidSignature
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
    from cryptography.hazmat.primitives.serialization import load_pem_public_key

    if not manifest.signature:
        raise BundleError("bundle is not signed, but a trusted key is configured; sign it with 'edgebuild sign'")
    try:
        if trusted_public_key.lstrip().startswith(b"-----BEGIN"):
            key = load_pem_public_key(trusted_public_key)
        else:
            key = Ed25519PublicKey.from_public_bytes(trusted_public_key)
    except ValueError as exc:
        raise BundleError(f"trusted key is not an ed25519 public key ({exc})") from None
    if not isinstance(key, Ed25519PublicKey):
        raise BundleError("trusted key is not an ed25519 public key")
    try:
        signature = base64.b64decode(manifest.signature.get("value", ""), validate=True)
        key.verify(signature, manifest.signed_payload())
    except (InvalidSignature, ValueError):
        raise BundleError("bundle signature does not verify against the trusted key; refusing it") from None


def open_bundle(
    location: str | Path, *, trusted_public_key: bytes | None = None, workdir: Path | None = None
) -> Bundle:
    """Open a bundle directory or archive and verify it completely before anything uses it."""
    location = Path(location)
    if not location.exists():
        raise BundleError(f"bundle '{location}' does not exist")
    if not location.is_file():
        return _verified(location, trusted_public_key)
    dest = Path(workdir or tempfile.mkdtemp(prefix="edgerun-"))
    try:
        return _verified(extract_archive(location, dest), trusted_public_key)
    except BaseException:
        if workdir is None:  # a refused archive must not leave its extraction behind
            shutil.rmtree(dest, ignore_errors=True)
        raise


def _verified(root: Path, trusted_public_key: bytes | None) -> Bundle:
    manifest = read_manifest(root)
    verify_files(root, manifest)
    if trusted_public_key is not None:
        verify_signature(manifest, trusted_public_key)
    return Bundle(root=root.resolve(), manifest=manifest)
