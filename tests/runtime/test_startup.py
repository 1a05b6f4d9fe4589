"""The start-up timeline: every phase of ``edgerun serve`` is named with its duration at debug level."""

from __future__ import annotations

import re

from server_process import start_server, stop_server

from edgerun.bundle import open_bundle
from edgerun.startup import PHASES, Timeline


def test_timeline_adds_up_repeated_phases_and_keeps_their_order():
    timeline = Timeline()
    timeline.add("session", 0.010)
    timeline.add("verify", 0.002)
    timeline.add("session", 0.030)  # a second variant tried
    assert timeline.phases["session"] == 0.040
    summary = timeline.summary()
    assert summary.index("verify 2 ms") < summary.index("session 40 ms")
    assert "ready" in summary


def test_timeline_phase_records_even_when_the_phase_fails():
    timeline = Timeline()
    try:
        with timeline.phase("verify"):
            raise ValueError("refused")
    except ValueError:
        pass
    assert "verify" in timeline.phases


def test_serve_logs_each_phase_at_debug_level(bundles, cache_dir):
    proc, _ = start_server([str(bundles["classifier"])], cache_dir, log_level="debug")
    stop_server(proc)
    lines = [line for line in proc.stderr.read().splitlines() if "start-up:" in line]
    assert len(lines) == 1, lines
    for name in ("imports", "verify", "session", "golden", "layout", "app", "bind"):
        assert re.search(rf"\b{name} \d+ ms \(at \d+-\d+\)", lines[0]), (name, lines[0])
    assert re.search(r"ready \d+ ms after edgerun started", lines[0])
    assert set(PHASES) >= {"imports", "verify", "session", "golden", "layout", "app", "bind"}


def test_serve_at_info_level_prints_no_timeline(bundles, cache_dir):
    proc, _ = start_server([str(bundles["classifier"])], cache_dir, log_level="info")
    stop_server(proc)
    assert "start-up:" not in proc.stderr.read()


def test_verification_hands_out_the_bytes_it_checked_once(bundles):
    """The selected model is read and hashed by the verification, then handed to the session as is."""
    bundle = open_bundle(bundles["classifier"])
    path = bundle.manifest.model.path
    first = bundle.verified_file(path)
    (bundle.root / path).write_bytes(b"replaced after the check")  # never read in its place
    try:
        assert first.sha256 == bundle.manifest.files[path]
        assert first.data != b"replaced after the check"
        assert "does not match its checksum" in _refusal(bundle, path)  # a second read checks again
    finally:
        (bundle.root / path).write_bytes(first.data)


def _refusal(bundle, path: str) -> str:
    try:
        bundle.verified_file(path)
    except Exception as exc:  # noqa: BLE001 - the message is what is checked
        return str(exc)
    return ""
