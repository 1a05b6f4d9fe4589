"""The first stage of ``pack``: the model source, its declarations and its data, ready to run.

What the user declared (``--task``, ``--preprocess``, ``--postprocess``, ``--labels``, or
``PREPROCESS`` / ``POSTPROCESS`` / ``LABELS`` next to the factory, or the ONNX file's Ultralytics
metadata) is resolved here once, and the calibration and validation data are opened with it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edgebuild.bundle import check_bundle_name, check_destination
from edgebuild.data import Batch, DataSource, infer_inputs, open_data
from edgebuild.errors import UsageError
from edgebuild.options import PackOptions
from edgebuild.recipe import load_labels, load_postprocess, load_preprocess
from edgebuild.sources import ModelSource, load_model, require_shapes
from edgebuild.targets import TargetProfile
from edgebuild.tasks.infer import DETECTION_PREPROCESS, declared_task
from edgebuild.tasks.metadata import ModelMetadata, read_metadata
from edgerun.preprocess import PreprocessSpec

EXAMPLE = "edgebuild.examples.digits"


@dataclass
class Prepared:
    """A model source with everything declared about it, and its data opened."""

    source: ModelSource
    name: str
    dest: Path
    # What was declared next to the factory or on the command line: "preprocess", "postprocess".
    extras: dict
    metadata: ModelMetadata | None
    task_name: str | None  # None: the outputs decide (classification or tensor)
    preprocess: PreprocessSpec | None  # as recorded for /v1/predict
    labels: list[str] | None
    calibration: DataSource | None
    validation: DataSource
    val: Batch
    validated: bool


def prepare(options: PackOptions, target: TargetProfile, extras: dict, progress: Callable[[str], None]) -> Prepared:
    """Load the model, resolve its declarations, open its data (exit 2 for anything wrong, nothing written)."""
    real_data = [d for d in (options.calib_data, options.val_data) if d and d != "random"]
    source = load_model(
        options.model,
        weights=options.weights,
        input_shape=options.input_shape,
        input_names=options.input_names,
        shapes_from_data=bool(real_data),
    )
    if not source.resolved:
        purpose = "calibration" if real_data[0] == options.calib_data else "validation"
        source.inputs, layout = infer_inputs(source.inputs, real_data[0], purpose, source.module)
        require_shapes(source.inputs)
        progress(f"inputs from the data: {layout}")
    if source.kind == "pt2" and options.torch_passes:
        flags = "/".join(f"--{p.name}" for p in options.torch_passes)
        raise UsageError(
            f"{flags} needs a package.module:callable model: '{source.spec}' is a torch.export program, which "
            "cannot be pruned or trained; pass the factory that builds the model instead"
        )
    name = options.name or source.default_name
    check_bundle_name(name)
    dest = Path(options.output_dir) / f"{name}-{target.name}"
    check_destination(dest, options.force, options.archive)
    # PREPROCESS / POSTPROCESS / LABELS live next to the factory (the module named in MODEL).
    factory = source.factory_module
    for key, attr in (("preprocess", "PREPROCESS"), ("postprocess", "POSTPROCESS")):
        if extras.get(key) is None and getattr(factory, attr, None) is not None:
            extras[key] = getattr(factory, attr)
    if options.postprocess is not None:
        extras["postprocess"] = load_postprocess(options.postprocess)
    metadata = read_metadata(source.onnx_path) if source.kind == "onnx" and source.onnx_path else None
    task_name = declared_task(options.task, extras.get("postprocess"), metadata, progress)
    if task_name == "detection" and options.preprocess is None and extras.get("preprocess") is None:
        extras["preprocess"] = dict(DETECTION_PREPROCESS)  # Ultralytics' convention; recorded for /v1/predict
    preprocess = declared_preprocess(options, extras, source)
    labels = load_labels(options.labels) if options.labels else load_labels(getattr(factory, "LABELS", None), "LABELS")
    if labels is None and metadata is not None and metadata.names:
        labels = metadata.names
        progress(
            f"labels: {len(labels)} class names from the model's metadata ({', '.join(labels[:5])}{' ...' if len(labels) > 5 else ''})"
        )

    calibration = None
    if options.calib_data:
        calibration = open_data(
            options.calib_data,
            source.inputs,
            purpose="calibration",
            allow_random=True,
            limit=options.calib_samples,
            preprocess=preprocess,
            task=task_name,
        )
    val_spec = options.val_data or (
        options.calib_data if calibration is not None and not calibration.is_random else None
    )
    validated = val_spec is not None
    validation_source = (
        open_data(
            val_spec,
            source.inputs,
            purpose="validation",
            limit=options.val_samples,
            preprocess=preprocess,
            task=task_name,
        )
        if val_spec is not None
        else open_data("random", source.inputs, purpose="validation", allow_random=True, limit=64)
    )
    if not validated:
        progress(
            "WARNING: no validation data (--val-data): accuracy is NOT validated; outputs are only compared on random inputs"
        )
    if calibration is not None and calibration.is_random:
        progress("WARNING: calibrating on random data hides real accuracy loss; give --calib-data with real samples")
    serves_images = options.preprocess != "none"  # "--preprocess none": no /v1/predict to disagree with
    for note in dict.fromkeys(
        n for d in (calibration, validation_source) if d is not None and serves_images for n in d.notes
    ):
        progress(f"WARNING: {note}")
    val = validation_source.collect()
    preprocess = data_preprocess(preprocess, calibration, validation_source, options, progress)
    return Prepared(
        source=source,
        name=name,
        dest=dest,
        extras=extras,
        metadata=metadata,
        task_name=task_name,
        preprocess=preprocess,
        labels=labels,
        calibration=calibration,
        validation=validation_source,
        val=val,
        validated=validated,
    )


def apply_example_defaults(options: PackOptions) -> dict:
    """No MODEL: pack the embedded digits CNN with its real calibration and validation splits."""
    if options.model is not None:
        return {}
    from edgebuild.examples import digits

    options.model = f"{EXAMPLE}:pretrained"
    options.calib_data = options.calib_data or f"{EXAMPLE}:calibration_data"
    options.val_data = options.val_data or f"{EXAMPLE}:validation_data"
    options.name = options.name or "digits"
    options.labels = options.labels or digits.LABELS
    return {"preprocess": digits.PREPROCESS, "postprocess": digits.POSTPROCESS}


def declared_preprocess(options: PackOptions, extras: dict, source: ModelSource) -> PreprocessSpec | None:
    """``--preprocess`` / ``[preprocess]``, else ``PREPROCESS`` next to the factory, checked against the image input."""
    declared = options.preprocess if options.preprocess is not None else extras.get("preprocess")
    where = "--preprocess" if options.preprocess is not None else "PREPROCESS"
    spec = load_preprocess(declared, where)
    if spec is None:
        return None
    by_name = {s.name: s for s in source.inputs}
    image_input = by_name.get(spec.input) if spec.input else source.inputs[0]
    if image_input is None:
        raise UsageError(f"{where}: input '{spec.input}' is not one of the model's inputs {list(by_name)}")
    try:
        return spec.for_input(image_input.shape, image_input.name)
    except ValueError as exc:
        raise UsageError(f"{where} does not fit input '{image_input.name}': {exc}") from None


def data_preprocess(
    declared: PreprocessSpec | None,
    calibration: DataSource | None,
    validation: DataSource,
    options: PackOptions,
    progress: Callable[[str], None],
) -> PreprocessSpec | None:
    """What the manifest records: the declared preprocessing, or what an image folder was read with."""
    if declared is not None or options.preprocess is not None:
        used = declared  # "--preprocess none" keeps /v1/predict off even for image folders
        note = "declared"
    else:
        used = next((d.preprocess for d in (calibration, validation) if d is not None and d.preprocess), None)
        note = "image folder default, no --preprocess given"
    if used is not None:
        normalised = ", mean/std" if used.mean is not None or used.std is not None else ""
        progress(
            f"preprocess: {used.color}, {used.resize} to {list(used.size or [])}, x{used.scale:.6g}{normalised} "
            f"({note}; recorded for /v1/predict)"
        )
    return used


def check_labels(
    labels: list[str] | None,
    validation: DataSource,
    calibration: DataSource | None,
    ref: np.ndarray,
    progress: Callable[[str], None],
) -> list[str] | None:
    """Declared labels must match the model's output width; an image folder's class names are used
    when nothing is declared and their count is that width."""
    width = ref.shape[1] if ref.ndim == 2 else None
    if labels is not None:
        if width is not None and len(labels) != width:
            raise UsageError(f"{len(labels)} labels given but the model's output has {width} classes")
        return labels
    classes = next((d.classes for d in (validation, calibration) if d is not None and d.classes), None)
    if classes and width == len(classes):
        progress(f"labels: the image folder's classes {', '.join(classes[:5])}{' ...' if len(classes) > 5 else ''}")
        return classes
    if classes:
        progress(f"labels: not taken from the image folder ({len(classes)} classes, model outputs {width})")
    return None
