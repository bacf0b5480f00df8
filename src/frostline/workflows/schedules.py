"""Freezing schedules as callbacks: what changes, at which epoch, with which rate.

* :class:`UnfreezeAt` — unfreeze a selection at one epoch (optionally at its own rate).
* :class:`GradualUnfreezing` — ULMFiT: the base starts frozen, one more block from
  the top joins training every ``every`` epochs.
* :class:`DiscriminativeLR` — layer-wise learning rates (decaying from the top, or
  spread geometrically over a range) that land in the optimizer's param groups.
* :class:`ProgressiveFreezing` — FreezeOut / Composer layer freezing: blocks freeze
  from the bottom as training proceeds; the frozen prefix then runs without autograd
  and its outputs are cached, so later epochs get cheaper (``log[i]["cache"]``).

A "block" (:class:`Group`) is a contiguous run of the base's leaf layers: by default
the base's direct children that own weights; ``groups=n`` splits the leaf layers into
``n`` near-equal runs; a list of selectors (bottom to top) names them explicitly. See
:func:`layer_groups`.

Epochs are 0-based, as in ``Callback.on_epoch_begin``: a change made "at epoch 2"
applies from the third epoch (``Epoch 3/N`` in the progress output) on. Each callback
records what it did in ``self.log`` (a list of JSON-able dicts, one per change) and
implements ``get_state``/``set_state`` so a resumed fit carries on exactly.

>>> import frostline as fl
>>> from torch import nn
>>> base = fl.wrap(nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 8), nn.Linear(8, 8)), name="base")
>>> [g.name for g in layer_groups(base)]
['0', '2', '3']
>>> model = fl.Sequential([base, nn.Linear(8, 2)])
>>> model.compile("adam", loss="sparse_categorical_crossentropy")
>>> import numpy as np
>>> x, y = np.random.rand(32, 4).astype("float32"), np.random.randint(0, 2, 32)
>>> cb = GradualUnfreezing(base)
>>> _ = model.fit(x, y, epochs=3, verbose=0, callbacks=[cb])
>>> [(e["epoch"], e["groups"]) for e in cb.log]
[(0, ['3']), (1, ['2']), (2, ['0'])]
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from frostline.api import select
from frostline.api.callbacks import Callback
from frostline.api.layer import Layer
from frostline.api.select import SelectionError, Selector
from frostline.core.state import set_learning_rate, unique_tensors

if TYPE_CHECKING:
    from frostline.api.model import Model

__all__ = [
    "DiscriminativeLR",
    "GradualUnfreezing",
    "Group",
    "GroupRates",
    "ProgressiveFreezing",
    "UnfreezeAt",
    "layer_groups",
]

BaseSpec = Layer | nn.Module | str
GroupsSpec = int | Sequence[Any] | None


# --------------------------------------------------------------------------- groups


@dataclass(frozen=True)
class Group:
    """A block of leaf layers: ``indices`` into ``base.leaf_layers()``, bottom to top."""

    name: str
    indices: tuple[int, ...]
    paths: tuple[str, ...]

    def selector(self) -> Selector:
        """A selector picking exactly this group's leaf layers (relative to the base)."""
        idx = list(self.indices)
        return Selector(f"group {self.name!r}", lambda ls: idx)

    def modules(self, base: nn.Module) -> list[nn.Module]:
        leaves = select.leaves_of(base)
        return [leaves[i][1] for i in self.indices]

    def params(self, base: nn.Module) -> list[torch.Tensor]:
        """The group's parameters, each once (a weight owned beside children: just that one)."""
        leaves = select.leaves_of(base)
        return list(unique_tensors(p for i in self.indices for p in leaves[i].params()))


def _as_layer(base: Layer | nn.Module, what: str = "base") -> Layer:
    if isinstance(base, Layer):
        return base
    if isinstance(base, nn.Module):
        return Layer(base, name=what)
    raise TypeError(
        f"{what} must be a frostline Layer/Model, a torch.nn.Module or a layer name, "
        f"got {type(base).__name__}: {base!r}"
    )


def _has_weights(module: nn.Module) -> bool:
    return next(module.parameters(), None) is not None


def _is_stack(module: nn.Module) -> bool:
    """A Sequential/ModuleList of two or more children with weights: stages, or blocks of one."""
    return isinstance(module, nn.Sequential | nn.ModuleList) and (
        sum(1 for c in module.children() if _has_weights(c)) >= 2
    )


def _stage_paths(module: nn.Module, prefix: str = "") -> list[str]:
    """Module paths, bottom to top, whose leaves form one group each (see :func:`layer_groups`)."""
    kids = [
        (f"{prefix}.{name}" if prefix else name, child)
        for name, child in module.named_children()
        if _has_weights(child)
    ]
    own = next(module.parameters(recurse=False), None) is not None
    if len(kids) == 1 and not own and next(kids[0][1].children(), None) is not None:
        return _stage_paths(kids[0][1], kids[0][0])  # a single-child wrapper: look through
    if _is_stack(module):
        return [path for path, _ in kids]  # a stack's children are its stages
    alike = Counter(_signature(c) for _, c in kids if _is_stack(c))
    out: list[str] = []
    for path, child in kids:
        if _is_stack(child) and alike[_signature(child)] >= 2:
            out.append(path)  # one of several like stacks: a stage (ResNet's layer1..4)
        elif any(_is_stack(m) for m in child.modules()):
            out += _stage_paths(child, path)  # a stack inside: its children are the stages
        else:
            out.append(path)
    return out


def _signature(stack: nn.Module) -> frozenset[str]:
    return frozenset(type(c).__name__ for c in stack.children() if _has_weights(c))


def _groups_of(leaves: list, keys: list[Any]) -> list[Group]:
    """One group per distinct key, in order of first appearance (leaves with key None join the previous one).

    A group is named by the shortest module paths that hold its leaves and none of
    another group's (``"layer1"``, ``"blocks.6+conv_head+bn2"``).
    """
    order: dict[Any, list[int]] = {}
    last = None
    for i, key in enumerate(keys):
        key = last if key is None else key
        last = key
        order.setdefault(key, []).append(i)
    owner = {leaves[i][0]: g for g, idx in enumerate(order.values()) for i in idx}
    out = []
    for g, idx in enumerate(order.values()):
        names: list[str] = []
        for i in idx:
            parts = leaves[i][0].split(".")
            for depth in range(1, len(parts) + 1):
                prefix = ".".join(parts[:depth])
                if all(
                    o == g
                    for path, o in owner.items()
                    if path == prefix or path.startswith(prefix + ".")
                ):
                    break
            if prefix not in names:
                names.append(prefix)
        paths = tuple(leaves[i][0] for i in idx)
        out.append(Group("+".join(names), tuple(idx), paths))
    return out


def _timm_groups(root: nn.Module, leaves: list) -> list[Group] | None:
    """Groups from a timm model's own ``group_matcher(coarse=True)`` (its stages); None if it has none."""
    matcher = getattr(root, "group_matcher", None)
    if not callable(matcher):
        return None
    try:
        from timm.models import group_parameters

        spec = matcher(coarse=True)
        by_group = group_parameters(root, spec)
    except (ImportError, TypeError, ValueError, AttributeError):
        return None
    gid = {name: g for g, names in by_group.items() for name in names}
    names = {id(p): n for n, p in root.named_parameters()}
    keys = []
    for entry in leaves:
        ids = [gid[names[id(p)]] for p in entry.params() if names.get(id(p)) in gid]
        keys.append(min(ids) if ids else None)
    if all(k is None for k in keys):
        return None
    return _groups_of(leaves, keys)


def _model_groups(root: nn.Module) -> list[Group]:
    """The default groups: what the model says about its stages, else its children.

    A timm model's ``group_matcher(coarse=True)``; otherwise its stage modules: a stack
    (``Sequential``/``ModuleList``) found under single-weighted-child paths is split into
    its children (Hugging Face ``encoder.layer.N`` and ``h.N``, torchvision
    ``features.N``), sibling stacks are stages themselves (ResNet ``layer1``..``layer4``),
    everything else is one group per child that owns weights.
    """
    leaves = select.leaves_of(root)
    timm = _timm_groups(root, leaves)
    if timm is not None:
        return timm
    paths = _stage_paths(root)
    keys: list[Any] = []
    for e in leaves:
        match = [p for p in paths if e.path == p or e.path.startswith(p + ".")]
        # weights a module owns beside its children (a class token) are a group of their own
        keys.append(max(match, key=len) if match else f"own:{e.path}")
    return _groups_of(leaves, keys)


def layer_groups(base: Layer | nn.Module, groups: GroupsSpec = None) -> list[Group]:
    """The blocks of ``base`` a schedule works on, bottom to top.

    ``None`` or ``"stages"``: the model's own stages: a timm model's ``group_matcher(coarse=True)``;
    otherwise a stack of blocks found through single-child paths is split into its
    children (Hugging Face ``encoder.layer.N`` / ``h.N``, torchvision ``features.N``),
    sibling stacks are stages (ResNet ``layer1``..``layer4``), and every other child that
    owns weights is a group (through single-child wrappers); a model that is one opaque
    block falls back to its leaf layers. ``n`` (int): the leaf layers split into ``n`` contiguous, near-equal
    runs; a list of selectors or glob strings: one group each, in the order given
    (bottom first), disjoint.

    >>> from torch import nn
    >>> net = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2), nn.Linear(2, 2), nn.Linear(2, 2))
    >>> [g.paths for g in layer_groups(net, 2)]
    [('0', '1'), ('2', '3')]
    >>> from frostline import select
    >>> [g.name for g in layer_groups(net, [select.first(1), "3"])]
    ['first(1)', "name('3')"]
    """
    layer = _as_layer(base)
    leaves = select.leaves_of(layer.module)
    if not leaves:
        raise SelectionError(f"{layer.name!r} has no layer with weights: nothing to group")
    if groups is None or groups == "stages":
        out = _model_groups(layer.module)
        if len(out) < 2 and len(leaves) > 1:  # one opaque block: fall back to leaf layers
            out = [Group(p or layer.name, (i,), (p,)) for i, (p, _) in enumerate(leaves)]
        return out
    if isinstance(groups, bool):
        raise TypeError("groups must be None, an int or a list of selectors, got a bool")
    if isinstance(groups, int):
        n = len(leaves)
        if not 1 <= groups <= n:
            raise ValueError(
                f"groups={groups} must be between 1 and the number of leaf layers of {layer.name!r} ({n})"
            )
        out = []
        start = 0
        for g in range(groups):
            size = n // groups + (1 if g < n % groups else 0)
            idx = tuple(range(start, start + size))
            out.append(
                Group(f"leaves {start}..{start + size - 1}", idx, tuple(leaves[i][0] for i in idx))
            )
            start += size
        return out
    if isinstance(groups, str | Selector) or not isinstance(groups, Sequence):
        raise TypeError(
            "groups must be None, 'stages', an int, or a list of selectors / glob strings (one per group, bottom first); "
            f"got {type(groups).__name__}: {groups!r}"
        )
    if not groups:
        raise ValueError("groups is an empty list; give at least one selector")
    out = []
    taken: dict[int, str] = {}
    for spec in groups:
        sel = select.as_selector(spec)
        idx = tuple(sel.indices(leaves))
        if not idx:
            shown = ", ".join(p for p, _ in leaves[:12])
            raise SelectionError(
                f"group {sel.description} matched no leaf layer of {layer.name!r}. Leaf layers: {shown}"
            )
        for i in idx:
            if i in taken:
                raise ValueError(
                    f"groups overlap: leaf layer {leaves[i][0]!r} is in both {taken[i]} and {sel.description}"
                )
            taken[i] = sel.description
        out.append(Group(sel.description, idx, tuple(leaves[i][0] for i in idx)))
    return out


def _check_int(value: object, what: str, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{what} must be an int >= {minimum}, got {value!r}")
    return value


def _check_lr(value: object, what: str = "learning_rate") -> float | None:
    if value is None:
        return None
    if (
        isinstance(value, bool)
        or not isinstance(value, int | float)
        or not math.isfinite(value)
        or value <= 0
    ):
        raise ValueError(f"{what} must be a positive number or None, got {value!r}")
    return float(value)


def _trainable_count(model: Model) -> int:
    return sum(p.numel() for p in model.module.parameters() if p.requires_grad)


class _BaseSchedule(Callback):
    """Shared plumbing: resolve the base inside the model being trained, keep a log."""

    writes_weights = False

    def __init__(self, base: BaseSpec | None, groups: GroupsSpec = None) -> None:
        if base is not None and not isinstance(base, Layer | nn.Module | str):
            _as_layer(base)  # raises the TypeError
        if groups is not None and not isinstance(groups, int | Sequence):
            raise TypeError(
                f"groups must be None, an int or a list of selectors, got {type(groups).__name__}"
            )
        if isinstance(groups, bool) or (isinstance(groups, int) and groups < 1):
            raise ValueError(f"groups must be an int >= 1, got {groups!r}")
        self._base_spec = base
        self._groups_spec = groups
        self.base: Layer | None = None
        self.groups: list[Group] = []
        self.log: list[dict[str, Any]] = []

    def set_model(self, model: Model) -> None:
        super().set_model(model)
        spec = self._base_spec
        if spec is None:
            base: Layer = model
        elif isinstance(spec, str):
            base = model.get_layer(spec)
        else:
            base = _as_layer(spec)
            if not any(m is base.module for m in model.module.modules()):
                raise ValueError(
                    f"{type(self).__name__}: base {base.name!r} is not part of the model being trained "
                    f"({model.name!r}); pass a layer of that model (e.g. model.get_layer(...))"
                )
        self.base = base
        self.groups = layer_groups(base, self._groups_spec)

    def _apply(
        self, groups: Sequence[Group], trainable: bool, learning_rate: float | None = None
    ) -> tuple[int, int]:
        assert self.base is not None
        changed = params = 0
        for g in groups:
            plan = select.apply(self.base, g.selector(), trainable, learning_rate=learning_rate)
            changed += len(plan.changes)
            params += sum(c.params for c in plan.changes)
        return changed, params

    def _record(
        self,
        epoch: int,
        action: str,
        groups: Sequence[Group],
        layers: int,
        params: int,
        **extra: Any,
    ) -> dict:
        entry = {
            "epoch": epoch,
            "action": action,
            "groups": [g.name for g in groups],
            "layers": layers,
            "params": params,
            "trainable_params": _trainable_count(self.model),
            **extra,
        }
        self.log.append(entry)
        return entry

    def get_state(self) -> dict:
        return {"log": [dict(e) for e in self.log]}

    def set_state(self, state: dict) -> None:
        self.log = [dict(e) for e in state.get("log", [])]


# --------------------------------------------------------------------------- UnfreezeAt


class UnfreezeAt(Callback):
    """Unfreeze ``selector`` (of ``layer``, default the model) when epoch ``epoch`` begins.

    ``learning_rate`` gives the unfrozen parameters their own rate. On a resumed fit
    that starts past ``epoch`` the selection is unfrozen at the first epoch.

    >>> import frostline as fl, numpy as np
    >>> from torch import nn
    >>> model = fl.wrap(nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2)))
    >>> model.layers[0].trainable = False
    >>> model.compile("adam", loss="sparse_categorical_crossentropy")
    >>> cb = UnfreezeAt(1, fl.select.first(1), learning_rate=1e-4)
    >>> _ = model.fit(np.random.rand(16, 4).astype("float32"), np.random.randint(0, 2, 16), epochs=2, verbose=0, callbacks=[cb])
    >>> cb.log[0]["epoch"], cb.log[0]["params"], sorted(g["lr"] for g in model.optimizer.param_groups)
    (1, 40, [0.0001, 0.001])
    """

    writes_weights = False

    def __init__(
        self,
        epoch: int,
        selector: Any = None,
        learning_rate: float | None = None,
        *,
        layer: BaseSpec | None = None,
    ) -> None:
        self.epoch = _check_int(epoch, "UnfreezeAt epoch", 0)
        self.selector = select.as_selector(selector)
        self.learning_rate = _check_lr(learning_rate)
        if layer is not None and not isinstance(layer, Layer | nn.Module | str):
            _as_layer(layer)
        self._layer_spec = layer
        self.done = False
        self.log: list[dict[str, Any]] = []

    def _target(self) -> Layer:
        spec = self._layer_spec
        if spec is None:
            return self.model
        if isinstance(spec, str):
            return self.model.get_layer(spec)
        return _as_layer(spec, "layer")

    def set_model(self, model: Model) -> None:
        super().set_model(model)
        select.resolve(self._target(), self.selector)  # fail at fit start, not at epoch N

    def on_train_begin(self, logs: dict | None = None) -> None:
        self.done = False

    def on_epoch_begin(self, epoch: int, logs: dict | None = None) -> None:
        if self.done or epoch < self.epoch:
            return
        plan = self._target().unfreeze(self.selector, learning_rate=self.learning_rate)
        self.done = True
        if plan.changes or not self.log:  # a resumed fit re-applies silently
            self.log.append(
                {
                    "epoch": epoch,
                    "action": "unfreeze",
                    "selector": self.selector.description,
                    "layers": len(plan.changes),
                    "params": sum(c.params for c in plan.changes),
                    "learning_rate": self.learning_rate,
                    "trainable_params": _trainable_count(self.model),
                }
            )

    def get_state(self) -> dict:
        return {"done": self.done, "log": [dict(e) for e in self.log]}

    def set_state(self, state: dict) -> None:
        self.done = bool(state.get("done", False))
        self.log = [dict(e) for e in state.get("log", [])]

    def __repr__(self) -> str:
        return f"UnfreezeAt(epoch={self.epoch}, {self.selector.description}, learning_rate={self.learning_rate})"


# --------------------------------------------------------------------------- gradual unfreezing


class GradualUnfreezing(_BaseSchedule):
    """ULMFiT gradual unfreezing: the base starts frozen; one more block from the top joins every ``every`` epochs.

    At epoch ``start_epoch`` the top group of ``base`` is unfrozen, at
    ``start_epoch + every`` the next one down, and so on until all are trainable.
    Layers outside ``base`` (the head) are left as they are. ``freeze_base=False``
    keeps the base's current state instead of freezing it when training begins.
    ``learning_rate`` gives each newly unfrozen group that rate (without it, a rate set
    earlier, e.g. by :class:`DiscriminativeLR`, or the compile rate applies).

    See the module docstring for an example.
    """

    def __init__(
        self,
        base: BaseSpec,
        groups: GroupsSpec = None,
        start_epoch: int = 0,
        every: int = 1,
        learning_rate: float | None = None,
        *,
        freeze_base: bool = True,
    ) -> None:
        if base is None:
            raise ValueError(
                "GradualUnfreezing needs the base to unfreeze (a layer of the model or its name)"
            )
        super().__init__(base, groups)
        self.start_epoch = _check_int(start_epoch, "start_epoch", 0)
        self.every = _check_int(every, "every", 1)
        self.learning_rate = _check_lr(learning_rate)
        self.freeze_base = bool(freeze_base)
        self.unfrozen = 0

    def target(self, epoch: int) -> int:
        """How many groups (from the top) are unfrozen during ``epoch``."""
        if epoch < self.start_epoch:
            return 0
        return min(len(self.groups), (epoch - self.start_epoch) // self.every + 1)

    def set_model(self, model: Model) -> None:
        super().set_model(model)
        # frozen before fit fingerprints the frozen weights, so the groups that never
        # join are verified bitwise at the end; the state is a function of the epoch,
        # so a resumed fit (initial_epoch > 0) lands where the interrupted one was
        if self.freeze_base:
            assert self.base is not None
            self.base.trainable = False
        self.unfrozen = 0

    def on_epoch_begin(self, epoch: int, logs: dict | None = None) -> None:
        want = self.target(epoch)
        if want <= self.unfrozen:
            return
        joined, layers, params = [], 0, 0
        for g in self.groups[::-1][self.unfrozen : want]:
            n, k = self._apply([g], True, self.learning_rate)
            if n:
                joined.append(g)
                layers, params = layers + n, params + k
        self.unfrozen = want
        if joined:
            self._record(
                epoch, "unfreeze", joined, layers, params, learning_rate=self.learning_rate
            )

    def get_state(self) -> dict:
        return {**super().get_state(), "unfrozen": self.unfrozen}

    def __repr__(self) -> str:
        return f"GradualUnfreezing(groups={len(self.groups) or self._groups_spec}, start_epoch={self.start_epoch}, every={self.every})"


# --------------------------------------------------------------------------- discriminative rates


def _regroup(model: Model) -> bool:
    """Move each parameter of the live optimizer into the group of its own rate (state kept)."""
    live = model.live_optimizer
    return live is not None and live.regroup()


class GroupRates(list):
    """Rows ``{"group", "layers", "params", "learning_rate"}``, bottom to top; prints as a table."""

    def __str__(self) -> str:
        head = ("group", "layers", "params", "learning rate")
        cells = [head] + [
            (r["group"], str(r["layers"]), f"{r['params']:,}", f"{r['learning_rate']:.6g}")
            for r in self
        ]
        widths = [max(len(c[i]) for c in cells) for i in range(4)]
        return "\n".join(
            "  ".join(c[i].ljust(widths[i]) if i == 0 else c[i].rjust(widths[i]) for i in range(4))
            for c in cells
        )


class DiscriminativeLR(_BaseSchedule):
    """Layer-wise learning rates for the groups of ``base`` (ULMFiT's discriminative fine-tuning).

    Either ``base_lr`` for the top group and ``decay`` per group going down
    (``lr_g = base_lr * decay ** (groups above g)``; ULMFiT uses ``decay=1/2.6``), or
    ``lr_range=(lo, hi)``: geometric from ``lo`` (bottom group) to ``hi`` (top group),
    like fastai's ``slice(lo, hi)``. ``base_lr=None`` takes the compile rate. Frozen
    groups get their rate too and use it once unfrozen (works with
    :class:`GradualUnfreezing`). Parameters outside ``base`` keep the compile rate.
    The groups are the model's own stages by default (:func:`layer_groups`: timm's
    ``group_matcher``, torchvision's and Hugging Face's stage modules);
    :meth:`dry_run` shows them with their rates.
    The rates land in ``model.optimizer.param_groups`` when each fit begins (optimizer
    state is kept; a recompile clears them and the next fit sets them again); a
    learning-rate schedule scales them all, keeping their ratios.

    >>> import frostline as fl, numpy as np
    >>> from torch import nn
    >>> base = fl.wrap(nn.Sequential(nn.Linear(4, 8), nn.Linear(8, 8), nn.Linear(8, 8)), name="base")
    >>> model = fl.Sequential([base, nn.Linear(8, 2)])
    >>> model.compile(fl.optimizers.Adam(1e-3), loss="sparse_categorical_crossentropy")
    >>> cb = DiscriminativeLR(base, 1e-3, decay=0.5)
    >>> _ = model.fit(np.random.rand(16, 4).astype("float32"), np.random.randint(0, 2, 16), verbose=0, callbacks=[cb])
    >>> cb.rates
    {'0': 0.00025, '1': 0.0005, '2': 0.001}
    >>> sorted({g["lr"] for g in model.optimizer.param_groups})
    [0.00025, 0.0005, 0.001]
    """

    def __init__(
        self,
        base: BaseSpec,
        base_lr: float | None = None,
        decay: float | None = None,
        *,
        lr_range: tuple[float, float] | None = None,
        groups: GroupsSpec = None,
    ) -> None:
        if base is None:
            raise ValueError("DiscriminativeLR needs the base whose layers get the rates")
        super().__init__(base, groups)
        if lr_range is not None:
            if decay is not None or base_lr is not None:
                raise ValueError("pass either lr_range=(lo, hi) or base_lr/decay, not both")
            if not isinstance(lr_range, tuple | list) or len(lr_range) != 2:
                raise ValueError(f"lr_range must be a pair (lo, hi), got {lr_range!r}")
            lo, hi = (_check_lr(v, "lr_range values") for v in lr_range)
            assert lo is not None and hi is not None
            if lo > hi:
                raise ValueError(
                    f"lr_range=(lo, hi) needs lo <= hi (lo is the bottom group's rate), got {lr_range!r}"
                )
            self.lr_range: tuple[float, float] | None = (lo, hi)
        else:
            self.lr_range = None
        self.base_lr = _check_lr(base_lr, "base_lr")
        if decay is None:
            decay = 0.5
        if isinstance(decay, bool) or not isinstance(decay, int | float) or not 0 < decay <= 1:
            raise ValueError(
                f"decay must be a number in (0, 1] (each group down gets decay times the rate above), got {decay!r}"
            )
        self.decay = float(decay)
        self.rates: dict[str, float] = {}

    def compute_rates(self, top_lr: float) -> list[float]:
        """One rate per group, bottom to top."""
        n = len(self.groups)
        if self.lr_range is not None:
            lo, hi = self.lr_range
            if n == 1:
                return [hi]
            return [lo * (hi / lo) ** (i / (n - 1)) for i in range(n)]
        return [top_lr * self.decay ** (n - 1 - i) for i in range(n)]

    def dry_run(self, model: Model | nn.Module) -> GroupRates:
        """The groups of ``base`` inside ``model`` and the rate each would get; changes nothing.

        >>> from torch import nn
        >>> net = nn.Sequential(nn.Linear(4, 8), nn.Linear(8, 8), nn.Linear(8, 2))
        >>> print(DiscriminativeLR(net, 1e-3).dry_run(net))
        group  layers  params  learning rate
        0           1      40        0.00025
        1           1      72         0.0005
        2           1      18          0.001
        """
        if isinstance(model, nn.Module):
            from frostline.api.model import Model

            model = Model(model)
        self.set_model(model)
        assert self.base is not None
        top = self.base_lr if self.base_lr is not None else model.learning_rate
        rows = [
            {
                "group": g.name,
                "layers": len(g.indices),
                "params": sum(p.numel() for p in g.params(self.base.module)),
                "learning_rate": float(lr),
            }
            for g, lr in zip(self.groups, self.compute_rates(top))
        ]
        return GroupRates(rows)

    def on_train_begin(self, logs: dict | None = None) -> None:
        assert self.base is not None
        top = self.base_lr if self.base_lr is not None else self.model.learning_rate
        rates = self.compute_rates(top)
        self.rates = {}
        for g, lr in zip(self.groups, rates):
            for p in g.params(self.base.module):
                set_learning_rate(p, float(lr))
            self.rates[g.name] = float(lr)
        moved = _regroup(self.model)
        self._record(0, "rates", self.groups, 0, 0, rates=dict(self.rates), regrouped=moved)

    def __repr__(self) -> str:
        how = (
            f"lr_range={self.lr_range}"
            if self.lr_range
            else f"base_lr={self.base_lr}, decay={self.decay}"
        )
        return f"DiscriminativeLR({how})"


# --------------------------------------------------------------------------- progressive freezing


class ProgressiveFreezing(_BaseSchedule):
    """FreezeOut / AutoFreeze / Egeria-style freezing: blocks freeze from the bottom as training goes on.

    The groups are the model's own stages by default (``groups="stages"``: timm's
    ``group_matcher``, torchvision's ``features.N`` / ``layerN``, Hugging Face's
    ``encoder.layer.N``; see :func:`layer_groups`). Once frozen, a bottom run of the model
    is a frozen prefix: it runs without autograd and, on deterministic data, its outputs
    are cached; each freeze extends that cache from the old boundary to the new one
    instead of rebuilding it ("extended" in ``log[i]["cache"]``: only the newly frozen
    groups run, over the stored outputs, also with ``fit(frozen_inference=True)``), so
    every freeze makes the following epochs cheaper. (A frozen BatchNorm runs on its running statistics, as
    everywhere in frostline.) A group is never frozen if that would leave nothing to
    train, and at most ``max_groups`` are.

    When a group freezes:

    * ``criterion=None``: by the calendar: the bottom group at epoch ``start_epoch``,
      the next one up at ``start_epoch + every``, and so on;
    * ``criterion="weight_change"`` (Egeria's plasticity, simplified): from
      ``start_epoch`` on, the bottom groups, as a run from the bottom, whose movement
      over the last epoch (``|w_end - w_start| / |w_start|``, the whole group's norms)
      has either fallen below ``tolerance`` times their first epoch's, or has levelled
      off: it lies within ``plateau`` (a fraction, 0.1) of the smallest movement of
      their earlier epochs, neither still falling nor rising. A group's movement falls
      while it learns and levels off at a floor set by its gradient noise, and that
      floor differs from group to group (measured in ``benchmarks/progressive.py``: a
      small ViT's patch embedding levels off at 0.45-0.6 of its first epoch's movement,
      its blocks at 0.2-0.35), so the tolerance alone never freezes a group whose floor
      lies above it, nor anything above that group. A freeze below disturbs the groups
      above (after EfficientNet-Lite0's stem froze, its ``blocks.0`` moved 0.36, 0.38,
      0.45 of its first epoch's movement in epochs 2-4, against 0.36, 0.35, 0.31 in a
      plain fit), so the comparison starts afresh then: only epochs since the last
      freeze count as earlier epochs, the first epoch's movement stays the reference
      for the tolerance. This is the idea of Egeria's rule (a layer freezes once its
      plasticity stops changing) on the weights themselves; ``plateau=None`` leaves
      the tolerance alone;
    * ``criterion="grad_norm"`` (AutoFreeze): the group's gradient norm over the last
      epoch below ``tolerance`` times its first epoch's (the tolerance alone: a
      gradient norm that stops falling may be growing, as the ViT's lower blocks' do).

    ``log`` holds each freeze and, per epoch, the fit's cache note and the criterion's
    ratios (``"activity"``, group -> last / first).

    The rule's arithmetic, on a group whose movement levels off at half its first epoch's:

    >>> ProgressiveFreezing.converged([1.0, 0.6, 0.5, 0.49], tolerance=0.35, plateau=0.1)
    True
    >>> ProgressiveFreezing.converged([1.0, 0.6, 0.5], tolerance=0.35, plateau=0.1)
    False

    >>> import frostline as fl, numpy as np
    >>> from torch import nn
    >>> model = fl.wrap(nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2)))
    >>> model.compile("adam", loss="sparse_categorical_crossentropy")
    >>> cb = ProgressiveFreezing(start_epoch=1)
    >>> _ = model.fit(np.random.rand(16, 4).astype("float32"), np.random.randint(0, 2, 16), epochs=4, verbose=0, callbacks=[cb])
    >>> [(e["epoch"], e["action"], e["groups"]) for e in cb.log if e["action"] == "freeze"]
    [(1, 'freeze', ['0']), (2, 'freeze', ['2'])]
    >>> [e["cache"].split(" ")[0] for e in cb.log if e["action"] == "epoch"]
    ['off', 'built', 'extended', 'reused']
    """

    CRITERIA = (None, "weight_change", "grad_norm")

    def __init__(
        self,
        base: BaseSpec | None = None,
        start_epoch: int = 1,
        every: int = 1,
        groups: GroupsSpec = "stages",
        *,
        max_groups: int | None = None,
        criterion: str | None = None,
        tolerance: float = 0.35,
        plateau: float | None = 0.1,
    ) -> None:
        super().__init__(base, groups)
        self.start_epoch = _check_int(start_epoch, "start_epoch", 0)
        self.every = _check_int(every, "every", 1)
        self.max_groups = None if max_groups is None else _check_int(max_groups, "max_groups", 0)
        if criterion not in self.CRITERIA:
            raise ValueError(f"criterion must be one of {self.CRITERIA}, got {criterion!r}")
        if (
            isinstance(tolerance, bool)
            or not isinstance(tolerance, int | float)
            or not 0 < tolerance <= 1
        ):
            raise ValueError(f"tolerance must be a number in (0, 1], got {tolerance!r}")
        if plateau is not None and (
            isinstance(plateau, bool)
            or not isinstance(plateau, int | float)
            or not 0 <= plateau < 1
        ):
            raise ValueError(f"plateau must be a number in [0, 1) or None, got {plateau!r}")
        self.criterion = criterion
        self.tolerance = float(tolerance)
        self.plateau = None if plateau is None else float(plateau)
        self.frozen = 0
        self.stopped = False
        self._history: dict[int, list[float]] = {}  # group -> its activity, epoch by epoch
        # group -> where its epochs since the last freeze below start in its history
        self._since: dict[int, int] = {}
        self._start: dict[int, list[torch.Tensor]] = {}  # weight_change: weights at epoch start
        self._grads: dict[int, float] = {}  # grad_norm: sum of squared gradient norms
        self._batches = 0
        self._hooks: list[Any] = []

    def _cap(self) -> int:
        n = len(self.groups)
        return n if self.max_groups is None else min(self.max_groups, n)

    def target(self, epoch: int) -> int:
        """How many groups (from the bottom) should be frozen during ``epoch``."""
        if epoch < self.start_epoch:
            return 0
        if self.criterion is not None:
            k = self.frozen
            while k < self._cap() and self._done(k):
                k += 1
            return k
        n = (epoch - self.start_epoch) // self.every + 1
        return min(n, self._cap())

    @staticmethod
    def converged(
        activity: list[float], tolerance: float, plateau: float | None, since: int = 1
    ) -> bool:
        """Whether a group whose activity was ``activity`` (one value per epoch, its first
        epoch first) has converged: the last value below ``tolerance`` times the first,
        or, with ``plateau``, within that fraction of the smallest earlier value from
        epoch ``since`` on (levelled off: neither falling nor rising by more). ``since``
        is at least 1 (the first epoch's movement is the reference, not a floor) and,
        after groups below froze, the first epoch after that freeze: a freeze below
        disturbs a group, so only epochs since then are compared.

        >>> ProgressiveFreezing.converged([1.0, 0.3], tolerance=0.35, plateau=None)
        True
        >>> ProgressiveFreezing.converged([1.0, 0.5, 0.52], tolerance=0.35, plateau=None)
        False
        >>> ProgressiveFreezing.converged([1.0, 0.5, 0.52], tolerance=0.35, plateau=0.1)
        True
        >>> ProgressiveFreezing.converged([1.0, 0.5, 0.4], tolerance=0.35, plateau=0.1)
        False
        >>> ProgressiveFreezing.converged([1.0, 0.5, 0.6], tolerance=0.35, plateau=0.1)
        False
        >>> ProgressiveFreezing.converged([1.0, 0.5, 0.52], tolerance=0.35, plateau=0.1, since=2)
        False
        """
        if len(activity) < 2 or activity[0] <= 0:
            return False
        first, last = activity[0], activity[-1]
        if last < tolerance * first:
            return True
        earlier = activity[max(since, 1) : -1]
        if plateau is None or not earlier:
            return False
        low = min(earlier)
        return (1 - plateau) * low <= last <= (1 + plateau) * low

    def _done(self, k: int) -> bool:
        plateau = self.plateau if self.criterion == "weight_change" else None
        history = self._history.get(k, [])
        return self.converged(history, self.tolerance, plateau, self._since.get(k, 1))

    def on_train_begin(self, logs: dict | None = None) -> None:
        self.frozen, self.stopped = 0, False
        if self.criterion == "grad_norm":
            assert self.base is not None
            for k, g in enumerate(self.groups):
                for p in g.params(self.base.module):
                    if p.requires_grad:
                        self._hooks.append(p.register_hook(self._grad_hook(k)))

    def _grad_hook(self, k: int):
        def hook(grad: torch.Tensor) -> None:
            self._grads[k] = self._grads.get(k, 0.0) + float(grad.detach().float().pow(2).sum())

        return hook

    def on_train_end(self, logs: dict | None = None) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks.clear()
        self._start.clear()

    def _leaves_something(self, k: int) -> bool:
        assert self.base is not None
        frozen = {id(p) for g in self.groups[:k] for p in g.params(self.base.module)}
        return any(p.requires_grad and id(p) not in frozen for p in self.model.module.parameters())

    def on_epoch_begin(self, epoch: int, logs: dict | None = None) -> None:
        self._freeze_to(epoch, self.target(epoch))
        assert self.base is not None
        if self.criterion == "weight_change":  # what the candidates hold now
            self._start = {
                k: [p.detach().clone() for p in self.groups[k].params(self.base.module)]
                for k in range(self.frozen, self._cap())
            }
        self._grads.clear()
        self._batches = 0

    def _freeze_to(self, epoch: int, want: int) -> None:
        if self.stopped or want <= self.frozen:
            return
        while want > self.frozen and not self._leaves_something(want):
            want -= 1  # never freeze everything: keep the model trainable
            self.stopped = True
        new = self.groups[self.frozen : want]
        if new:
            layers, params = self._apply(new, False)
            self.frozen = want
            for k in range(want, len(self.groups)):  # compare only epochs from now on
                self._since[k] = len(self._history.get(k, []))
            if layers:
                self._record(epoch, "freeze", new, layers, params)
        if self.stopped:
            self._record(
                epoch,
                "stop",
                [],
                0,
                0,
                reason="freezing the next group would leave nothing to train",
            )

    def on_train_batch_end(self, batch: int, logs: dict | None = None) -> None:
        self._batches += 1

    def _measure(self) -> dict[str, float]:
        """Each candidate group's activity over the epoch just ended, as last / first."""
        assert self.base is not None
        for k in range(self.frozen, self._cap()):
            if self.criterion == "weight_change" and k in self._start:
                now = self.groups[k].params(self.base.module)
                moved = sum(
                    float((a.detach() - b).float().pow(2).sum())
                    for a, b in zip(now, self._start[k])
                )
                size = sum(float(b.float().pow(2).sum()) for b in self._start[k])
                value = math.sqrt(moved / max(size, 1e-30))
            elif self.criterion == "grad_norm" and k in self._grads:
                value = math.sqrt(self._grads[k] / max(self._batches, 1))
            else:
                continue
            self._history.setdefault(k, []).append(value)
        self._start.clear()
        return {
            self.groups[k].name: round(h[-1] / h[0], 4)
            for k, h in self._history.items()
            if k >= self.frozen and h[0] > 0
        }

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        activity = self._measure() if self.criterion is not None else None
        trainer = getattr(self.model, "_trainer", None)
        runner = getattr(trainer, "runner", None)
        status = getattr(runner, "status", {}) if runner is not None else {}
        extra: dict[str, Any] = {"activity": activity} if activity is not None else {}
        self._record(
            epoch,
            "epoch",
            [],
            0,
            0,
            cache=str(status.get("train", "n/a")),
            epoch_time=(logs or {}).get("epoch_time"),
            **extra,
        )

    def get_state(self) -> dict:
        return {
            **super().get_state(),
            "frozen": self.frozen,
            "stopped": self.stopped,
            "history": {str(k): list(h) for k, h in self._history.items()},
            "since": {str(k): v for k, v in self._since.items()},
        }

    def set_state(self, state: dict) -> None:
        """The log and the criterion's measurements, so a resumed fit decides as before."""
        super().set_state(state)
        if "history" in state:
            self._history = {int(k): [float(v) for v in h] for k, h in state["history"].items()}
            self._since = {int(k): int(v) for k, v in state.get("since", {}).items()}
        else:  # saved before the history was kept: the first and the last epoch
            first, last = state.get("first", {}), state.get("last", {})
            self._history = {int(k): [float(first[k]), float(v)] for k, v in last.items()}

    def __repr__(self) -> str:
        how = (
            f"criterion={self.criterion!r}, tolerance={self.tolerance}, plateau={self.plateau}, "
            if self.criterion
            else ""
        )
        return f"ProgressiveFreezing(start_epoch={self.start_epoch}, every={self.every}, {how}groups={len(self.groups) or self._groups_spec!r})"
