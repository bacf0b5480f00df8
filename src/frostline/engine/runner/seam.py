"""The one narrow, typed seam between the training loop and the frozen-part engine.

The trainer (:mod:`frostline.engine.trainer`) drives the runner through
:class:`FrozenPartSeam` only, as a Lightning loop drives its trainer through a few hooks:
a fit begins (:meth:`~FrozenPartSeam.begin_fit`), each epoch begins
(:meth:`~FrozenPartSeam.begin_epoch`), the data of a role is prepared (its cache built or
reused, :meth:`~FrozenPartSeam.prepare_data`), each step syncs with the trainable set
(:meth:`~FrozenPartSeam.sync`) and gets its inputs at the frontier
(:meth:`~FrozenPartSeam.batch_inputs`), and the epoch's note says what the cache did
(:meth:`~FrozenPartSeam.epoch_note`). Which split holds, the cache entries, the folded
copy and the weights' keys stay behind it. ``tests/engine/test_seam.py`` holds the trainer
to these names.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from contextlib import AbstractContextManager
from typing import Any, NamedTuple, Protocol

import torch
from torch import Tensor, nn

from frostline.engine.runner.status import CacheOptions, CacheStatus

__all__ = ["SEAM", "FrozenPartSeam", "TrainablePart"]


class TrainablePart(NamedTuple):
    """The trainable part the optimizer step runs (frontier tensors -> outputs, or the
    whole model) and the ids of its trainable parameters (None before the first sync)."""

    module: nn.Module
    ids: tuple[int, ...] | None


class FrozenPartSeam(Protocol):
    """What the trainer may ask of the frozen-part engine (see the module doc)."""

    @property
    def options(self) -> CacheOptions:
        """The cache options it runs with, the object ``fit`` was given."""
        ...

    @property
    def status(self) -> Mapping[str, CacheStatus]:
        """The last cache status of each data role ("train", "val", "evaluate")."""
        ...

    @property
    def verified(self) -> bool:
        """Whether :meth:`verify` got an example batch."""
        ...

    @property
    def has_frozen_part(self) -> bool:
        """Whether a frozen part is split off (the step then takes frontier tensors)."""
        ...

    def matches(self, module: nn.Module, options: CacheOptions | None) -> bool:
        """Whether it serves ``module`` with ``options`` (None: any options)."""
        ...

    def verify(self, example: Any) -> None:
        """Remember a real batch to trace and check the model on (once)."""
        ...

    def begin_fit(self, unfreeze_next: Iterable[Tensor] = ()) -> None:
        """A fit begins; the next fit will also train ``unfreeze_next``."""
        ...

    def begin_evaluate(self) -> None:
        """An ``evaluate`` call begins."""
        ...

    def begin_epoch(self, *, reread_weights: bool) -> None:
        """An epoch begins (``reread_weights``: code that may write weights ran)."""
        ...

    def sync(self, optimizer: torch.optim.Optimizer | None = None) -> bool:
        """Follow the trainable set and modes now; True if the split moved."""
        ...

    def trainable_part(self) -> TrainablePart:
        """The trainable part and its parameter ids."""
        ...

    def prepare_data(
        self,
        role: str,
        data: Any,
        *,
        indices: Tensor | None,
        device: torch.device,
        batch_size: int,
        fingerprint: str | None,
        epoch: int = 0,
    ) -> CacheStatus:
        """Build, extend or reuse the cache of random-access data for ``role``."""
        ...

    def batch_inputs(
        self,
        role: str,
        idx: Tensor | None,
        load: Callable[[], Any],
        *,
        device: torch.device,
        autocast: Callable[[], AbstractContextManager[Any]],
    ) -> tuple[Any, ...]:
        """A step's inputs at the frontier: from the cache, or the frozen part run on
        ``load()`` (the raw batch on ``device``) under ``autocast()``."""
        ...

    def epoch_note(self, role: str, prepared: CacheStatus | None) -> str:
        """The epoch log's word on the cache (``prepared``: what :meth:`prepare_data`
        said, None for a loader's batches)."""
        ...

    def weight_digest(self, t: Tensor) -> str:
        """A tensor's content digest, memoised (shared with the cache key)."""
        ...

    def end_fit(self) -> None:
        """Undo what a fit set up (step hooks, flipped modes, the folded view)."""
        ...

    def close(self) -> None:
        """Free every cache entry (the runner is being replaced)."""
        ...


#: The names the trainer may use on its runner: the members of :class:`FrozenPartSeam`.
SEAM: frozenset[str] = frozenset(
    name
    for name, value in vars(FrozenPartSeam).items()
    if not name.startswith("_") and (callable(value) or isinstance(value, property))
)
