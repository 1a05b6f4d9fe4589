"""Knowledge distillation: train a student (a pruned model or ``--student``) to match the original model.

Loss (Hinton et al.): ``alpha · KL(softmax(t/T) ‖ softmax(s/T)) · T² + (1 − alpha) · CE(s, y)``;
without labels only the soft term is used. The T² factor keeps the soft term's gradients on
the same scale as the hard term's whatever the temperature. Outputs that are not
``[batch, classes]`` (embeddings, dense heads) are matched with MSE instead.

The loop is plain PyTorch: seeded, validated after every epoch, keeps the best epoch's weights,
and stops early at a time limit. It trains a deep copy; the caller's module is never changed.
"""

from __future__ import annotations

import copy
import logging
import math
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from typing import TYPE_CHECKING

import numpy as np

from edgebuild.data import Batch, open_data
from edgebuild.errors import UsageError
from edgebuild.sources import ModelSource, build_module
from edgerun.manifest import PassRecord

if TYPE_CHECKING:
    import torch
    from torch import nn

    from edgebuild.passes import PassContext

log = logging.getLogger(__name__)


@dataclass
class DistillConfig:
    """Distillation settings (descriptions double as CLI help)."""

    train_data: str | None = None
    "Training DATA (image folder, .npz, module:callable): labels are used when present."
    student: str | None = None
    "Student model as package.module:callable (default: the incoming, e.g. pruned, model)."
    epochs: int = 10
    "Training epochs (the best epoch on validation is kept)."
    temperature: float = 3.0
    "Softmax temperature T of the soft targets (higher = softer)."
    alpha: float = 0.5
    "Weight of the distillation term; 1 - alpha goes to cross-entropy on labels (1.0 without labels)."
    learning_rate: float = 1e-3
    "AdamW learning rate (cosine-annealed to 0 over the run)."
    batch_size: int = 64
    "Training batch size."
    max_train_minutes: float | None = None
    "Stop training after this many minutes (the best epoch so far is kept)."
    train_samples: int | None = None
    "Use at most this many training samples."
    seed: int = 0
    "Seed for initialisation order and batch shuffling."

    def check(self) -> None:
        if not self.train_data:
            raise UsageError(
                "--distill needs --train-data (an image folder, .npz or module:callable with training samples)"
            )
        if self.train_data == "random":
            raise UsageError("--train-data random cannot teach anything: give real training samples")
        if self.epochs < 1:
            raise UsageError(f"--epochs {self.epochs} must be at least 1")
        if self.temperature <= 0:
            raise UsageError(f"--temperature {self.temperature} must be positive (e.g. 3)")
        if not 0.0 <= self.alpha <= 1.0:
            raise UsageError(f"--alpha {self.alpha} must be between 0 and 1 (weight of the distillation loss)")
        if self.max_train_minutes is not None and self.max_train_minutes <= 0:
            raise UsageError(f"--max-train-minutes {self.max_train_minutes} must be positive")
        if self.batch_size < 1 or self.learning_rate <= 0:
            raise UsageError("batch size and learning rate must be positive")


def _first_output(out):
    import torch

    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, dict):
        return next(iter(out.values()))
    return out[0]


def distillation_loss(
    student_out: torch.Tensor,
    teacher_out: torch.Tensor,
    labels: torch.Tensor | None = None,
    *,
    temperature: float = 3.0,
    alpha: float = 0.5,
) -> torch.Tensor:
    """KD loss for ``[batch, classes]`` logits (MSE for other outputs); CE on labels weighted by 1 - alpha."""
    import torch.nn.functional as F

    if student_out.ndim != 2 or student_out.shape[1] < 2:
        return F.mse_loss(student_out, teacher_out)
    t = temperature
    soft = F.kl_div(
        F.log_softmax(student_out / t, dim=1),
        F.log_softmax(teacher_out / t, dim=1),
        log_target=True,
        reduction="batchmean",
    ) * (t * t)
    if labels is None or alpha >= 1.0:
        return soft
    return alpha * soft + (1.0 - alpha) * F.cross_entropy(student_out, labels)


def _score(out: np.ndarray, teacher: np.ndarray, labels: np.ndarray | None) -> tuple[str, float]:
    """Higher is better: accuracy with labels, top-1 agreement with the teacher, or -MSE for dense outputs."""
    if out.ndim == 2 and out.shape[1] > 1:
        if labels is not None:
            return "accuracy", float((out.argmax(1) == labels).mean())
        return "agreement", float((out.argmax(1) == teacher.argmax(1)).mean())
    return "neg_mse", -float(((out - teacher) ** 2).mean())


def _forward(module, names: list[str], inputs: dict[str, np.ndarray], index=None, grad: bool = False):
    import torch

    tensors = [torch.from_numpy(np.ascontiguousarray(inputs[n] if index is None else inputs[n][index])) for n in names]
    if grad:
        return _first_output(module(*tensors))
    with torch.no_grad():
        return _first_output(module(*tensors))


def _predict(module, names, inputs: dict[str, np.ndarray], batch_size: int = 256) -> np.ndarray:
    total = len(inputs[names[0]])
    module.eval()
    return np.concatenate(
        [_forward(module, names, inputs, slice(i, i + batch_size)).float().numpy() for i in range(0, total, batch_size)]
    )


def _split(batch: Batch, fraction: float, seed: int) -> tuple[Batch, Batch]:
    n = len(batch)
    order = np.random.default_rng(seed).permutation(n)
    cut = max(1, int(round(n * fraction)))
    held, kept = order[:cut], order[cut:]

    def take(idx):
        return Batch({k: v[idx] for k, v in batch.inputs.items()}, None if batch.labels is None else batch.labels[idx])

    return take(kept), take(held)


def _load_student(spec: str, teacher: ModelSource) -> nn.Module:
    student = build_module(spec, what="student")
    feed = teacher.example_feed()
    try:
        s_out = _forward(student, teacher.input_names, feed)
    except Exception as exc:  # noqa: BLE001
        raise UsageError(f"student '{spec}' fails on the model's example input: {type(exc).__name__}: {exc}") from None
    t_out = _forward(teacher.module, teacher.input_names, feed)
    if tuple(s_out.shape) != tuple(t_out.shape):
        raise UsageError(
            f"student '{spec}' outputs shape {list(s_out.shape)}, the teacher {list(t_out.shape)}: they must match"
        )
    return student


class DistillPass:
    """Torch-level pass; the teacher is the original model (pack passes it as ``teacher``)."""

    name = "distill"
    needs_teacher = True

    def __init__(self, config: DistillConfig, *, val_data: str | None = None, show_bar: bool | None = None):
        config.check()
        self.config = config
        self.val_data = val_data
        self.show_bar = show_bar  # None: only when stderr is a terminal

    def run(
        self,
        source: ModelSource,
        context: PassContext | None = None,
        progress: Callable[[str], None] = lambda message: None,
        teacher: ModelSource | None = None,
    ) -> tuple[ModelSource, PassRecord]:
        import torch
        from tqdm import tqdm

        cfg = self.config
        teacher = teacher or source
        names = source.input_names
        torch.manual_seed(cfg.seed)
        student = _load_student(cfg.student, teacher) if cfg.student else copy.deepcopy(source.module)
        teacher_module = teacher.module.eval()

        assert cfg.train_data is not None  # config.check() refused a missing one
        train = open_data(cfg.train_data, source.inputs, purpose="training", limit=cfg.train_samples).collect()
        val_spec = self.val_data or (context.val_data if context is not None else None)
        if val_spec and val_spec != "random":
            val = open_data(
                val_spec,
                source.inputs,
                purpose="validation",
                limit=context.val_samples if context is not None else None,
            ).collect()
            val_from = val_spec
        else:
            train, val = _split(train, 0.1, cfg.seed)  # hold out 10% so "best epoch" is not chosen on training data
            val_from = "10% held out of the training data"
        teacher_train = _predict(teacher_module, names, train.inputs)
        teacher_val = _predict(teacher_module, names, val.inputs)
        score_name, teacher_score = _score(teacher_val, teacher_val, val.labels)

        def evaluate():
            out = _predict(student, names, val.inputs)
            loss = float(
                distillation_loss(
                    torch.from_numpy(out), torch.from_numpy(teacher_val), None, temperature=cfg.temperature, alpha=1.0
                )
            )
            return _score(out, teacher_val, val.labels)[1], loss

        start_score, start_kd = evaluate()
        best = (start_score, -1, copy.deepcopy(student.state_dict()))
        optimizer = torch.optim.AdamW(student.parameters(), lr=cfg.learning_rate, weight_decay=1e-4)
        steps_per_epoch = math.ceil(len(train) / cfg.batch_size)
        scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=cfg.epochs * steps_per_epoch)
        generator = torch.Generator().manual_seed(cfg.seed)
        labels = torch.from_numpy(train.labels) if train.labels is not None else None
        t_logits = torch.from_numpy(teacher_train)
        deadline = time.monotonic() + cfg.max_train_minutes * 60 if cfg.max_train_minutes else None
        history, stopped, began = [], None, time.monotonic()
        bar_enabled = self.show_bar if self.show_bar is not None else sys.stderr.isatty()
        bar = tqdm(
            total=cfg.epochs * steps_per_epoch,
            desc="distill",
            unit="step",
            file=sys.stderr,
            disable=not bar_enabled,
            leave=False,
            dynamic_ncols=True,
        )
        for epoch in range(cfg.epochs):
            student.train()
            total, seen = 0.0, 0
            for idx in torch.randperm(len(train), generator=generator).split(cfg.batch_size):
                if len(idx) < 2 and seen:  # a batch of one breaks BatchNorm statistics
                    continue
                index = idx.numpy()
                out = _forward(student, names, train.inputs, index, grad=True)
                loss = distillation_loss(
                    out,
                    t_logits[idx],
                    None if labels is None else labels[idx],
                    temperature=cfg.temperature,
                    alpha=cfg.alpha,
                )
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
                scheduler.step()
                total += loss.item() * len(idx)
                seen += len(idx)
                bar.update(1)
                bar.set_postfix(loss=f"{loss.item():.4f}")
                if deadline and time.monotonic() > deadline:
                    stopped = f"--max-train-minutes {cfg.max_train_minutes} reached in epoch {epoch + 1}"
                    break
            score, kd = evaluate()
            history.append(
                {
                    "epoch": epoch + 1,
                    "train_loss": round(total / max(seen, 1), 5),
                    "val_kd_loss": round(kd, 5),
                    f"val_{score_name}": round(score, 5),
                }
            )
            progress(
                f"distill epoch {epoch + 1}/{cfg.epochs}: loss {total / max(seen, 1):.4f}, val KD loss {kd:.4f}, "
                f"val {score_name} {score:.4f} (teacher {teacher_score:.4f})"
            )
            if score > best[0]:
                best = (score, epoch, copy.deepcopy(student.state_dict()))
            if stopped:
                break
        bar.close()
        student.load_state_dict(best[2])
        student.eval()
        final_score, final_kd = evaluate()
        metrics = {
            "teacher": teacher.spec,
            "student": cfg.student or f"{source.spec} (incoming model)",
            "train_samples": len(train),
            "validation": val_from,
            "val_samples": len(val),
            "score": score_name,
            f"teacher_{score_name}": round(teacher_score, 5),
            f"student_{score_name}_before": round(start_score, 5),
            f"student_{score_name}_after": round(final_score, 5),
            "val_kd_loss_before": round(start_kd, 5),
            "val_kd_loss_after": round(final_kd, 5),
            "best_epoch": best[1] + 1,
            "epochs_run": len(history),
            "train_seconds": round(time.monotonic() - began, 1),
            "stopped_early": stopped,
            "history": history,
            "labels_used": labels is not None,
        }
        if best[1] < 0:
            metrics["note"] = "no epoch beat the starting weights on validation; the starting weights were kept"
        params = asdict(cfg)
        return replace(source, module=student), PassRecord(name=self.name, params=params, metrics=metrics)
