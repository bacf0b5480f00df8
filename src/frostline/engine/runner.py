"""How a training step runs the model: the frozen part, then the trainable rest.

The model is traced (:mod:`frostline.engine.frozen`) and split at the frontier of its
frozen part: every value that depends only on the inputs and frozen weights. The frozen
part runs under ``torch.no_grad`` (where that works, as a verified channels_last copy of
its structure that shares its weights and folds BatchNorm into the convs at each call,
:mod:`frostline.engine.fuse`), and when the data is deterministic and the frozen part draws no
random numbers, its frontier tensors are cached across epochs and fits
(:mod:`frostline.engine.activations`). The cache key holds the frontier, a fingerprint
of the data, a content digest of the frozen weights and the frozen part's modes, so the
cache is rebuilt, never silently stale, when any of them changes.

Where the model cannot be traced, the trace does not reproduce the model, or nothing is
frozen, the runner runs the whole model as a plain loop would; :attr:`Runner.status`
says why, as a :class:`CacheStatus` per data role.
"""

from __future__ import annotations

import enum
import shutil
import tempfile
import warnings
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import Tensor, nn

from frostline.core import batchnorm
from frostline.core.digest import tensor_digest, text_digest
from frostline.engine import rng
from frostline.engine.activations import ActivationStore
from frostline.engine.fingerprints import CacheKey, StepCounter, data_fingerprint, weights_version
from frostline.engine.frozen import (
    FrozenEffect,
    GraphError,
    Partition,
    RandomnessError,
    Traced,
    bridge,
    call_model,
    describe_boundary,
    frozen_calls,
    joint_frozen,
    mode_key,
    partition,
    same_outputs,
    stochastic_frozen,
    trace,
)
from frostline.engine.fuse import inference_copy, replay_draws

__all__ = ["CacheOptions", "CacheState", "CacheStatus", "OffReason", "Runner", "fingerprint_of"]


@dataclass(frozen=True)
class CacheOptions:
    """``fit``'s options for the frozen part and its activation cache, named as ``fit``
    names them and carried unchanged to the :class:`Runner`.

    ``cache``: True, False or "auto"; ``cache_memory_bytes``: what the cache may hold in
    memory before it spills to ``cache_dir`` (the system's temporary folder when None);
    ``cache_dtype``: the dtype floating-point frontier tensors are stored in;
    ``frozen_inference``: run the frozen part in inference mode; ``augment_views``: cache
    this many augmented passes of a random frozen part and cycle them.

    Example:
        >>> CacheOptions(cache=False).cache_memory_bytes == 2 << 30
        True
        >>> CacheOptions(cache="yes")
        Traceback (most recent call last):
        ...
        ValueError: cache must be True, False or 'auto', got 'yes'
    """

    cache: bool | str = "auto"
    cache_memory_bytes: int = 2 << 30
    cache_dtype: torch.dtype | None = None
    cache_dir: Any = None
    frozen_inference: bool = False
    augment_views: int | None = None

    def __post_init__(self) -> None:
        if self.cache not in (True, False, "auto"):
            raise ValueError(f"cache must be True, False or 'auto', got {self.cache!r}")
        if not isinstance(self.frozen_inference, bool):
            raise TypeError(f"frozen_inference must be a bool, got {self.frozen_inference!r}")
        views = self.augment_views
        if views is not None and (
            isinstance(views, bool) or not isinstance(views, int) or views < 1
        ):
            raise ValueError(f"augment_views must be None or an int >= 1, got {views!r}")


class CacheState(enum.Enum):
    """What the activation cache did for one data role this epoch."""

    BUILT = "built"
    EXTENDED = "extended"
    REUSED = "reused"
    INVALIDATED = "invalidated"
    OFF = "off"


class OffReason(enum.Enum):
    """Why the cache is off (or was invalidated); the value is the log's wording."""

    DISABLED = "cache=False"
    NOT_TRACEABLE = "the model could not be traced"
    NOT_VERIFIED = "the traced graph does not reproduce the model"
    NO_FROZEN_PART = "no frozen part: the first computation is trainable"
    NOT_DETERMINISTIC = (
        "data is not declared deterministic: a DataLoader, or a Dataset without deterministic=True"
    )
    NO_FINGERPRINT = "data could not be fingerprinted"
    RANDOM = "randomness in the frozen part"
    DATA_RANDOM = "data declared deterministic is not"
    STOCHASTIC = "the frozen part has an active stochastic layer"
    STATEFUL = "the frozen part writes to model state"
    MIXES_SAMPLES = "frozen values depend on other samples in the batch"
    TOO_LARGE = "the frontier does not fit the memory budget nor the spill directory"
    WEIGHTS_CHANGED = "frozen weights changed"


@dataclass(frozen=True)
class CacheStatus:
    """The typed cache status of one data role ("train", "val", "evaluate").

    ``boundary`` names the frontier tensors (empty when there is no frozen part),
    ``reason`` says why the cache is off or was invalidated, ``detail`` adds specifics
    (a module name, a tracing error). ``frozen_mode`` is ``"inference"`` when the frozen
    part runs in inference mode (``fit(frozen_inference=True)``), else ``"as set"``.
    ``str(status)`` is the epoch log's wording.

    Example:
        >>> s = CacheStatus(CacheState.OFF, reason=OffReason.DISABLED)
        >>> str(s), s.cached
        ('off (cache=False)', False)
    """

    state: CacheState
    boundary: tuple[str, ...] = ()
    reason: OffReason | None = None
    detail: str = ""
    samples: int = 0
    nbytes: int = 0
    location: str = ""
    frozen_mode: str = "as set"
    view: int = 0  # with fit(augment_views=K): which of the K cached augmented views
    views: int = 0

    @property
    def cached(self) -> bool:
        """Whether the frozen part's outputs come from the cache."""
        return self.state in (CacheState.BUILT, CacheState.EXTENDED, CacheState.REUSED)

    def __str__(self) -> str:
        mode = " (frozen part in inference mode)" if self.frozen_mode == "inference" else ""
        if self.views:
            mode += f" (augmented view {self.view + 1} of {self.views})"
        if self.cached:
            where = describe_boundary(self.boundary)
            mb = self.nbytes / 2**20
            return (
                f"{self.state.value} ({self.samples} samples after {where}, "
                f"{mb:.1f} MB in {self.location}){mode}"
            )
        assert self.reason is not None
        text = self.reason.value + (f": {self.detail}" if self.detail else "")
        return f"{self.state.value} ({text}){mode}"


class WholeModel(nn.Module):
    """The model called on a batch as it takes it (no frozen part split off)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: Any) -> Any:
        return call_model(self.model, x)


@dataclass
class _Prepared:
    """Frontier tensors kept for the split a planned unfreeze needs (see ``plan_next``)."""

    key: CacheKey  # mode: which BatchNorms use running statistics; ``check``: the rest
    stores: list[ActivationStore]
    local: Tensor | None
    check: tuple  # the frontier on the runner's example batch, to compare at reuse
    fit: int  # the fit that built it: it serves the next fit only


@dataclass
class _Entry:
    key: CacheKey
    stores: list[ActivationStore]
    local: Tensor | None  # global sample index -> row in the stores (sharded data)
    version: tuple  # cheap per-step weights key, checked every batch
    partition: Partition
    checked: int = -1  # the fit whose first reuse recomputed a sample of it (-1: none yet)


class _Drew(Exception):
    """The data or the frozen part drew random numbers while the cache was built or
    checked: ``source`` is ``"data"`` or ``"frozen"``, ``why`` the log's detail."""

    def __init__(self, source: str, why: str) -> None:
        super().__init__(why)
        self.source, self.why = source, why


def _data_name(data) -> str:
    ds = getattr(data, "dataset", data)
    return f"dataset {type(ds).__name__}"


class Runner:
    """Runs a module as frozen part + trainable part, with an activation cache.

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
        self.fuse = fuse
        self._view: dict[str, int] = {}  # the view each role's cache serves this epoch
        self.verified = False
        self.example: Any = None
        self.traces: dict[tuple, tuple[Traced, tuple]] = {}
        self.partitions: dict[tuple, Partition] = {}
        self._stochastic: dict[tuple, FrozenEffect | None] = {}
        # found drawing random numbers by the cache build or check: per split (this fit),
        # and per data key (declared deterministic, it is not: for good)
        self._drew: dict[int, tuple[Partition, str]] = {}
        self._untrusted: dict[str, str] = {}
        # frozen_inference: the modules a guess put in eval mode, by the key before it
        # (fit puts the model in train mode every epoch; the guess is not made again)
        self._guesses: dict[tuple, list[nn.Module]] = {}
        self.next_ids: frozenset[int] = frozenset()
        self.prepared: dict[str, _Prepared] = {}
        self._fits = 0
        self.part: Partition | None = None
        self.failure: tuple[OffReason, str] | None = None
        self._key: tuple | None = None
        self.whole = WholeModel(module)
        self.suffix: nn.Module = self.whole
        self._fused: Any = None
        self._fused_key: Any = None
        # per split: (the split, its frozen weights' version when it was made)
        self._split_weights: dict[int, tuple[Partition, tuple]] = {}
        self.entries: dict[str, _Entry] = {}
        self._digests: dict[tuple, str] = {}
        self._tensor_digests: dict[tuple, str] = {}  # (id, storage, version) -> tensor_digest
        self.status: dict[str, CacheStatus] = {}
        self.steps = StepCounter()
        self._flipped: list[nn.Module] = []
        self._params: list[nn.Parameter] | None = None
        self._modules: list[nn.Module] = []
        self._policies: tuple = ()
        self._flags: tuple | None = None
        self._tensors: tuple[Partition, list[Tensor]] | None = None

    # -- structure -----------------------------------------------------------------
    def verify(self, example: Any) -> None:
        """Remember a real batch (a few samples) to trace and check the model on."""
        if self.verified:
            return
        self.verified = True
        self.example = _head(example, 4)
        self._key = self._flags = None
        self.refresh()

    def _walk(self) -> None:
        """Read the module's structure: parameters, modules, BatchNorm policies (per epoch)."""
        self._params = list(self.module.parameters())
        self._modules = list(self.module.modules())
        self._policies = tuple(batchnorm.mode_of(m) for m in self._modules)
        self._tensors = None

    def refresh(self) -> bool:
        """Re-split when the trainable set or the modes changed; True if the split moved.

        Called every step: it reads ``requires_grad`` and ``training`` flags only. The
        structure (parameters, submodules, BatchNorm policies) is re-read by
        :meth:`new_fit`, once per epoch.
        """
        if self._params is None:
            self._walk()
        params = self._params or []
        flags = (
            tuple(p.requires_grad for p in params),
            tuple(m.training for m in self._modules),
        )
        if flags == self._flags:
            return False
        self._flags = flags
        key = (
            tuple(id(p) for p in params if p.requires_grad),
            (flags[1], self._policies),
        )
        if self.example is None:
            self._key = key
            return False
        if key == self._key:
            return False
        old = self.part
        if self.frozen_inference and key not in self.partitions:
            key = self._guess_inference(key)
        for _ in range(3):  # frozen_inference flips modes, which may re-split once more
            self.part = self._partition(key)
            self._key = key
            if not (self.frozen_inference and self.part is not None and self._apply_inference()):
                break
            training = tuple(m.training for m in self._modules)
            self._flags = (self._flags[0], training)
            key = (key[0], (training, self._policies))
        self.suffix = self.part.trainable if self.part is not None else self.whole
        self._fused = None
        return self.part is not old

    def _partition(self, key: tuple) -> Partition | None:
        if key in self.partitions:
            return self.partitions[key]
        if not self.frozen_inference and not self.options.augment_views:
            # an active stochastic layer in the frozen part: the split would gain nothing
            # (no cache, no folding), so the model runs whole and nothing is traced
            if key not in self._stochastic:
                self._stochastic[key] = stochastic_frozen(self.module, self.example)
            effect = self._stochastic[key]
            if effect is not None:
                random = effect.kind == "random"
                self.failure = (OffReason.RANDOM if random else OffReason.STOCHASTIC, str(effect))
                return None
        # what a trace bakes in: training flags; an export trace runs BatchNorm inline, so
        # also whether each BatchNorm's policy makes it use running statistics
        modes = mode_key(self.module)
        policies = tuple(
            batchnorm.runs_inference(m) for m in self._modules if batchnorm.is_batchnorm(m)
        )
        self.failure = None
        # a trace fits while the flags it baked in hold (an fx trace: only those of the
        # modules it traced through, so a mode change inside a layer it calls whole keeps
        # it; an export trace: every flag, and every BatchNorm's policy)
        traced = next(
            (
                t
                for t, p in self.traces.values()
                if t.fits_modes() and (t.backend != "export" or p == policies)
            ),
            None,
        )
        if traced is not None and not traced.current():  # a weight was replaced: trace again
            self.traces.clear()
            self.partitions.clear()
            self._split_weights.clear()
            self._guesses.clear()
            traced = None
        if traced is None:
            # in other modes, the tracer that worked before (and its leaves) is tried first
            like = next(reversed(self.traces.values()), (None,))[0]
            try:
                traced = trace(self.module, self.example, like=like)
            except GraphError as e:
                if isinstance(e, RandomnessError):
                    reason = OffReason.RANDOM
                elif "does not reproduce" in str(e):
                    reason = OffReason.NOT_VERIFIED
                else:
                    reason = OffReason.NOT_TRACEABLE
                self.failure = (reason, str(e))
                return None
            self.traces[modes] = (traced, policies)
        try:
            part = partition(traced)
        except GraphError as e:
            random = isinstance(e, RandomnessError)
            self.failure = (OffReason.RANDOM if random else OffReason.NOT_TRACEABLE, str(e))
            return None
        if part.frozen is None:
            self.failure = (OffReason.NO_FROZEN_PART, "")
            return None
        self.partitions[key] = part
        self._split_weights[id(part)] = (
            part,
            weights_version(_frozen_tensors(part)),
        )
        return part

    def _guess_inference(self, key: tuple) -> tuple:
        """Put the modules that run on frozen values only in eval mode before the first
        split (:func:`frozen_calls`), so that one trace, in the final modes, serves; those
        the split does not confirm as modules of the frozen part go back to their mode
        (a trace that baked their flag is then redone). Returns the key for the modes now
        set. The outcome is remembered by ``key``: the next epoch (in train mode again)
        flips the same modules without running the model."""
        assert self._flags is not None
        if key in self._guesses:
            confirmed = self._guesses[key]
        else:
            confirmed = self._guess(key)
            self._guesses[key] = confirmed
        for m in confirmed:
            if m.training:
                m.training = False
                self._flipped.append(m)
        if not confirmed:
            return key
        training = tuple(m.training for m in self._modules)
        self._flags = (self._flags[0], training)
        return (key[0], (training, self._policies))

    def _guess(self, key: tuple) -> list[nn.Module]:
        """The modules of the frozen part, found by one run with hooks and one split in
        the guessed modes; every flag is as before on return."""
        guess = [m for m in frozen_calls(self.module, self.example) if m.training]
        if not guess:
            return []
        for m in guess:
            m.training = False
        training = tuple(m.training for m in self._modules)
        part = self._partition((key[0], (training, self._policies)))
        for m in guess:
            m.training = True
        if part is None:  # the split from the modes as set decides
            return []
        confirmed = set()
        for path in part.frozen_modules:
            try:
                confirmed.add(id(self.module.get_submodule(path)))
            except AttributeError:  # a tracer's own scope name
                continue
        return [m for m in guess if id(m) in confirmed]

    def _apply_inference(self) -> bool:
        """Put the modules of the frozen part in eval mode; True if any flag changed."""
        assert self.part is not None
        changed = False
        for path in self.part.frozen_modules:
            try:
                m = self.module.get_submodule(path)
            except AttributeError:  # a tracer's own scope name, not a module of the model
                continue
            if m.training:
                m.training = False
                self._flipped.append(m)
                changed = True
        return changed

    def end_fit(self) -> None:
        """Undo what fit set up: modes flipped for ``frozen_inference``, step counting."""
        for m in self._flipped:
            m.training = True
        self._flipped.clear()
        self.steps.detach()
        self._key = self._flags = None
        self._fused = self._fused_key = None  # the folded view (it shares the weights) goes too

    @property
    def frozen_inference(self) -> bool:
        """Whether the frozen part runs in inference mode (``fit(frozen_inference=True)``)."""
        return self.options.frozen_inference

    @property
    def trainable_ids(self) -> tuple[int, ...] | None:
        """Ids of the trainable parameters at the last :meth:`refresh`."""
        return self._key[0] if self._key is not None else None

    @property
    def prefix(self) -> nn.Module | None:
        """The frozen part as a module (flat inputs -> tuple of frontier tensors)."""
        return self.part.frozen if self.part is not None else None

    @property
    def boundary(self) -> tuple[str, ...]:
        """Names of the frontier tensors (empty without a frozen part)."""
        return self.part.boundary if self.part is not None else ()

    @property
    def boundary_name(self) -> str:
        """The frontier for people: ``"layer3"``, ``"a + b"``, ``"(none)"``."""
        return " + ".join(self.boundary) or "(none)"

    def prefix_tensors(self) -> list[Tensor]:
        """The frozen part's weights (parameters and buffers), the user's own tensors.

        Read once per split and epoch (:meth:`new_fit` re-reads it)."""
        part = self.part
        if part is None or part.frozen is None:
            return []
        if self._tensors is None or self._tensors[0] is not part:
            self._tensors = (part, _frozen_tensors(part))
        return self._tensors[1]

    # -- running -------------------------------------------------------------------
    def run_prefix(self, x: Any) -> tuple[Any, ...]:
        """What the trainable part takes for the raw batch ``x`` (no autograd recording)."""
        if self.part is None:
            return (x,)
        values = self.part.traced.flat(x)
        with torch.no_grad():
            return tuple(self._frozen_fn(values)(*values))

    def _frozen_fn(self, values: tuple, module: nn.Module | None = None):
        part = self.part
        assert part is not None and part.frozen is not None
        frozen = part.frozen if module is None else module
        if (
            not self.fuse
            or (part.random is not None and part.random_layers)
            or part.batch_statistics is not None
            or not any(isinstance(v, Tensor) and v.dim() == 4 for v in values)
            or values[0].shape[0] < 2
        ):
            return frozen  # a random layer the copy's eval mode may change: run as set
        first = values[0]
        version = weights_version(self.prefix_tensors())
        key = (id(frozen), version, first.device, first.dtype)
        # The view folds from the live weights at each call, so it is never stale; a new
        # weights version re-runs its numerical check on the new weights.
        if self._fused_key != key:
            self._fused_key = key
            self._fused = self._fold(part, frozen, values, version, module is None)
        return self._fused if self._fused is not None else frozen

    def _fold(
        self, part: Partition, frozen: nn.Module, values: tuple, version: tuple, own: bool
    ) -> nn.Module | None:
        """The folded copy of ``frozen``, checked against it (None when it differs).

        A frozen part that draws random numbers (random ops in the graph, such as
        augmentation in front of a frozen base) is checked on the same draws as the plain
        part, and the check leaves every generator as it found it."""
        split = self._split_reference(part, version, values[0]) if own else None
        example, reference = split or (tuple(v[:4] for v in values), None)
        try:
            if part.random is None:
                return inference_copy(frozen, example=example, reference=reference)
            with replay_draws(rng.generators_of(self.module)) as again, torch.no_grad():
                reference = frozen(*example)
                again()
                return inference_copy(frozen, example=example, reference=reference)
        except Exception:  # folding is an optimisation: any failure runs the plain part
            return None

    def _split_reference(
        self, part: Partition, version: tuple, first: Tensor
    ) -> tuple[tuple[Tensor, ...], tuple[Tensor, ...]] | None:
        """The example the split ran its frozen part on and the outputs it got, when they
        still hold (same weights, device and dtype, no autocast): the copy's check then
        needs no reference run of its own."""
        example, out = part.traced.example, part.example_frontier
        if not self._split_holds(part, version) or out is None:
            return None
        if not example or not all(isinstance(v, Tensor) for v in example):
            return None
        if (example[0].device, example[0].dtype) != (first.device, first.dtype):
            return None
        if torch.is_autocast_enabled(first.device.type):
            return None
        return example, out

    def _split_holds(self, part: Partition, version: tuple) -> bool:
        """Whether ``part``'s frozen weights still have the version they had at the split
        (``version``: theirs now), so what the split computed on the example holds."""
        split = self._split_weights.get(id(part))
        return split is not None and split[0] is part and split[1] == version

    def _example_frontier(self, part: Partition, fresh: bool) -> tuple | None:
        """``part``'s frozen output on its trace's example: the one the split computed
        when ``fresh`` (the weights unchanged since), else computed again; ``None``
        without an example."""
        if fresh and part.example_frontier is not None:
            return part.example_frontier
        if part.frozen is None or part.traced.example is None:
            return None
        with torch.no_grad(), rng.kept(rng.generators_of(self.module)):
            return tuple(part.frozen(*part.traced.example))

    def cacheable(self, deterministic: bool) -> CacheStatus | None:
        """None when the frozen part's output may be cached, else the OFF status saying why."""
        mode = "inference" if self.frozen_inference else "as set"

        def off(reason: OffReason, detail: str = "") -> CacheStatus:
            return CacheStatus(CacheState.OFF, self.boundary, reason, detail, frozen_mode=mode)

        if self.options.cache is False:
            return off(OffReason.DISABLED)
        if self.part is None:
            reason, detail = self.failure or (OffReason.NO_FROZEN_PART, "")
            if reason in (OffReason.STOCHASTIC, OffReason.RANDOM) and not deterministic:
                return off(OffReason.NOT_DETERMINISTIC)  # the first reason, as with a split
            return off(reason, detail)
        if not deterministic:
            return off(OffReason.NOT_DETERMINISTIC)
        drew = self._drew.get(id(self.part))
        drew_why = drew[1] if drew is not None and drew[0] is self.part else None
        if (self.part.random or drew_why) and not self.options.augment_views:
            return off(OffReason.RANDOM, self.part.random or drew_why or "")
        if self.part.batch_statistics:
            return off(OffReason.STOCHASTIC, self.part.batch_statistics)
        if self.part.stateful:
            return off(OffReason.STATEFUL, self.part.stateful)
        if self.part.mixes_samples:
            return off(OffReason.MIXES_SAMPLES, self.part.mixes_samples)
        return None

    def _mode_string(self, part: Partition) -> str:
        assert part.frozen is not None
        return (
            ",".join(
                f"{m.training}:{batchnorm.mode_of(m)}"
                for m in part.frozen.modules()
                if batchnorm.is_batchnorm(m)
            )
            + f"|{hash(part.traced.modes)}"
        )

    def ensure_cache(
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
        """Build, extend or reuse the cache for ``role``; returns (and records) its status.

        With ``augment_views=K`` and a frozen part that draws random numbers, each of K
        caches holds one augmented pass over the data, built at its first use; epoch
        ``e`` is served by view ``e % K``."""
        views = self.options.augment_views if self.part is not None and self.part.random else None
        view = epoch % views if views else 0
        slot = f"{role}@view{view}" if views else role
        self._view[role] = view if views else -1
        status = self._ensure(role, slot, data, indices, device, batch_size, fingerprint)
        if views:
            status = replace(status, view=view, views=views)
            self.status[role] = status
        return status

    def _slot(self, role: str) -> str:
        """The entry that serves ``role`` now: its cache, or this epoch's augmented view."""
        view = self._view.get(role, -1)
        return role if view < 0 else f"{role}@view{view}"

    def _ensure(
        self,
        role: str,
        slot: str,
        data,
        indices: Tensor | None,
        device: torch.device,
        batch_size: int,
        fingerprint: str | None,
    ) -> CacheStatus:
        """:meth:`ensure_cache` for the entry ``slot``.

        Every generator is watched (:mod:`frostline.engine.rng`) while the data is read and
        the frozen part runs for the cache, and restored: a draw there means the data (or
        the frozen part, outside an augmented view) is random, and the cache is off. The
        first reuse of a cache in each fit recomputes a few of its entries from the data
        and compares them; data declared deterministic that reads otherwise turns the
        cache off for it, with one warning naming the dataset.
        """
        status = self.cacheable(getattr(data, "deterministic", False))
        if status is None and fingerprint is None:
            status = CacheStatus(CacheState.OFF, self.boundary, OffReason.NO_FINGERPRINT)
        if status is not None:
            return self._off(role, slot, status)
        part = self.part
        assert part is not None
        rows = indices if indices is not None else torch.arange(data.n)
        key = CacheKey(
            part.boundary,
            f"{fingerprint}:{hash(tuple(rows.tolist()))}",
            self._content_key(self.prefix_tensors()),
            self._mode_string(part),
        )
        untrusted = self._untrusted.get(key.data)
        if untrusted is not None:
            return self._off(role, slot, self._off_status(OffReason.DATA_RANDOM, untrusted))
        held = rng.generators_of(self.module)
        try:
            return self._fill(role, slot, data, part, key, rows, indices, device, batch_size, held)
        except _Drew as e:
            if e.source == "frozen":
                self._drew[id(part)] = (part, e.why)
                return self._off(role, slot, self._off_status(OffReason.RANDOM, e.why))
            self._untrusted[key.data] = e.why
            warnings.warn(
                f"{e.why}: the activation cache is off for it (declare a Dataset "
                "deterministic only when every read of a sample gives the same values)",
                UserWarning,
                stacklevel=2,
            )
            return self._off(role, slot, self._off_status(OffReason.DATA_RANDOM, e.why))

    def _off_status(self, reason: OffReason, detail: str = "") -> CacheStatus:
        mode = "inference" if self.frozen_inference else "as set"
        return CacheStatus(CacheState.OFF, self.boundary, reason, detail, frozen_mode=mode)

    def _off(self, role: str, slot: str, status: CacheStatus) -> CacheStatus:
        """Record ``status`` (off) for ``role``, dropping the cache in ``slot``."""
        old = self.entries.pop(slot, None)
        if old is not None:
            _close(old.stores)
        self.status[role] = status
        return status

    def _fill(
        self,
        role: str,
        slot: str,
        data,
        part: Partition,
        key: CacheKey,
        rows: Tensor,
        indices: Tensor | None,
        device: torch.device,
        batch_size: int,
        held: tuple,
    ) -> CacheStatus:
        """Reuse, extend or build the entry ``slot``; raises :class:`_Drew`."""
        view = slot != role  # an augmented view: its frozen part draws, by design

        def watched(fn):
            return fn if view else _watched(fn, held)

        entry = self.entries.get(slot)
        if entry is not None and entry.key == key:
            entry.version = self._version()  # same contents, maybe new counters
            entry.partition = part
            if not view:
                self._check(entry, data, rows, device, held)
            return self._record(role, CacheState.REUSED, entry)
        ready = self.prepared.pop(role, None) if not view else None
        if ready is not None:
            if self._serves(ready, key, part):
                if entry is not None:
                    _close(entry.stores)
                self.entries[slot] = _Entry(key, ready.stores, ready.local, self._version(), part)
                self._check(self.entries[slot], data, rows, device, held)
                return self._record(role, CacheState.REUSED, self.entries[slot])
            _close(ready.stores)
        local = None
        if indices is not None:
            local = torch.full((data.n,), -1, dtype=torch.long)
            local[indices] = torch.arange(len(indices))
        extra = None
        if entry is not None and entry.key.data == key.data:
            extra = self._extension(entry, part)
        if extra is not None and entry is not None:
            step = watched(extra)
            stores = self._build(step, _store_batches(entry.stores, batch_size, device), len(rows))
            if stores is None:
                return self._too_large(role)
            _close(entry.stores)
            self.entries[slot] = _Entry(key, stores, local, self._version(), part)
            return self._record(role, CacheState.EXTENDED, self.entries[slot])
        self.entries.pop(slot, None)
        if entry is not None:
            _close(entry.stores)

        def batches() -> Iterator[tuple[Tensor, tuple]]:
            for chunk in torch.arange(len(rows)).split(batch_size):
                x = _read(data, rows[chunk], held)
                yield chunk, part.traced.flat(_to(x, device))

        later, joint = self._next_split(part)
        stores = None
        if joint is not None:  # in memory or not at all (refused at the first batch): the
            # planned split's tensors must not push this fit's cache to disk
            fn = self._frozen_fn
            both = watched(lambda *v: fn(v, joint)(*v))
            stores = self._build(both, batches(), len(rows), spill=False)
        if stores is None:
            later = None
            one = watched(lambda *v: self._frozen_fn(v)(*v))
            stores = self._build(one, batches(), len(rows))
        if stores is None:
            return self._too_large(role)
        if later is not None:
            self._keep(role, later, key, stores[len(part.frontier) :], local)
            stores = stores[: len(part.frontier)]
        self.entries[slot] = _Entry(key, stores, local, self._version(), part)
        return self._record(role, CacheState.BUILT, self.entries[slot])

    def _check(self, entry: _Entry, data, rows: Tensor, device: torch.device, held) -> None:
        """At the first reuse of ``entry`` in this fit, recompute a few of its entries
        (spread over the data) and compare; raises :class:`_Drew` when they differ."""
        if entry.checked == self._fits:
            return
        pos = torch.linspace(0, len(rows) - 1, steps=min(_CHECKED, len(rows))).round().long()
        pos = pos.unique()
        idx = rows[pos]
        values = entry.partition.traced.flat(_to(_read(data, idx, held), device))
        with torch.no_grad():
            now = _watched(lambda *v: self._frozen_fn(v)(*v), held)(*values)
        for store, fresh in zip(entry.stores, now):
            kept = store[pos].to(fresh.device)  # the stores hold ``rows`` in order
            fresh = fresh.to(kept.dtype)
            # loose: another batch size, TF32 convolutions or a half-precision store move
            # the last digits; data that reads otherwise (an augmentation) moves far more
            tol = 1e-2 if kept.dtype in (torch.float32, torch.float64) else 1e-1
            same = [
                torch.allclose(a, b, rtol=tol, atol=tol / 10, equal_nan=True)
                for a, b in zip(kept, fresh)
            ]
            if not all(same):
                raise _Drew(
                    "data",
                    f"{_data_name(data)} is declared deterministic, but sample "
                    f"{int(idx[same.index(False)])} read again gives other values than "
                    "when its cache was built",
                )
        entry.checked = self._fits

    def _next_split(self, part: Partition) -> tuple[Partition | None, nn.Module | None]:
        """The split the planned unfreeze needs, and the frozen module giving both frontiers."""
        if not self.next_ids or self._key is None:
            return None, None
        ids = set(self._key[0]) | self.next_ids
        try:
            later = partition(part.traced, trainable=ids)
        except GraphError:
            return None, None
        if (
            later.frozen is None
            or later.boundary == part.boundary
            or later.random
            or later.batch_statistics
            or later.stateful
            or later.mixes_samples
        ):
            return None, None
        joint = joint_frozen(part, later)
        return (later, joint) if joint is not None else (None, None)

    def _keep(
        self, role: str, later: Partition, key: CacheKey, stores: list, local: Tensor | None
    ) -> None:
        """Keep ``later``'s frontier (built with this fit's cache) for the next fit."""
        check = self._example_frontier(later, fresh=True)  # split just now: computed then
        if check is None:
            _close(stores)
            return
        old = self.prepared.pop(role, None)
        if old is not None:
            _close(old.stores)
        self.prepared[role] = _Prepared(
            CacheKey(
                later.boundary,
                key.data,
                self._content_key(_frozen_tensors(later)),
                _running_statistics(later),
            ),
            stores,
            local,
            check,
            self._fits,
        )

    def _serves(self, ready: _Prepared, key: CacheKey, part: Partition) -> bool:
        """Whether frontier tensors kept by the last fit are this split's cache: the same
        frontier, data, frozen weights and BatchNorm modes, and the same values on the
        example batch (which stands for the modes a trace baked in)."""
        if ready.fit != self._fits - 1 or part.frozen is None:
            return False
        if (ready.key.boundary, ready.key.data, ready.key.weights) != (
            key.boundary,
            key.data,
            key.weights,
        ) or ready.key.mode != _running_statistics(part):
            return False
        now = self._example_frontier(
            part, fresh=self._split_holds(part, weights_version(self.prefix_tensors()))
        )
        return (
            now is not None
            and len(now) == len(ready.check)
            and all(same_outputs(a, b) for a, b in zip(now, ready.check))
        )

    def _extension(self, entry: _Entry, part: Partition):
        """A graph from the stored frontier to the new one, when the new one lies past it."""
        old = entry.partition
        if old.traced is not part.traced or entry.key.boundary == part.boundary:
            return None
        if entry.key.mode.split("|")[-1] != self._mode_string(part).split("|")[-1]:
            return None
        if entry.key.mode.split("|")[0] != self._mode_string(old).split("|")[0]:
            return None
        # whether the new frontier lies past the stored one is a walk over the graph; the
        # stored part's weights are hashed only then (a phase-2 split that unfreezes more
        # never extends, and its old weights need not be read)
        step = bridge(old, part)
        if step is None:
            return None
        if entry.key.weights != self._content_key(_frozen_tensors(old)):
            return None
        return step

    def _build(self, fn, batches, n: int, spill: bool = True) -> list[ActivationStore] | None:
        """The stores, or None when they fit neither in memory nor (``spill``) on disk."""
        try:
            return ActivationStore.build_many(
                fn,
                batches,
                n,
                memory_budget_bytes=self.options.cache_memory_bytes,
                spill_dir=self.options.cache_dir,
                dtype=self.options.cache_dtype,
                free_bytes=_free_bytes(self.options.cache_dir) if spill else 0,
            )
        except MemoryError:
            return None

    def _too_large(self, role: str) -> CacheStatus:
        status = CacheStatus(CacheState.OFF, self.boundary, OffReason.TOO_LARGE)
        self.status[role] = status
        return status

    def _record(self, role: str, state: CacheState, entry: _Entry) -> CacheStatus:
        status = CacheStatus(
            state,
            entry.key.boundary,
            samples=len(entry.stores[0]),
            nbytes=sum(s.nbytes for s in entry.stores),
            location="disk" if any(s.location == "disk" for s in entry.stores) else "memory",
            frozen_mode="inference" if self.frozen_inference else "as set",
        )
        self.status[role] = status
        return status

    def _version(self) -> tuple:
        """Per-step key of the frozen weights: version counters, storage, optimizer steps."""
        ts = self.prefix_tensors()
        try:
            return (
                tuple([t._version for t in ts]),
                tuple([t.data_ptr() for t in ts]),
                tuple([self.steps[t] for t in ts]),
            )
        except RuntimeError:  # inference tensors have no version counter
            return weights_version(ts, steps=self.steps)

    def cached_inputs(self, role: str, idx: Tensor) -> tuple[Tensor, ...] | None:
        """Cached frontier tensors for these samples, or None when the cache cannot serve them."""
        slot = self._slot(role)
        entry = self.entries.get(slot)
        if entry is None or entry.partition is not self.part:
            return None
        if entry.version != self._version():
            self.entries.pop(slot, None)  # weights changed under us: never serve stale outputs
            _close(entry.stores)
            self.status[role] = CacheStatus(
                CacheState.INVALIDATED, entry.key.boundary, OffReason.WEIGHTS_CHANGED
            )
            return None
        rows = idx if entry.local is None else entry.local[idx]
        if (rows < 0).any():
            return None
        return tuple(s[rows] for s in entry.stores)

    def plan_next(self, params: Iterable[Tensor] = ()) -> None:
        """Start a fit whose next fit will also train ``params`` (a planned unfreeze).

        When this fit builds its cache from the data, the same run also keeps the frontier
        of the split the next fit will need (the frozen values right below ``params``), as
        memory allows; the next fit then reuses it instead of running the frozen part over
        the data again. What the fit before the last one kept is dropped.
        """
        self._fits += 1
        self.next_ids = frozenset(id(p) for p in params)
        for role, old in list(self.prepared.items()):
            if old.fit < self._fits - 1:
                _close(self.prepared.pop(role).stores)

    def new_fit(self) -> None:
        """Forget memoised digests and structure: the next check reads the model again."""
        self.new_epoch(reread_weights=True)

    def new_epoch(self, *, reread_weights: bool) -> None:
        """Re-read the structure (parameters, modules, modes) at an epoch's start.

        With ``reread_weights`` the frozen weights are hashed again too, which catches
        writes hidden from torch's version counters (``p.data.copy_``). The trainer asks
        for it only when code that may write weights ran since the last check (a callback
        whose ``writes_weights`` is True); version-visible writes are always seen.
        """
        if reread_weights:
            self._digests.clear()
            self._tensor_digests.clear()
        self._stochastic.clear()  # a layer's rate may have changed (p = 0)
        self._params = None
        self._flags = None

    def _content_key(self, tensors: list[Tensor]) -> tuple:
        """Weights key with a content digest (catches ``p.data.copy_``), read once per check."""
        plain = weights_version(tensors)
        digest = self._digests.get(plain)
        if digest is None:
            digest = self._digests[plain] = text_digest(self.weight_digest(t) for t in tensors)
        return (*plain, digest)

    def weight_digest(self, t: Tensor) -> str:
        """``tensor_digest(t)``, each tensor read once until the weights are read again.

        Memoised by the tensor, its storage and its version until :meth:`new_fit` or
        :meth:`new_epoch` with ``reread_weights``: ``fit`` hands it to the fingerprint that
        verifies the frozen weights, so the cache key reads none of them a second time.

        Example:
            >>> import torch
            >>> runner = Runner(torch.nn.Linear(2, 2))
            >>> w = torch.ones(3)
            >>> runner.weight_digest(w) == tensor_digest(w)
            True
        """
        try:
            key = (id(t), t.data_ptr(), t._version)
        except RuntimeError:  # an inference tensor has no version counter: read it
            return tensor_digest(t)
        digest = self._tensor_digests.get(key)
        if digest is None:
            digest = self._tensor_digests[key] = tensor_digest(t)
        return digest

    def drop(self) -> None:
        for e in self.entries.values():
            _close(e.stores)
        self.entries.clear()
        for p in self.prepared.values():
            _close(p.stores)
        self.prepared.clear()


def _frozen_tensors(part: Partition) -> list[Tensor]:
    """The frozen part's weights: its parameters, then its buffers (the user's tensors)."""
    assert part.frozen is not None
    return [*part.frozen.parameters(), *part.frozen.buffers()]


def _running_statistics(part: Partition) -> str:
    """Which BatchNorms of the frozen part normalise with running statistics (a policy
    named differently that computes the same, ``"auto"`` on a frozen layer and
    ``"inference"``, gives the same string)."""
    assert part.frozen is not None
    return "".join(
        "1" if not m.training or batchnorm.runs_inference(m) else "0"
        for m in part.frozen.modules()
        if batchnorm.is_batchnorm(m)
    )


_CHECKED = 4  # entries of a reused cache recomputed and compared, once per fit


def _read(data, idx: Tensor, held: tuple) -> Any:
    """The inputs of samples ``idx``; raises :class:`_Drew` when reading them drew random
    numbers (every generator is put back first)."""
    with rng.kept(held) as watch:
        x, _ = data.gather(idx)
    if watch.moved:
        raise _Drew(
            "data",
            f"{_data_name(data)} is declared deterministic, but reading it draws random "
            f"numbers ({', '.join(watch.moved)})",
        )
    return x


def _watched(fn, held: tuple):
    """``fn`` (the frozen part, run for the cache) that raises :class:`_Drew` when it
    draws random numbers (every generator is put back first)."""

    def run(*values: Any) -> Any:
        with rng.kept(held) as watch:
            out = fn(*values)
        if watch.moved:
            raise _Drew(
                "frozen",
                f"the frozen part draws random numbers ({', '.join(watch.moved)}) while "
                "its outputs are cached",
            )
        return out

    return run


def _close(stores: list[ActivationStore]) -> None:
    for s in stores:
        s.close()


def _store_batches(
    stores: list[ActivationStore], batch_size: int, device: torch.device
) -> Iterator[tuple[Tensor, tuple]]:
    n = len(stores[0])
    for start in range(0, n, batch_size):
        idx = torch.arange(start, min(n, start + batch_size))
        yield idx, tuple(s[idx].to(device) for s in stores)


def _free_bytes(spill_dir) -> int | None:
    try:
        return shutil.disk_usage(spill_dir or tempfile.gettempdir()).free
    except OSError:
        return None


def _to(obj: Any, device: torch.device) -> Any:
    if isinstance(obj, dict):
        return {k: _to(v, device) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return type(obj)(_to(v, device) for v in obj)
    return obj.to(device, non_blocking=True) if isinstance(obj, Tensor) else obj


def _head(x: Any, n: int) -> Any:
    """The first ``n`` samples of a batch (tensor, dict or tuple of tensors)."""
    if isinstance(x, dict):
        return {k: _head(v, n) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return type(x)(_head(v, n) for v in x)
    return x[:n] if isinstance(x, Tensor) and x.dim() else x


def fingerprint_of(data) -> str | None:
    """Exact fingerprint of in-memory data (None when the data is not in memory)."""
    arrays = data.inputs() if hasattr(data, "inputs") else ()
    if not arrays:
        ds = getattr(data, "dataset", None)
        fp = getattr(ds, "fingerprint", None)
        return str(fp() if callable(fp) else fp) if fp is not None else None
    return data_fingerprint(*arrays)
