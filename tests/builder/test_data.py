import numpy as np
import pytest
from PIL import Image

from edgebuild.data import CalibrationReader, open_data, resolve_inputs, run_calls
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


# --- image folders through the runtime's preprocessing; per-call data; shapes from the data ---

STREAM = [
    InputSpec("x", (1, 0), "float32", dynamic=(0, 1)),
    InputSpec("state", (2, 0, 8), "float32", dynamic=(1,)),
    InputSpec("sr", (), "int64", dynamic=()),
]


def test_image_folder_uses_the_declared_preprocessing_and_names_its_classes(tmp_path):
    from edgerun.preprocess import parse_spec, preprocess_image

    for label, size in (("b_dog", (30, 17)), ("a_cat", (9, 40))):
        (tmp_path / label).mkdir()
        Image.new("RGB", size, (40, 90, 200)).save(tmp_path / label / "0.png")
    spec = parse_spec({"preset": "imagenet", "resize": "letterbox"})
    source = open_data(str(tmp_path), IMG, purpose="validation", preprocess=spec)
    batch = source.collect()
    assert source.classes == ["a_cat", "b_dog"] and source.preprocess.size == (8, 8)
    expected = preprocess_image((tmp_path / "a_cat" / "0.png").read_bytes(), spec.for_input((1, 3, 8, 8)))
    np.testing.assert_array_equal(batch.inputs["input"][:1], expected)
    assert batch.inputs["input"].min() < -1.0  # normalised, not 0..1


def test_image_folder_refuses_a_preprocessing_that_does_not_fit(tmp_path):
    from edgerun.preprocess import parse_spec

    (tmp_path / "a").mkdir()
    with pytest.raises(UsageError, match="takes 3"):
        open_data(str(tmp_path), IMG, purpose="validation", preprocess=parse_spec({"color": "L"}))


def test_npz_calls_of_batch_first_inputs_become_rows(tmp_path):
    np.savez(tmp_path / "d.npz", x=np.ones((5, 1, 3, 8, 8), np.float32))  # 5 calls of [1, 3, 8, 8]
    batch = open_data(str(tmp_path / "d.npz"), IMG, purpose="validation").collect()
    assert not batch.calls and batch.inputs["input"].shape == (5, 3, 8, 8)


def test_inputs_without_a_common_batch_axis_are_kept_per_call(tmp_path):
    rng = np.random.default_rng(0)
    np.savez(
        tmp_path / "s.npz",
        x=rng.random((6, 1, 40), dtype=np.float32),
        state=rng.random((6, 2, 1, 8), dtype=np.float32),
        sr=np.full(6, 16000),
    )
    specs = resolve_inputs(STREAM, str(tmp_path / "s.npz"), "calibration")
    assert [(s.name, s.shape) for s in specs] == [("x", (1, 40)), ("state", (2, 1, 8)), ("sr", ())]
    source = open_data(str(tmp_path / "s.npz"), specs, purpose="calibration", batch_size=4)
    batch = source.collect()
    assert batch.calls and len(batch) == 6 and batch.inputs["state"].shape == (6, 2, 1, 8)
    reader = CalibrationReader(source, batch_size=2)  # a pinned "batch" of 2 (state's first axis) is ignored
    feeds = list(iter(reader.get_next, None))
    assert len(feeds) == 6 and feeds[0]["state"].shape == (2, 1, 8) and feeds[0]["sr"].shape == ()
    outputs = run_calls(lambda feed: [feed["state"].sum(0)], batch.inputs)
    assert outputs[0].shape == (6, 1, 8)


def test_per_call_data_must_have_a_calls_axis(tmp_path):
    np.savez(tmp_path / "s.npz", x=np.ones((6, 40), np.float32), state=np.ones((6, 2, 1, 8), np.float32), sr=np.ones(6))
    specs = [InputSpec("x", (1, 40), "float32", dynamic=(0, 1)), *STREAM[1:]]
    with pytest.raises(UsageError, match=r"input 'x' needs shape \[calls, 1, 40\]"):
        open_data(str(tmp_path / "s.npz"), specs, purpose="validation")


def test_fixed_dimensions_are_checked_dynamic_ones_are_not(tmp_path):
    np.savez(
        tmp_path / "s.npz", x=np.ones((3, 1, 40), np.float32), state=np.ones((3, 3, 1, 8), np.float32), sr=np.ones(3)
    )
    specs = [
        InputSpec("x", (1, 40), "float32", dynamic=(0, 1)),
        InputSpec("state", (2, 1, 8), "float32", (1,)),
        STREAM[2],
    ]
    with pytest.raises(UsageError, match="dimension 0 must be 2"):
        open_data(str(tmp_path / "s.npz"), specs, purpose="validation")


def test_callable_items_are_one_call_each_for_per_call_models():
    specs = [
        InputSpec("x", (1, 40), "float32", dynamic=(0, 1)),
        InputSpec("state", (2, 1, 8), "float32", (1,)),
        STREAM[2],
    ]
    batch = open_data("tinymodels:stream_calls", specs, purpose="validation").collect()
    assert batch.calls and batch.inputs["sr"].shape == (3,) and batch.inputs["state"].shape == (3, 2, 1, 8)


def test_unknown_inputs_take_rank_shape_and_dtype_from_the_data(tmp_path):
    np.savez(tmp_path / "t.npz", input_ids=np.ones((4, 1, 7), np.int64), attention_mask=np.ones((4, 1, 7), np.int64))
    unknown = [InputSpec(n, (), "", known=False) for n in ("input_ids", "attention_mask", "token_type_ids")]
    specs = resolve_inputs(unknown, str(tmp_path / "t.npz"), "validation")
    assert [(s.name, s.shape, s.dtype, s.dynamic_axes) for s in specs] == [
        ("input_ids", (1, 7), "int64", (0, 1)),
        ("attention_mask", (1, 7), "int64", (0, 1)),
    ]
    np.savez(tmp_path / "skip.npz", input_ids=np.ones((4, 1, 7), np.int64), token_type_ids=np.ones((4, 1, 7)))
    with pytest.raises(UsageError, match="not forward"):
        resolve_inputs(unknown, str(tmp_path / "skip.npz"), "validation")


def test_random_data_for_per_call_models_is_whole_calls():
    specs = [
        InputSpec("x", (1, 40), "float32", dynamic=(0, 1)),
        InputSpec("state", (2, 1, 8), "float32", (1,)),
        STREAM[2],
    ]
    batch = open_data("random", specs, purpose="calibration", allow_random=True, limit=3).collect()
    assert batch.calls and batch.inputs["state"].shape == (3, 2, 1, 8) and batch.inputs["sr"].shape == (3,)


class _BatchFirstEncoder:
    """forward(input_ids, attention_mask) that needs [batch, T], as a Hugging Face encoder does."""

    def __new__(cls):
        import torch

        class Encoder(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.embed = torch.nn.Embedding(50, 4)

            def forward(self, input_ids, attention_mask=None):
                batch, length = input_ids.shape  # a [T] call fails here, as BertModel does
                return (self.embed(input_ids) * attention_mask.unsqueeze(-1)).sum(1)

        return Encoder().eval()


TOKENS = [InputSpec(n, (), "", known=False) for n in ("input_ids", "attention_mask")]


def test_tokenizer_arrays_n_by_t_are_rows_of_the_batch_axis(tmp_path):
    from edgebuild.data import infer_inputs

    ids = np.random.default_rng(0).integers(1, 50, (64, 32))
    np.savez(tmp_path / "tokens.npz", input_ids=ids, attention_mask=np.ones((64, 32), np.int64))
    specs, line = infer_inputs(TOKENS, str(tmp_path / "tokens.npz"), "calibration", _BatchFirstEncoder())
    assert [(s.name, s.shape, s.dtype, s.dynamic_axes) for s in specs] == [
        ("input_ids", (1, 32), "int64", (0, 1)),
        ("attention_mask", (1, 32), "int64", (0, 1)),
    ]
    assert line.startswith("input_ids [1, 32] int64, attention_mask [1, 32] int64 per call")
    assert "read as the batch axis: 64 rows" in line
    batch = open_data(str(tmp_path / "tokens.npz"), specs, purpose="validation").collect()
    assert not batch.calls and batch.inputs["input_ids"].shape == (64, 32)


def test_calls_with_a_leading_batch_of_one_stay_calls_with_the_model_too(tmp_path):
    from edgebuild.data import infer_inputs

    np.savez(tmp_path / "t.npz", input_ids=np.ones((4, 1, 7), np.int64), attention_mask=np.ones((4, 1, 7), np.int64))
    specs, line = infer_inputs(TOKENS, str(tmp_path / "t.npz"), "validation", _BatchFirstEncoder())
    assert [s.shape for s in specs] == [(1, 7), (1, 7)] and "counts calls: 4 calls" in line


def test_data_the_model_runs_on_in_neither_layout_names_both_feeds(tmp_path):
    from edgebuild.data import infer_inputs

    np.savez(tmp_path / "t.npz", input_ids=np.ones((4, 2, 3, 7), np.int64), attention_mask=np.ones((4, 2, 3, 7)))
    with pytest.raises(UsageError) as err:
        infer_inputs(TOKENS, str(tmp_path / "t.npz"), "validation", _BatchFirstEncoder())
    message = str(err.value)
    assert "runs on neither reading" in message and "input_ids [2, 2, 3, 7]" in message
    assert "input_ids [2, 3, 7]" in message and "a tokenizer's [N, T]" in message


def test_images_the_server_would_refuse_are_counted_with_what_to_declare(tmp_path):
    from edgebuild.data import serve_refusals
    from edgerun.preprocess import parse_spec

    (tmp_path / "a").mkdir()
    Image.new("RGB", (70, 299)).save(tmp_path / "a" / "thin.png")  # 4.3x off a square model under stretch
    Image.new("RGB", (64, 48)).save(tmp_path / "a" / "ok.png")
    files = sorted((tmp_path / "a").iterdir())
    stretch = parse_spec({"size": [224, 224]})
    note = serve_refusals("imgs", files, stretch)
    assert note is not None and note.startswith("1 of 2 images in 'imgs' would be refused by /v1/predict")
    assert "thin.png" in note and "4.3x off" in note and 'resize = "letterbox"' in note
    assert serve_refusals("imgs", files, parse_spec({"size": [224, 224], "resize": "letterbox"})) is None
    source = open_data(str(tmp_path), IMG, purpose="validation")
    assert len(source.notes) == 1 and "would be refused" in source.notes[0]
