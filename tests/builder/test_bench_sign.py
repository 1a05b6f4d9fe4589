import json

import pytest
from click.testing import CliRunner
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from edgebuild.cli import main
from edgerun.bundle import open_bundle
from edgerun.errors import BundleError

pytestmark = pytest.mark.slow  # the fixture packs a bundle with every variant


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    out = tmp_path_factory.mktemp("b")
    result = CliRunner().invoke(
        main,
        [
            "pack",
            "tinymodels:tiny_cnn",
            "--calib-data",
            "tinymodels:tiny_images",
            "--ship-variants",
            "--max-accuracy-drop",
            "0.2",
            "-o",
            str(out),
            "--bench-seconds",
            "0.05",
        ],
    )
    assert result.exit_code == 0, result.stderr
    return result.stdout.strip().splitlines()[-1]


def test_bench_times_every_model_of_a_bundle(bundle):
    result = CliRunner().invoke(main, ["bench", bundle, "--json", "--bench-seconds", "0.05"])
    assert result.exit_code == 0, result.stderr
    rows = json.loads(result.stdout)
    manifest = open_bundle(bundle).manifest
    assert [r["path"] for r in rows] == [m.path for m in manifest.all_models()] and len(rows) > 1
    assert all(r["p50_ms"] > 0 and r["runs"] >= 20 for r in rows)


def test_bench_refuses_a_tampered_bundle(bundle, tmp_path):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(bundle, copy)
    (copy / "golden.npz").write_bytes(b"x")
    result = CliRunner().invoke(main, ["bench", str(copy)])
    assert result.exit_code == 2 and "does not match its checksum" in result.stderr


def test_sign_then_verify_with_trusted_key(bundle, tmp_path):
    key = Ed25519PrivateKey.generate()
    (tmp_path / "key.pem").write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    pub = key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    with pytest.raises(BundleError, match="not signed"):
        open_bundle(bundle, trusted_public_key=pub)
    result = CliRunner().invoke(main, ["sign", bundle, "--key", str(tmp_path / "key.pem")])
    assert result.exit_code == 0, result.stderr
    assert open_bundle(bundle, trusted_public_key=pub).manifest.signature["algorithm"] == "ed25519"
    (tmp_path / "not-a-key.pem").write_text("hello")
    result = CliRunner().invoke(main, ["sign", bundle, "--key", str(tmp_path / "not-a-key.pem")])
    assert result.exit_code == 2 and "PEM private key" in result.stderr
