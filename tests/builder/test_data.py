import numpy as np
import pytest
from PIL import Image

from edgebuild.data import CalibrationReader, open_data
from edgebuild.errors import UsageError
from edgebuild.sources import InputSpec

IMG = [InputSpec("input", (1, 3, 8, 8), "float32")]


def test_npz_with_x_and_y(tmp_path):
    np.savez(tmp_path / "d.npz", x=np.ones((10, 3, 8, 8), np.float32), y=np.arange(10))
    batch = open_data(str(tmp_path / "d.npz"), IMG, purpose="validation", batch_size=4).collect()
    assert batch.inputs["input"].shape == (10, 3, 8, 8) and list(batch.labels) == list(range(10))


def test_npz_limit_and_wrong_keys(tmp_path):
    np.savez(tmp_path / "d.npz", x=np.ones((10, 3, 8, 8), np.float32))
    assert len(open_data(str(tmp_path / "d.npz"), IMG, purpose="calibration", limit=7).collect()) == 7
    np.savez(tmp_path / "bad.npz", z=np.ones(3))
    with pytest.raises(UsageError, match="needs an array 'x'"):
        open_data(str(tmp_path / "bad.npz"), IMG, purpose="validation")


def test_image_folder_labels_follow_sorted_class_folders(tmp_path):
    for label, color in (("cat", 10), ("dog", 200)):
        (tmp_path / label).mkdir()
        for i in range(3):
            Image.new("RGB", (16, 16), (color, color, color)).save(tmp_path / label / f"{i}.png")
    batch = open_data(str(tmp_path), IMG, purpose="validation").collect()
    assert batch.inputs["input"].shape == (6, 3, 8, 8)
    assert list(batch.labels) == [0, 0, 0, 1, 1, 1]
    assert np.isclose(batch.inputs["input"][3].max(), 200 / 255)


def test_callable_multi_input_dicts_and_calibration_reader():
    specs = [InputSpec("input_ids", (1, 6), "int64"), InputSpec("attention_mask", (1, 6), "int64")]
    source = open_data("tinymodels:token_data", specs, purpose="calibration")
    reader = CalibrationReader(source)
    feeds = []
    while (feed := reader.get_next()) is not None:
        feeds.append(feed)
    assert (
        len(feeds) == 3 and set(feeds[0]) == {"input_ids", "attention_mask"} and feeds[0]["input_ids"].dtype == np.int64
    )


def test_random_only_for_calibration():
    assert open_data("random", IMG, purpose="calibration", allow_random=True, limit=5).is_random
    with pytest.raises(UsageError, match="calibration only"):
        open_data("random", IMG, purpose="validation")


def test_shape_mismatch_is_explained(tmp_path):
    np.savez(tmp_path / "d.npz", x=np.ones((4, 3, 9, 9), np.float32))
    with pytest.raises(UsageError, match=r"expects \[3, 8, 8\]"):
        open_data(str(tmp_path / "d.npz"), IMG, purpose="validation").collect()


def test_missing_data_file():
    with pytest.raises(UsageError, match="does not exist"):
        open_data("nope/x.npz", IMG, purpose="validation")
