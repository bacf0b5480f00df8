"""Optimizer specs (Keras names) and the live optimizer that never goes stale.

A spec (``fl.optimizers.Adam(1e-3)``) says *how* to optimise; :class:`LiveOptimizer`
owns the torch optimizer and, before every step, brings its parameter groups in line
with the model's trainable set: frozen parameters leave it (state dropped, ``.grad``
cleared, so they stay bitwise unchanged), newly trainable ones join it fresh (with
their own learning rate when one was given), and the rest keep their state.
"""

from __future__ import annotations

import functools
import math
import warnings
from collections.abc import Callable, Iterable

import torch
from torch import nn


class Optimizer:
    """Base spec: a torch optimizer class, a learning rate and options.

    >>> spec = SGD(0.1, momentum=0.9)
    >>> spec.learning_rate, spec.slots
    (0.1, 1)
    """

    torch_class: type[torch.optim.Optimizer] = torch.optim.SGD
    #: tensors of optimizer state per parameter (for memory estimates)
    slots: int = 0

    def __init__(self, learning_rate: float = 0.001, **options) -> None:
        if isinstance(learning_rate, bool) or not isinstance(learning_rate, int | float):
            raise TypeError(
                f"learning_rate must be a number, got {type(learning_rate).__name__}: {learning_rate!r}"
            )
        if not math.isfinite(learning_rate) or learning_rate < 0:
            raise ValueError(f"learning_rate must be a finite number >= 0, got {learning_rate!r}")
        self.learning_rate = float(learning_rate)
        self.options = options

    def torch_options(self) -> dict:
        return dict(self.options)

    def build(self, groups: list[dict]) -> torch.optim.Optimizer:
        """A torch optimizer over ``groups`` (each a dict with ``params`` and ``lr``)."""
        return self.torch_class(groups, lr=self.learning_rate, **self.torch_options())

    def get_config(self) -> dict:
        return {"class": type(self).__name__, "learning_rate": self.learning_rate, **self.options}

    def __repr__(self) -> str:
        opts = "".join(f", {k}={v!r}" for k, v in self.options.items())
        return f"{type(self).__name__}({self.learning_rate}{opts})"


class SGD(Optimizer):
    """SGD with Keras' signature: ``SGD(learning_rate=0.01, momentum=0.0, nesterov=False, weight_decay=0.0)``."""

    torch_class = torch.optim.SGD

    def __init__(
        self,
        learning_rate: float = 0.01,
        momentum: float = 0.0,
        nesterov: bool = False,
        weight_decay: float = 0.0,
    ):
        if nesterov and momentum <= 0:
            raise ValueError(f"nesterov=True needs momentum > 0, got momentum={momentum!r}")
        super().__init__(
            learning_rate, momentum=momentum, nesterov=nesterov, weight_decay=weight_decay
        )
        self.slots = 1 if momentum else 0


class Adam(Optimizer):
    """Adam: ``Adam(learning_rate=0.001, beta_1=0.9, beta_2=0.999, epsilon=1e-7, weight_decay=0.0)``."""

    torch_class = torch.optim.Adam
    slots = 2

    def __init__(
        self,
        learning_rate: float = 0.001,
        beta_1: float = 0.9,
        beta_2: float = 0.999,
        epsilon: float = 1e-7,
        weight_decay: float = 0.0,
        amsgrad: bool = False,
    ):
        super().__init__(
            learning_rate,
            beta_1=beta_1,
            beta_2=beta_2,
            epsilon=epsilon,
            weight_decay=weight_decay,
            amsgrad=amsgrad,
        )

    def torch_options(self) -> dict:
        o = self.options
        return {
            "betas": (o["beta_1"], o["beta_2"]),
            "eps": o["epsilon"],
            "weight_decay": o["weight_decay"],
            "amsgrad": o["amsgrad"],
        }


class AdamW(Adam):
    """AdamW: ``AdamW(learning_rate=0.001, weight_decay=0.004, ...)`` (Keras defaults)."""

    torch_class = torch.optim.AdamW

    def __init__(
        self,
        learning_rate: float = 0.001,
        weight_decay: float = 0.004,
        beta_1: float = 0.9,
        beta_2: float = 0.999,
        epsilon: float = 1e-7,
        amsgrad: bool = False,
    ):
        super().__init__(
            learning_rate,
            beta_1=beta_1,
            beta_2=beta_2,
            epsilon=epsilon,
            weight_decay=weight_decay,
            amsgrad=amsgrad,
        )


class RMSprop(Optimizer):
    """RMSprop: ``RMSprop(learning_rate=0.001, rho=0.9, momentum=0.0, epsilon=1e-7, centered=False)``."""

    torch_class = torch.optim.RMSprop

    def __init__(
        self,
        learning_rate: float = 0.001,
        rho: float = 0.9,
        momentum: float = 0.0,
        epsilon: float = 1e-7,
        centered: bool = False,
        weight_decay: float = 0.0,
    ):
        super().__init__(
            learning_rate,
            rho=rho,
            momentum=momentum,
            epsilon=epsilon,
            centered=centered,
            weight_decay=weight_decay,
        )
        self.slots = 1 + (1 if momentum else 0) + (1 if centered else 0)

    def torch_options(self) -> dict:
        o = self.options
        return {
            "alpha": o["rho"],
            "momentum": o["momentum"],
            "eps": o["epsilon"],
            "centered": o["centered"],
            "weight_decay": o["weight_decay"],
        }


class TorchOptimizer(Optimizer):
    """Any torch optimizer class with its keyword options: ``TorchOptimizer(torch.optim.NAdam, lr=2e-3)``."""

    def __init__(
        self, torch_class: type[torch.optim.Optimizer], lr: float | None = None, **options
    ):
        if not (isinstance(torch_class, type) and issubclass(torch_class, torch.optim.Optimizer)):
            raise TypeError(f"expected a torch.optim.Optimizer subclass, got {torch_class!r}")
        if lr is None:
            lr = _default_lr(torch_class)
        super().__init__(lr, **options)
        self.torch_class = torch_class
        self.slots = {
            "Adam": 2,
            "AdamW": 2,
            "NAdam": 2,
            "RAdam": 2,
            "Adamax": 2,
            "RMSprop": 1,
            "Adagrad": 1,
        }.get(torch_class.__name__, 1)

    def get_config(self) -> dict:
        return {
            "class": "TorchOptimizer",
            "torch_class": self.torch_class.__name__,
            "learning_rate": self.learning_rate,
            **self.options,
        }

    def __repr__(self) -> str:
        return f"TorchOptimizer({self.torch_class.__name__}, lr={self.learning_rate})"


def _default_lr(cls) -> float:
    import inspect

    default = inspect.signature(cls.__init__).parameters.get("lr")
    value = getattr(default, "default", inspect.Parameter.empty)
    if isinstance(value, int | float):
        return float(value)
    return 0.001


_STRINGS: dict[str, Callable[[], Optimizer]] = {
    "sgd": SGD,
    "adam": Adam,
    "adamw": AdamW,
    "rmsprop": RMSprop,
}


def get(identifier) -> Optimizer:
    """Resolve ``compile(optimizer=...)``: a Keras string, a spec, a torch class, partial or instance.

    >>> get("adam").learning_rate
    0.001
    >>> get(torch.optim.SGD).torch_class.__name__
    'SGD'
    """
    if isinstance(identifier, Optimizer):
        return identifier
    if isinstance(identifier, str):
        key = identifier.lower().replace("_", "")
        if key in _STRINGS:
            return _STRINGS[key]()
        raise ValueError(
            f"unknown optimizer {identifier!r}; expected one of {sorted(_STRINGS)} or an optimizer object"
        )
    if isinstance(identifier, type) and issubclass(identifier, torch.optim.Optimizer):
        return TorchOptimizer(identifier)
    if (
        isinstance(identifier, functools.partial)
        and isinstance(identifier.func, type)
        and issubclass(identifier.func, torch.optim.Optimizer)
    ):
        if identifier.args:
            raise ValueError(
                "pass torch optimizer options by keyword in functools.partial (lr=..., ...)"
            )
        return TorchOptimizer(identifier.func, **identifier.keywords)
    if isinstance(identifier, torch.optim.Optimizer):
        defaults = dict(identifier.defaults)
        defaults.pop("differentiable", None)
        return TorchOptimizer(type(identifier), **defaults)
    raise TypeError(
        f"optimizer must be a name ({sorted(_STRINGS)}), an fl.optimizers spec, a torch.optim class, "
        f"partial or instance; got {type(identifier).__name__}: {identifier!r}"
    )


def _named_trainable(module: nn.Module) -> list[tuple[str, nn.Parameter]]:
    seen: set[int] = set()
    out = []
    for name, p in module.named_parameters(remove_duplicate=False):
        if p.requires_grad and id(p) not in seen:
            seen.add(id(p))
            out.append((name, p))
    return out


SchedulerFactory = Callable[[torch.optim.Optimizer], "torch.optim.lr_scheduler.LRScheduler"]


class LiveOptimizer:
    """One torch optimizer kept in step with a module's trainable set.

    Call :meth:`sync` before each step (``fit`` does); it returns True when the set
    changed. ``scale`` multiplies every group's base rate (what Keras-style
    ``LearningRateScheduler``/``ReduceLROnPlateau`` change); a torch scheduler factory
    is rebuilt and fast-forwarded whenever groups change, so LambdaLR/OneCycleLR
    keep working as layers are unfrozen.

    >>> net = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 1))
    >>> live = LiveOptimizer(Adam(0.01), net)
    >>> live.sync(), len(live.optimizer.param_groups[0]["params"])
    (True, 4)
    >>> _ = net[0].requires_grad_(False); live.sync(), len(live.optimizer.param_groups[0]["params"])
    (True, 2)
    """

    def __init__(
        self, spec: Optimizer, module: nn.Module, *, scheduler: SchedulerFactory | None = None
    ) -> None:
        self.spec = spec
        self.module = module
        self.optimizer: torch.optim.Optimizer | None = None
        self.scale = 1.0
        self.scheduler_factory = scheduler
        self.scheduler = None
        self.scheduler_steps = 0
        self._key: tuple[int, ...] | None = None
        self.names: dict[int, str] = {}
        self.changes = 0

    # -- the trainable set ---------------------------------------------------------
    def trainable(self) -> list[tuple[str, nn.Parameter]]:
        return _named_trainable(self.module)

    def _lr_for(self, p: torch.Tensor) -> float:
        return float(p.__dict__.get("_frostline_lr", self.spec.learning_rate))

    def sync(self) -> bool:
        """Bring the optimizer in line with ``requires_grad``; True if anything changed."""
        current = self.trainable()
        key = tuple(id(p) for _, p in current)
        if key == self._key:
            return False
        if not current:
            raise RuntimeError(
                "nothing to train: every parameter of the model is frozen (trainable_weights is empty). "
                "Unfreeze something first, e.g. model.trainable = True or model.unfreeze(fl.select.last(5))."
            )
        self.names = {id(p): n for n, p in current}
        wanted = {id(p) for _, p in current}
        if self.optimizer is None:
            self.optimizer = self.spec.build(self._groups([p for _, p in current]))
        else:
            self._remove(wanted)
            present = {id(p) for g in self.optimizer.param_groups for p in g["params"]}
            new = [p for _, p in current if id(p) not in present]
            for group in self._groups(new):
                self.optimizer.add_param_group(group)
        self._key = key
        self.changes += 1
        self._rebuild_scheduler()
        return True

    def _groups(self, params: Iterable[torch.Tensor]) -> list[dict]:
        by_lr: dict[float, list] = {}
        for p in params:
            by_lr.setdefault(self._lr_for(p), []).append(p)
        return [{"params": ps, "lr": lr * self.scale, "base_lr": lr} for lr, ps in by_lr.items()]

    def _remove(self, wanted: set[int]) -> None:
        opt = self.optimizer
        assert opt is not None
        for group in opt.param_groups:
            keep = []
            for p in group["params"]:
                if id(p) in wanted:
                    keep.append(p)
                else:
                    opt.state.pop(p, None)
                    p.grad = None
            group["params"] = keep
        opt.param_groups[:] = [g for g in opt.param_groups if g["params"]]

    def regroup(self) -> bool:
        """Put every parameter in the group of its own rate (after per-parameter rates changed).

        Optimizer state is kept. Returns True when the groups changed.

        >>> net = nn.Linear(2, 1); live = LiveOptimizer(Adam(0.01), net); _ = live.sync()
        >>> net.weight.__dict__["_frostline_lr"] = 0.001
        >>> live.regroup(), sorted(g["lr"] for g in live.optimizer.param_groups)
        (True, [0.001, 0.01])
        """
        opt = self.optimizer
        if opt is None:
            return False
        default = self.spec.learning_rate
        if all(
            self._lr_for(p) == g.get("base_lr", default)
            for g in opt.param_groups
            for p in g["params"]
        ):
            return False
        template = {
            k: v
            for k, v in opt.param_groups[0].items()
            if k not in ("params", "lr", "base_lr", "initial_lr")
        }
        by_lr: dict[float, list] = {}
        for g in opt.param_groups:
            for p in g["params"]:
                by_lr.setdefault(self._lr_for(p), []).append(p)
        opt.param_groups.clear()
        for lr, params in by_lr.items():
            opt.add_param_group(
                {**template, "params": params, "lr": lr * self.scale, "base_lr": lr}
            )
        self._rebuild_scheduler()
        return True

    # -- learning rates ------------------------------------------------------------
    @property
    def learning_rate(self) -> float:
        """The spec's rate times the current scale (what schedules report)."""
        return self.spec.learning_rate * self.scale

    def set_learning_rate(self, lr: float) -> None:
        """Set the headline rate; every group keeps its ratio to it (discriminative rates survive)."""
        if (
            not isinstance(lr, int | float)
            or isinstance(lr, bool)
            or not math.isfinite(lr)
            or lr < 0
        ):
            raise ValueError(f"learning rate must be a finite number >= 0, got {lr!r}")
        self.scale = lr / self.spec.learning_rate if self.spec.learning_rate else 1.0
        if self.optimizer is not None:
            for g in self.optimizer.param_groups:
                g["lr"] = g.get("base_lr", self.spec.learning_rate) * self.scale

    def _rebuild_scheduler(self) -> None:
        if self.scheduler_factory is None or self.optimizer is None:
            return
        for g in self.optimizer.param_groups:
            g.pop("initial_lr", None)
            g["lr"] = g.get("base_lr", self.spec.learning_rate) * self.scale
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            self.scheduler = self.scheduler_factory(self.optimizer)
            for _ in range(self.scheduler_steps):
                self.scheduler.step()

    def scheduler_step(self) -> None:
        if self.scheduler is not None:
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message=".*lr_scheduler.step.*")
                self.scheduler.step()
            self.scheduler_steps += 1

    # -- stepping ------------------------------------------------------------------
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
