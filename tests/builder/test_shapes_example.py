"""The shapes detection example: deterministic scenes, the YOLO-format writer, the training fit matching
edgerun's letterbox, and the shipped detector's output format."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from edgebuild.examples import shapes


def test_scenes_are_reproducible_and_varied():
    first, again = shapes.scenes("val", 12), shapes.scenes("val", 12)
    for a, b in zip(first, again):
        np.testing.assert_array_equal(a.image, b.image)
        np.testing.assert_array_equal(a.boxes, b.boxes)
    assert not np.array_equal(first[0].image[:8, :8], shapes.scenes("calib", 1)[0].image[:8, :8])
    assert len({s.image.shape[:2] for s in first}) >= 3, "several image sizes and aspect ratios"
    for scene in first:
        height, width = scene.image.shape[:2]
        assert 1 <= len(scene.boxes) <= 5 and len(scene.classes) == len(scene.boxes)
        assert (scene.boxes[:, :2] >= -1).all() and (scene.boxes[:, 2] <= width + 1).all()
        assert (scene.boxes[:, 3] <= height + 1).all()
    with pytest.raises(ValueError, match="unknown split 'test'"):
        shapes.scenes("test", 1)


def test_write_dataset_is_yolo_format(tmp_path):
    root = shapes.write_dataset(tmp_path / "val", "val", count=5)
    images, labels = sorted((root / "images").glob("*.png")), sorted((root / "labels").glob("*.txt"))
    assert [p.stem for p in images] == [p.stem for p in labels] == [f"{i:04d}" for i in range(5)]
    for scene, label in zip(shapes.scenes("val", 5), labels):
        rows = np.loadtxt(label, ndmin=2)
        height, width = scene.image.shape[:2]
        assert rows.shape == (len(scene.boxes), 5)
        np.testing.assert_array_equal(rows[:, 0], scene.classes)
        assert (rows[:, 1:] > 0).all() and (rows[:, 1:] <= 1).all()
        np.testing.assert_allclose(rows[:, 3] * width, scene.boxes[:, 2] - scene.boxes[:, 0], atol=1e-3)


@pytest.mark.parametrize("mode", ["center", "stretch", "bottom-right"])
def test_training_fit_is_edgeruns_preprocessing(mode):
    """The detector trains on what /v1/predict will feed it: same pixels, same box transform."""
    import io

    from PIL import Image

    from edgerun.preprocess import preprocess_image_with_transform

    spec = {**shapes.PREPROCESS}
    if mode == "stretch":
        spec["resize"] = "stretch"
    else:
        spec["pad"] = mode
    scene = next(s for s in shapes.scenes("val", 10) if s.image.shape[0] != s.image.shape[1])
    buffer = io.BytesIO()
    Image.fromarray(scene.image).save(buffer, format="PNG")
    served, transform = preprocess_image_with_transform(buffer.getvalue(), spec)
    trained, boxes = shapes.fit(scene, mode)
    np.testing.assert_allclose(served[0], trained, atol=1e-6)
    np.testing.assert_allclose(transform.to_input(scene.boxes), boxes, atol=1e-3)


def test_detector_output_is_yolov8_format_and_split_agrees():
    model = shapes.pretrained()
    x = torch.from_numpy(next(shapes.validation_data(batch_size=2))[0])
    with torch.no_grad():
        out = model(x)
        split = shapes.pretrained_split()(x)
    assert out.shape == (2, 4 + len(shapes.LABELS), 16 * 16 + 8 * 8)
    assert sum(p.numel() for p in model.parameters()) < 150_000
    scores = out[:, 4:]
    assert float(scores.min()) >= 0 and float(scores.max()) <= 1
    centre, size = out[:, :2].transpose(1, 2), out[:, 2:4].transpose(1, 2)
    torch.testing.assert_close(split["boxes"], torch.cat([centre - size / 2, centre + size / 2], -1))
    torch.testing.assert_close(split["scores"], scores.transpose(1, 2))


def test_shipped_weights_find_the_shapes():
    """A small check of the shipped weights (the full figure is in the end-to-end test): mAP50 on 48 scenes."""
    model = shapes.pretrained()

    def run(x):
        with torch.no_grad():
            return model(torch.from_numpy(x)).numpy()

    batches = [next(shapes.validation_data(batch_size=48))]
    scores = shapes.evaluate(run, batches)
    assert scores["map50"] >= 0.9, scores
