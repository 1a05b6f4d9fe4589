"""Pruning: unstructured magnitude pruning (torch.nn.utils.prune) or structured channel pruning (Torch-Pruning).

Unstructured pruning zeroes weights but keeps every tensor dense, so ONNX Runtime runs the same
dense kernels: latency does not change, only the compressed (gzip) size does. Channel pruning
physically removes channels through Torch-Pruning's dependency graph (residual additions,
depthwise convolutions and BatchNorms stay consistent) and so does cut MACs and latency.

The pass works on a deep copy: the user's module is never modified. Accuracy is then checked by
the usual validation gate against the original model; a fine-tuning/distillation pass can
follow when training data is given.
"""

from __future__ import annotations

import copy
import gzip
import io
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from typing import TYPE_CHECKING

import numpy as np

from edgebuild.errors import UsageError, first_line
from edgebuild.sources import ModelSource
from edgerun.manifest import PassRecord

if TYPE_CHECKING:
    from torch import nn

    from edgebuild.passes import PassContext

    WeightedLayer = nn.Conv1d | nn.Conv2d | nn.Conv3d | nn.Linear

METHODS = ("l1", "global", "channel")


@dataclass
class PruneConfig:
    """Pruning settings (descriptions double as CLI help)."""

    amount: float = 0.3
    "Fraction to remove, in (0, 1): of each layer's weights (l1), of all conv/linear weights (global) or of channels (channel)."
    method: str = "l1"
    "l1: per-layer L1 unstructured | global: global L1 unstructured | channel: structured, removes channels (Torch-Pruning)."
    ignored_layers: list[str] = field(default_factory=list)
    "Module names never pruned; channel pruning always keeps the layer that produces the output (the classifier)."
    round_to: int | None = None
    "Channel pruning: keep channel counts a multiple of this (SIMD-friendly widths, e.g. 8)."

    def check(self) -> None:
        if self.method not in METHODS:
            raise UsageError(f"--prune-method '{self.method}' is unknown; use one of {', '.join(METHODS)}")
        if not 0.0 < self.amount < 1.0:
            raise UsageError(
                f"--prune {self.amount} must be a fraction strictly between 0 and 1 (e.g. 0.3 removes 30%)"
            )
        if self.round_to is not None and self.round_to < 1:
            raise UsageError(f"round_to {self.round_to} must be a positive integer")


def _weighted_layers(module: nn.Module) -> list[tuple[str, WeightedLayer]]:
    from torch import nn

    return [
        (name, m) for name, m in module.named_modules() if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear))
    ]


def weight_sparsity(module: nn.Module) -> dict:
    """Fraction of exactly-zero weights over all conv/linear weights, and the parameter count."""
    zeros = total = 0
    for _, layer in _weighted_layers(module):
        w = layer.weight.detach()
        zeros += int((w == 0).sum())
        total += w.numel()
    return {
        "weight_sparsity": round(zeros / total, 4) if total else 0.0,
        "params": int(sum(p.numel() for p in module.parameters())),
    }


def gzip_size(module: nn.Module) -> int:
    """gzip size of the float32 weights: where unstructured sparsity pays off (downloads, storage)."""
    buffer = io.BytesIO()
    for tensor in module.state_dict().values():
        buffer.write(tensor.detach().cpu().numpy().astype(np.float32, copy=False).tobytes())
    return len(gzip.compress(buffer.getvalue(), compresslevel=6))


def _unstructured(module: nn.Module, config: PruneConfig) -> None:
    import torch.nn.utils.prune as prune

    layers = [(n, m) for n, m in _weighted_layers(module) if n not in config.ignored_layers]
    if not layers:
        raise UsageError("pruning found no Conv/Linear layers to prune")
    if config.method == "l1":
        for _, layer in layers:
            prune.l1_unstructured(layer, "weight", amount=config.amount)
    else:
        prune.global_unstructured(
            [(m, "weight") for _, m in layers], pruning_method=prune.L1Unstructured, amount=config.amount
        )
    for _, layer in layers:
        prune.remove(layer, "weight")  # make it permanent: plain weight tensors with zeros, no masks/hooks


def _output_layer(module: nn.Module, args: tuple) -> nn.Module | None:
    """The last Conv/Linear to run: it produces the outputs (classes), so its out-channels must stay."""
    import torch

    order = []
    handles = [m.register_forward_hook(lambda mod, _i, _o: order.append(mod)) for _, m in _weighted_layers(module)]
    try:
        with torch.no_grad():
            module(*args)
    finally:
        for h in handles:
            h.remove()
    return order[-1] if order else None


def _channel(module: nn.Module, source: ModelSource, config: PruneConfig) -> None:
    import torch
    import torch_pruning as tp

    args = tuple(torch.from_numpy(spec.example()) for spec in source.inputs)
    example = args[0] if len(args) == 1 else args
    named = dict(module.named_modules())
    ignored = [named[n] for n in config.ignored_layers if n in named]
    last = _output_layer(module, args)
    if last is not None and last not in ignored:
        ignored.append(last)
    try:
        pruner = tp.pruner.MetaPruner(
            module,
            example,
            importance=tp.importance.MagnitudeImportance(p=1),
            pruning_ratio=config.amount,
            ignored_layers=ignored,
            round_to=config.round_to,
            global_pruning=False,
        )
        pruner.step()
    except Exception as exc:  # noqa: BLE001 - tracing user models fails in many ways
        raise UsageError(
            f"channel pruning could not trace the model ({first_line(exc)}); use --prune-method l1 or global"
        ) from None


class PrunePass:
    """Torch-level pass: ``run(source, context, progress) -> (new ModelSource, PassRecord)``."""

    name = "prune"

    def __init__(self, config: PruneConfig):
        config.check()
        self.config = config

    def run(
        self,
        source: ModelSource,
        context: PassContext | None = None,
        progress: Callable[[str], None] = lambda message: None,
    ) -> tuple[ModelSource, PassRecord]:
        import torch

        from edgebuild.inspection import inspect_source

        module = copy.deepcopy(source.module)  # never touch the caller's module
        module.eval()
        before = {**weight_sparsity(module), "weights_gzip_bytes": gzip_size(module)}
        cost_before = inspect_source(source, measure_latency=False)
        if self.config.method == "channel":
            _channel(module, source, self.config)  # Torch-Pruning traces through autograd: no no_grad here
        else:
            with torch.no_grad():
                _unstructured(module, self.config)
        module.eval()
        pruned = replace(source, module=module)
        after = {**weight_sparsity(module), "weights_gzip_bytes": gzip_size(module)}
        cost_after = inspect_source(pruned, measure_latency=False)
        metrics = {
            "weight_sparsity": after["weight_sparsity"],
            "params_before": cost_before.params,
            "params_after": cost_after.params,
            "macs_before": cost_before.macs,
            "macs_after": cost_after.macs,
            "weights_gzip_bytes_before": before["weights_gzip_bytes"],
            "weights_gzip_bytes_after": after["weights_gzip_bytes"],
        }
        if self.config.method == "channel":
            metrics["note"] = "channels removed: MACs and params shrink; latency is measured after export"
        else:
            metrics["note"] = (
                "unstructured sparsity: tensors stay dense, so dense-kernel latency and the raw file size are "
                "unchanged; only the compressed (gzip) size shrinks"
            )
        progress(
            f"prune ({self.config.method}, {self.config.amount:.0%}): sparsity {metrics['weight_sparsity']:.1%}, "
            f"MACs {cost_before.macs:,} -> {cost_after.macs:,}, params {cost_before.params:,} -> {cost_after.params:,}"
        )
        return pruned, PassRecord(name=self.name, params=asdict(self.config), metrics=metrics)
