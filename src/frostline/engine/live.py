"""The live optimizer: one torch optimizer that never goes stale.

Before every step it brings its parameter groups in line with the model's trainable
set: frozen parameters leave it (state dropped, ``.grad`` cleared, so they stay
bitwise unchanged), newly trainable ones join it fresh (with their own learning rate
when one was given), and the rest keep their state. It is built from any *spec*: an
object with ``learning_rate`` and ``build(groups) -> torch.optim.Optimizer``
(:mod:`frostline.api.optimizers`).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterable
from typing import Any, Protocol

import torch
from torch import nn
from torch.optim.lr_scheduler import CyclicLR, ReduceLROnPlateau

from frostline.core.state import learning_rate_of
from frostline.engine.tracking import (
    ONE_CYCLE_KEYS,
    OptimizerTracker,
    named_trainable,
    one_cycle_group,
    schedulers_in,
)
from frostline.io.optimizer_state import optimizer_state_from_tensors, optimizer_state_to_tensors


class OptimizerSpec(Protocol):
    """What the live optimizer needs from a spec."""

    learning_rate: float

    def learning_rate_at(self, step: int) -> float: ...

    def build(self, groups: list[dict]) -> torch.optim.Optimizer: ...

    def get_config(self) -> dict: ...

    def group_options(self, name: str, param: torch.Tensor) -> dict[str, Any]: ...


SchedulerFactory = Callable[[torch.optim.Optimizer], "torch.optim.lr_scheduler.LRScheduler"]


class LiveOptimizer:
    """One torch optimizer kept in step with a module's trainable set.

    Call :meth:`sync` before each step (``fit`` does); it returns True when the set
    changed. ``scale`` multiplies every group's base rate (what Keras-style
    ``LearningRateScheduler``/``ReduceLROnPlateau`` change; with a Keras schedule it
    multiplies the scheduled rate); a torch scheduler factory
    is rebuilt and fast-forwarded whenever groups change, so LambdaLR/OneCycleLR
    keep working as layers are unfrozen.

    >>> net = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 1))
    >>> from frostline.api.optimizers import Adam
    >>> live = LiveOptimizer(Adam(0.01), net)
    >>> live.sync(), len(live.optimizer.param_groups[0]["params"])
    (True, 4)
    >>> _ = net[0].requires_grad_(False); live.sync(), len(live.optimizer.param_groups[0]["params"])
    (True, 2)
    """

    def __init__(
        self, spec: OptimizerSpec, module: nn.Module, *, scheduler: SchedulerFactory | None = None
    ) -> None:
        self.spec = spec
        self.module = module
        self.optimizer: torch.optim.Optimizer | None = None
        self.scale = 1.0
        self.scheduler_factory = scheduler
        self.scheduler: Any = None
        self.scheduler_steps = 0
        self.tracker: OptimizerTracker | None = None
        self.names: dict[int, str] = {}
        self.changes = 0

    # -- the trainable set ---------------------------------------------------------
    def trainable(
        self, named: list[tuple[str, nn.Parameter]] | None = None
    ) -> list[tuple[str, nn.Parameter]]:
        return named_trainable(self.module, named)

    def _lr_for(self, p: torch.Tensor) -> float:
        own = learning_rate_of(p)
        return float(self.spec.learning_rate if own is None else own)

    def sync(self, named: list[tuple[str, nn.Parameter]] | None = None) -> bool:
        """Bring the optimizer in line with ``requires_grad`` and own rates; True if anything changed.

        The first call builds the optimizer from the spec; later calls go through the
        same :class:`~frostline.engine.tracking.OptimizerTracker` that ``fl.track``
        gives any optimizer (it owns every group here). ``named``: the module's
        :func:`~frostline.engine.tracking.named_parameters_once`, if the caller keeps it.
        """
        current = self.trainable(named)
        if not current:
            raise RuntimeError(
                "nothing to train: every parameter of the model is frozen (trainable_weights is empty). "
                "Unfreeze something first, e.g. model.trainable = True or model.unfreeze(fl.select.last(5))."
            )
        if self.tracker is None:
            self.adopt(self.spec.build(self._groups(current)))
            changed = True
        else:
            changed = self.tracker.sync(named)
        if changed:
            self.names = {id(p): n for n, p in current}
            self.changes += 1
            self.rebuild_scheduler()
        return changed

    def adopt(self, optimizer: torch.optim.Optimizer) -> None:
        """Use ``optimizer`` (built from this spec, e.g. from a checkpoint) from now on."""
        self.optimizer = optimizer
        self.tracker = OptimizerTracker(
            optimizer,
            self.module,
            lr=self.spec.learning_rate,
            owns_groups=True,
            factor=lambda: self.scale,
            group_options=self.spec.group_options,
        )
        self.tracker.sync()
        self.names = {id(p): n for n, p in self.trainable()}

    def _groups(self, named: Iterable[tuple[str, torch.Tensor]]) -> list[dict]:
        """One group per rate and options (the spec's ``group_options``: e.g. no weight decay)."""
        buckets: dict[tuple, list] = {}
        options: dict[tuple, dict] = {}
        for name, p in named:
            extra = self.spec.group_options(name, p)
            key = (self._lr_for(p), tuple(sorted(extra.items())))
            buckets.setdefault(key, []).append(p)
            options[key] = extra
        return [
            {**options[key], "params": ps, "lr": key[0] * self.scale, "base_lr": key[0]}
            for key, ps in buckets.items()
        ]

    def regroup(self) -> bool:
        """Put every parameter in the group of its own rate (after per-parameter rates changed).

        Optimizer state is kept. Returns True when the groups changed.

        >>> from frostline.api.optimizers import Adam
        >>> from frostline.core.state import set_learning_rate
        >>> net = nn.Linear(2, 1); live = LiveOptimizer(Adam(0.01), net); _ = live.sync()
        >>> set_learning_rate(net.weight, 0.001)
        >>> live.regroup(), sorted(g["lr"] for g in live.optimizer.param_groups)
        (True, [0.001, 0.01])
        """
        if self.tracker is None:
            return False
        return self.sync()

    # -- learning rates ------------------------------------------------------------
    def _headline(self) -> float:
        """The spec's rate now: its schedule's value at the optimizer's step count, or its rate."""
        step = int(getattr(self.optimizer, "schedule_step", 0))
        return float(self.spec.learning_rate_at(step))

    @property
    def learning_rate(self) -> float:
        """The spec's current rate (a schedule's value now) times the scale callbacks set."""
        return self._headline() * self.scale

    def set_learning_rate(self, lr: float) -> None:
        """Set the headline rate; every group keeps its ratio to it (discriminative rates survive)."""
        if (
            not isinstance(lr, int | float)
            or isinstance(lr, bool)
            or not math.isfinite(lr)
            or lr < 0
        ):
            raise ValueError(f"learning rate must be a finite number >= 0, got {lr!r}")
        headline = self._headline()
        self.scale = lr / headline if headline else 1.0
        if self.optimizer is not None:
            for g in self.optimizer.param_groups:
                g["lr"] = g.get("base_lr", self.spec.learning_rate) * self.scale

    def rebuild_scheduler(self) -> None:
        if self.scheduler_factory is None or self.optimizer is None:
            return
        for g in self.optimizer.param_groups:
            g.pop("initial_lr", None)
            g["lr"] = g.get("base_lr", self.spec.learning_rate) * self.scale
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            self.scheduler = self.scheduler_factory(self.optimizer)
            if any(isinstance(s, ReduceLROnPlateau) for s in schedulers_in(self.scheduler)):
                raise TypeError(
                    "compile(scheduler=...) built torch's ReduceLROnPlateau, which needs the "
                    "monitored metric at every step; use fl.callbacks.ReduceLROnPlateau(monitor=...) "
                    "with fit instead"
                )
            self._scale_peaks()
            for _ in range(self.scheduler_steps):
                self.scheduler.step()

    def _scale_peaks(self) -> None:
        """Give each group its own OneCycleLR/CyclicLR curve, scaled by its rate's ratio to the spec's.

        Those schedulers replace the groups' rates with their own (one ``max_lr`` for all
        when given a number), which would erase per-layer rates; every other scheduler
        starts from each group's rate already.
        """
        assert self.optimizer is not None
        nominal = float(self.spec.learning_rate)
        if not nominal:
            return
        for i, g in enumerate(self.optimizer.param_groups):
            k = float(g.get("base_lr", nominal)) / nominal
            if k == 1.0:
                continue
            if one_cycle_group(g):
                for key in ONE_CYCLE_KEYS:
                    g[key] *= k
                g["lr"] = g["initial_lr"]
            for s in schedulers_in(self.scheduler):
                if isinstance(s, CyclicLR):
                    s.base_lrs[i] *= k
                    s.max_lrs[i] *= k
                    g["lr"] = s.base_lrs[i]
            for s in schedulers_in(self.scheduler):
                last = getattr(s, "_last_lr", None)
                if isinstance(last, list) and i < len(last):
                    last[i] = g["lr"]

    def scheduler_step(self) -> None:
        if self.scheduler is not None:
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message=".*lr_scheduler.step.*")
                self.scheduler.step()
            self.scheduler_steps += 1

    # -- state ---------------------------------------------------------------------
    def state_dict(self) -> tuple[dict[str, torch.Tensor], dict]:
        """``(tensors, JSON-able meta)``: optimizer state by parameter name, rate scale,
        scheduler position and spec. Pickle-free, so it can go into safetensors.

        >>> from frostline.api.optimizers import Adam
        >>> net = nn.Linear(2, 1); live = LiveOptimizer(Adam(0.01), net); _ = live.sync()
        >>> net(torch.ones(1, 2)).sum().backward(); live.step()
        >>> tensors, meta = live.state_dict()
        >>> other = LiveOptimizer(Adam(0.01), net); other.load_state_dict(tensors, meta)
        >>> torch.equal(other.optimizer.state[net.weight]["momentum"], live.optimizer.state[net.weight]["momentum"])
        True
        """
        meta: dict = {
            "scale": self.scale,
            "scheduler_steps": self.scheduler_steps,
            "spec": self.spec.get_config(),
        }
        if self.optimizer is None:
            return {}, meta
        names = {id(p): n for n, p in self.module.named_parameters()}
        tensors, meta["optimizer"] = optimizer_state_to_tensors(self.optimizer, names)
        return {k: v.detach().clone() for k, v in tensors.items()}, meta

    def load_state_dict(self, tensors: dict[str, torch.Tensor], meta: dict) -> None:
        """Restore what :meth:`state_dict` returned (parameters matched by name)."""
        self.scale = float(meta.get("scale", 1.0))
        self.scheduler_steps = int(meta.get("scheduler_steps", 0))
        if "optimizer" not in meta:
            return
        params = dict(self.module.named_parameters())
        unknown = [
            n for g in meta["optimizer"]["param_groups"] for n in g["params"] if n not in params
        ]
        if unknown:
            raise KeyError(
                f"the optimizer state names parameters this model does not have: {unknown[:10]}"
            )
        groups = [
            {
                "params": [params[n] for n in g["params"]],
                "lr": g["lr"],
                "base_lr": g.get("base_lr", g["lr"]),
            }
            for g in meta["optimizer"]["param_groups"]
        ]
        optimizer = self.spec.build(groups)
        optimizer_state_from_tensors(optimizer, tensors, meta["optimizer"], params)
        self.adopt(optimizer)
        self.rebuild_scheduler()

    # -- stepping ------------------------------------------------------------------
    def scale_loss(self, loss: torch.Tensor) -> torch.Tensor:
        """The loss to differentiate: the optimizer's ``scale_loss(loss)`` where it has one
        (a Keras ``loss_scale_factor``; its step divides the gradients back), else ``loss``.

        >>> from frostline.api.optimizers import SGD
        >>> net = nn.Linear(2, 1); live = LiveOptimizer(SGD(0.1), net); _ = live.sync()
        >>> live.scale_loss(torch.tensor(2.0)).item()
        2.0
        """
        scale = getattr(self.optimizer, "scale_loss", None)
        return loss if scale is None else scale(loss)

    def finalize_variable_values(self) -> None:
        """What the optimizer does when ``fit`` ends (Keras: EMA weights replace the weights).

        Calls the optimizer's ``finalize_variable_values()`` where it has one; a torch
        optimizer has none, and nothing happens.
        """
        finalize = getattr(self.optimizer, "finalize_variable_values", None)
        if finalize is not None:
            finalize()

    def step(self) -> None:
        assert self.optimizer is not None, "call sync() before step()"
        self.optimizer.step()

    def zero_grad(self) -> None:
        if self.optimizer is not None:
            self.optimizer.zero_grad(set_to_none=True)

    def state_numel(self) -> int:
        """Scalars held in optimizer state (Keras' 'Optimizer params')."""
        if self.optimizer is None:
            return 0
        return sum(
            v.numel()
            for st in self.optimizer.state.values()
            for v in st.values()
            if isinstance(v, torch.Tensor) and v.dim() > 0
        )

    def state_bytes(self) -> int:
        if self.optimizer is None:
            return 0
        return sum(
            v.numel() * v.element_size()
            for st in self.optimizer.state.values()
            for v in st.values()
            if isinstance(v, torch.Tensor) and v.dim() > 0
        )
