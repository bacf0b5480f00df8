"""The runner: one object per model that puts the parts together for the trainer.

:class:`Runner` composes :class:`~.splits.Splits` (which split holds),
:class:`~.executor.FrozenExecutor` (running the frozen part), :class:`~.weights.WeightKeys`
(keys of the frozen weights) and :class:`~.cache.ActivationCache` (the cache per data
role). The trainer drives it through :class:`~.seam.FrozenPartSeam` only.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from contextlib import AbstractContextManager
from typing import Any

import torch
from torch import Tensor, nn

from frostline.engine.fingerprints import StepCounter
from frostline.engine.frozen import Partition
from frostline.engine.runner.cache import ActivationCache
from frostline.engine.runner.executor import FrozenExecutor, WholeModel
from frostline.engine.runner.seam import TrainablePart
from frostline.engine.runner.splits import Splits
from frostline.engine.runner.status import CacheOptions, CacheState, CacheStatus
from frostline.engine.runner.weights import WeightKeys

__all__ = ["Runner"]


class Runner:
    """Runs a module as frozen part + trainable part, with an activation cache.

    The trainer uses the members of :class:`~.seam.FrozenPartSeam` only (``begin_fit``,
    ``sync``, ``prepare_data``, ``batch_inputs``, ...); the rest serves
    :class:`~frostline.api.features.FrozenFeatures` and tests.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
        >>> _ = net[0].requires_grad_(False)
        >>> runner = Runner(net)
        >>> runner.verify(torch.randn(4, 4))
        >>> _ = runner.refresh()
        >>> runner.boundary_name
        '1'
        >>> front = runner.run_prefix(torch.randn(3, 4))
        >>> runner.suffix(*front).shape
        torch.Size([3, 2])
    """

    def __init__(
        self, module: nn.Module, options: CacheOptions | None = None, *, fuse: bool = True
    ) -> None:
        self.module = module
        self.options = options if options is not None else CacheOptions()
        self.whole = WholeModel(module)
        self.splits = Splits(module, self.options)
        self.executor = FrozenExecutor(self.splits, fuse=fuse)
        self.weights = WeightKeys()
        self.cache = ActivationCache(self.splits, self.executor, self.weights)

    # -- structure -----------------------------------------------------------------
    @property
    def verified(self) -> bool:
        """Whether :meth:`verify` got an example batch."""
        return self.splits.verified

    def verify(self, example: Any) -> None:
        """Remember a real batch (a few samples) to trace and check the model on."""
        self.splits.verify(example)

    def refresh(self) -> bool:
        """Re-split when the trainable set or the modes changed; True if the split moved.

        Called every step: it reads ``requires_grad`` and ``training`` flags only. The
        structure (parameters, submodules, BatchNorm policies) is re-read by
        :meth:`new_fit`, once per epoch.
        """
        moved = self.splits.refresh()
        if moved or self.splits.part is None:
            self.executor.reset()
        return moved

    @property
    def part(self) -> Partition | None:
        """The split in use (None: the model runs whole)."""
        return self.splits.part

    @property
    def suffix(self) -> nn.Module:
        """The trainable part (frontier tensors -> outputs), or the whole model."""
        part = self.splits.part
        return part.trainable if part is not None else self.whole

    @property
    def status(self) -> dict[str, CacheStatus]:
        """The last cache status of each data role ("train", "val", "evaluate")."""
        return self.cache.status

    @property
    def steps(self) -> StepCounter:
        """Optimizer steps per tensor (part of the per-step weights version)."""
        return self.weights.steps

    @property
    def frozen_inference(self) -> bool:
        """Whether the frozen part runs in inference mode (``fit(frozen_inference=True)``)."""
        return self.options.frozen_inference

    @property
    def trainable_ids(self) -> tuple[int, ...] | None:
        """Ids of the trainable parameters at the last :meth:`refresh`."""
        return self.splits.trainable_ids

    @property
    def prefix(self) -> nn.Module | None:
        """The frozen part as a module (flat inputs -> tuple of frontier tensors)."""
        part = self.splits.part
        return part.frozen if part is not None else None

    @property
    def boundary(self) -> tuple[str, ...]:
        """Names of the frontier tensors (empty without a frozen part)."""
        return self.splits.boundary

    @property
    def boundary_name(self) -> str:
        """The frontier for people: ``"layer3"``, ``"a + b"``, ``"(none)"``."""
        return " + ".join(self.boundary) or "(none)"

    def prefix_tensors(self) -> list[Tensor]:
        """The frozen part's weights (parameters and buffers), the user's own tensors."""
        return self.splits.prefix_tensors()

    # -- running -------------------------------------------------------------------
    def run_prefix(self, x: Any) -> tuple[Any, ...]:
        """What the trainable part takes for the raw batch ``x`` (no autograd recording)."""
        return self.executor.run_prefix(x)

    def cached_inputs(self, role: str, idx: Tensor) -> tuple[Tensor, ...] | None:
        """Cached frontier tensors for these samples, or None when the cache cannot serve them."""
        return self.cache.cached_inputs(role, idx)

    # -- fits and epochs -----------------------------------------------------------
    def new_fit(self) -> None:
        """Forget memoised digests and structure: the next check reads the model again."""
        self.begin_epoch(reread_weights=True)

    def end_fit(self) -> None:
        """Undo what fit set up: modes flipped for ``frozen_inference``, step counting."""
        self.splits.end_fit()
        self.weights.steps.detach()
        self.executor.reset()  # the folded view (it shares the weights) goes too

    def weight_digest(self, t: Tensor) -> str:
        """``tensor_digest(t)``, each tensor read once until the weights are read again
        (:meth:`WeightKeys.weight_digest`).

        Example:
            >>> import torch
            >>> from frostline.core.digest import tensor_digest
            >>> w = torch.ones(3)
            >>> Runner(torch.nn.Linear(2, 2)).weight_digest(w) == tensor_digest(w)
            True
        """
        return self.weights.weight_digest(t)

    # -- the trainer's seam (FrozenPartSeam) -----------------------------------------
    @property
    def has_frozen_part(self) -> bool:
        """Whether a frozen part is split off (the step then takes frontier tensors)."""
        return self.splits.part is not None

    def matches(self, module: nn.Module, options: CacheOptions | None) -> bool:
        """Whether this runner serves ``module`` with ``options`` (None: any options).

        Example:
            >>> net = torch.nn.Linear(2, 2)
            >>> runner = Runner(net, CacheOptions(cache=False))
            >>> runner.matches(net, None), runner.matches(net, CacheOptions())
            (True, False)
        """
        return self.module is module and (options is None or self.options == options)

    def begin_fit(self, unfreeze_next: Iterable[Tensor] = ()) -> None:
        """A fit begins: digests and structure are read again (:meth:`new_fit`), and the
        next fit will also train ``unfreeze_next`` (a planned unfreeze: when this fit
        builds its cache from the data, the same run keeps the frontier the next fit needs,
        :meth:`ActivationCache.plan_next`)."""
        self.new_fit()
        self.cache.plan_next(unfreeze_next)

    def begin_evaluate(self) -> None:
        """An ``evaluate`` call begins: the split follows the model now, and digests and
        structure are read again."""
        self.refresh()
        self.new_fit()

    def begin_epoch(self, *, reread_weights: bool) -> None:
        """An epoch begins: the structure (parameters, modules, modes) is read again.

        With ``reread_weights`` the frozen weights are hashed again too, which catches
        writes hidden from torch's version counters (``p.data.copy_``). The trainer asks
        for it only when code that may write weights ran since the last check (a callback
        whose ``writes_weights`` is True); version-visible writes are always seen.
        """
        if reread_weights:
            self.weights.forget()
        self.splits.forget_structure()

    def sync(self, optimizer: torch.optim.Optimizer | None = None) -> bool:
        """Count ``optimizer``'s steps (part of the weights' version; the hook goes at
        :meth:`end_fit`) and re-split when the trainable set or the modes changed; True
        if the split moved."""
        if optimizer is not None:
            self.weights.steps.watch(optimizer)
        return self.refresh()

    def trainable_part(self) -> TrainablePart:
        """The trainable part the step runs, and its trainable parameters' ids.

        Example:
            >>> net = torch.nn.Linear(2, 2)
            >>> Runner(net).trainable_part().module.model is net
            True
        """
        return TrainablePart(self.suffix, self.trainable_ids)

    def prepare_data(
        self,
        role: str,
        data,
        *,
        indices: Tensor | None,
        device: torch.device,
        batch_size: int,
        fingerprint: str | None,
        epoch: int = 0,
    ) -> CacheStatus:
        """Build, extend or reuse the cache of random-access data for ``role``; returns
        (and records) its status (:meth:`ActivationCache.ensure_cache`)."""
        return self.cache.ensure_cache(
            role,
            data,
            indices=indices,
            device=device,
            batch_size=batch_size,
            fingerprint=fingerprint,
            epoch=epoch,
        )

    def batch_inputs(
        self,
        role: str,
        idx: Tensor | None,
        load: Callable[[], Any],
        *,
        device: torch.device,
        autocast: Callable[[], AbstractContextManager[Any]],
    ) -> tuple[Any, ...]:
        """A step's inputs at the frontier: the cached frontier tensors of samples
        ``idx`` when the cache serves them, else the frozen part run on ``load()`` (the
        raw batch on ``device``) under ``autocast()``."""
        cached = self.cached_inputs(role, idx) if idx is not None else None
        if cached is not None:
            return tuple(t.to(device) for t in cached)
        x = load()
        with autocast():
            return self.run_prefix(x)

    def epoch_note(self, role: str, prepared: CacheStatus | None) -> str:
        """What the cache did for ``role`` this epoch, for the log: ``prepared`` (what
        :meth:`prepare_data` said; None for a loader's batches, never cached, which
        records why), or its invalidation mid-epoch.

        Example:
            >>> net = torch.nn.Linear(2, 2)
            >>> Runner(net, CacheOptions(cache=False)).epoch_note("train", None)
            'off (cache=False)'
        """
        if prepared is None:
            prepared = self.cache.cacheable(False)
            assert prepared is not None
            self.status[role] = prepared
        final = self.status.get(role)
        if final is not None and final.state is CacheState.INVALIDATED:
            return f"{final} mid-epoch (had {prepared})"  # what really happened
        return str(prepared)

    def close(self) -> None:
        """Free every cache entry and kept frontier (memory freed, spill files removed)."""
        self.cache.drop()
