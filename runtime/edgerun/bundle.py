"""Open and verify a bundle: directory or ``.tar.gz``, checksums, format version, signature.

What is verified is what is used: ``Bundle.read_verified`` reads a file once, hashes those
bytes and hands out the same bytes (to ONNX Runtime, the golden check, the labels reader), so
a file replaced on disk after the check can never be loaded in its place.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import shutil
import tarfile
import tempfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

from edgerun.errors import BundleError, first_line
from edgerun.manifest import MANIFEST_NAME, Manifest, parse_manifest
from edgerun.prefetch import BundlePrefetch

_CHUNK = 1 << 20
# Files up to this size are kept in memory once read (golden data, labels): read once, used twice.
_KEEP_IN_MEMORY_BYTES = 16 << 20


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


@dataclass(frozen=True)
class VerifiedFile:
    """Bytes of one bundle file whose sha256 matched the manifest. ``os.fspath`` gives its bundle path."""

    relpath: str
    data: bytes = field(repr=False)
    sha256: str

    def __fspath__(self) -> str:
        return self.relpath


@dataclass(frozen=True)
class Bundle:
    """A verified bundle on disk.

    ``extracted`` is set when the bundle was unpacked from an archive into a directory of its
    own; ``close()`` removes that directory (a bundle directory given by the user is never touched).
    """

    root: Path
    manifest: Manifest
    sha256: str = ""  # identity: the hash of manifest.json as read (it hashes every file)
    extracted: Path | None = None
    _cache: dict[str, VerifiedFile] = field(default_factory=dict, repr=False, compare=False)
    # Files the load uses next (the selected model, golden data, labels), read and hashed by the
    # verification: handed out once instead of read and hashed a second time.
    _fresh: dict[str, VerifiedFile] = field(default_factory=dict, repr=False, compare=False)

    def path(self, relative: str) -> Path:
        return self.root / relative

    def read_verified(self, relpath: str) -> bytes:
        """The bytes of ``relpath``, read once and checked against the manifest's sha256.

        Small files (golden data, labels) are kept after the first read, so every user gets the
        same bytes; model files are read per session (ONNX Runtime keeps its own copy).
        """
        cached = self._cache.get(relpath)
        if cached is None:
            cached = self.verified_file(relpath)
            if len(cached.data) <= _KEEP_IN_MEMORY_BYTES:
                self._cache[relpath] = cached
        return cached.data

    def verified_file(self, relpath: str) -> VerifiedFile:
        """Read ``relpath`` now and check the bytes read against the manifest's sha256 (or take the
        bytes the verification read and checked, the first time)."""
        fresh = self._fresh.pop(relpath, None)
        if fresh is not None:
            return fresh
        expected = self.manifest.files.get(relpath)
        if expected is None:
            raise BundleError(f"manifest has no checksum for '{relpath}'; rebuild the bundle")
        _safe_member_path(relpath)
        try:
            data = (self.root / relpath).read_bytes()
        except OSError as exc:
            raise BundleError(f"bundle file '{relpath}' cannot be read from {self.root} ({exc.strerror})") from None
        actual = hashlib.sha256(data).hexdigest()
        if actual != expected:
            raise BundleError(
                f"bundle file '{relpath}' does not match its checksum (expected sha256 {expected[:12]}…, "
                f"got {actual[:12]}…): the bundle was modified or damaged; rebuild or re-copy it"
            )
        return VerifiedFile(relpath, data, actual)

    def forget_cached(self) -> None:
        """Drop the small files kept since their first read (a later read reads and checks them again)."""
        self._cache.clear()
        self._fresh.clear()

    def close(self) -> None:
        """Remove the directory this bundle was extracted into, if any."""
        self.forget_cached()
        if self.extracted is not None:
            shutil.rmtree(self.extracted, ignore_errors=True)


def _safe_member_path(name: str) -> PurePosixPath:
    path = PurePosixPath(name)
    if path.is_absolute() or ".." in path.parts:
        raise BundleError(f"archive member '{name}' escapes the bundle directory (absolute path or '..'); refusing it")
    return path


# Bundles hold single-file models under 2 GB plus a few variants; anything bigger is not a bundle
# (and a tar bomb must not fill a device's disk before it is refused).
MAX_ARCHIVE_BYTES = 8 << 30
# A bundle has a handful of files; millions of tiny members would exhaust inodes and memory.
MAX_ARCHIVE_MEMBERS = 1000
# What a damaged or truncated archive raises while being read.
_ARCHIVE_ERRORS = (tarfile.TarError, OSError, EOFError, zlib.error)
# Files a user may hand to `edgerun serve` that are models, not bundles.
_MODEL_SUFFIXES = frozenset({".onnx", ".pt", ".pt2", ".pth", ".safetensors", ".ort", ".engine", ".plan"})
# Header records that tarfile reads whole into memory (pax records, GNU long names) are a few hundred
# bytes in a bundle; a few megabytes of gzip can declare gigabytes of them.
MAX_ARCHIVE_HEADER_BYTES = 1 << 20
_HEADER_RECORDS = (
    tarfile.XHDTYPE,
    tarfile.XGLTYPE,
    tarfile.SOLARIS_XHDTYPE,
    tarfile.GNUTYPE_LONGNAME,
    tarfile.GNUTYPE_LONGLINK,
)


class _BoundedTarInfo(tarfile.TarInfo):
    """A tar header checked before tarfile acts on it: header records over the limit and GNU sparse
    files (whose map, of any length, tarfile keeps as a list) are refused."""

    def _proc_member(self, tarfile_):
        if self.type == tarfile.GNUTYPE_SPARSE:
            raise BundleError(f"archive member '{self.name}' is a sparse file; bundles hold only regular files")
        if self.type in _HEADER_RECORDS and self.size > MAX_ARCHIVE_HEADER_BYTES:
            raise BundleError(
                f"archive header record of {self.size} bytes (pax or GNU long name) is over the "
                f"{MAX_ARCHIVE_HEADER_BYTES} byte limit; a bundle's are a few hundred bytes, refusing the archive"
            )
        return super()._proc_member(tarfile_)  # type: ignore[misc]  # private in typeshed, stable in CPython

    def _refuse_pax_sparse(self, next_, *_):
        # GNU sparse maps in pax form; version 1.0 reads its map, of any length, from the member's data.
        raise BundleError(f"archive member '{next_.name}' is a sparse file; bundles hold only regular files")

    _proc_gnusparse_00 = _proc_gnusparse_01 = _proc_gnusparse_10 = _refuse_pax_sparse


def extract_archive(
    archive: Path, dest: Path, max_bytes: int = MAX_ARCHIVE_BYTES, max_members: int = MAX_ARCHIVE_MEMBERS
) -> Path:
    """Extract a bundle archive safely; return the directory holding ``manifest.json``.

    Refuses absolute paths, ``..``, links and device files instead of trusting the archive, and
    turns a truncated or corrupt archive into one ``BundleError``.
    """
    if Path(archive).suffix.lower() in _MODEL_SUFFIXES:
        raise BundleError(
            f"{archive} is a model file, not a bundle: edgerun serves a bundle (a directory or .tar.gz with "
            f"manifest.json, golden.npz and the model) made by `edgebuild pack {Path(archive).name}`"
        )
    try:
        tar = tarfile.open(archive, "r:*", tarinfo=_BoundedTarInfo)
    except _ARCHIVE_ERRORS as exc:
        raise BundleError(
            f"{archive}: not a bundle (a directory or .tar.gz made by `edgebuild pack`): not a readable tar archive "
            f"({first_line(exc)})"
        ) from None
    with tar:
        members: list[tarfile.TarInfo] = []
        total = 0
        try:
            for member in tar:
                if len(members) >= max_members:
                    raise BundleError(
                        f"{archive}: holds more than {max_members} members; a bundle has a handful of files"
                    )
                _safe_member_path(member.name)
                if not (member.isfile() or member.isdir()):
                    raise BundleError(
                        f"archive member '{member.name}' is a link or special file; bundles hold only regular files"
                    )
                members.append(member)
                total += member.size if member.isfile() else 0
                if total > max_bytes:
                    raise BundleError(
                        f"{archive}: unpacks to more than {max_bytes} bytes, over the {max_bytes} byte limit for a bundle; "
                        f"refusing it"
                    )
            tar.extractall(dest, members=members, filter="data")
        except _ARCHIVE_ERRORS as exc:
            raise BundleError(f"{archive}: damaged or truncated archive ({exc or type(exc).__name__})") from None
    manifests = sorted(dest.rglob(MANIFEST_NAME), key=lambda p: len(p.parts))
    if not manifests:
        raise BundleError(f"{archive}: archive holds no {MANIFEST_NAME}")
    return manifests[0].parent


def verify_files(root: Path, manifest: Manifest, prefetched: BundlePrefetch | None = None) -> dict[str, VerifiedFile]:
    """Check every file the manifest lists (and every file it uses) against its sha256.

    Returns the bytes of the files a load reads first (the selected model, golden data, labels), read
    whole and checked here; the others are hashed in chunks and not kept. A file ``prefetched`` read
    and hashed ahead is checked with those bytes and digest instead of being read again."""
    used = [model.path for model in manifest.all_models()]
    used += [path for path in (manifest.golden.path if manifest.golden else None, manifest.labels) if path]
    for relative in used:
        if relative not in manifest.files:
            raise BundleError(f"manifest uses '{relative}' but 'files' has no checksum for it; rebuild the bundle")
    first = {manifest.model.path, *used[len(manifest.all_models()) :]}
    kept: dict[str, VerifiedFile] = {}
    for relative, expected in manifest.files.items():
        _safe_member_path(relative)
        path = root / relative
        if not path.is_file():
            raise BundleError(f"bundle file '{relative}' is missing from {root}")
        ahead = prefetched.take(relative) if prefetched is not None else None
        if ahead is not None:
            data, actual = ahead
            if relative in first:
                kept[relative] = VerifiedFile(relative, data, actual)
        elif relative in first:
            try:
                data = path.read_bytes()
            except OSError as exc:
                raise BundleError(f"bundle file '{relative}' cannot be read from {root} ({exc.strerror})") from None
            actual = hashlib.sha256(data).hexdigest()
            kept[relative] = VerifiedFile(relative, data, actual)
        else:
            actual = sha256_file(path)
        if actual != expected:
            raise BundleError(
                f"bundle file '{relative}' does not match its checksum (expected sha256 {expected[:12]}…, "
                f"got {actual[:12]}…): the bundle was modified or damaged; rebuild or re-copy it"
            )
    return kept


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
    location: str | Path,
    *,
    trusted_public_key: bytes | None = None,
    workdir: Path | None = None,
    prefetched: BundlePrefetch | None = None,
) -> Bundle:
    """Open a bundle directory or archive and verify it completely before anything uses it.

    An archive is extracted into ``workdir`` or, without one, into a new temporary directory
    that the returned bundle owns (``Bundle.close`` removes it). A directory's files read ahead
    (``prefetched``, see ``edgerun.prefetch``) are verified from those bytes.
    """
    location = Path(location)
    if not location.exists():
        raise BundleError(f"bundle '{location}' does not exist")
    if not location.is_file():
        return _verified(location, trusted_public_key, prefetched)
    dest = Path(workdir or tempfile.mkdtemp(prefix="edgerun-"))
    try:
        bundle = _verified(extract_archive(location, dest), trusted_public_key)
    except BaseException:
        if workdir is None:  # a refused archive must not leave its extraction behind
            shutil.rmtree(dest, ignore_errors=True)
        raise
    return bundle if workdir is not None else _owning(bundle, dest)


def _owning(bundle: Bundle, extracted: Path) -> Bundle:
    return Bundle(
        root=bundle.root, manifest=bundle.manifest, sha256=bundle.sha256, extracted=extracted, _fresh=bundle._fresh
    )


def _verified(root: Path, trusted_public_key: bytes | None, prefetched: BundlePrefetch | None = None) -> Bundle:
    path = Path(root) / MANIFEST_NAME
    if not path.is_file():
        raise BundleError(f"{root}: no {MANIFEST_NAME} found; is this an edgebuild bundle directory?")
    ahead = prefetched.take(MANIFEST_NAME) if prefetched is not None else None
    try:
        raw = ahead[0] if ahead is not None else path.read_bytes()  # one snapshot with the files read ahead
        data = json.loads(raw)
    except OSError as exc:
        raise BundleError(f"{path}: cannot be read ({exc.strerror})") from None
    except (ValueError, RecursionError) as exc:  # also: nesting too deep, a number past the digit limit
        raise BundleError(f"{path}: not valid JSON ({str(exc)[:200]})") from None
    manifest = parse_manifest(data, str(path))
    if trusted_public_key is not None:  # authenticate the manifest before trusting its hashes
        verify_signature(manifest, trusted_public_key)
    kept = verify_files(root, manifest, prefetched)
    return Bundle(
        root=Path(os.path.realpath(root)), manifest=manifest, sha256=hashlib.sha256(raw).hexdigest(), _fresh=kept
    )
