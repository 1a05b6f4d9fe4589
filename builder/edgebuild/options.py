"""Every ``edgebuild pack`` option, declared once: field, type, default, help, flag and recipe key.

The click options of ``edgebuild pack`` (:func:`click_options`), the recipe's keys and their type
and choice checks (``edgebuild.recipe``) are all derived from the fields below, so adding an
option is one field here plus its test, and a help text can never disagree with a default.

:class:`PackOptions` holds what ``pack`` runs with; :class:`TorchPassOptions` declares the
settings of the torch-level passes (pruning, distillation), whose defaults are the pass
configs' own (``PruneConfig``, ``DistillConfig``), shown in the help from there.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import click

from edgebuild.passes import TorchPass
from edgebuild.passes.distill import DistillConfig
from edgebuild.passes.fusion import MODEL_TYPE_CHOICES
from edgebuild.passes.prune import METHODS as PRUNE_METHODS
from edgebuild.passes.prune import PruneConfig
from edgebuild.passes.quantize import CALIB_METHODS, INT8_SEARCH, QUANTIZE_MODES
from edgebuild.shipping import VARIANT_MODES
from edgebuild.sources import InputShapes

# --task names and the aliases it also accepts (edgebuild.tasks resolves them).
TASK_CHOICES = ("detect", "classify", "embed", "tensor", "detection", "classification", "embedding")
OPTIMIZE_FOR = ("latency", "size")

# What a recipe value may be, per kind of option (TOML is typed: "0.01" is a string, not a number).
KINDS = ("str", "int", "float", "bool", "shapes", "names", "table", "budget")


def option(
    default: Any,
    help: str,
    *,
    kind: str | None = None,
    flags: tuple[str, ...] | None = None,
    recipe: str | None = "",
    aliases: tuple[str, ...] = (),
    choices: tuple[str, ...] | None = None,
    path: bool = False,
    click_type: Any = None,
    multiple: bool = False,
    shown_default: Any = None,
    cli: bool = True,
) -> Any:
    """A dataclass field that is also a ``pack`` option.

    ``recipe`` is its key in a recipe file (``""``: the field name at the top level; ``None``: not
    in recipes); ``flags`` its click declarations (default ``--field-name``); ``path`` values are
    resolved against the recipe's folder; ``shown_default`` is the default the help shows when
    the field's own default is ``None`` meaning "the pass's default".
    """
    metadata = {
        "help": help,
        "kind": kind,
        "flags": flags,
        "recipe": recipe,
        "aliases": aliases,
        "choices": choices,
        "path": path,
        "click_type": click_type,
        "multiple": multiple,
        "shown_default": shown_default,
        "cli": cli,
    }
    return field(default=default, metadata={"option": metadata})


@dataclass
class PackOptions:
    """What ``edgebuild pack`` runs with (the CLI, recipes and Python callers all build this)."""

    model: str | None = option(
        None, "package.module:callable, a .pt2 or an .onnx file (default: the embedded example).", path=True, cli=False
    )
    target: str = option(
        "x86", "Target profile name (see `edgebuild targets`) or a .toml profile file.", flags=("--target", "-t")
    )
    output_dir: Path = option(
        Path("dist"),
        "Directory the bundle <name>-<target>/ is written into.",
        flags=("-o", "--output-dir"),
        click_type=click.Path(path_type=Path),
    )
    name: str | None = option(None, "Bundle/model name (default: from the model).")
    weights: str | None = option(
        None,
        "State dict for a module:callable model (.pt/.pth via torch.load(weights_only=True), or .safetensors).",
        path=True,
    )
    input_shape: InputShapes | None = option(
        None,
        "Example input shape, e.g. 1,3,224,224, or NAME=1,576 per input (repeat). Default: the model's "
        "example_inputs/input_shape, the ONNX graph, or the first sample of the data.",
        kind="shapes",
        multiple=True,
    )
    input_names: list[str] | None = option(
        None,
        "Comma-separated input names (default: the module's input_names, else forward()'s parameters).",
        kind="names",
    )
    preprocess: str | dict | None = option(
        None,
        "Image preprocessing for image-folder data and /v1/predict: imagenet | unit | none | FILE.toml "
        "(default: the factory module's PREPROCESS).",
        kind="table",
        path=True,
    )
    task: str | None = option(
        None,
        "What the model does: detect | classify | embed | tensor (also detection, classification, embedding). "
        "Decides validation (boxes for detect), quantization (detect: head tail in float) and /v1/predict "
        "(default: the model's Ultralytics metadata, a declared post-processing, else classification for "
        "[batch, classes] outputs and tensor otherwise).",
        choices=TASK_CHOICES,
    )
    postprocess: str | dict | None = option(
        None,
        "Detection post-processing: yolov8 | yolov5 | yolox | end2end | FILE.toml (a [postprocess] table: format, "
        "conf, iou, max_det, strides, box, normalized, class_agnostic, boxes_output, scores_output) "
        "(default: the factory module's POSTPROCESS, else from the Ultralytics metadata and output shape).",
        kind="table",
        path=True,
    )
    labels: list[str] | str | None = option(
        None,
        "Class names, one per line (default: the factory module's LABELS, or the image folder's class names).",
        kind="names",
        path=True,
        click_type=click.Path(exists=True, dir_okay=False),
    )
    calib_data: str | None = option(
        None,
        "Calibration DATA: image folder, .npz, module:callable, or 'random' (then not validated).",
        recipe="data.calib",
        path=True,
    )
    val_data: str | None = option(
        None, "Validation DATA: image folder, .npz (x, y) or module:callable.", recipe="data.val", path=True
    )
    quantize: str = option(
        "auto",
        "auto builds every sensible variant, measures each, and keeps the fastest within the accuracy budget.",
        recipe="quantize.mode",
        choices=QUANTIZE_MODES,
    )
    max_accuracy_drop: float | str | None = option(
        None,
        "Largest allowed drop of the metric: a fraction (0.01 = 1 point) or a percent (1%); above 0.5 only as a "
        "percent. Default 0.01; detection judged by box agreement without labels: 0.05 (mAP50-95 vs FP32 >= 0.95).",
        kind="budget",
        click_type=str,
        aliases=("quantize.max_accuracy_drop",),
    )
    metric: str | None = option(
        None,
        "accuracy | agreement | cosine | map50-95 | box-agreement | module:callable(reference, packed, labels) "
        "receiving every output as lists (default: accuracy with labels, agreement for known classifiers, "
        "detection: map50-95 with box labels, box-agreement without; else cosine on every output).",
        aliases=("quantize.metric",),
    )
    optimize_for: str = option(
        "latency",
        "What auto minimises among in-budget variants.",
        choices=OPTIMIZE_FOR,
        aliases=("quantize.optimize_for",),
    )
    calib_samples: int = option(256, "Calibration samples used.")
    val_samples: int = option(1000, "Validation uses all the samples given, up to this cap.")
    ship_variants: bool | None = option(
        None,
        "Also ship every in-budget variant for the device to choose from (default: on for GPU targets).",
        flags=("--ship-variants/--no-ship-variants",),
    )
    variants: str = option(
        "auto",
        "Variants the device's self-benchmark chooses among: one (model.onnx only), contenders (the best float "
        "variant + the best INT8 variant of up to 2 recipe families, about 1.5x FP32's size), all (every in-budget "
        "variant); auto: all on GPU targets, contenders on CPUs (--ship-variants/--no-ship-variants: all/one).",
        choices=VARIANT_MODES,
    )
    force: bool = option(False, "Replace an existing bundle at the destination.")
    archive: bool = option(False, "Also write <bundle>.tar.gz.")
    sign_key: bytes | None = option(
        None,
        "ed25519 private key (PEM) to sign the manifest.",
        recipe=None,
        click_type=click.Path(exists=True, dir_okay=False, path_type=Path),
    )
    bench_seconds: float = option(1.0, "Time spent timing each candidate on this host.")
    max_batch: int = option(8, "Largest batch the device will serve (sizes TensorRT shape profiles on GPU targets).")
    calib_method: str | None = option(
        None,
        "INT8 calibration method (default: the target's preset).",
        recipe="quantize.calib_method",
        choices=CALIB_METHODS,
    )
    per_channel: bool | None = option(
        None,
        "INT8 weight granularity (default: the target's preset).",
        flags=("--per-channel/--per-tensor",),
        recipe="quantize.per_channel",
    )
    int8_search: str = option(
        "quick",
        "auto on CPUs: quick measures QDQ/QOperator x reduce_range; full also per-channel x calibration method.",
        recipe="quantize.int8_search",
        choices=INT8_SEARCH,
    )
    head_in_float: bool = option(
        True,
        "Detection: keep the head's tail (the nodes after the last Conv on each output path: decode, DFL, "
        "Sigmoid/Softmax, final Concat) in float when quantizing.",
        flags=("--float-head/--quantize-head",),
        recipe="quantize.float_head",
    )
    partial_quantization: bool = option(
        True,
        "When every full INT8 variant breaks the budget, keep the worst nodes in float (precision 'mixed').",
        flags=("--partial/--no-partial",),
        recipe="quantize.partial",
    )
    model_type: str = option(
        "auto",
        "Transformer fusion (ONNX Runtime's transformer optimizer) as extra candidates on CPUs: the optimizer's "
        "model type (bert, gpt2, vit, ...), auto (a Hugging Face config's type, else bert when the graph has "
        "attention) or none.",
        recipe="quantize.model_type",
        choices=MODEL_TYPE_CHOICES,
    )
    # Not options: the resolved --config recipe (recorded in the manifest) and the torch-level passes built
    # from the TorchPassOptions settings, run before export when the source is a torch model.
    recipe: dict | None = None
    torch_passes: list[TorchPass] = field(default_factory=list)


def _config_default(config: type, name: str) -> Any:
    return next(f.default for f in dataclasses.fields(config) if f.name == name)


@dataclass
class TorchPassOptions:
    """Settings of the torch-level passes; ``None`` means the pass config's own default (shown in the help)."""

    prune: float | None = option(
        None, "Prune this fraction, in (0, 1): of weights (l1/global) or channels (channel).", recipe="prune.amount"
    )
    prune_method: str | None = option(
        None,
        "l1 per layer | global | channel (structured, faster)",
        recipe="prune.method",
        choices=PRUNE_METHODS,
        shown_default=_config_default(PruneConfig, "method"),
    )
    prune_round_to: int | None = option(
        None, "channel pruning: keep channel counts multiples of this.", recipe="prune.round_to", cli=False
    )
    distill: bool = option(
        False,
        "Distil the original model into the pruned model or --student (needs --train-data).",
        recipe="distill.enabled",
    )
    train_data: str | None = option(
        None, "Training DATA for --distill (and fine-tuning after --prune).", recipe="data.train", path=True
    )
    student: str | None = option(None, "Student model package.module:callable for --distill.", recipe="distill.student")
    epochs: int | None = option(
        None, "Distillation epochs.", recipe="distill.epochs", shown_default=_config_default(DistillConfig, "epochs")
    )
    temperature: float | None = option(
        None,
        "Distillation softmax temperature.",
        recipe="distill.temperature",
        shown_default=_config_default(DistillConfig, "temperature"),
    )
    alpha: float | None = option(
        None,
        "Weight of the distillation loss vs cross-entropy on labels.",
        recipe="distill.alpha",
        shown_default=_config_default(DistillConfig, "alpha"),
    )
    max_train_minutes: float | None = option(
        None, "Stop distillation after this many minutes (best epoch kept).", recipe="distill.max_train_minutes"
    )
    learning_rate: float | None = option(
        None,
        "Distillation learning rate.",
        recipe="distill.learning_rate",
        shown_default=_config_default(DistillConfig, "learning_rate"),
        cli=False,
    )
    batch_size: int | None = option(
        None,
        "Distillation batch size.",
        recipe="distill.batch_size",
        shown_default=_config_default(DistillConfig, "batch_size"),
        cli=False,
    )
    train_samples: int | None = option(
        None, "Training samples used at most (default: all).", recipe="distill.train_samples", cli=False
    )


@dataclass(frozen=True)
class Option:
    """One declared option, as the CLI and the recipe loader see it."""

    name: str
    default: Any
    help: str
    kind: str
    flags: tuple[str, ...]
    recipe_keys: tuple[str, ...]
    choices: tuple[str, ...] | None
    path: bool
    click_type: Any
    multiple: bool
    shown_default: Any
    cli: bool

    def click_option(self) -> Callable[[Callable], Callable]:
        help_text = self.help
        if self.shown_default is not None:
            help_text += f"  [default: {self.shown_default}]"
        is_bool_pair = any("/" in flag for flag in self.flags)
        kwargs: dict[str, Any] = {"help": help_text, "default": () if self.multiple else self.default}
        if self.kind == "bool" and not is_bool_pair:
            kwargs["is_flag"] = True
        elif self.choices is not None:
            kwargs["type"] = click.Choice(list(self.choices))
        elif self.click_type is not None:
            kwargs["type"] = self.click_type
        elif self.kind in ("int", "float"):
            kwargs["type"] = int if self.kind == "int" else float
        if self.multiple:
            kwargs["multiple"] = True
        if self.default not in (None, False) and not self.multiple:
            kwargs["show_default"] = True
        return click.option(*self.flags, self.name, **kwargs)

    def recipe_problem(self, value: Any) -> str | None:
        """What a recipe value should be, when it is something else."""
        is_int = isinstance(value, int) and not isinstance(value, bool)
        if self.kind == "bool":
            ok, wanted = isinstance(value, bool), "true or false"
        elif self.kind == "float":
            ok, wanted = is_int or isinstance(value, float), "a number"
        elif self.kind == "int":
            ok, wanted = is_int, "a whole number"
        elif self.kind == "budget":
            ok, wanted = is_int or isinstance(value, (float, str)), "a number (0.01) or a percent string ('1%')"
        elif self.kind == "shapes":
            ints = isinstance(value, list) and all(isinstance(d, int) and not isinstance(d, bool) for d in value)
            strings = isinstance(value, list) and all(isinstance(d, str) for d in value)
            table = isinstance(value, dict) and all(isinstance(v, (list, str)) for v in value.values())
            ok = ints or strings or table or isinstance(value, str)
            wanted = "a list of integers, 'NAME=DIMS' strings, or a table of name = [dims]"
        elif self.kind == "names":
            ok = isinstance(value, str) or (isinstance(value, list) and all(isinstance(n, str) for n in value))
            wanted = "a string or a list of strings"
        elif self.kind == "table":
            ok, wanted = isinstance(value, (str, dict)), "a string or a table"
        else:
            ok, wanted = isinstance(value, str), "a string"
        if ok and self.choices is not None and value not in self.choices:
            ok, wanted = False, f"one of {', '.join(self.choices)}"
        return None if ok else wanted


_SIMPLE_KINDS = {"bool": "bool", "int": "int", "float": "float", "str": "str", "Path": "str", "bytes": "str"}


def _kind(f: dataclasses.Field) -> str:
    declared = f.metadata["option"]["kind"]
    if declared:
        return declared
    # Annotations are strings under ``from __future__ import annotations``, classes otherwise.
    annotation = (f.type if isinstance(f.type, str) else getattr(f.type, "__name__", str(f.type))).replace(
        " | None", ""
    )
    if annotation not in _SIMPLE_KINDS:
        raise TypeError(f"option '{f.name}' of type {f.type} needs an explicit kind ({', '.join(KINDS)})")
    return _SIMPLE_KINDS[annotation]


def declared_options(*classes: type) -> Iterator[Option]:
    """The options declared on ``classes`` (default: :class:`PackOptions` then :class:`TorchPassOptions`)."""
    for cls in classes or (PackOptions, TorchPassOptions):
        for f in dataclasses.fields(cls):
            meta = f.metadata.get("option")
            if meta is None:
                continue
            recipe = meta["recipe"]
            keys = (() if recipe is None else (recipe or f.name,)) + tuple(meta["aliases"])
            default = f.default if f.default is not dataclasses.MISSING else None
            yield Option(
                name=f.name,
                default=default,
                help=meta["help"],
                kind=_kind(f),
                flags=meta["flags"] or ("--" + f.name.replace("_", "-"),),
                recipe_keys=keys,
                choices=meta["choices"],
                path=meta["path"],
                click_type=meta["click_type"],
                multiple=meta["multiple"],
                shown_default=meta["shown_default"],
                cli=meta["cli"],
            )


OPTIONS: dict[str, Option] = {o.name: o for o in declared_options()}


def check_choices(options: Any) -> None:
    """Exit 2 for a value outside an option's choices (Python callers and recipes bypass click's check)."""
    from edgebuild.errors import UsageError

    for opt in OPTIONS.values():
        value = getattr(options, opt.name, None)
        if opt.choices is not None and value is not None and value not in opt.choices:
            raise UsageError(f"{opt.flags[0]} '{value}' is unknown; use one of {', '.join(opt.choices)}")


def click_options(command: Callable) -> Callable:
    """Decorate a click command with every declared option (in declaration order in ``--help``)."""
    for opt in reversed([o for o in OPTIONS.values() if o.cli]):
        command = opt.click_option()(command)
    return command
