"""--config recipe.toml: sections map onto pack options, flags override the file, every step is recorded."""

import pytest
from click.testing import CliRunner

from edgebuild.cli import main
from edgebuild.errors import UsageError
from edgebuild.passes.distill import DistillPass
from edgebuild.passes.prune import PrunePass
from edgebuild.recipe import load_labels, load_preprocess, load_recipe, merge, pack_options
from edgerun.bundle import open_bundle

RECIPE = """
model = "tinymodels:tiny_cnn"
target = "x86"

[data]
calib = "calib.npz"
train = "tinymodels:tiny_images"

[prune]
amount = 0.4
method = "channel"

[distill]
epochs = 2
temperature = 4.0

[quantize]
mode = "int8"
calib_method = "entropy"
max_accuracy_drop = 0.05
"""


def test_sections_map_to_pack_options_and_passes_in_order(tmp_path):
    (tmp_path / "calib.npz").write_bytes(b"")
    path = tmp_path / "recipe.toml"
    path.write_text(RECIPE)
    settings = load_recipe(path)
    assert settings["calib_data"] == str(tmp_path / "calib.npz")  # relative to the recipe's folder
    assert settings["prune"] == 0.4 and settings["distill"] is True and settings["quantize"] == "int8"
    options = pack_options(merge({"epochs": None}, settings, {"max_accuracy_drop": 0.02}), recipe_path=str(path))
    assert options.quantize == "int8" and options.calib_method == "entropy" and options.max_accuracy_drop == 0.02
    prune, distill = options.torch_passes
    assert isinstance(prune, PrunePass) and prune.config.method == "channel" and prune.config.amount == 0.4
    assert isinstance(distill, DistillPass) and distill.config.epochs == 2 and distill.config.temperature == 4.0
    assert options.recipe["path"] == str(path) and options.recipe["max_accuracy_drop"] == 0.02


def test_pruning_with_training_data_is_followed_by_fine_tuning():
    passes = pack_options({"prune": 0.3, "train_data": "tinymodels:tiny_images"}).torch_passes
    assert [p.name for p in passes] == ["prune", "distill"] and passes[1].config.student is None


@pytest.mark.parametrize(
    "text, message",
    [
        ("[prune]\nammount = 0.3\n", "unknown key(s) prune.ammount"),
        ("model = \n", "not valid TOML"),
        ("[prune]\namount = 1.3\n", "strictly between 0 and 1"),
        ("[distill]\nepochs = 3\n", "--distill needs --train-data"),
    ],
)
def test_bad_recipes_are_usage_errors(tmp_path, text, message):
    path = tmp_path / "recipe.toml"
    path.write_text(text)
    with pytest.raises(UsageError, match=message.replace("(", r"\(").replace(")", r"\)")):
        pack_options(load_recipe(path))


def test_cli_recipe_with_flag_override_records_each_step(tmp_path):
    path = tmp_path / "recipe.toml"
    path.write_text(
        'model = "tinymodels:tiny_cnn"\n[data]\ncalib = "tinymodels:tiny_images"\nval = "tinymodels:tiny_images"\n'
        '[prune]\namount = 0.5\nmethod = "l1"\n[quantize]\nmode = "int8"\nmax_accuracy_drop = 0.5\n'
    )
    result = CliRunner().invoke(
        main,
        ["pack", "--config", str(path), "--quantize", "none", "-o", str(tmp_path / "out"), "--bench-seconds", "0.02"],
    )
    assert result.exit_code == 0, result.output
    manifest = open_bundle(result.stdout.strip().splitlines()[-1]).manifest
    names = [p.name for p in manifest.passes]
    assert names[:3] == ["recipe", "prune", "export"] and "candidate:fp32" in names
    assert manifest.model.precision == "fp32"  # --quantize none overrode the recipe's int8
    recipe, prune, export = manifest.passes[:3]
    assert recipe.params["quantize"] == "none" and recipe.params["prune"] == 0.5
    assert prune.params["method"] == "l1" and prune.metrics["weight_sparsity"] == pytest.approx(0.5, abs=0.02)
    assert export.metrics["gzip_bytes"] < export.metrics["size_bytes"]


@pytest.mark.parametrize(
    "text, key",
    [
        ("max_accuracy_drop = true", "max_accuracy_drop"),  # a number or a percent string ("1%")
        ('[prune]\namount = "half"', "prune.amount"),
        ("[distill]\nepochs = 2.5", "distill.epochs"),
        ('[quantize]\npartial = "yes"', "quantize.partial"),
        ('input_shape = [1, "x"]', "input_shape"),
    ],
)
def test_recipe_value_of_the_wrong_type_is_a_usage_error(tmp_path, text, key):
    path = tmp_path / "recipe.toml"
    path.write_text(text + "\n")
    with pytest.raises(UsageError, match=key.replace(".", r"\.")):
        load_recipe(path)


def test_preprocess_table_labels_and_named_shapes_in_a_recipe(tmp_path):
    (tmp_path / "classes.txt").write_text("cat\ndog\n")
    path = tmp_path / "recipe.toml"
    path.write_text(
        'labels = "classes.txt"\ninput_shape = ["x=1,576", "state=2,1,8"]\n'
        '[preprocess]\npreset = "imagenet"\nresize = "center-crop"\nresize_shorter = 256\n'
    )
    settings = load_recipe(path)
    assert settings["labels"] == str(tmp_path / "classes.txt")
    options = pack_options(settings)
    assert options.input_shape == {"x": (1, 576), "state": (2, 1, 8)}
    spec = load_preprocess(options.preprocess)
    assert spec is not None and spec.resize == "center-crop" and spec.mean == [0.485, 0.456, 0.406]
    assert load_labels(options.labels) == ["cat", "dog"]


@pytest.mark.parametrize(
    "value, message",
    [
        ("cifar", "neither a preset"),
        ({"preset": "imagenet", "resize": "squash"}, "invalid preprocess key 'resize'"),
        ({"mean": [0.5, 0.5]}, "mean has 2 values"),
    ],
)
def test_bad_preprocess_declarations_are_usage_errors(value, message):
    with pytest.raises(UsageError, match=message):
        pack_options({"preprocess": value})


def test_preprocess_file_and_presets(tmp_path):
    (tmp_path / "pre.toml").write_text('[preprocess]\ncolor = "L"\nscale = 0.5\nresize = "letterbox"\n')
    spec = load_preprocess(str(tmp_path / "pre.toml"))
    assert spec is not None and (spec.color, spec.scale, spec.resize) == ("L", 0.5, "letterbox")
    assert load_preprocess("none") is None
    assert load_preprocess("unit").scale == pytest.approx(1 / 255)


@pytest.mark.slow
def test_cli_preprocess_and_labels_reach_the_bundle(tmp_path):
    from PIL import Image

    for k, name in enumerate(("b", "a", "c", "d")):
        (tmp_path / "img" / name).mkdir(parents=True)
        Image.new("RGB", (11 + k, 13), (60 * k, 20, 90)).save(tmp_path / "img" / name / "0.png")
    (tmp_path / "labels.txt").write_text("w\nx\ny\nz\n")
    args = ["pack", "tinymodels:tiny_cnn", "--calib-data", str(tmp_path / "img"), "--quantize", "none"]
    args += ["--bench-seconds", "0.02", "-o", str(tmp_path / "out"), "--preprocess", "imagenet"]
    result = CliRunner().invoke(main, [*args, "--labels", str(tmp_path / "labels.txt")])
    assert result.exit_code == 0, result.output
    bundle = open_bundle(result.stdout.strip().splitlines()[-1])
    assert (bundle.root / "labels.txt").read_text().split() == ["w", "x", "y", "z"]
    assert bundle.manifest.preprocess is not None and bundle.manifest.preprocess["size"] == [8, 8]
    # Without --labels the folder's sorted class names are used (their count is the model's 4 outputs).
    result = CliRunner().invoke(main, [*args, "--force"])
    assert result.exit_code == 0, result.output
    assert (bundle.root / "labels.txt").read_text().split() == ["a", "b", "c", "d"]
    (tmp_path / "three.txt").write_text("x\ny\nz\n")
    result = CliRunner().invoke(main, [*args, "--force", "--labels", str(tmp_path / "three.txt")])
    assert result.exit_code == 2 and "3 labels given but the model's output has 4 classes" in result.output


# --- one declaration per option: click flags, recipe keys and their checks are derived from it ---


def test_a_declared_option_becomes_a_flag_a_recipe_key_and_a_type_check():
    from dataclasses import dataclass

    import click

    from edgebuild.options import declared_options, option

    @dataclass
    class Extra:
        warmup_runs: int = option(3, "Warm-up runs before timing.", recipe="bench.warmup")
        layout: str = option("nchw", "Tensor layout.", choices=("nchw", "nhwc"))

    opts = {o.name: o for o in declared_options(Extra)}
    command = click.command()(lambda **kw: click.echo(sorted(kw.items())))
    for opt in opts.values():
        command = opt.click_option()(command)
    runner = CliRunner()
    assert runner.invoke(command, ["--warmup-runs", "5"]).output.strip() == "[('layout', 'nchw'), ('warmup_runs', 5)]"
    assert "Warm-up runs before timing.  [default: 3]" in runner.invoke(command, ["--help"]).output
    assert runner.invoke(command, ["--layout", "chw"]).exit_code == 2
    assert opts["warmup_runs"].recipe_keys == ("bench.warmup",) and opts["layout"].recipe_keys == ("layout",)
    assert opts["warmup_runs"].recipe_problem("3") == "a whole number" and opts["warmup_runs"].recipe_problem(3) is None
    assert opts["layout"].recipe_problem("chw") == "one of nchw, nhwc"


def test_recipe_values_outside_an_options_choices_are_usage_errors(tmp_path):
    path = tmp_path / "recipe.toml"
    path.write_text('[quantize]\nmode = "fast"\n')
    with pytest.raises(UsageError, match=r"quantize\.mode = 'fast' must be one of auto, int8, int8-dynamic"):
        load_recipe(path)


def test_python_callers_get_the_same_choice_check():
    from edgebuild.options import check_choices
    from edgebuild.pack import PackOptions

    with pytest.raises(UsageError, match="--optimize-for 'speed' is unknown; use one of latency, size"):
        check_choices(PackOptions(optimize_for="speed"))


def test_help_shows_the_pass_configs_own_defaults():
    from edgebuild.passes.distill import DistillConfig

    output = CliRunner().invoke(main, ["pack", "--help"], terminal_width=400).output
    assert f"Distillation epochs.  [default: {DistillConfig().epochs}]" in output
    assert f"Distillation softmax temperature.  [default: {DistillConfig().temperature}]" in output
