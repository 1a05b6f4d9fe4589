"""edgerun.preprocess: the typed spec, presets, resize policies, JPEG draft decoding and the pixel limit."""

import io

import numpy as np
import pytest
from PIL import Image

from edgerun.errors import BundleError, RequestError
from edgerun.manifest import parse_manifest
from edgerun.preprocess import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    ImageTransform,
    PreprocessSpec,
    parse_spec,
    preprocess_image,
    preprocess_image_with_transform,
)


def encode(array: np.ndarray, fmt: str = "PNG") -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array.astype(np.uint8)).save(buffer, format=fmt)
    return buffer.getvalue()


def test_imagenet_preset_normalises_each_channel():
    image = np.zeros((37, 53, 3), np.uint8) + np.array([100, 150, 200], np.uint8)
    spec = parse_spec({"preset": "imagenet"}).for_input((1, 3, 16, 16), "pixels")
    x = preprocess_image(encode(image), spec)
    assert x.shape == (1, 3, 16, 16) and x.dtype == np.float32 and spec.input == "pixels"
    for c, value in enumerate((100, 150, 200)):
        np.testing.assert_allclose(x[0, c], (value / 255 - IMAGENET_MEAN[c]) / IMAGENET_STD[c], atol=1e-5)


def test_resize_policies_keep_what_they_say():
    # Bright left and right thirds, dark middle third: a 30x10 image into a 10x10 input.
    image = np.zeros((10, 30), np.uint8)
    image[:, :10] = image[:, 20:] = 255
    data = encode(image)
    base = {"color": "L", "size": [10, 10], "interpolation": "nearest"}
    stretched = preprocess_image(data, {**base, "resize": "stretch"})[0, 0]
    cropped = preprocess_image(data, {**base, "resize": "center-crop"})[0, 0]
    boxed = preprocess_image(data, {**base, "resize": "letterbox", "fill": 7})[0, 0]
    assert stretched[:, 0].min() == 255 and stretched[:, -1].min() == 255  # the sides are squeezed in
    assert cropped.max() == 0  # only the middle third is kept
    assert (boxed[0] == 7).all() and (boxed[-1] == 7).all()  # padded above and below
    assert boxed[5, 0] == 255 and boxed[5, 5] == 0  # the whole width is kept, aspect ratio intact


def test_center_crop_resizes_the_shorter_side_first():
    rng = np.random.default_rng(0)
    image = rng.integers(0, 255, (40, 60, 3))
    spec = PreprocessSpec(size=(8, 8), resize="center-crop", resize_shorter=10)
    expected = Image.fromarray(image.astype(np.uint8)).resize((15, 10), Image.BILINEAR).crop((4, 1, 12, 9))
    np.testing.assert_array_equal(preprocess_image(encode(image), spec)[0], np.asarray(expected).transpose(2, 0, 1))


def test_jpeg_is_decoded_in_draft_mode_within_the_pixel_limit():
    big = encode(np.full((2000, 2400, 3), 90, np.uint8), "JPEG")
    spec = PreprocessSpec(size=(64, 64))
    # 4.8 M pixels in the file, but draft mode decodes at 1/8 scale: 300x250 is all that is read.
    x = preprocess_image(big, spec, max_pixels=100_000)
    assert x.shape == (1, 3, 64, 64) and abs(float(x.mean()) - 90) < 3
    with pytest.raises(RequestError, match="pixel limit"):
        preprocess_image(encode(np.zeros((400, 400, 3), np.uint8)), spec, max_pixels=100_000)


def test_bgr_and_uint8_outputs():
    image = np.zeros((4, 4, 3), np.uint8) + np.array([10, 20, 30], np.uint8)
    x = preprocess_image(encode(image), {"color": "BGR", "layout": "NHWC", "dtype": "uint8"})
    assert x.dtype == np.uint8 and list(x[0, 0, 0]) == [30, 20, 10]


def test_spec_fits_the_model_input_or_says_why():
    spec = parse_spec({"preset": "imagenet"})
    assert spec.for_input((1, 3, 224, 320)).size == (224, 320)
    assert parse_spec({"layout": "NHWC"}).for_input((1, 96, 64, 3)).size == (96, 64)
    with pytest.raises(ValueError, match="takes 1"):
        spec.for_input((1, 1, 28, 28))
    with pytest.raises(ValueError, match=r"\[N, C, H, W\]"):
        spec.for_input((1, 576))
    with pytest.raises(ValueError, match="does not match"):
        parse_spec({"size": [32, 32]}).for_input((1, 3, 64, 64))
    with pytest.raises(ValueError, match="resize_shorter"):
        parse_spec({"resize": "center-crop", "resize_shorter": 100}).for_input((1, 3, 224, 224))


@pytest.mark.parametrize(
    "keys, message",
    [
        ({"mean": [0.5, 0.5]}, "mean has 2 values"),
        ({"std": [0.0]}, "must not contain 0"),
        ({"resize": "squash"}, "resize"),
        ({"colour": "RGB"}, "colour"),
        ({"preset": "cifar"}, "unknown preprocess preset 'cifar'"),
    ],
)
def test_bad_specs_are_refused_with_the_key(keys, message):
    with pytest.raises(BundleError, match=message):
        parse_spec(keys)


def test_legacy_resize_key_means_interpolation():
    spec = parse_spec({"resize": "nearest", "size": [4, 4]})
    assert spec.resize == "stretch" and spec.interpolation == "nearest"


def test_manifest_checks_and_normalises_preprocess():
    base = {
        "format_version": 1,
        "name": "m",
        "created": "now",
        "model": {"path": "model.onnx", "sha256": "", "size_bytes": 0, "precision": "fp32", "opset": 17},
        "inputs": [{"name": "x", "dtype": "float32", "shape": [-1, 3, 8, 8]}],
        "outputs": [{"name": "y", "dtype": "float32", "shape": [-1, 2]}],
    }
    manifest = parse_manifest({**base, "preprocess": {"size": [8, 8], "scale": 0.5}})
    assert manifest.preprocess is not None and manifest.preprocess["resize"] == "stretch"
    assert manifest.preprocess_spec() == PreprocessSpec(size=(8, 8), scale=0.5)
    with pytest.raises(BundleError, match="preprocess"):
        parse_manifest({**base, "preprocess": {"size": [8, 8], "crop": True}})


def letterboxed(pad: str, fill: int = 114) -> tuple[np.ndarray, ImageTransform]:
    """A 6x3 (w x h) bright image into a 4x4 input: scaled to 4x2, two rows of padding."""
    spec = PreprocessSpec(color="L", size=(4, 4), resize="letterbox", pad=pad, fill=fill, interpolation="nearest")
    x, transform = preprocess_image_with_transform(encode(np.full((3, 6), 200, np.uint8)), spec)
    return x[0, 0], transform


def test_letterbox_centre_pads_both_sides_pixel_exact():
    image, transform = letterboxed("center")
    np.testing.assert_array_equal(image, [[114] * 4, [200] * 4, [200] * 4, [114] * 4])
    assert transform == ImageTransform(4 / 6, 2 / 3, 0, 1, (6, 3), (4, 4))


def test_letterbox_bottom_right_puts_the_image_top_left_pixel_exact():
    image, transform = letterboxed("bottom-right", fill=0)
    np.testing.assert_array_equal(image, [[200] * 4, [200] * 4, [0] * 4, [0] * 4])
    assert (transform.pad_x, transform.pad_y) == (0, 0)
    wide = PreprocessSpec(color="L", size=(4, 4), resize="letterbox", pad="bottom-right", interpolation="nearest")
    tall, _ = preprocess_image_with_transform(encode(np.full((6, 3), 200, np.uint8)), wide)
    np.testing.assert_array_equal(tall[0, 0], [[200, 200, 114, 114]] * 4)  # padded on the right


def test_letterbox_defaults_are_ultralytics():
    spec = PreprocessSpec(resize="letterbox")
    assert (spec.pad, spec.fill) == ("center", 114)
    with pytest.raises(ValueError, match="pad"):
        PreprocessSpec(resize="letterbox", pad="top-left")


@pytest.mark.parametrize(
    ("policy", "pad"),
    [("stretch", "center"), ("letterbox", "center"), ("letterbox", "bottom-right"), ("center-crop", "center")],
)
def test_a_box_round_trips_through_the_transform(policy, pad):
    # a 300x200 image into a 64x96 (h x w) input; a box well inside what every policy keeps
    spec = PreprocessSpec(size=(64, 96), resize=policy, pad=pad)
    x, transform = preprocess_image_with_transform(encode(np.zeros((200, 300, 3), np.uint8)), spec)
    assert x.shape == (1, 3, 64, 96) and transform.original == (300, 200) and transform.input == (96, 64)
    box = np.array([[100.0, 60.0, 180.0, 150.0]], np.float32)
    np.testing.assert_allclose(transform.to_image(transform.to_input(box)), box, atol=1e-3)


def test_boxes_map_to_the_original_pixels_and_are_clipped():
    # 200x100 image into 64x64 letterbox (centre): scale 0.32, image rows 16..48 of the input
    spec = PreprocessSpec(size=(64, 64), resize="letterbox")
    _, transform = preprocess_image_with_transform(encode(np.zeros((100, 200, 3), np.uint8)), spec)
    assert (transform.scale_x, transform.scale_y, transform.pad_x, transform.pad_y) == (0.32, 0.32, 0, 16)
    mapped = transform.to_image(np.array([[16, 24, 32, 40], [-5, 0, 70, 64]], np.float32))
    np.testing.assert_allclose(mapped, [[50, 25, 100, 75], [0, 0, 200, 100]], atol=1e-4)


def test_stretch_transform_scales_each_axis():
    spec = PreprocessSpec(size=(50, 40), resize="stretch")
    _, transform = preprocess_image_with_transform(encode(np.zeros((100, 200, 3), np.uint8)), spec)
    mapped = transform.to_image(np.array([[4, 5, 20, 25]], np.float32))
    np.testing.assert_allclose(mapped, [[20, 10, 100, 50]], atol=1e-4)


def test_jpeg_draft_decode_maps_boxes_to_the_full_size_image():
    # draft mode decodes at 1/8 scale; the transform still refers to the image as sent
    spec = PreprocessSpec(size=(64, 64), resize="letterbox")
    _, transform = preprocess_image_with_transform(encode(np.full((1000, 2000, 3), 90, np.uint8), "JPEG"), spec)
    assert transform.original == (2000, 1000)
    np.testing.assert_allclose(transform.to_image(np.array([[0, 16, 64, 48]])), [[0, 0, 2000, 1000]], atol=1e-3)
