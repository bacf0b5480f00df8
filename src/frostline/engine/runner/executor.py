"""Running the frozen part: under ``no_grad``, as a verified folded copy where that works.

:class:`FrozenExecutor` runs the current split's frozen part on a batch. Where the frozen
part takes images (4-d tensors), it runs a channels_last copy of its structure that shares
its weights and folds BatchNorm into the convs at each call
(:func:`frostline.engine.fuse.inference_copy`; the layers called whole that draw random
numbers run there as they are set), checked against the plain part on an example first
(on the same draws); any failure runs the plain part.
:class:`WholeModel` is the model called on a batch as it takes it (no split).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
from typing import Any

import torch
from torch import Tensor, nn

from frostline.engine import rng
from frostline.engine.fingerprints import weights_version
from frostline.engine.frozen import Partition, call_model
from frostline.engine.fuse import InferenceCopy, inference_copy, replay_draws
from frostline.engine.runner.splits import Splits

__all__ = ["FrozenExecutor", "WholeModel"]


@functools.cache
def _malloc_trim() -> Any:
    """glibc's ``malloc_trim``, or None where the C library has none (musl, macOS)."""
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or None).malloc_trim
    except (OSError, AttributeError):
        return None


def _trim_c_heap() -> None:
    """Give the C heap's free pages back to the system (a no-op without glibc)."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


class WholeModel(nn.Module):
    """The model called on a batch as it takes it (no frozen part split off).

    Example:
        >>> import torch
        >>> WholeModel(torch.nn.Linear(2, 3))(torch.zeros(4, 2)).shape
        torch.Size([4, 3])
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: Any) -> Any:
        return call_model(self.model, x)


class FrozenExecutor:
    """Runs the frozen part of ``splits``' current split (see the module doc).

    ``fused`` is the folded copy in use (None: the plain frozen part runs).

    Example:
        >>> import torch
        >>> from torch import nn
        >>> from frostline.engine.runner.status import CacheOptions
        >>> net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
        >>> _ = net[0].requires_grad_(False)
        >>> splits = Splits(net, CacheOptions())
        >>> splits.verify(torch.randn(4, 4))
        >>> (front,) = FrozenExecutor(splits).run_prefix(torch.randn(3, 4))
        >>> front.shape
        torch.Size([3, 8])
    """

    def __init__(self, splits: Splits, *, fuse: bool = True) -> None:
        self.splits = splits
        self.fuse = fuse
        self.fused: Any = None
        self.fused_key: Any = None

    def reset(self) -> None:
        """Drop the folded copy (it shares the weights): the next call folds again."""
        self.fused = self.fused_key = None

    def release(self) -> None:
        """Free what running the frozen part keeps for speed, once a cache build is done
        and the epochs read the cache: the folded copy's padding buffers (the next call
        allocates them again), then the C heap's free pages (glibc's ``malloc_trim``;
        nothing elsewhere), which a build leaves kept but unused.

        Example:
            >>> from frostline.engine.runner.status import CacheOptions
            >>> FrozenExecutor(Splits(torch.nn.Linear(2, 2), CacheOptions())).release()
        """
        if isinstance(self.fused, InferenceCopy):
            self.fused.release()
        _trim_c_heap()

    def run_prefix(self, x: Any) -> tuple[Any, ...]:
        """What the trainable part takes for the raw batch ``x`` (no autograd recording)."""
        part = self.splits.part
        if part is None:
            return (x,)
        values = part.traced.flat(x)
        with torch.no_grad():
            return tuple(self.frozen_fn(values)(*values))

    def frozen_fn(self, values: tuple, module: nn.Module | None = None):
        """The module to run the frozen part (or ``module``, a module giving more
        frontiers than it) on ``values`` with: the folded copy where it serves."""
        part = self.splits.part
        assert part is not None and part.frozen is not None
        frozen = part.frozen if module is None else module
        if (
            not self.fuse
            or part.batch_statistics is not None
            or not any(isinstance(v, Tensor) and v.dim() == 4 for v in values)
            or values[0].shape[0] < 2
        ):
            return frozen
        first = values[0]
        version = weights_version(self.splits.prefix_tensors())
        key = (id(frozen), version, first.device, first.dtype)
        # The view folds from the live weights at each call, so it is never stale; a new
        # weights version re-runs its numerical check on the new weights.
        if self.fused_key != key:
            self.fused_key = key
            self.fused = self._fold(part, frozen, values, version, module is None)
        return self.fused if self.fused is not None else frozen

    def _fold(
        self, part: Partition, frozen: nn.Module, values: tuple, version: tuple, own: bool
    ) -> nn.Module | None:
        """The folded copy of ``frozen``, checked against it (None when it differs).

        A frozen part that draws random numbers (random ops in the graph, such as
        augmentation in front of a frozen base) is checked on the same draws as the plain
        part, and the check leaves every generator as it found it. The layers called whole
        that draw (a module fx cannot trace holding augmentation or a Dropout) run in the
        copy as they are set (:func:`inference_copy`'s ``as_set``: their own modes,
        contiguous inputs); the layers around them fold."""
        split = self._split_reference(part, version, values[0]) if own else None
        example, reference = split or (tuple(v[:4] for v in values), None)
        try:
            if part.random is None:
                return inference_copy(frozen, example=example, reference=reference)
            module = self.splits.module
            as_set = [module.get_submodule(path) for path in part.random_layers]
            with replay_draws(rng.generators_of(module)) as again, torch.no_grad():
                reference = frozen(*example)
                again()
                return inference_copy(frozen, example=example, reference=reference, as_set=as_set)
        except Exception:  # folding is an optimisation: any failure runs the plain part
            return None

    def _split_reference(
        self, part: Partition, version: tuple, first: Tensor
    ) -> tuple[tuple[Tensor, ...], tuple[Tensor, ...]] | None:
        """The example the split ran its frozen part on and the outputs it got, when they
        still hold (same weights, device and dtype, no autocast): the copy's check then
        needs no reference run of its own."""
        example, out = part.traced.example, part.example_frontier
        if not self.splits.split_holds(part, version) or out is None:
            return None
        if not example or not all(isinstance(v, Tensor) for v in example):
            return None
        if (example[0].device, example[0].dtype) != (first.device, first.dtype):
            return None
        if torch.is_autocast_enabled(first.device.type):
            return None
        return example, out

    def example_frontier(self, part: Partition, fresh: bool) -> tuple | None:
        """``part``'s frozen output on its trace's example: the one the split computed
        when ``fresh`` (the weights unchanged since), else computed again; ``None``
        without an example."""
        if fresh and part.example_frontier is not None:
            return part.example_frontier
        if part.frozen is None or part.traced.example is None:
            return None
        with torch.no_grad(), rng.kept(rng.generators_of(self.splits.module)):
            return tuple(part.frozen(*part.traced.example))
