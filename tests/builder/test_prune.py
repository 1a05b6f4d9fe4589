"""Pruning pass: requested sparsity reached, channels physically removed, the user's module untouched, export still works."""

import numpy as np
import pytest
import torch
from torch import nn

from edgebuild.errors import UsageError
from edgebuild.export import export_onnx
from edgebuild.onnx_utils import make_session
from edgebuild.passes.prune import PruneConfig, PrunePass
from edgebuild.sources import InputSpec, ModelSource


class ResidualDepthwise(nn.Module):
    """Stem, a depthwise-separable residual block, a classifier: the shapes channel pruning must keep consistent."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.stem = nn.Conv2d(3, 16, 3, padding=1)
        self.bn = nn.BatchNorm2d(16)
        self.dw = nn.Conv2d(16, 16, 3, padding=1, groups=16)
        self.pw = nn.Conv2d(16, 16, 1)
        self.head = nn.Linear(16, 5)

    def forward(self, x):
        h = torch.relu(self.bn(self.stem(x)))
        h = h + self.pw(torch.relu(self.dw(h)))
        return self.head(h.mean((2, 3)))


def _source():
    return ModelSource(
        "callable", "test:residual", [InputSpec("input", (1, 3, 8, 8), "float32")], module=ResidualDepthwise().eval()
    )


def _layers(module):
    return [m for m in module.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]


def test_l1_prunes_each_layer_to_the_amount_permanently_on_a_copy():
    source = _source()
    original = {k: v.clone() for k, v in source.module.state_dict().items()}
    pruned, record = PrunePass(PruneConfig(amount=0.5, method="l1")).run(source)
    for layer in _layers(pruned.module):
        assert float((layer.weight == 0).float().mean()) == pytest.approx(0.5, abs=0.07)
        assert not hasattr(layer, "weight_orig") and not layer._forward_pre_hooks  # prune.remove made it permanent
    assert all(torch.equal(v, source.module.state_dict()[k]) for k, v in original.items())
    m = record.metrics
    assert m["weight_sparsity"] == pytest.approx(0.5, abs=0.02) and m["params_after"] == m["params_before"]
    assert m["weights_gzip_bytes_after"] < m["weights_gzip_bytes_before"] and "latency" in m["note"]
    assert pruned.module(torch.zeros(2, 3, 8, 8)).shape == (2, 5)


def test_global_reaches_overall_sparsity_with_uneven_layers():
    pruned, record = PrunePass(PruneConfig(amount=0.6, method="global")).run(_source())
    assert record.metrics["weight_sparsity"] == pytest.approx(0.6, abs=0.01)
    per_layer = [float((layer.weight == 0).float().mean()) for layer in _layers(pruned.module)]
    assert max(per_layer) - min(per_layer) > 0.05  # global ranking, not a per-layer quota


def test_channel_pruning_removes_channels_keeps_classifier_and_exports(tmp_path):
    source = _source()
    pruned, record = PrunePass(PruneConfig(amount=0.5, method="channel")).run(source)
    m = pruned.module
    assert (
        m.stem.out_channels == 8 and m.dw.groups == m.dw.in_channels == m.dw.out_channels == 8
    )  # depthwise stays depthwise
    assert m.pw.out_channels == m.stem.out_channels and m.bn.num_features == 8  # residual add stays consistent
    assert m.head.out_features == 5 and m.head.in_features == 8
    assert source.module.stem.out_channels == 16  # the user's module is untouched
    assert record.metrics["macs_after"] < 0.6 * record.metrics["macs_before"]
    assert record.metrics["params_after"] < record.metrics["params_before"]
    exported = export_onnx(pruned, tmp_path, 18)
    x = np.random.default_rng(0).random((2, 3, 8, 8), dtype=np.float32)
    with torch.no_grad():
        expected = m(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(make_session(exported.path).run(None, {"input": x})[0], expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize(
    "config, message",
    [
        (PruneConfig(amount=0.0), "strictly between 0 and 1"),
        (PruneConfig(amount=1.0), "strictly between 0 and 1"),
        (PruneConfig(amount=0.3, method="random"), "unknown"),
    ],
)
def test_bad_config_is_a_usage_error(config, message):
    with pytest.raises(UsageError, match=message):
        PrunePass(config)
