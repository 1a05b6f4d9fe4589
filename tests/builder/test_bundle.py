"""The builder's bundle writer: atomic, checksummed, never clobbering without --force."""

import pytest

from edgebuild.bundle import check_destination, write_bundle
from edgebuild.errors import UsageError
from edgerun.bundle import open_bundle
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
