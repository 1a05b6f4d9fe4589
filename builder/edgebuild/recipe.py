"""``--config recipe.toml``: one file for prune → distill → export → quantize; command-line flags override it.

```toml
model = "edgebuild.examples.digits:pretrained"
target = "x86"

[data]
calib = "edgebuild.examples.digits:calibration_data"
val = "edgebuild.examples.digits:validation_data"
train = "edgebuild.examples.digits:train_data"

[prune]                       # optional
amount = 0.3
method = "channel"            # l1 | global | channel

[distill]                     # optional; its presence turns distillation on
epochs = 5
temperature = 3.0
alpha = 0.5
max_train_minutes = 2

[quantize]
mode = "auto"                 # auto | int8 | int8-dynamic | fp16 | none
calib_method = "minmax"       # minmax | entropy | percentile
max_accuracy_drop = 0.01
metric = "accuracy"

[postprocess]                 # detectors (with task = "detect"); or postprocess = "yolov8" | ... | "file.toml"
format = "yolov8"             # yolov8 | yolov5 | yolox | end2end | split
conf = 0.25

[preprocess]                  # optional; or preprocess = "imagenet" | "unit" | "none" | "file.toml"
preset = "imagenet"           # start from a preset; the manifest's keys below override it
resize = "center-crop"        # stretch | center-crop | letterbox
```

``input_shape`` is ``[1, 3, 224, 224]`` or, per input, ``["input_ids=1,128", "attention_mask=1,128"]``;
``labels = "classes.txt"`` names the classes (one per line).

Both the file and the flags become one flat dict keyed by the ``pack`` option names; this
module turns it into :class:`PackOptions` with the torch passes in order. Each pass then records
``{name, params, metrics}`` in the manifest, and the resolved recipe is recorded too.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from edgebuild.errors import UsageError
from edgebuild.options import OPTIONS

if TYPE_CHECKING:
    from edgerun.preprocess import PreprocessSpec

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

# recipe key (section.key or top-level key) -> option name, from the options' declarations.
KEYS: dict[str, str] = {key: opt.name for opt in OPTIONS.values() for key in opt.recipe_keys}
# Values that name files: resolved against the recipe's folder when they exist there.
PATH_OPTIONS = tuple(opt.name for opt in OPTIONS.values() if opt.path)
# Sections that are one option's table rather than groups of options.
TABLE_OPTIONS = tuple(opt.name for opt in OPTIONS.values() if opt.kind in ("table", "shapes"))


def load_recipe(path: str | Path) -> dict[str, Any]:
    """Read a recipe file into ``{pack option name: value}``; unknown keys are an error, not ignored."""
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"--config '{path}' does not exist")
    try:
        data = tomllib.loads(path.read_text())
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise UsageError(f"--config '{path}' is not valid TOML: {exc}") from None
    settings: dict[str, Any] = {}
    unknown, mistyped = [], []
    entries = []
    for key, value in data.items():
        if isinstance(value, dict) and key in TABLE_OPTIONS:
            entries.append((key, value))
        elif isinstance(value, dict):
            if key == "distill":
                settings["distill"] = True  # a [distill] section turns it on (enabled = false turns it off)
            entries += [(f"{key}.{sub}", sub_value) for sub, sub_value in value.items()]
        else:
            entries.append((key, value))
    for key, value in entries:
        if key not in KEYS:
            unknown.append(key)
        elif wanted := OPTIONS[KEYS[key]].recipe_problem(value):
            mistyped.append(f"{key} = {value!r} must be {wanted}")
        else:
            settings[KEYS[key]] = value
    if unknown:
        raise UsageError(f"--config '{path}': unknown key(s) {', '.join(unknown)}; known: {', '.join(sorted(KEYS))}")
    if mistyped:
        raise UsageError(f"--config '{path}': {'; '.join(mistyped)}")
    for option in PATH_OPTIONS:
        value = settings.get(option)
        if isinstance(value, str) and (path.parent / value).exists() and not Path(value).is_absolute():
            settings[option] = str(path.parent / value)
    return settings


def load_preprocess(value: Any, where: str = "--preprocess") -> PreprocessSpec | None:
    """A preprocessing declaration -> the typed spec (``None`` for ``none``).

    ``value`` is a preset name (``imagenet``, ``unit``, ``none``), a ``.toml`` file (a ``[preprocess]``
    table or top-level keys), or a table of the manifest's preprocess keys (``preset`` starts from a
    preset and the other keys override it).
    """
    from edgerun.errors import BundleError
    from edgerun.preprocess import PRESETS, PreprocessSpec, parse_spec

    if value is None or isinstance(value, PreprocessSpec):
        return value
    if isinstance(value, str) and value in PRESETS:
        value = {"preset": value}
    elif isinstance(value, str):
        path = Path(value)
        if path.suffix != ".toml" or not path.is_file():
            raise UsageError(f"{where} '{value}' is neither a preset ({', '.join(PRESETS)}) nor an existing .toml file")
        try:
            data = tomllib.loads(path.read_text())
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
            raise UsageError(f"{where} '{value}' is not valid TOML: {exc}") from None
        value, where = data.get("preprocess", data), f"{where} '{value}'"
    if not isinstance(value, dict):
        raise UsageError(f"{where} must be a preset name, a .toml file or a table of preprocess keys, got {value!r}")
    if value.get("preset") == "none":
        return None
    try:
        return parse_spec(value, where)
    except BundleError as exc:
        raise UsageError(str(exc)) from None


def load_postprocess(value: Any, where: str = "--postprocess") -> dict | str | None:
    """A post-processing declaration: a detection preset name (``yolov8``, ...), a ``.toml`` file (a
    ``[postprocess]`` table or top-level keys) or a table; checked by the task that uses it."""
    from edgerun.tasks.detection import FORMATS

    if value is None or isinstance(value, dict):
        return value
    if not isinstance(value, str):
        raise UsageError(f"{where} must be a preset name, a .toml file or a table, got {value!r}")
    if value in FORMATS:
        return value
    path = Path(value)
    if path.suffix != ".toml" or not path.is_file():
        raise UsageError(
            f"{where} '{value}' is neither a detection preset ({', '.join(FORMATS)}) nor an existing .toml file"
        )
    try:
        data = tomllib.loads(path.read_text())
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise UsageError(f"{where} '{value}' is not valid TOML: {exc}") from None
    table = data.get("postprocess", data)
    if not isinstance(table, dict):
        raise UsageError(f"{where} '{value}': [postprocess] must be a table")
    return table


def load_labels(value: Any, where: str = "--labels") -> list[str] | None:
    """Class names from a file (one per line) or a list."""
    if value is None or isinstance(value, (list, tuple)):
        return None if value is None else [str(label) for label in value]
    path = Path(value)
    if not path.is_file():
        raise UsageError(f"{where} '{value}' does not exist (expected a text file with one class name per line)")
    labels = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    if not labels:
        raise UsageError(f"{where} '{value}' has no class names (expected one per line)")
    return labels


def merge(defaults: dict[str, Any], recipe: dict[str, Any], explicit: dict[str, Any]) -> dict[str, Any]:
    """Defaults, then the recipe, then the flags the user actually typed."""
    return {**defaults, **recipe, **explicit}


def torch_passes(settings: dict[str, Any]) -> list:
    """Prune → distill (or fine-tune after pruning when training data is given), validated before anything runs."""
    from edgebuild.passes.distill import DistillConfig, DistillPass
    from edgebuild.passes.prune import PruneConfig, PrunePass

    passes: list = []
    prune_amount = settings.get("prune")
    distill = bool(settings.get("distill"))
    student = settings.get("student")
    train_data = settings.get("train_data")
    if prune_amount is None and settings.get("prune_method") is not None:
        raise UsageError("--prune-method needs --prune AMOUNT")
    if student and not distill:
        raise UsageError("--student needs --distill (the student is trained from the original model)")
    if student and prune_amount is not None:
        raise UsageError(
            "--student replaces the model, so --prune would be thrown away: prune the student itself or drop --prune"
        )
    if train_data and not distill and prune_amount is None:
        raise UsageError("--train-data is used by --distill or to fine-tune after --prune; add one of them")
    if prune_amount is not None:
        passes.append(
            PrunePass(
                PruneConfig(
                    amount=float(prune_amount),
                    method=settings.get("prune_method") or "l1",
                    round_to=settings.get("prune_round_to"),
                )
            )
        )
    if distill or (prune_amount is not None and train_data):
        fields = ("epochs", "temperature", "alpha", "max_train_minutes", "learning_rate", "batch_size", "train_samples")
        config = DistillConfig(
            train_data=train_data, student=student, **{k: settings[k] for k in fields if settings.get(k) is not None}
        )
        passes.append(DistillPass(config))
    return passes


def pack_options(settings: dict[str, Any], *, recipe_path: str | None = None):
    """Resolved settings -> :class:`PackOptions` (torch passes built and checked: a bad combination is exit 2)."""
    from edgebuild.options import PackOptions
    from edgebuild.sources import parse_input_shapes

    passes = torch_passes(settings)
    fields = set(PackOptions.__dataclass_fields__)
    values = {k: v for k, v in settings.items() if k in fields and v is not None}
    values["input_shape"] = parse_input_shapes(values.get("input_shape"))
    if isinstance(values.get("preprocess"), (str, dict)):
        load_preprocess(values["preprocess"])  # a bad declaration is exit 2 before anything is loaded
    if isinstance(values.get("postprocess"), str):
        values["postprocess"] = load_postprocess(values["postprocess"])
    if isinstance(values.get("input_names"), str):
        values["input_names"] = [n.strip() for n in values["input_names"].split(",")]
    if "output_dir" in values:
        values["output_dir"] = Path(values["output_dir"])
    values["torch_passes"] = passes
    if recipe_path:
        recorded = {k: v for k, v in settings.items() if k != "sign_key" and v is not None}
        values["recipe"] = {
            "path": str(recipe_path),
            **{k: (str(v) if isinstance(v, Path) else v) for k, v in recorded.items()},
        }
    return PackOptions(**values)
