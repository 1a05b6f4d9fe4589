"""The README's own examples, run as a user would: its files and command lines as written, with data
built here in the shapes a user's tools produce (a tokenizer's [N, T] arrays, an image folder)."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

README = (Path(__file__).resolve().parents[1] / "README.md").read_text()


def _block(first_line: str, lang: str) -> str:
    """The README code block of ``lang`` whose text starts with (or contains) ``first_line``."""
    for body in re.findall(rf"```{lang}\n(.*?)```", README, flags=re.S):
        if body.startswith(first_line) or first_line in body:
            return body
    raise AssertionError(f"README has no {lang} block with {first_line!r}")


def _command(block: str, starts: str) -> str:
    """One command of a bash block, continuation lines joined."""
    text = block.replace("\\\n", " ")
    return next(line for line in text.splitlines() if line.startswith(starts))


def _run(command: str, cwd: Path, timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", "-c", command], cwd=cwd, capture_output=True, text=True, timeout=timeout)


def _stderr_ok(err: str) -> list[str]:
    lines = err.splitlines()
    strays = [line for line in lines if not line.startswith("edgebuild: ")]
    assert not strays, f"library output reached the user: {strays[:5]}"
    assert re.fullmatch(r"edgebuild: done in .*", lines[-1]), lines[-1]
    return lines


@pytest.mark.slow
def test_text_encoder_example_packs_a_tokenizers_arrays_with_readable_output(tmp_path):
    (tmp_path / "mypkg").mkdir()
    (tmp_path / "mypkg" / "__init__.py").write_text("")
    (tmp_path / "mypkg" / "text.py").write_text(_block("# mypkg/text.py", "python"))
    rng = np.random.default_rng(0)
    lengths = rng.integers(8, 33, 64)
    mask = (np.arange(32)[None, :] < lengths[:, None]).astype(np.int64)  # [N, T], as a tokenizer pads
    np.savez(tmp_path / "tokens.npz", input_ids=rng.integers(1, 1000, (64, 32)) * mask, attention_mask=mask)
    command = _command(_block("edgebuild pack mypkg.text:encoder", "bash"), "edgebuild pack mypkg.text:encoder")
    result = _run(command, tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    lines = _stderr_ok(result.stderr)
    assert (
        "edgebuild: inputs from the data: input_ids [1, 32] int64, attention_mask [1, 32] int64 per call "
        "(the .npz's first axis read as the batch axis: 64 rows)" in lines
    )
    # Before: 394 stderr lines, 45 of them `WARNING:` with protobuf dumps. Now one line per step and candidate.
    assert len(lines) < 45, "\n".join(lines)
    assert "Inference failed or unsupported type" not in result.stderr.replace("(first: WARNING: Inference", "")
    assert sum("library message(s) captured" in line for line in lines) <= sum("building" in line for line in lines) + 2
    assert result.stdout.splitlines()[-1] == "dist/encoder-x86"


@pytest.mark.slow
def test_image_classifier_example_packs_a_folder_and_predicts_over_http(tmp_path):
    sys.path.insert(0, str(Path(__file__).parent / "runtime"))
    from runtime_fixtures import free_port
    from server_process import wait_ready

    (tmp_path / "fruit.py").write_text(_block("# fruit.py", "python"))
    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for index, label in enumerate(("apple", "banana", "cherry")):
            folder = tmp_path / "images" / split / label
            folder.mkdir(parents=True)
            for k in range(3):
                size = (70, 299) if (split, index, k) == ("val", 0, 0) else (64 + 16 * k, 48 + 8 * index)
                pixels = rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)
                Image.fromarray(pixels).save(folder / f"{k}.jpg")
    Image.fromarray(rng.integers(0, 255, (90, 120, 3), dtype=np.uint8)).save(tmp_path / "apple.jpg")
    block = _block("edgebuild pack fruit:build", "bash")
    result = _run(_command(block, "edgebuild pack fruit:build"), tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    lines = _stderr_ok(result.stderr)
    # Pack applies /v1/predict's own aspect-ratio rule and says what to declare.
    refused = [line for line in lines if "would be refused by /v1/predict" in line]
    assert len(refused) == 1 and refused[0].startswith("edgebuild: WARNING: 1 of 9 images in 'images/val'")
    assert result.stdout.splitlines()[-1] == "dist/build-x86"
    # The serve and curl lines as written, on a free port instead of 8000 (the host is shared).
    port = str(free_port())
    serve = _command(block, "edgerun serve").rstrip(" &") + f" --port {port} --no-bench --cache-dir {tmp_path}/cache"
    proc = subprocess.Popen(
        ["bash", "-c", f"exec {serve}"], cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
    )
    try:
        wait_ready(f"http://127.0.0.1:{port}", proc)
        curl = _command(block, "curl").replace("localhost:8000", f"localhost:{port}")
        answer = _run(curl, tmp_path, timeout=60)
        assert answer.returncode == 0, answer.stderr
        predictions = json.loads(answer.stdout)["predictions"]
        assert {p["label"] for p in predictions} == {"apple", "banana", "cherry"}  # LABELS from fruit.py
        thin = _run(curl.replace("apple.jpg", "images/val/apple/0.jpg"), tmp_path, timeout=60)
        assert "the aspect ratio is 4.3x off" in thin.stdout  # the image pack warned about
    finally:
        proc.terminate()
        proc.wait(timeout=30)
