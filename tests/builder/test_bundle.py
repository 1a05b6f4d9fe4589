import json

import pytest

from edgebuild.bundle import check_destination, write_bundle
from edgebuild.errors import UsageError
from edgerun.bundle import open_bundle
from edgerun.errors import BundleError
from edgerun.manifest import FORMAT_VERSION, Manifest, ModelFile, TensorSpec


def _manifest():
    return Manifest(
        format_version=FORMAT_VERSION,
        name="m",
        created="2026-01-01T00:00:00+00:00",
        model=ModelFile(path="model.onnx", sha256="", size_bytes=0, precision="fp32", opset=18),
        inputs=[TensorSpec(name="x", dtype="float32", shape=[-1, 4])],
        outputs=[TensorSpec(name="y", dtype="float32", shape=[-1, 4])],
    )


def test_write_fills_checksums_and_reads_back(tmp_path):
    dest = write_bundle(tmp_path / "b", _manifest(), {"model.onnx": b"abc", "labels.txt": b"a\nb\n"})
    bundle = open_bundle(dest)
    assert bundle.manifest.model.size_bytes == 3
    assert set(bundle.manifest.files) == {"model.onnx", "labels.txt"}
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no staging left behind


def test_refuses_to_overwrite_without_force(tmp_path):
    dest = write_bundle(tmp_path / "b", _manifest(), {"model.onnx": b"one"})
    with pytest.raises(UsageError, match="--force"):
        write_bundle(dest, _manifest(), {"model.onnx": b"two"})
    assert (dest / "model.onnx").read_bytes() == b"one"
    write_bundle(dest, _manifest(), {"model.onnx": b"two"}, force=True)
    assert (dest / "model.onnx").read_bytes() == b"two"


def test_failed_write_leaves_nothing(tmp_path):
    with pytest.raises(FileNotFoundError):
        write_bundle(tmp_path / "b", _manifest(), {"model.onnx": tmp_path / "does-not-exist.onnx"})
    assert list(tmp_path.iterdir()) == []


def test_tampered_or_unknown_version_is_refused(tmp_path):
    dest = write_bundle(tmp_path / "b", _manifest(), {"model.onnx": b"abc"})
    (dest / "model.onnx").write_bytes(b"abd")
    with pytest.raises(BundleError, match="does not match its checksum"):
        open_bundle(dest)
    dest2 = write_bundle(tmp_path / "c", _manifest(), {"model.onnx": b"abc"})
    data = json.loads((dest2 / "manifest.json").read_text())
    data["format_version"] = 99
    (dest2 / "manifest.json").write_text(json.dumps(data))
    with pytest.raises(BundleError, match="format_version 99 is not supported"):
        open_bundle(dest2)


def test_signature_round_trip(tmp_path):
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    key = Ed25519PrivateKey.generate()
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    pub = key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    dest = write_bundle(tmp_path / "b", _manifest(), {"model.onnx": b"abc"}, sign_key=pem)
    assert open_bundle(dest, trusted_public_key=pub).manifest.signature["algorithm"] == "ed25519"
    other = (
        Ed25519PrivateKey.generate()
        .public_key()
        .public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    )
    with pytest.raises(BundleError, match="does not verify"):
        open_bundle(dest, trusted_public_key=other)
    unsigned = write_bundle(tmp_path / "u", _manifest(), {"model.onnx": b"abc"})
    with pytest.raises(BundleError, match="not signed"):
        open_bundle(unsigned, trusted_public_key=pub)


def test_archive_of_the_same_name_is_kept_without_force(tmp_path):
    archive = tmp_path / "b.tar.gz"
    archive.write_bytes(b"someone else's archive")
    with pytest.raises(UsageError, match="--force"):
        write_bundle(tmp_path / "b", _manifest(), {"model.onnx": b"abc"}, archive=True)
    assert archive.read_bytes() == b"someone else's archive" and not (tmp_path / "b").exists()
    write_bundle(tmp_path / "b", _manifest(), {"model.onnx": b"abc"}, archive=True, force=True)
    assert archive.read_bytes()[:2] == b"\x1f\x8b"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_output_dir_that_is_a_file_is_a_usage_error(tmp_path):
    (tmp_path / "dist").write_text("not a directory")
    with pytest.raises(UsageError, match="not a directory"):
        check_destination(tmp_path / "dist" / "b", force=False)


def test_manifest_with_a_dtype_kserve_cannot_carry_is_refused(tmp_path):
    dest = write_bundle(tmp_path / "b", _manifest(), {"model.onnx": b"abc"})
    data = json.loads((dest / "manifest.json").read_text())
    data["inputs"][0]["dtype"] = "bfloat16"
    (dest / "manifest.json").write_text(json.dumps(data))
    with pytest.raises(BundleError, match="inputs.0.dtype.*bfloat16"):
        open_bundle(dest)
