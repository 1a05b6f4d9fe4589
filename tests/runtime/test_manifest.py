"""The manifest schema: the runtime refuses what it cannot serve faithfully, naming the field."""

import json

import pytest
from runtime_fixtures import CLASSIFIER_IO, make_manifest

from edgebuild.bundle import write_bundle
from edgerun.bundle import open_bundle
from edgerun.errors import BundleError


def edited_bundle(dest, edit):
    """A bundle whose manifest.json was changed by ``edit(data)`` after writing."""
    write_bundle(dest, make_manifest("m", **CLASSIFIER_IO), {"model.onnx": b"abc"})
    data = json.loads((dest / "manifest.json").read_text())
    edit(data)
    (dest / "manifest.json").write_text(json.dumps(data))
    return dest


def test_an_unknown_format_version_is_refused(tmp_path):
    dest = edited_bundle(tmp_path / "b", lambda data: data.update(format_version=99))
    with pytest.raises(BundleError, match="format_version 99 is not supported"):
        open_bundle(dest)


def test_a_dtype_kserve_cannot_carry_is_refused(tmp_path):
    dest = edited_bundle(tmp_path / "b", lambda data: data["inputs"][0].update(dtype="bfloat16"))
    with pytest.raises(BundleError, match="inputs.0.dtype.*bfloat16"):
        open_bundle(dest)
