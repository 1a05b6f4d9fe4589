"""One small adapter for calibration, validation and training data.

``DATA`` is a folder of images (one sub-folder per class), an ``.npz`` (``x`` and optional
``y``, or one array per input name), ``package.module:callable`` returning an iterable of
``x``, ``(x, y)`` or ``{input_name: x, ..., "y": labels}``, or ``random`` (calibration only,
recorded as "accuracy not validated"). Every form becomes batches of named numpy arrays.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edgebuild.errors import UsageError
from edgebuild.sources import InputSpec, import_callable

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"}
LABEL_KEYS = ("y", "label", "labels")


@dataclass
class Batch:
    inputs: dict[str, np.ndarray]
    labels: np.ndarray | None = None

    def __len__(self) -> int:
        return len(next(iter(self.inputs.values())))


@dataclass
class DataSource:
    """Re-iterable batches of named inputs (and labels when the data has them)."""

    description: str
    make_batches: Callable[[], Iterable[Batch]]
    is_random: bool = False
    limit: int | None = None

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
                )
            seen += len(batch)
            yield batch

    def collect(self) -> Batch:
        """All samples as one batch (validation sets are small by design)."""
        parts = list(self.batches())
        if not parts:
            raise UsageError(f"data '{self.description}' yielded no samples")
        inputs = {k: np.concatenate([p.inputs[k] for p in parts]) for k in parts[0].inputs}
        has_labels = all(p.labels is not None for p in parts)
        labels = np.concatenate([p.labels for p in parts]) if has_labels else None
        return Batch(inputs, labels)


def _to_numpy(value) -> np.ndarray:
    if hasattr(value, "detach"):
        value = value.detach().cpu().numpy()
    return np.asarray(value)


def _conform(name: str, array, spec: InputSpec, source: str) -> np.ndarray:
    """Cast to the input's dtype and add a batch dim to single samples; explain mismatches."""
    array = _to_numpy(array)
    if array.ndim == len(spec.shape) - 1:
        array = array[None]
    if array.ndim != len(spec.shape):
        raise UsageError(
            f"data '{source}': input '{name}' has shape {list(array.shape)}, expected a batch like {list(spec.shape)}"
        )
    if array.shape[1:] != tuple(spec.shape[1:]) and len(spec.shape) > 1:
        # Only the batch dim is fixed by the model here; sequence dims of text models may vary.
        if spec.dtype.startswith("float"):
            raise UsageError(
                f"data '{source}': input '{name}' samples have shape {list(array.shape[1:])}, "
                f"the model expects {list(spec.shape[1:])}"
            )
    return array.astype(spec.dtype, copy=False)


def _labels(value) -> np.ndarray | None:
    return None if value is None else _to_numpy(value).astype(np.int64).reshape(-1)


def _batch_from_item(item, specs: list[InputSpec], source: str) -> Batch:
    names = [s.name for s in specs]
    by_name = {s.name: s for s in specs}
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
    inputs = {n: _conform(n, a, by_name[n], source) for n, a in arrays.items()}
    return Batch(inputs, _labels(labels))


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
    whole = _batch_from_item({**arrays, **({"y": labels} if labels is not None else {})}, specs, str(path))

    def batches():
        for i in range(0, len(whole), batch_size):
            yield Batch(
                {k: v[i : i + batch_size] for k, v in whole.inputs.items()},
                None if whole.labels is None else whole.labels[i : i + batch_size],
            )

    return batches


def _image_folder_source(root: Path, specs: list[InputSpec], batch_size: int) -> Callable[[], Iterable[Batch]]:
    from PIL import Image

    if len(specs) != 1 or len(specs[0].shape) != 4:
        raise UsageError(f"data '{root}': an image folder feeds a single NCHW image input")
    _, channels, height, width = specs[0].shape
    classes = sorted(p.name for p in root.iterdir() if p.is_dir())
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
    mode = "L" if channels == 1 else "RGB"

    def load(path: Path) -> np.ndarray:
        image = Image.open(path).convert(mode).resize((width, height), Image.BILINEAR)
        array = np.asarray(image, dtype=np.float32) / 255.0
        return array[None] if channels == 1 else array.transpose(2, 0, 1)

    def batches():
        for i in range(0, len(files), batch_size):
            chunk = files[i : i + batch_size]
            x = np.stack([load(f) for f, _ in chunk]).astype(specs[0].dtype)
            yield Batch({specs[0].name: x}, np.array([label for _, label in chunk], dtype=np.int64))

    return batches


def _random_source(specs: list[InputSpec], samples: int, seed: int) -> Callable[[], Iterable[Batch]]:
    def batches():
        rng = np.random.default_rng(seed)
        for _ in range(samples):
            feed = {}
            for s in specs:
                if s.dtype.startswith("float"):
                    feed[s.name] = rng.random((1, *s.shape[1:]), dtype=np.float32).astype(s.dtype)
                else:
                    # 0 and 1 are valid for every vocabulary, mask and flag; larger ids crash embeddings.
                    feed[s.name] = rng.integers(0, 2, (1, *s.shape[1:])).astype(s.dtype)
            yield Batch(feed)

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
) -> DataSource:
    """Open any ``DATA`` form for ``purpose`` (calibration, validation, training)."""
    if spec == "random":
        if not allow_random:
            raise UsageError(f"'random' data is allowed for calibration only, not for {purpose}; give real data")
        return DataSource("random", _random_source(inputs, limit or 32, seed), is_random=True, limit=limit)
    path = Path(spec)
    if spec.endswith(".npz"):
        if not path.is_file():
            raise UsageError(f"{purpose} data file '{spec}' does not exist")
        return DataSource(spec, _npz_source(path, inputs, batch_size), limit=limit)
    if path.is_dir():
        return DataSource(spec, _image_folder_source(path, inputs, batch_size), limit=limit)
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
    """

    def __init__(self, source: DataSource, batch_size: int | None = None):
        self._source = source
        self._batch_size = batch_size
        self._iter: Iterator[dict[str, np.ndarray]] | None = None

    def get_next(self) -> dict[str, np.ndarray] | None:
        if self._iter is None:
            batches = self._source.batches()
            self._iter = (
                fixed_size_feeds(batches, self._batch_size) if self._batch_size else (b.inputs for b in batches)
            )
        return next(self._iter, None)

    def rewind(self) -> None:
        self._iter = None
