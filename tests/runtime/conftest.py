"""Shared fixtures for the runtime tests; model/bundle builders live in runtime_fixtures."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from runtime_fixtures import build_classifier_bundle, build_image_bundle, build_two_input_bundle


@pytest.fixture(scope="session")
def bundles(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("bundles")
    return {
        "classifier": build_classifier_bundle(root / "clf"),
        "pair": build_two_input_bundle(root / "pair"),
        "image": build_image_bundle(root / "img"),
    }


@pytest.fixture()
def cache_dir(tmp_path) -> Path:
    return tmp_path / "cache"


@pytest.fixture()
def load_options(cache_dir):
    from edgerun.loader import LoadOptions

    return LoadOptions(cache_dir=cache_dir, bench=False, threads=1)
