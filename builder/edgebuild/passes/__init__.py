"""Model passes: one technique per module, each with a typed config."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from edgebuild.sources import ModelSource
    from edgerun.manifest import PassRecord


@dataclass(frozen=True)
class PassContext:
    """What a torch pass may use of the build besides its own config: the validation data."""

    val_data: str | None = None
    val_samples: int | None = None


class TorchPass(Protocol):
    """A torch-level technique pack runs before export (pruning, distillation).

    ``run`` returns a new model source (the input is left alone) and the record of what it did
    and measured, which goes into the manifest's ``passes``. A pass that learns from the
    original model sets ``needs_teacher`` and takes it as the ``teacher`` keyword.
    """

    name: str

    def run(
        self, source: ModelSource, context: PassContext | None = None, progress: Callable[[str], None] = ...
    ) -> tuple[ModelSource, PassRecord]: ...
