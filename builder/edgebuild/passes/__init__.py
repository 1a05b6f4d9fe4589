"""Model passes: one technique per module, each with a typed config."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from edgebuild.pack import PackOptions
    from edgebuild.sources import ModelSource
    from edgerun.manifest import PassRecord


class TorchPass(Protocol):
    """A torch-level technique pack runs before export (pruning, distillation).

    ``run`` returns a new model source (the input is left alone) and the record of what it did
    and measured, which goes into the manifest's ``passes``. A pass that learns from the
    original model sets ``needs_teacher`` and takes it as the ``teacher`` keyword.
    """

    name: str

    def run(
        self, source: ModelSource, options: PackOptions | None = None, progress: Callable[[str], None] = ...
    ) -> tuple[ModelSource, PassRecord]: ...
