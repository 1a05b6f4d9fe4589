"""The bundle reader: every file checked against its sha256, signatures verified with a trusted key."""

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from runtime_fixtures import CLASSIFIER_IO, make_manifest

from edgebuild.bundle import write_bundle
from edgerun.bundle import open_bundle
from edgerun.errors import BundleError


def write(dest, **kwargs):
    return write_bundle(dest, make_manifest("m", **CLASSIFIER_IO), {"model.onnx": b"abc"}, **kwargs)


def test_a_file_changed_after_writing_is_refused(tmp_path):
    dest = write(tmp_path / "b")
    assert open_bundle(dest).manifest.model.size_bytes == 3
    (dest / "model.onnx").write_bytes(b"abd")
    with pytest.raises(BundleError, match="does not match its checksum"):
        open_bundle(dest)


def test_signature_round_trip(tmp_path):
    key = Ed25519PrivateKey.generate()
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    pub = key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    dest = write(tmp_path / "b", sign_key=pem)
    assert open_bundle(dest, trusted_public_key=pub).manifest.signature["algorithm"] == "ed25519"
    other = (
        Ed25519PrivateKey.generate()
        .public_key()
        .public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    )
    with pytest.raises(BundleError, match="does not verify"):
        open_bundle(dest, trusted_public_key=other)
    unsigned = write(tmp_path / "u")
    with pytest.raises(BundleError, match="not signed"):
        open_bundle(unsigned, trusted_public_key=pub)
