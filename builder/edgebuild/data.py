"""One small adapter for calibration, validation and training data.

``DATA`` is a folder of images (one sub-folder per class), an ``.npz`` (``x`` and optional
``y``, or one array per input name), ``package.module:callable`` returning an iterable of
``x``, ``(x, y)`` or ``{input_name: x, ..., "y": labels}``, or ``random`` (calibration only,
recorded as "accuracy not validated"). Every form becomes batches of named numpy arrays.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from edgebuild.errors import UsageError
from edgebuild.sources import InputSpec, import_callable
from edgerun.errors import EdgerunError
from edgerun.preprocess import PreprocessSpec, parse_spec, preprocess_image, preset_values

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"}
LABEL_KEYS = ("y", "label", "labels")


@dataclass
class Batch:
    """Named input arrays whose first axis counts samples.

    ``calls`` is False for rows stacked along the model's batch axis, True for one model call per
    entry (each entry is that call's full tensor: models whose inputs cannot be stacked along a
    common first axis, e.g. a recurrent ``state [2, N, 128]`` or a scalar).
    """

    inputs: dict[str, np.ndarray]
    labels: np.ndarray | None = None
    calls: bool = False
    # Detection data: each sample's ground-truth boxes in model-input pixels (edgebuild.tasks.coco.BoxLabels).
    targets: list | None = None

    def __len__(self) -> int:
        return len(next(iter(self.inputs.values())))


@dataclass
class DataSource:
    """Re-iterable batches of named inputs (and labels when the data has them)."""

    description: str
    make_batches: Callable[[], Iterable[Batch]]
    is_random: bool = False
    limit: int | None = None
    # Class names of an image folder (sorted, as torchvision's ImageFolder numbers them).
    classes: list[str] | None = None
    # The preprocessing that turned images into tensors, when the data is an image folder.
    preprocess: PreprocessSpec | None = None
    # Warnings about the data itself (images /v1/predict would refuse), shown once by pack.
    notes: list[str] = field(default_factory=list)
    # Detection data (YOLO-format folder, COCO json, flat image folder): see edgebuild.detection_data.
    detection: bool = False

    def batches(self) -> Iterator[Batch]:
        seen = 0
        for batch in self.make_batches():
            if self.limit is not None and seen >= self.limit:
                return
            if self.limit is not None and seen + len(batch) > self.limit:
                keep = self.limit - seen
                batch = Batch(
                    {k: v[:keep] for k, v in batch.inputs.items()},
                    None if batch.labels is None else batch.labels[:keep],
                    batch.calls,
                    None if batch.targets is None else batch.targets[:keep],
                )
            seen += len(batch)
            yield batch

    def collect(self) -> Batch:
        """All samples as one batch (validation sets are small by design)."""
        parts = list(self.batches())
        if not parts:
            raise UsageError(f"data '{self.description}' yielded no samples")
        try:
            inputs = {k: np.concatenate([p.inputs[k] for p in parts]) for k in parts[0].inputs}
        except ValueError as exc:
            raise UsageError(f"data '{self.description}': samples differ in shape ({exc})") from None
        has_labels = all(p.labels is not None for p in parts)
        labels = np.concatenate([p.labels for p in parts]) if has_labels else None
        has_targets = all(p.targets is not None for p in parts)
        targets = [t for p in parts for t in (p.targets or [])] if has_targets else None
        return Batch(inputs, labels, parts[0].calls, targets)


def _to_numpy(value) -> np.ndarray:
    if hasattr(value, "detach"):
        value = value.detach().cpu().numpy()
    return np.asarray(value)


def stackable(specs: list[InputSpec]) -> bool:
    """Samples of these inputs stack along one first axis: every input has a batch axis first
    (dynamic everywhere, or the same fixed size everywhere, as a model that pins its batch)."""
    if any(not s.known for s in specs):
        return True  # a torch module: its inputs are exported with a dynamic batch axis
    if any(not s.shape for s in specs):
        return False
    if all(0 in s.dynamic_axes for s in specs):
        return True
    return not any(0 in s.dynamic_axes for s in specs) and len({s.shape[0] for s in specs}) == 1


def _check_fixed_dims(name: str, sample_shape: tuple[int, ...], spec: InputSpec, source: str, skip_first: bool) -> None:
    for axis, want in enumerate(spec.shape):
        if (skip_first and axis == 0) or axis in spec.dynamic_axes or want <= 0:
            continue
        if sample_shape[axis] != want:
            got = list(sample_shape[1:] if skip_first else sample_shape)
            expected = list(spec.shape[1:] if skip_first else spec.shape)
            raise UsageError(
                f"data '{source}': input '{name}' samples have shape {got}, the model expects {expected} "
                f"(dimension {axis} must be {want})"
            )


def _conform(name: str, value, spec: InputSpec, source: str, one_call: bool) -> tuple[np.ndarray, bool]:
    """Cast to the input's dtype; return the array with its first axis counting samples, and
    whether those samples are whole calls (True) or rows of the batch axis (False).

    A rank-(r+1) array is calls of the rank-r input; rank r is rows (or, for ``one_call`` items, a
    single call); rank r-1 is a single row.
    """
    array = _to_numpy(value)
    if not spec.known:  # only the name is known: an .npz counts calls on its first axis, an item is one call
        return (array, True) if not one_call else (array[None], True)
    rank = len(spec.shape)
    if array.ndim == rank + 1:
        calls = True
    elif array.ndim == rank and rank > 0:
        calls = False
    elif array.ndim == rank - 1 or (one_call and array.ndim == rank):
        array, calls = array[None], rank == 0
    else:
        raise UsageError(
            f"data '{source}': input '{name}' has shape {list(array.shape)}; expected a batch like "
            f"{list(spec.shape)} or one entry per call, [calls, {', '.join(map(str, spec.shape))}]"
        )
    _check_fixed_dims(name, array.shape[1:] if calls else array.shape, spec, source, skip_first=not calls)
    return array.astype(spec.dtype or array.dtype, copy=False), calls


def _labels(value) -> np.ndarray | None:
    return None if value is None else _to_numpy(value).astype(np.int64).reshape(-1)


def _assemble(arrays: Mapping[str, Any], labels, specs: list[InputSpec], source: str, one_call: bool) -> Batch:
    """Named arrays -> one :class:`Batch`, as rows when the model's inputs stack, else as calls."""
    by_name = {s.name: s for s in specs}
    conformed = {n: _conform(n, a, by_name[n], source, one_call) for n, a in arrays.items()}
    if stackable(specs):
        # Calls of batch-first tensors are rows: [calls, b, ...] -> [calls * b, ...].
        inputs = {n: a.reshape(-1, *a.shape[2:]) if calls else a for n, (a, calls) in conformed.items()}
        as_calls = False
    else:
        rows = [n for n, (_, calls) in conformed.items() if not calls]
        if rows and not one_call:
            name = rows[0]
            raise UsageError(
                f"data '{source}': the model's inputs do not share a batch axis, so each entry is one call: input "
                f"'{name}' needs shape [calls, {', '.join(map(str, by_name[name].shape))}], got "
                f"{list(conformed[name][0].shape)}"
            )
        inputs = {n: a if calls else a[None] for n, (a, calls) in conformed.items()}
        as_calls = True
    counts = {n: len(a) for n, a in inputs.items()}
    if len(set(counts.values())) > 1:
        raise UsageError(f"data '{source}': inputs hold different numbers of samples {counts}")
    targets = _box_targets(labels, len(next(iter(inputs.values()))), source)
    if targets is not None:
        return Batch(inputs, None, as_calls, targets)
    return Batch(inputs, _labels(labels), as_calls)


def _box_targets(labels, samples: int, source: str) -> list | None:
    """Detection labels from a callable: one ``[K, 5]`` array per sample (class, x1, y1, x2, y2 in
    model-input pixels; K may be 0), else ``None`` (the labels are class indices)."""
    if not isinstance(labels, (list, tuple)) or not labels:
        return None
    arrays = [_to_numpy(t) for t in labels]
    if not all(a.ndim == 2 and a.shape[1] == 5 for a in arrays):
        return None
    if len(arrays) != samples:
        raise UsageError(
            f"data '{source}': {len(arrays)} box label arrays for {samples} samples (one [K, 5] per sample)"
        )
    from edgebuild.tasks.coco import BoxLabels

    return [BoxLabels(a[:, 1:5].astype(np.float32), a[:, 0].astype(np.int64)) for a in arrays]


def _batch_from_item(item, specs: list[InputSpec], source: str, one_call: bool = True) -> Batch:
    names = [s.name for s in specs]
    labels = None
    if isinstance(item, dict):
        labels = next((item[k] for k in LABEL_KEYS if k in item), None)
        missing = [n for n in names if n not in item]
        if missing:
            raise UsageError(f"data '{source}': item lacks input(s) {missing}; it has keys {sorted(item)}")
        arrays = {n: item[n] for n in names}
    elif isinstance(item, (tuple, list)) and len(item) == 2 and len(specs) == 1:
        arrays, labels = {names[0]: item[0]}, item[1]
    elif isinstance(item, (tuple, list)) and len(specs) > 1:
        if len(item) not in (len(specs), len(specs) + 1):
            raise UsageError(f"data '{source}': items have {len(item)} parts, the model takes {len(specs)} inputs")
        arrays = dict(zip(names, item))
        labels = item[len(specs)] if len(item) > len(specs) else None
    else:
        arrays = {names[0]: item}
    return _assemble(arrays, labels, specs, source, one_call)


def _npz_source(path: Path, specs: list[InputSpec], batch_size: int) -> Callable[[], Iterable[Batch]]:
    try:
        data = dict(np.load(path, allow_pickle=False))
    except Exception as exc:  # noqa: BLE001
        raise UsageError(f"data '{path}' is not a readable .npz file ({exc})") from None
    names = [s.name for s in specs]
    if all(n in data for n in names):
        arrays = {n: data[n] for n in names}
    elif "x" in data and len(specs) == 1:
        arrays = {names[0]: data["x"]}
    else:
        raise UsageError(f"data '{path}' needs an array 'x' or arrays named {names}; it has {sorted(data)}")
    labels = next((data[k] for k in LABEL_KEYS if k in data), None)
    whole = _assemble(arrays, labels, specs, str(path), one_call=False)

    def batches():
        for i in range(0, len(whole), batch_size):
            yield Batch(
                {k: v[i : i + batch_size] for k, v in whole.inputs.items()},
                None if whole.labels is None else whole.labels[i : i + batch_size],
                whole.calls,
            )

    return batches


def image_folder_classes(root: Path) -> list[str]:
    """Class names of an image folder: its sub-folders, sorted (torchvision's ImageFolder numbering)."""
    return sorted(p.name for p in Path(root).iterdir() if p.is_dir())


def default_preprocess(spec: InputSpec) -> PreprocessSpec:
    """What an image folder uses when nothing is declared: RGB (or grey for one channel), resize, /255."""
    color = "L" if len(spec.shape) == 4 and spec.shape[1] == 1 else "RGB"
    return parse_spec({**(preset_values("unit") or {}), "color": color})


def serve_refusals(source: str, files: list[Path], preprocess: PreprocessSpec) -> str | None:
    """One warning when /v1/predict would refuse some of these images, else None.

    The check is the server's own (``edgerun.routes.predict.check_image``: the pixel budget, and an
    aspect ratio more than 4x off the model's under ``stretch``), so pack and serve agree on which
    images a bundle takes. Pack still uses them (stretched) and says what to declare to serve them.
    """
    from edgerun.routes.predict import check_image, image_size

    manifest = preprocess.to_manifest()
    refused: list[tuple[Path, str]] = []
    for path in files:
        try:
            width, height = image_size(path.read_bytes())
            check_image(width, height, manifest, "\0")
        except EdgerunError as exc:
            refused.append((path, str(exc).replace("model '\0' ", "the model ")))
    if not refused:
        return None
    first, why = refused[0]
    return (
        f"{len(refused)} of {len(files)} images in '{source}' would be refused by /v1/predict with this "
        f"preprocessing (e.g. '{first}': {why}); pack uses them as given. To serve such images declare "
        'resize = "letterbox" or "center-crop" (--preprocess FILE.toml or a [preprocess] recipe table), '
        "or crop them closer to the model's aspect ratio"
    )


def _image_folder_source(
    root: Path, specs: list[InputSpec], batch_size: int, preprocess: PreprocessSpec
) -> tuple[Callable[[], Iterable[Batch]], list[Path]]:
    classes = image_folder_classes(root)
    if not classes:
        raise UsageError(f"data '{root}' has no class sub-folders (expected one sub-folder of images per class)")
    files = [
        (f, i)
        for i, c in enumerate(classes)
        for f in sorted((root / c).iterdir())
        if f.suffix.lower() in IMAGE_SUFFIXES
    ]
    if not files:
        raise UsageError(f"data '{root}': no images ({', '.join(sorted(IMAGE_SUFFIXES))}) in its class folders")

    def load(path: Path) -> np.ndarray:
        # The runtime's own preprocessing: the device makes the same tensor from the same image.
        try:
            return preprocess_image(path.read_bytes(), preprocess)
        except EdgerunError as exc:
            raise UsageError(f"data '{root}': image '{path}': {exc}") from None

    def batches():
        for i in range(0, len(files), batch_size):
            chunk = files[i : i + batch_size]
            x = np.concatenate([load(f) for f, _ in chunk]).astype(specs[0].dtype, copy=False)
            yield Batch({specs[0].name: x}, np.array([label for _, label in chunk], dtype=np.int64))

    return batches, [f for f, _ in files]


def _random_source(specs: list[InputSpec], samples: int, seed: int) -> Callable[[], Iterable[Batch]]:
    # One row per sample; or, when the inputs share no batch axis, one whole call per sample.
    calls = not stackable(specs)

    def batches():
        rng = np.random.default_rng(seed)
        for _ in range(samples):
            feed = {}
            for s in specs:
                shape = (1, *s.shape) if calls else (1, *s.shape[1:])
                if s.dtype.startswith("float"):
                    feed[s.name] = rng.random(shape, dtype=np.float32).astype(s.dtype)
                else:
                    # 0 and 1 are valid for every vocabulary, mask and flag; larger ids crash embeddings.
                    feed[s.name] = rng.integers(0, 2, shape).astype(s.dtype)
            yield Batch(feed, calls=calls)

    return batches


def open_data(
    spec: str,
    inputs: list[InputSpec],
    *,
    purpose: str,
    allow_random: bool = False,
    limit: int | None = None,
    batch_size: int = 32,
    seed: int = 0,
    preprocess: PreprocessSpec | None = None,
    task: str | None = None,
) -> DataSource:
    """Open any ``DATA`` form for ``purpose`` (calibration, validation, training).

    An image folder becomes tensors through ``preprocess`` (default: RGB, resize, /255), the
    runtime's own implementation. For ``task="detection"`` a YOLO-format folder, a COCO json or a
    flat image folder is detection data (``edgebuild.detection_data``).
    """
    if spec == "random":
        if not allow_random:
            raise UsageError(f"'random' data is allowed for calibration only, not for {purpose}; give real data")
        return DataSource("random", _random_source(inputs, limit or 32, seed), is_random=True, limit=limit)
    path = Path(spec)
    detection = _detection_data(spec, inputs, purpose, batch_size, preprocess, limit, task)
    if detection is not None:
        return detection
    if spec.endswith(".npz"):
        if not path.is_file():
            raise UsageError(f"{purpose} data file '{spec}' does not exist")
        return DataSource(spec, _npz_source(path, inputs, batch_size), limit=limit)
    if path.is_dir():
        if len(inputs) != 1 or len(inputs[0].shape) != 4:
            raise UsageError(
                f"{purpose} data '{spec}': an image folder feeds a single [N, C, H, W] or [N, H, W, C] image input; "
                f"the model takes {[(s.name, list(s.shape)) for s in inputs]}"
            )
        try:
            image = (preprocess or default_preprocess(inputs[0])).for_input(inputs[0].shape, inputs[0].name)
        except ValueError as exc:
            raise UsageError(f"{purpose} data '{spec}': the preprocessing does not fit the model: {exc}") from None
        make, files = _image_folder_source(path, inputs, batch_size, image)
        notes = [note] if (note := serve_refusals(spec, files[:limit] if limit else files, image)) else []
        return DataSource(spec, make, limit=limit, classes=image_folder_classes(path), preprocess=image, notes=notes)
    if ":" not in spec:
        raise UsageError(
            f"{purpose} data '{spec}' does not exist (expected an image folder, a .npz, 'module:callable' or 'random')"
        )
    factory = import_callable(spec, what=f"{purpose} data")

    def batches():
        try:
            items = factory()
        except Exception as exc:  # noqa: BLE001 - user code
            raise UsageError(f"{purpose} data '{spec}' failed: {type(exc).__name__}: {exc}") from None
        for item in items:
            yield _batch_from_item(item, inputs, spec)

    return DataSource(spec, batches, limit=limit)


def _image_spec(inputs: list[InputSpec], spec: str, purpose: str, preprocess: PreprocessSpec | None) -> PreprocessSpec:
    if len(inputs) != 1 or len(inputs[0].shape) != 4:
        raise UsageError(
            f"{purpose} data '{spec}': an image folder feeds a single [N, C, H, W] or [N, H, W, C] image input; "
            f"the model takes {[(s.name, list(s.shape)) for s in inputs]}"
        )
    try:
        return (preprocess or default_preprocess(inputs[0])).for_input(inputs[0].shape, inputs[0].name)
    except ValueError as exc:
        raise UsageError(f"{purpose} data '{spec}': the preprocessing does not fit the model: {exc}") from None


def _detection_data(
    spec: str,
    inputs: list[InputSpec],
    purpose: str,
    batch_size: int,
    preprocess: PreprocessSpec | None,
    limit: int | None,
    task: str | None,
) -> DataSource | None:
    """A detection DATA form, or ``None`` for every other form; detection data for another task is exit 2."""
    from edgebuild import detection_data as dd

    path = Path(spec)
    kind = (
        "a COCO json"
        if dd.is_coco_json(spec)
        else "a YOLO-format dataset (images/ + labels/)"
        if path.is_dir() and dd.is_yolo_dataset(path)
        else "a flat image folder"
        if path.is_dir() and task == "detection" and dd.is_flat_image_folder(path)
        else None
    )
    if kind is None:
        return None
    if task != "detection":
        raise UsageError(f"{purpose} data '{spec}' is {kind}, detection data; pack a detector with --task detect")
    image = _image_spec(inputs, spec, purpose, preprocess)
    name, dtype = inputs[0].name, inputs[0].dtype or "float32"
    classes = None
    if dd.is_coco_json(spec):
        make, classes = dd.coco_source(spec, name, dtype, batch_size, image)
    elif dd.is_yolo_dataset(path):
        make = dd.yolo_source(path, name, dtype, batch_size, image)
    else:
        make = dd.flat_source(path, name, dtype, batch_size, image)
    return DataSource(spec, make, limit=limit, classes=classes, preprocess=image, detection=True)


def resolve_inputs(inputs: list[InputSpec], spec: str, purpose: str, module: Any = None) -> list[InputSpec]:
    """Fill in what the model does not say about its inputs (dynamic sizes, dtypes, rank) from the
    first sample of ``spec``; the data's own names pick forward()'s optional parameters."""
    return infer_inputs(inputs, spec, purpose, module)[0]


def infer_inputs(inputs: list[InputSpec], spec: str, purpose: str, module: Any = None) -> tuple[list[InputSpec], str]:
    """:func:`resolve_inputs`, plus one line saying what one model call gets and how the data was read.

    ``module`` (a torch model whose inputs only have names) decides how an ``.npz`` is read: see
    :func:`edgebuild.data_layout.npz_layout`.
    """
    if spec.endswith(".npz") and Path(spec).is_file() and any(not s.known for s in inputs):
        with np.load(spec, allow_pickle=False) as data:
            present = set(data.files)
            inputs = _named_subset(inputs, present, spec)
            if all(not s.known for s in inputs):
                from edgebuild.data_layout import npz_layout

                arrays = {s.name: data[s.name] if s.name in present else data["x"] for s in inputs}
                return npz_layout(inputs, arrays, spec, module)
    elif ":" in spec and not Path(spec).exists() and any(not s.known for s in inputs):
        factory = import_callable(spec, what=f"{purpose} data")
        try:
            first = next(iter(factory()), None)
        except Exception as exc:  # noqa: BLE001 - user code
            raise UsageError(f"{purpose} data '{spec}' failed: {type(exc).__name__}: {exc}") from None
        if isinstance(first, dict):
            inputs = _named_subset(inputs, set(first), spec)
    first_batch = next(iter(open_data(spec, inputs, purpose=purpose, limit=1).batches()), None)
    if first_batch is None:
        raise UsageError(f"{purpose} data '{spec}' yielded no samples")
    resolved = []
    for s in inputs:
        array = first_batch.inputs[s.name]
        sample = array.shape[1:] if first_batch.calls else (1, *array.shape[1:])
        if s.known:
            shape = tuple(
                got if want <= 0 or axis in s.dynamic_axes else want
                for axis, (want, got) in enumerate(zip(s.shape, sample))
            )
            if first_batch.calls is False and 0 in s.dynamic_axes and s.shape:
                shape = (s.shape[0] if s.shape[0] > 0 else 1, *shape[1:])
            resolved.append(replace(s, shape=shape))
        else:
            resolved.append(InputSpec(s.name, tuple(int(d) for d in sample), array.dtype.name))
    how = "one call per entry" if first_batch.calls else "rows of the batch axis"
    return resolved, f"{describe_inputs(resolved)} per call ({how})"


def describe_inputs(inputs: list[InputSpec]) -> str:
    """``input_ids [1, 32] int64, attention_mask [1, 32] int64``: what one model call gets."""
    return ", ".join(f"{s.name} {list(s.shape)} {s.dtype}" for s in inputs)


def _named_subset(inputs: list[InputSpec], present: set[str], spec: str) -> list[InputSpec]:
    """forward()'s parameters that the data names, in forward() order (optional ones may be left out)."""
    chosen = [s for s in inputs if s.name in present]
    if not chosen and len(inputs) == 1 and "x" in present:
        return inputs
    if not chosen:
        raise UsageError(
            f"data '{spec}' names none of the model's inputs {[s.name for s in inputs]}; it has {sorted(present)}"
        )
    if [s.name for s in inputs[: len(chosen)]] != [s.name for s in chosen]:
        raise UsageError(
            f"data '{spec}' gives inputs {[s.name for s in chosen]}, but they are not forward()'s first parameters "
            f"{[s.name for s in inputs[: len(chosen)]]}; give the model 'example_inputs' or 'input_names'"
        )
    return chosen


def call_feeds(inputs: Mapping[str, np.ndarray]) -> Iterator[dict[str, np.ndarray]]:
    """One feed per call of per-call data (:attr:`Batch.calls`)."""
    for i in range(len(next(iter(inputs.values())))):
        yield {k: np.asarray(v[i]) for k, v in inputs.items()}


def is_per_call(inputs: Mapping[str, np.ndarray], ranks: Mapping[str, int]) -> bool:
    """True when every array has one more axis than its model input: the first counts calls."""
    return bool(inputs) and all(k in ranks and np.ndim(v) == ranks[k] + 1 for k, v in inputs.items())


def run_calls(run: Callable[[dict[str, np.ndarray]], list[Any]], inputs: Mapping[str, np.ndarray]) -> list[np.ndarray]:
    """Run per-call data one call at a time; each output gets a first axis counting calls."""
    outputs = [run(feed) for feed in call_feeds(inputs)]
    try:
        return [np.stack([np.asarray(out[i]) for out in outputs]) for i in range(len(outputs[0]))]
    except ValueError as exc:
        raise UsageError(
            f"the model's outputs change shape from call to call ({exc}); give calls of one shape"
        ) from None


def first_feed(batch: Batch, rows: int) -> dict[str, np.ndarray]:
    """One model call's feed: the first call of per-call data, else ``rows`` rows (filled by repeating)."""
    if batch.calls:
        return next(call_feeds(batch.inputs))
    return fill_rows({k: v[:rows] for k, v in batch.inputs.items()}, rows)


def fill_rows(inputs: dict[str, np.ndarray], size: int) -> dict[str, np.ndarray]:
    """Pad every array to ``size`` rows by repeating its rows: a model that pins its batch size runs nothing smaller."""
    return {k: v[np.arange(size) % len(v)] for k, v in inputs.items()}


def fixed_size_feeds(batches: Iterable[Batch], size: int) -> Iterator[dict[str, np.ndarray]]:
    """The samples of ``batches`` regrouped into feeds of exactly ``size`` rows (the last one filled)."""
    pending: dict[str, np.ndarray] | None = None
    for batch in batches:
        pending = (
            batch.inputs if pending is None else {k: np.concatenate([pending[k], v]) for k, v in batch.inputs.items()}
        )
        while len(Batch(pending)) >= size:
            yield {k: v[:size] for k, v in pending.items()}
            pending = {k: v[size:] for k, v in pending.items()}
    if pending is not None and len(Batch(pending)):
        yield fill_rows(pending, size)


class CalibrationReader:
    """ONNX Runtime ``CalibrationDataReader`` over a :class:`DataSource` (one batch per call).

    ``batch_size`` is set for models that pin their batch size: the calibrator feeds the data as is.
    :meth:`strided` makes it a reader for ORT's strided collection (``CalibStridedMinMax``): a few
    small feeds per collection call, so histogram calibrators never hold the whole set in memory.
    """

    def __init__(self, source: DataSource, batch_size: int | None = None):
        self._source = source
        self._batch_size = batch_size
        self._iter: Iterator[dict[str, np.ndarray]] | None = None
        self.per_call: int | None = None
        self._rows: int | None = None  # rows per feed when strided (the model's pinned batch, else 1)
        self._count: int | None = None
        self._end: int | None = None
        self._position = 0

    def strided(self, feeds_per_call: int) -> None:
        """Feed ``feeds_per_call`` small feeds per collection call (one row each, or the model's pinned batch)."""
        self.per_call = feeds_per_call
        self._rows = self._batch_size or 1
        # ORT needs the count up front (a whole number of strides): one pass over the data counts the feeds.
        self._count = sum(1 for _ in self._feeds())

    def __len__(self) -> int:
        # ORT requires a whole number of strides; the last stride simply ends early (never empty).
        assert self._count is not None and self.per_call is not None, "len() of a strided reader only"
        return -(-self._count // self.per_call) * self.per_call

    def set_range(self, start_index: int, end_index: int) -> None:
        if self._iter is None or start_index < self._position:
            self._iter, self._position = self._feeds(), 0
        while self._position < start_index:  # ORT asks for consecutive ranges: this skips nothing then
            next(self._iter, None)
            self._position += 1
        self._end = end_index

    def get_next(self) -> dict[str, np.ndarray] | None:
        if self._iter is None:
            self._iter = self._feeds()
        if self._end is not None and self._position >= self._end:
            return None
        self._position += 1
        return next(self._iter, None)

    def _feeds(self) -> Iterator[dict[str, np.ndarray]]:
        batches = self._source.batches()
        first = next(batches, None)
        if first is None:
            return
        if first.calls:  # each entry is one whole call, whatever batch the model pins
            for batch in itertools.chain((first,), batches):  # one call at a time, not all in memory
                yield from call_feeds(batch.inputs)
            return
        chained = itertools.chain((first,), batches)
        size = self._rows or self._batch_size
        if size:
            yield from fixed_size_feeds(chained, size)
        else:
            yield from (b.inputs for b in chained)
