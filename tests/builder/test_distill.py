"""Distillation: the loss is Hinton's KD, training lowers it, and a distilled student beats an untrained one on digits."""

from pathlib import Path

import pytest
import torch

from edgebuild.errors import UsageError
from edgebuild.examples.digits import DigitsCNN
from edgebuild.passes.distill import DistillConfig, DistillPass, distillation_loss
from edgebuild.sources import load_model

DIGITS = "edgebuild.examples.digits"


def small_student():
    torch.manual_seed(1)
    return DigitsCNN(width=8)


def wrong_student():
    return torch.nn.Linear(64, 3)


@pytest.fixture
def teacher(monkeypatch):
    monkeypatch.syspath_prepend(str(Path(__file__).parent))
    return load_model(f"{DIGITS}:pretrained")


def test_loss_is_temperature_scaled_kl_mixed_with_cross_entropy():
    s, t = torch.randn(4, 10), torch.randn(4, 10)
    y = torch.tensor([0, 1, 2, 3])
    T = 3.0
    kl = torch.nn.functional.kl_div(torch.log_softmax(s / T, 1), torch.softmax(t / T, 1), reduction="batchmean") * T * T
    assert float(distillation_loss(s, t, None, temperature=T)) == pytest.approx(
        float(kl), rel=1e-5
    )  # soft-only without labels
    ce = torch.nn.functional.cross_entropy(s, y)
    assert float(distillation_loss(s, t, y, temperature=T, alpha=0.25)) == pytest.approx(
        float(0.25 * kl + 0.75 * ce), rel=1e-5
    )
    assert float(distillation_loss(t, t, None)) == pytest.approx(0.0, abs=1e-6)
    assert float(distillation_loss(torch.ones(2, 1, 3), torch.zeros(2, 1, 3))) == 1.0  # dense outputs: MSE


@pytest.mark.slow  # two real training epochs on the digits data
def test_distilled_student_beats_untrained_and_lowers_kd_loss(teacher):
    config = DistillConfig(
        train_data=f"{DIGITS}:train_data",
        student="test_distill:small_student",
        epochs=2,
        learning_rate=1e-2,
        batch_size=32,
    )
    student, record = DistillPass(config, val_data=f"{DIGITS}:validation_data").run(teacher, None, teacher=teacher)
    m = record.metrics
    assert m["val_kd_loss_after"] < 0.8 * m["val_kd_loss_before"]
    assert m["student_accuracy_after"] > m["student_accuracy_before"] + 0.3  # untrained: ~0.1
    assert m["best_epoch"] in (1, 2) and m["epochs_run"] == 2 and m["labels_used"] and len(m["history"]) == 2
    assert m["student_accuracy_after"] == max(h["val_accuracy"] for h in m["history"])  # best checkpoint kept
    assert not student.module.training and student.module.features[0].out_channels == 8
    assert teacher.module.features[0].out_channels == 32


@pytest.mark.slow
def test_time_limit_stops_early_and_training_is_seeded(teacher):
    config = DistillConfig(
        train_data=f"{DIGITS}:train_data", epochs=3, max_train_minutes=1e-6, train_samples=256, seed=3
    )
    first, record = DistillPass(config).run(teacher, None, teacher=teacher)
    assert record.metrics["epochs_run"] == 1 and "max-train-minutes" in record.metrics["stopped_early"]
    assert record.metrics["validation"].startswith("10% held out")
    second, _ = DistillPass(config).run(teacher, None, teacher=teacher)
    for a, b in zip(first.module.state_dict().values(), second.module.state_dict().values()):
        assert torch.equal(a, b)


@pytest.mark.parametrize(
    "config, message",
    [
        (DistillConfig(), "needs --train-data"),
        (DistillConfig(train_data="random"), "real training samples"),
        (DistillConfig(train_data="x.npz", temperature=0), "--temperature"),
        (DistillConfig(train_data="x.npz", alpha=1.5), "--alpha"),
        (DistillConfig(train_data="x.npz", epochs=0), "--epochs"),
    ],
)
def test_bad_config_is_a_usage_error(config, message):
    with pytest.raises(UsageError, match=message):
        DistillPass(config)


def test_student_with_other_output_shape_is_refused(teacher):
    config = DistillConfig(train_data=f"{DIGITS}:train_data", student="test_distill:wrong_student")
    with pytest.raises(UsageError, match="fails on the model's example input|must match"):
        DistillPass(config).run(teacher, None, teacher=teacher)
