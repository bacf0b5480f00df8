"""Which split of the model holds now: traces and partitions, kept per trainable set and modes.

:class:`Splits` traces the model on an example batch (:mod:`frostline.engine.frozen`),
splits it at the frontier of its frozen part, and keeps each split by its key (the
trainable parameters, every module's mode and BatchNorm policy), so that a change of
``requires_grad`` or of a mode re-splits at the next step and a change back costs
nothing. With ``frozen_inference`` it also puts the frozen part's modules in eval mode
(:class:`InferenceModes`) and undoes that when the fit ends. When no split serves (the
model cannot be traced, nothing is frozen, the frozen part draws random numbers),
:attr:`Splits.part` is None and :attr:`Splits.failure` says why.
"""

from __future__ import annotations

from typing import Any, NamedTuple

from torch import Tensor, nn

from frostline.core import batchnorm
from frostline.engine.fingerprints import weights_version
from frostline.engine.frozen import (
    FrozenEffect,
    GraphError,
    Partition,
    RandomnessError,
    Traced,
    frozen_calls,
    mode_key,
    partition,
    trace,
    watch_frozen,
)
from frostline.engine.runner.status import CacheOptions, OffReason
from frostline.engine.runner.weights import frozen_tensors

__all__ = ["InferenceModes", "Splits", "head"]


class _Structure(NamedTuple):
    """The module's structure, read once per epoch: parameters, modules, BatchNorm policies."""

    params: list[nn.Parameter]
    modules: list[nn.Module]
    policies: tuple


class InferenceModes:
    """The modules ``frozen_inference`` put in eval mode, and the guesses that found them.

    Example:
        >>> from torch import nn
        >>> modes = InferenceModes()
        >>> lin = nn.Linear(2, 2)
        >>> modes.to_eval([lin]), lin.training
        (True, False)
        >>> modes.restore(); lin.training
        True
    """

    def __init__(self) -> None:
        # the modules a guess put in eval mode, by the key before it (fit puts the model
        # in train mode every epoch; the guess is not made again)
        self.guesses: dict[tuple, list[nn.Module]] = {}
        self.flipped: list[nn.Module] = []

    def to_eval(self, modules: list[nn.Module]) -> bool:
        """Put ``modules`` in eval mode (remembered for :meth:`restore`); True if any changed."""
        changed = False
        for m in modules:
            if m.training:
                m.training = False
                self.flipped.append(m)
                changed = True
        return changed

    def restore(self) -> None:
        """Put every module :meth:`to_eval` changed back in train mode."""
        for m in self.flipped:
            m.training = True
        self.flipped.clear()


class Splits:
    """The split of ``module`` for its trainable set and modes now (see the module doc).

    Example:
        >>> import torch
        >>> from torch import nn
        >>> net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
        >>> _ = net[0].requires_grad_(False)
        >>> splits = Splits(net, CacheOptions())
        >>> splits.verify(torch.randn(4, 4))
        >>> splits.part.boundary
        ('1',)
    """

    def __init__(self, module: nn.Module, options: CacheOptions) -> None:
        self.module = module
        self.options = options
        self.verified = False
        self.example: Any = None
        self.traces: dict[tuple, tuple[Traced, tuple]] = {}
        self.partitions: dict[tuple, Partition] = {}
        self.stochastic: dict[tuple, FrozenEffect | None] = {}
        self.modes = InferenceModes()
        self.part: Partition | None = None
        self.failure: tuple[OffReason, str] | None = None
        self.key: tuple | None = None
        self.flags: tuple | None = None
        self.structure: _Structure | None = None
        # per split: (the split, its frozen weights' version when it was made)
        self.split_weights: dict[int, tuple[Partition, tuple]] = {}
        self.tensors: tuple[Partition, list[Tensor]] | None = None

    @property
    def frozen_inference(self) -> bool:
        """Whether the frozen part runs in inference mode (``fit(frozen_inference=True)``)."""
        return self.options.frozen_inference

    def verify(self, example: Any) -> None:
        """Remember a real batch (a few samples) to trace and check the model on."""
        if self.verified:
            return
        self.verified = True
        self.example = head(example, 4)
        self.key = self.flags = None
        self.refresh()

    def walk(self) -> _Structure:
        """Read the module's structure: parameters, modules, BatchNorm policies (per epoch)."""
        modules = list(self.module.modules())
        self.structure = _Structure(
            list(self.module.parameters()),
            modules,
            tuple(batchnorm.mode_of(m) for m in modules),
        )
        self.tensors = None
        return self.structure

    def forget_structure(self) -> None:
        """Re-read the structure and flags at the next :meth:`refresh` (an epoch's start)."""
        self.stochastic.clear()  # a layer's rate may have changed (p = 0)
        self.structure = None
        self.flags = None

    def refresh(self) -> bool:
        """Re-split when the trainable set or the modes changed; True if the split moved.

        Called every step: it reads ``requires_grad`` and ``training`` flags only. The
        structure (parameters, submodules, BatchNorm policies) is re-read after
        :meth:`forget_structure`, once per epoch.
        """
        s = self.structure if self.structure is not None else self.walk()
        flags = (
            tuple(p.requires_grad for p in s.params),
            tuple(m.training for m in s.modules),
        )
        if flags == self.flags:
            return False
        self.flags = flags
        key = (
            tuple(id(p) for p in s.params if p.requires_grad),
            (flags[1], s.policies),
        )
        if self.example is None:
            self.key = key
            return False
        if key == self.key:
            return False
        old = self.part
        if self.frozen_inference and key not in self.partitions:
            key = self._guess_inference(key, s)
        for _ in range(3):  # frozen_inference flips modes, which may re-split once more
            self.part = self._partition(key, s)
            self.key = key
            if not (self.frozen_inference and self.part is not None and self._apply_inference()):
                break
            training = tuple(m.training for m in s.modules)
            self.flags = (self.flags[0], training)
            key = (key[0], (training, s.policies))
        return self.part is not old

    def _partition(self, key: tuple, s: _Structure) -> Partition | None:
        if key in self.partitions:
            return self.partitions[key]
        reference = None  # the model's output on the probe rows, when the watch just ran
        if not self.frozen_inference and not self.options.augment_views:
            # an active stochastic layer in the frozen part: the split would gain nothing
            # (no cache, no folding), so the model runs whole and nothing is traced
            if key not in self.stochastic:
                watch = watch_frozen(self.module, self.example)
                self.stochastic[key], reference = watch.effect, watch.output
            effect = self.stochastic[key]
            if effect is not None:
                random = effect.kind == "random"
                self.failure = (OffReason.RANDOM if random else OffReason.STOCHASTIC, str(effect))
                return None
        # what a trace bakes in: training flags; an export trace runs BatchNorm inline, so
        # also whether each BatchNorm's policy makes it use running statistics
        modes = mode_key(self.module)
        policies = tuple(
            batchnorm.runs_inference(m) for m in s.modules if batchnorm.is_batchnorm(m)
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
            self.split_weights.clear()
            self.modes.guesses.clear()
            traced = None
        if traced is None:
            # in other modes, the tracer that worked before (and its leaves) is tried first
            like = next(reversed(self.traces.values()), (None,))[0]
            try:
                traced = trace(self.module, self.example, like=like, reference=reference)
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
        self.split_weights[id(part)] = (part, weights_version(frozen_tensors(part)))
        return part

    def _guess_inference(self, key: tuple, s: _Structure) -> tuple:
        """Put the modules that run on frozen values only in eval mode before the first
        split (:func:`frozen_calls`), so that one trace, in the final modes, serves; those
        the split does not confirm as modules of the frozen part go back to their mode
        (a trace that baked their flag is then redone). Returns the key for the modes now
        set. The outcome is remembered by ``key``: the next epoch (in train mode again)
        flips the same modules without running the model."""
        assert self.flags is not None
        if key in self.modes.guesses:
            confirmed = self.modes.guesses[key]
        else:
            confirmed = self._guess(key, s)
            self.modes.guesses[key] = confirmed
        self.modes.to_eval(confirmed)
        if not confirmed:
            return key
        training = tuple(m.training for m in s.modules)
        self.flags = (self.flags[0], training)
        return (key[0], (training, s.policies))

    def _guess(self, key: tuple, s: _Structure) -> list[nn.Module]:
        """The modules of the frozen part, found by one run with hooks and one split in
        the guessed modes; every flag is as before on return."""
        guess = [m for m in frozen_calls(self.module, self.example) if m.training]
        if not guess:
            return []
        for m in guess:
            m.training = False
        training = tuple(m.training for m in s.modules)
        part = self._partition((key[0], (training, s.policies)), s)
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
        found = []
        for path in self.part.frozen_modules:
            try:
                found.append(self.module.get_submodule(path))
            except AttributeError:  # a tracer's own scope name, not a module of the model
                continue
        return self.modes.to_eval(found)

    def end_fit(self) -> None:
        """Undo the modes flipped for ``frozen_inference``; the next step re-reads the flags."""
        self.modes.restore()
        self.key = self.flags = None

    @property
    def trainable_ids(self) -> tuple[int, ...] | None:
        """Ids of the trainable parameters at the last :meth:`refresh`."""
        return self.key[0] if self.key is not None else None

    @property
    def boundary(self) -> tuple[str, ...]:
        """Names of the frontier tensors (empty without a frozen part)."""
        return self.part.boundary if self.part is not None else ()

    def prefix_tensors(self) -> list[Tensor]:
        """The frozen part's weights (parameters and buffers), the user's own tensors.

        Read once per split and epoch (:meth:`walk` re-reads it)."""
        part = self.part
        if part is None or part.frozen is None:
            return []
        if self.tensors is None or self.tensors[0] is not part:
            self.tensors = (part, frozen_tensors(part))
        return self.tensors[1]

    def split_holds(self, part: Partition, version: tuple) -> bool:
        """Whether ``part``'s frozen weights still have the version they had at the split
        (``version``: theirs now), so what the split computed on the example holds."""
        split = self.split_weights.get(id(part))
        return split is not None and split[0] is part and split[1] == version


def head(x: Any, n: int) -> Any:
    """The first ``n`` samples of a batch (tensor, dict or tuple of tensors).

    Example:
        >>> import torch
        >>> head({"a": torch.zeros(8, 2)}, 4)["a"].shape
        torch.Size([4, 2])
    """
    if isinstance(x, dict):
        return {k: head(v, n) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return type(x)(head(v, n) for v in x)
    return x[:n] if isinstance(x, Tensor) and x.dim() else x
