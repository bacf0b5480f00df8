"""Keep any torch optimizer in step with a module's trainable set.

:class:`OptimizerTracker` wraps an optimizer someone else built (a plain loop's
``torch.optim.AdamW``, Lightning's ``configure_optimizers``, the Hugging Face
Trainer's) and, on :meth:`~OptimizerTracker.sync`, brings its parameter groups in line
with ``requires_grad``:

* parameters that stay trainable keep their optimizer state and their group;
* frozen parameters leave the optimizer: their state is dropped and ``.grad`` cleared,
  so the next ``step()`` cannot move them (momentum and weight decay included);
* newly trainable parameters join as new groups, at their own learning rate (given
  with ``unfreeze(..., learning_rate=...)``) or the tracker's default rate, following
  the learning-rate schedule of the optimizer's first group scaled by their rate's ratio
  to that group's rate in the schedule's terms (:meth:`OptimizerTracker.fit_scheduler`);
* a parameter whose own rate changed moves to a group at that rate, state kept.

The groups the optimizer had when tracking began are never removed (an LR scheduler
zips over them), only emptied; groups the tracker added go when they empty. Parameters
that are not the module's (a learnable loss temperature) are left as they are.
:class:`~frostline.engine.live.LiveOptimizer` (what ``fit`` uses) is built on the same
tracker, owning every group.

>>> import torch
>>> from torch import nn
>>> net = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 1))
>>> _ = net[0].requires_grad_(False)
>>> opt = torch.optim.SGD([p for p in net.parameters() if p.requires_grad], lr=0.1)
>>> tracker = OptimizerTracker(opt, net)
>>> _ = net[0].requires_grad_(True); tracker.sync()
True
>>> [len(g["params"]) for g in opt.param_groups]
[2, 2]
"""

from __future__ import annotations

import math
import warnings
from collections import Counter
from collections.abc import Callable, Hashable, Iterable
from typing import Any

import torch
from torch import nn
from torch.optim.lr_scheduler import CosineAnnealingLR, CosineAnnealingWarmRestarts, CyclicLR

from frostline.core.state import learning_rate_of

__all__ = [
    "ONE_CYCLE_KEYS",
    "OptimizerTracker",
    "like_groups",
    "named_parameters_once",
    "named_trainable",
    "no_decay_kind",
    "one_cycle_group",
    "track",
]

GroupOptions = Callable[[str, nn.Parameter], dict]
Kind = Callable[[str, torch.Tensor], Hashable]

# keys a saved layout never carries (tensors and what the tracker recomputes)
_LAYOUT_SKIP = ("params", "param_names")


def named_parameters_once(module: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """``(name, parameter)`` for every parameter, each tensor once (under its first name).

    >>> [n for n, _ in named_parameters_once(nn.Linear(2, 1))]
    ['weight', 'bias']
    """
    seen: set[int] = set()
    out = []
    for name, p in module.named_parameters(remove_duplicate=False):
        if id(p) not in seen:
            seen.add(id(p))
            out.append((name, p))
    return out


def named_trainable(
    module: nn.Module, named: list[tuple[str, nn.Parameter]] | None = None
) -> list[tuple[str, nn.Parameter]]:
    """``(name, parameter)`` for every parameter that requires grad, each tensor once.

    ``named`` is the module's :func:`named_parameters_once`, when the caller keeps it
    (the training loop reads it once per epoch; walking the modules costs ~1 ms a step).

    >>> net = nn.Linear(2, 1); _ = net.bias.requires_grad_(False)
    >>> [n for n, _ in named_trainable(net)]
    ['weight']
    """
    return [
        (n, p)
        for n, p in (named_parameters_once(module) if named is None else named)
        if p.requires_grad
    ]


def no_decay_kind(name: str, p: torch.Tensor) -> bool:
    """The usual weight-decay rule's split: True for biases and other 1-d tensors (norms' scales).

    >>> no_decay_kind("0.weight", torch.zeros(2, 2)), no_decay_kind("0.bias", torch.zeros(2))
    (False, True)
    """
    return p.ndim <= 1 or name.endswith("bias")


def _shared_prefix(a: str, b: str) -> int:
    n = 0
    for x, y in zip(a.split("."), b.split(".")):
        if x != y:
            break
        n += 1
    return n


def like_groups(
    optimizer: torch.optim.Optimizer, module: nn.Module, kind: Kind = no_decay_kind
) -> GroupOptions:
    """Group options for a newly trainable parameter: those of the optimizer's group it
    would have belonged to, as the groups are now.

    Among the groups (their parameters as they are when this is called), those where the
    parameter's ``kind`` is the most common one are candidates (else those holding any
    of that kind, else all); of these, the group holding the parameter's nearest
    relative by name (longest shared module path). Its options are copied: every key of
    ``optimizer.defaults`` but ``lr`` (weight decay, betas, momentum, ...); the rate
    follows the tracker's rules. So with decay and no-decay groups, an unfrozen bias joins
    without decay and an unfrozen weight with the decay the user gave weights.

    >>> net = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2))
    >>> opt = torch.optim.AdamW([{"params": [net[1].weight], "weight_decay": 0.05},
    ...                          {"params": [net[1].bias], "weight_decay": 0.0}], lr=1e-3)
    >>> rule = like_groups(opt, net)
    >>> rule("0.weight", net[0].weight)["weight_decay"], rule("0.bias", net[0].bias)["weight_decay"]
    (0.05, 0.0)
    """
    names = {id(p): n for n, p in module.named_parameters()}
    members: list[list[tuple[str, Hashable]]] = []
    for g in optimizer.param_groups:
        members.append(
            [(names[id(p)], kind(names[id(p)], p)) for p in g["params"] if id(p) in names]
        )
    keys = [k for k in optimizer.defaults if k != "lr"]

    def options(name: str, param: torch.Tensor) -> dict:
        k = kind(name, param)
        counts = [Counter(kd for _, kd in m) for m in members]
        candidates = [i for i, c in enumerate(counts) if c and c.most_common(1)[0][0] == k]
        candidates = candidates or [i for i, c in enumerate(counts) if c[k]]
        candidates = candidates or [i for i, m in enumerate(members) if m] or [0]
        best = max(
            candidates,
            key=lambda i: (max((_shared_prefix(name, n) for n, _ in members[i]), default=0), -i),
        )
        group = optimizer.param_groups[best]
        return {
            key: group[key]
            for key in keys
            if key in group and isinstance(group[key], bool | int | float | str | tuple | None)
        }

    return options


def _own_rate(p: torch.Tensor) -> float | None:
    value = learning_rate_of(p)
    return None if value is None else float(value)


def _innermost(optimizer: Any) -> Any:
    """The optimizer inside wrappers that keep it as ``.optimizer`` (accelerate, Lightning)."""
    while isinstance(getattr(optimizer, "optimizer", None), torch.optim.Optimizer):
        optimizer = optimizer.optimizer
    return optimizer


def schedulers_in(scheduler: Any) -> list[Any]:
    """``scheduler`` and every scheduler it drives (``SequentialLR``, ``ChainedScheduler``), depth first.

    >>> net = nn.Linear(2, 1); opt = torch.optim.SGD(net.parameters(), lr=0.1)
    >>> a = torch.optim.lr_scheduler.ConstantLR(opt, factor=0.5, total_iters=2)
    >>> b = torch.optim.lr_scheduler.ExponentialLR(opt, gamma=0.9)
    >>> [type(s).__name__ for s in schedulers_in(torch.optim.lr_scheduler.ChainedScheduler([a, b]))]
    ['ChainedScheduler', 'ConstantLR', 'ExponentialLR']
    """
    if scheduler is None:
        return []
    out = [scheduler]
    # torch keeps a composite's children in ``_schedulers`` (no public accessor)
    for child in getattr(scheduler, "_schedulers", None) or []:
        out.extend(schedulers_in(child))
    return out


ONE_CYCLE_KEYS = ("max_lr", "initial_lr", "min_lr")
"""The keys OneCycleLR writes into every param group (the peak, the start, the floor)."""


def one_cycle_group(group: dict) -> bool:
    """Whether a OneCycleLR has replaced this param group's rate (its keys are all there).

    Example:
        >>> g = {"lr": 0.04, "max_lr": 1.0, "initial_lr": 0.04, "min_lr": 4e-7}
        >>> one_cycle_group({"lr": 0.1}), one_cycle_group(g)
        (False, True)
    """
    return all(key in group for key in ONE_CYCLE_KEYS)


def _nominal_rates(optimizer: torch.optim.Optimizer, scheduler: Any) -> list[float]:
    """Each group's rate in its schedule's terms: the peak (``max_lr``) where a OneCycleLR or
    CyclicLR replaced the optimizer's rate, else the rate it started from (``initial_lr``)."""
    cyclic = next((s for s in schedulers_in(scheduler) if isinstance(s, CyclicLR)), None)
    out = []
    for i, g in enumerate(optimizer.param_groups):
        if cyclic is not None and i < len(cyclic.max_lrs):
            out.append(float(cyclic.max_lrs[i]))
        elif one_cycle_group(g):
            out.append(float(g["max_lr"]))
        else:
            out.append(float(g.get("initial_lr", g["lr"])))
    return out


def _check_rate(value: object, what: str) -> float:
    if (
        isinstance(value, bool)
        or not isinstance(value, int | float)
        or not math.isfinite(value)
        or value < 0
    ):
        raise ValueError(f"{what} must be a finite number >= 0, got {value!r}")
    return float(value)


class OptimizerTracker:
    """An existing torch optimizer, kept in step with ``module``'s trainable set.

    ``lr``: the rate of newly trainable parameters that have none of their own
    (default: the optimizer's constructor rate, ``optimizer.defaults["lr"]``; under a
    OneCycleLR or CyclicLR, which replace that rate, the first group's ``max_lr``).
    ``group_options``: ``(name, param) -> dict`` of extra options for the group a new
    parameter joins (e.g. ``{"weight_decay": 0.0}`` for biases; default:
    :func:`like_groups`, the options of the optimizer's group it would have belonged
    to); other options come from ``optimizer.defaults``, as with ``add_param_group``.
    ``scope``: ``name -> bool``, the module's parameters this tracker manages (default:
    all); the others are left alone, as parameters that are not the module's are
    (another optimizer's, in a loop with several). ``owns_groups=True``:
    every group is the tracker's (removed when empty, all rates its own).
    ``factor``: what multiplies a tracker group's base rate (default: the ratio of the
    first original group's current rate to its initial one, so added groups follow the
    optimizer's LR schedule). ``scheduler``: the LR scheduler built on this optimizer,
    kept in step with the groups (see :meth:`fit_scheduler`). ``scaler``: the
    ``torch.amp.GradScaler`` the loop steps through, if any (see :meth:`attach`).

    >>> net = nn.Linear(2, 1)
    >>> opt = torch.optim.Adam(net.parameters(), lr=0.01)
    >>> tracker = OptimizerTracker(opt, net)
    >>> _ = net.bias.requires_grad_(False); tracker.sync(), opt.param_groups[0]["params"] == [net.weight]
    (True, True)
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        module: nn.Module,
        *,
        lr: float | None = None,
        group_options: GroupOptions | None = None,
        owns_groups: bool = False,
        factor: Callable[[], float] | None = None,
        scheduler: Any = None,
        scaler: Any = None,
        scope: Callable[[str], bool] | None = None,
    ) -> None:
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(
                f"expected a torch.optim.Optimizer, got {type(optimizer).__module__}.{type(optimizer).__name__}"
            )
        if not isinstance(module, nn.Module):
            raise TypeError(
                f"expected the torch.nn.Module whose parameters the optimizer trains, "
                f"got {type(module).__module__}.{type(module).__name__}"
            )
        if group_options is not None and not callable(group_options):
            raise TypeError(
                f"group_options must be a callable (name, param) -> dict, got {group_options!r}"
            )
        if scope is not None and not callable(scope):
            raise TypeError(f"scope must be a callable name -> bool, got {scope!r}")
        if scheduler is not None and _innermost(getattr(scheduler, "optimizer", None)) is not (
            _innermost(optimizer)
        ):
            raise ValueError(
                f"scheduler {type(scheduler).__name__} does not drive this optimizer "
                "(pass the LR scheduler built on the same optimizer)"
            )
        if scaler is not None and not (
            callable(getattr(scaler, "get_scale", None))
            and callable(getattr(scaler, "is_enabled", None))
        ):
            raise TypeError(f"scaler must be a torch.amp.GradScaler, got {type(scaler).__name__}")
        self._fixed = 0 if owns_groups else len(optimizer.param_groups)
        if scheduler is not None:
            # ReduceLROnPlateau keeps no initial_lr: the rate tracking began with
            for g in optimizer.param_groups:
                g.setdefault("initial_lr", g["lr"])
        self._reference = _nominal_rates(optimizer, scheduler)
        if lr is None:
            peaked = self._fixed and self._reference[0] != float(
                optimizer.param_groups[0].get("initial_lr", optimizer.param_groups[0]["lr"])
            )
            if peaked:
                lr = self._reference[0]
            elif "lr" not in optimizer.defaults:
                raise ValueError(
                    f"{type(optimizer).__name__} has no default 'lr'; pass lr= for newly unfrozen parameters"
                )
            else:
                lr = optimizer.defaults["lr"]
            if isinstance(lr, torch.Tensor):
                lr = float(lr)
        self.optimizer = optimizer
        self.module = module
        self.lr = _check_rate(lr, "lr")
        self.scope = scope
        self.group_options = (
            like_groups(optimizer, module)
            if group_options is None and not owns_groups
            else group_options
        )
        self._factor = factor
        self.scheduler = scheduler
        self.scaler = scaler
        self._key: tuple | None = None
        self._hook: Any = None
        self._forward_hook: Any = None
        self._joined: list[nn.Parameter] = []
        self.changes = 0
        #: ids of every parameter that was trainable while tracked (verification exempts them)
        self.ever_trainable: set[int] = {id(p) for _, p in named_trainable(module)}

    # -- rates --------------------------------------------------------------------------
    def rate_of(self, p: torch.Tensor) -> float:
        """The base rate ``p`` trains at: its own rate, else the tracker's ``lr``."""
        own = _own_rate(p)
        return self.lr if own is None else own

    def factor(self) -> float:
        """What multiplies the base rates of the tracker's groups right now."""
        if self._factor is not None:
            return float(self._factor())
        for g, ref in zip(self.optimizer.param_groups[: self._fixed], self._reference):
            if ref > 0:
                lr = g["lr"]
                return float(lr) / ref
        return 1.0

    def _first_reference(self) -> float:
        """The first original group's rate in its schedule's terms (0.0 when there is none)."""
        for ref in self._reference[: self._fixed]:
            if ref > 0:
                return ref
        return 0.0

    def refresh_rates(self) -> None:
        """Set each tracker group's ``lr`` to its base rate times :meth:`factor`.

        With a ``scheduler`` the scheduler sets them (its entries for the added groups
        come from :meth:`fit_scheduler`), so nothing changes here.
        """
        if self.scheduler is not None:
            return
        f = self.factor()
        for g in self.optimizer.param_groups[self._fixed :]:
            if "base_lr" in g:
                g["lr"] = g["base_lr"] * f

    # -- sync ---------------------------------------------------------------------------
    def _options(self, name: str, p: nn.Parameter) -> dict:
        if self.group_options is None:
            return {}
        out = self.group_options(name, p)
        if not isinstance(out, dict):
            raise TypeError(f"group_options must return a dict, got {out!r} for {name!r}")
        return out

    def _fits(self, group: dict, p: torch.Tensor) -> bool:
        """Whether ``p`` may stay in ``group`` (a group not made by a tracker keeps what has no own rate)."""
        if "base_lr" not in group:
            return _own_rate(p) is None
        return group["base_lr"] == self.rate_of(p)

    def sync(self, named: list[tuple[str, nn.Parameter]] | None = None) -> bool:
        """Bring the optimizer in line with ``requires_grad`` and own rates; True if anything changed.

        ``named``: the module's :func:`named_parameters_once`, if the caller keeps it.

        >>> net = nn.Linear(2, 1); opt = torch.optim.SGD(net.parameters(), lr=0.1)
        >>> t = OptimizerTracker(opt, net); t.sync()
        False
        """
        scope = self.scope
        current = named_trainable(self.module, named)
        if scope is not None:
            current = [(n, p) for n, p in current if scope(n)]
        key = tuple((id(p), _own_rate(p)) for _, p in current)
        if key == self._key:
            return False
        opt = self.optimizer
        wanted = {id(p): n for n, p in current}
        own = {
            id(p)
            for n, p in (named_parameters_once(self.module) if named is None else named)
            if scope is None or scope(n)
        }
        changed = False
        placed: set[int] = set()
        moving: list[tuple[str, nn.Parameter]] = []
        for group in opt.param_groups:
            keep = []
            for p in group["params"]:
                if id(p) not in own:  # not the module's (a loss's temperature): left alone
                    keep.append(p)
                elif id(p) not in wanted:
                    opt.state.pop(p, None)
                    p.grad = None
                    changed = True
                elif id(p) in placed:  # a parameter twice in one optimizer: keep the first
                    changed = True
                elif not self._fits(group, p):
                    moving.append((wanted[id(p)], p))  # state kept: only the group changes
                    placed.add(id(p))
                    changed = True
                else:
                    keep.append(p)
                    placed.add(id(p))
            group["params"] = keep
        new = [(n, p) for n, p in current if id(p) not in placed]
        self._joined = [p for _, p in new]
        for _, p in new:
            opt.state.pop(p, None)  # a newly trainable parameter starts fresh
        if moving:
            self._add(moving, merge=True)
        if new:
            self._add(new, merge=False)
            changed = True
        if any(not g["params"] for g in opt.param_groups[self._fixed :]):
            opt.param_groups[:] = opt.param_groups[: self._fixed] + [
                g for g in opt.param_groups[self._fixed :] if g["params"]
            ]
        self._key = key
        self.ever_trainable.update(wanted)
        if changed:
            self.changes += 1
            self.fit_scheduler()
        return changed

    def fit_scheduler(self) -> None:
        """Give the LR scheduler (and each scheduler inside a SequentialLR/ChainedScheduler)
        one entry per group in every per-group list it keeps (torch zips them strictly).

        A group the tracker added, at base rate ``r``, follows the first group's schedule
        scaled by ``s = r / first group's rate in the schedule's terms`` (its
        ``initial_lr``; under OneCycleLR and CyclicLR its ``max_lr``, the peak): its
        ``base_lrs`` entry is its ``initial_lr`` (``s`` times the first group's), its
        ``max_lrs`` entry (CyclicLR) ``s`` times the first group's, its ``LambdaLR``/
        ``MultiplicativeLR`` lambda the first group's; floors (``min_lrs`` of
        ReduceLROnPlateau) and momentum bounds are the first group's, and
        ``get_last_lr()`` gets the group's current rate.

        >>> net = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 1)); _ = net[0].requires_grad_(False)
        >>> opt = torch.optim.SGD(net[1].parameters(), lr=0.1)
        >>> sched = torch.optim.lr_scheduler.ReduceLROnPlateau(opt, min_lr=[1e-3])
        >>> t = OptimizerTracker(opt, net, scheduler=sched)
        >>> _ = net[0].requires_grad_(True); t.sync(), sched.min_lrs, len(sched.get_last_lr())
        (True, [0.001, 0.001], 2)
        """
        if self.scheduler is None:
            return
        groups = self.optimizer.param_groups
        fixed = self._fixed
        added = groups[fixed:]
        ref = self._first_reference()
        scales = [g["base_lr"] / ref if ref and "base_lr" in g else 1.0 for g in added]
        for sched in schedulers_in(self.scheduler):
            self._fit_lists(sched, added, scales)

    def _fit_lists(self, sched: Any, added: list[dict], scales: list[float]) -> None:
        fixed = self._fixed

        def extend(name: str, values: list) -> None:
            current = getattr(sched, name, None)
            if isinstance(current, list) and current:
                setattr(sched, name, current[:fixed] + values)

        extend("base_lrs", [float(g.get("initial_lr", g["lr"])) for g in added])
        lambdas = getattr(sched, "lr_lambdas", None)
        if isinstance(lambdas, list) and lambdas:
            first = lambdas[0]

            def follow(step, _first=first):  # a plain function: not pickled into state_dict
                return _first(step)

            extend("lr_lambdas", [follow] * len(added))
        for name in ("min_lrs", "base_momentums", "max_momentums"):
            current = getattr(sched, name, None)
            if isinstance(current, list) and current:
                extend(name, [current[0]] * len(added))
        peaks = getattr(sched, "max_lrs", None)
        if isinstance(peaks, list) and peaks:
            extend("max_lrs", [float(peaks[0]) * k for k in scales])
        # get_last_lr() reads _last_lr; it stays as long as the groups
        extend("_last_lr", [g["lr"] for g in added])

    def _add(self, params: Iterable[tuple[str, nn.Parameter]], *, merge: bool) -> None:
        """New groups for ``params`` by rate and options; ``merge``: join a matching tracker group if any."""
        opt = self.optimizer
        with_initial = any("initial_lr" in g for g in opt.param_groups)
        buckets: dict[tuple, list[nn.Parameter]] = {}
        options: dict[tuple, dict] = {}
        for name, p in params:
            extra = self._options(name, p)
            rate = self.rate_of(p)
            bucket = (rate, tuple(sorted(extra.items())))
            buckets.setdefault(bucket, []).append(p)
            options[bucket] = extra
        for bucket, ps in buckets.items():
            rate = bucket[0]
            target = None
            for g in opt.param_groups[self._fixed :] if merge else []:
                if g.get("base_lr") == rate and all(
                    g.get(k) == v for k, v in options[bucket].items()
                ):
                    target = g
                    break
            if target is not None:
                target["params"].extend(ps)
                continue
            group = {**options[bucket], "params": ps, "base_lr": rate}
            scheduled = self._scheduled_keys(rate)
            if scheduled is None:  # no original group to follow: the tracker's factor
                group["lr"] = rate * self.factor()
                if with_initial:
                    group["initial_lr"] = rate
            else:
                group.update(scheduled)
                group["lr"] = self._join_rate(rate)
            opt.add_param_group(group)

    def _first_group(self) -> dict | None:
        """The first original group with a rate to scale from (None: there is none)."""
        for g, ref in zip(self.optimizer.param_groups[: self._fixed], self._reference):
            if ref > 0:
                return g
        return None

    def _join_rate(self, rate: float) -> float:
        """The rate *now* of a group at base ``rate``: the first group's, scaled by ``rate / its reference``.

        Under a CosineAnnealingLR/WarmRestarts with an ``eta_min`` floor the scaling is
        of the part above the floor, as torch computes each group's rate.
        """
        g0 = self._first_group()
        ref = self._first_reference()
        if g0 is None or not ref:
            return rate * self.factor()
        scale = rate / ref
        lr0 = float(g0["lr"])
        floor = (
            float(self.scheduler.eta_min)
            if isinstance(self.scheduler, CosineAnnealingLR | CosineAnnealingWarmRestarts)
            else 0.0
        )
        base0 = float(g0.get("initial_lr", ref))
        if floor and base0 != floor:
            return floor + (scale * base0 - floor) * (lr0 - floor) / (base0 - floor)
        return scale * lr0

    def _scheduled_keys(self, rate: float) -> dict[str, Any] | None:
        """Keys a scheduler keeps in the groups (``initial_lr``, OneCycleLR's ``max_lr``,
        ``min_lr``, ``max_momentum``), from the first group; None without one.

        Rates (``*_lr``) are scaled by ``rate / reference`` (the first group's rate in
        its schedule's terms); other values are copied.
        """
        g0 = self._first_group()
        ref = self._first_reference()
        if g0 is None or not ref:
            return None
        out: dict[str, Any] = {}
        for k, v in g0.items():
            if k in self.optimizer.defaults or k in ("params", "lr", "base_lr"):
                continue
            if k.endswith("_lr") and isinstance(v, int | float) and not isinstance(v, bool):
                out[k] = rate * (float(v) / ref)
            elif isinstance(v, int | float | bool | str | tuple) or v is None:
                out[k] = v
        return out

    # -- layout (resume) ----------------------------------------------------------------
    def names(self) -> dict[int, str]:
        """``{id(param): name}`` for the module's parameters."""
        return {id(p): n for n, p in self.module.named_parameters()}

    def layout(self) -> list[dict[str, Any]]:
        """JSON-able groups: parameter names and scalar options (what :meth:`restore_layout` takes).

        >>> net = nn.Linear(2, 1); t = OptimizerTracker(torch.optim.SGD(net.parameters(), lr=0.1), net)
        >>> t.layout()[0]["names"], t.layout()[0]["lr"]
        (['weight', 'bias'], 0.1)
        """
        names = self.names()
        out = []
        for gi, g in enumerate(self.optimizer.param_groups):
            missing = [tuple(p.shape) for p in g["params"] if id(p) not in names]
            if missing:
                raise ValueError(
                    f"optimizer param_groups[{gi}] holds parameters of shapes {missing} that are not "
                    f"parameters of the tracked {type(self.module).__name__}"
                )
            entry: dict[str, Any] = {"names": [names[id(p)] for p in g["params"]]}
            for k, v in g.items():
                if k in _LAYOUT_SKIP:
                    continue
                if isinstance(v, bool | int | float | str) or v is None:
                    entry[k] = v
                elif isinstance(v, tuple) and all(isinstance(x, int | float) for x in v):
                    entry[k] = {"tuple": list(v)}
                elif isinstance(v, torch.Tensor) and v.numel() == 1:
                    entry[k] = float(v)
            out.append(entry)
        return out

    def restore_layout(self, layout: list[dict[str, Any]]) -> None:
        """Regroup the optimizer exactly as ``layout`` (from :meth:`layout`) says, state dropped.

        Used on resume, before a checkpoint's optimizer state is loaded into the
        optimizer: the state then lands on the right parameters.

        >>> net = nn.Linear(2, 1); opt = torch.optim.SGD([net.weight], lr=0.1)
        >>> t = OptimizerTracker(opt, net); t.restore_layout([{"names": ["weight"]}, {"names": ["bias"], "lr": 0.01}])
        >>> [len(g["params"]) for g in opt.param_groups], opt.param_groups[1]["lr"]
        ([1, 1], 0.01)
        """
        if not isinstance(layout, list) or not all(
            isinstance(g, dict) and isinstance(g.get("names"), list) for g in layout
        ):
            raise ValueError(
                f"layout must be a list of dicts with a 'names' list (from OptimizerTracker.layout()), got {layout!r}"
            )
        params = dict(self.module.named_parameters())
        unknown = [n for g in layout for n in g["names"] if n not in params]
        if unknown:
            raise ValueError(
                f"the saved optimizer layout names parameters the model does not have: {unknown[:10]}"
            )
        if len(layout) < self._fixed:
            raise ValueError(
                f"the saved optimizer layout has {len(layout)} group(s), fewer than the "
                f"{self._fixed} the optimizer was built with"
            )
        opt = self.optimizer
        opt.state.clear()
        groups = []
        for i, saved in enumerate(layout):
            options = {
                k: (tuple(v["tuple"]) if isinstance(v, dict) and "tuple" in v else v)
                for k, v in saved.items()
                if k != "names"
            }
            base = dict(opt.param_groups[i]) if i < len(opt.param_groups) else dict(opt.defaults)
            base.update(options)
            base["params"] = [params[n] for n in saved["names"]]
            groups.append(base)
        opt.param_groups.clear()
        for g in groups:
            opt.add_param_group(g)
        self._key = None
        self.sync()
        self.fit_scheduler()

    # -- step hook ----------------------------------------------------------------------
    def _before_forward(self, module: nn.Module, args: Any) -> None:
        self.sync()

    def _before_step(self, optimizer, args, kwargs) -> None:
        if self.sync():
            self._unscale_late(self._joined)
        self.refresh_rates()

    def _unscale_late(self, joined: list[nn.Parameter]) -> None:
        """Parameters that joined at ``step()`` with a gradient already computed.

        A ``GradScaler`` unscaled the groups before this step but not these, so with
        ``scaler=`` their gradients are unscaled here (a non-finite one skips this step,
        as the scaler would); without, a one-line warning names the fix.
        """
        late = [p for p in joined if p.grad is not None]
        if not late:
            return
        scaler = self.scaler
        if scaler is not None and scaler.is_enabled():
            inverse = 1.0 / float(scaler.get_scale())
            with torch.no_grad():
                for p in late:
                    assert p.grad is not None
                    p.grad.mul_(inverse)
                    if not bool(torch.isfinite(p.grad).all()):
                        p.grad = None
            return
        warnings.warn(
            f"frostline: {len(late)} newly trainable parameter(s) joined the optimizer at step(), after "
            "their gradients were computed (the tracked module's forward did not run since they were "
            "unfrozen); under a GradScaler those gradients are still scaled: pass scaler= to fl.track, "
            "or call tracker.sync() before backward",
            RuntimeWarning,
            stacklevel=3,
        )

    def attach(self) -> OptimizerTracker:
        """Sync when the module's forward begins and before every ``optimizer.step()``.

        A forward pre-hook on the tracked module and a step pre-hook on this optimizer
        (nothing else is touched). Syncing at the forward pass puts newly unfrozen
        parameters in the optimizer before their gradients exist, so a ``GradScaler``
        unscales them with the rest; parameters that still join at ``step()`` with a
        gradient are unscaled by the tracker when it knows the ``scaler``, and warned
        about otherwise.
        """
        if self._hook is None:
            self._hook = self.optimizer.register_step_pre_hook(self._before_step)
        if self._forward_hook is None:
            self._forward_hook = self.module.register_forward_pre_hook(self._before_forward)
        return self

    def remove(self) -> None:
        """Remove the hooks (the optimizer keeps its current groups)."""
        for hook in (self._hook, self._forward_hook):
            if hook is not None:
                hook.remove()
        self._hook = self._forward_hook = None

    def __enter__(self) -> OptimizerTracker:
        return self.attach()

    def __exit__(self, *exc) -> None:
        self.remove()

    def __repr__(self) -> str:
        return (
            f"OptimizerTracker({type(self.optimizer).__name__}, groups={len(self.optimizer.param_groups)}, "
            f"changes={self.changes}, hooked={self._hook is not None})"
        )


def track(
    optimizer: torch.optim.Optimizer,
    model: Any,
    *,
    lr: float | None = None,
    group_options: GroupOptions | None = None,
    scheduler: Any = None,
    scaler: Any = None,
    hook: bool = True,
) -> OptimizerTracker:
    """Make ``optimizer`` (any ``torch.optim`` optimizer you built) follow ``model``'s trainable set.

    With ``hook=True`` (default) the optimizer syncs itself when the model's forward
    begins and before every ``step()`` (a forward pre-hook on the module and a step
    pre-hook on this optimizer; ``tracker.remove()`` takes them off, and
    ``with fl.track(...):`` scopes them). With ``hook=False`` call ``tracker.sync()``
    yourself before ``backward()``. ``scheduler``: the LR scheduler on this optimizer,
    if any: every per-group list it keeps gets an entry for each added group, which
    follows the first group's schedule scaled by its rate's ratio to the first group's
    (:meth:`OptimizerTracker.fit_scheduler`). ``scaler``: the ``torch.amp.GradScaler``
    the loop uses, if any: a parameter that joins only at ``step()`` (the model's forward
    did not run through the tracked module) has its gradient unscaled too.
    ``model``: a ``torch.nn.Module`` or a frostline Layer/Model.

    >>> import frostline as fl, torch
    >>> from torch import nn
    >>> model = fl.wrap(nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2)))
    >>> model.layers[0].trainable = False
    >>> opt = torch.optim.AdamW(model.trainable_weights, lr=1e-3)
    >>> tracker = fl.track(opt, model)
    >>> _ = model.unfreeze(fl.select.first(1), learning_rate=1e-4)
    >>> model.module(torch.randn(3, 4)).sum().backward(); opt.step()
    >>> sorted(g["lr"] for g in opt.param_groups)
    [0.0001, 0.001]
    """
    module = model if isinstance(model, nn.Module) else getattr(model, "module", None)
    if not isinstance(module, nn.Module):
        raise TypeError(
            f"model must be a torch.nn.Module or a frostline Layer/Model, got {type(model).__name__}: {model!r}"
        )
    tracker = OptimizerTracker(
        optimizer,
        module,
        lr=lr,
        group_options=group_options,
        scheduler=scheduler,
        scaler=scaler,
    )
    if hook:
        tracker.attach()
    return tracker
