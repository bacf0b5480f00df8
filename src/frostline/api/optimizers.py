"""Optimizer specs with Keras names: ``fl.optimizers.Adam(1e-3)`` says *how* to optimise.

``SGD``, ``Adam``, ``AdamW``, ``RMSprop``, ``Adamax``, ``Nadam``, ``Adagrad`` and
``Lion`` build the Keras 3 update rules of :mod:`frostline.api.keras_optimizers`
(Keras defaults, decoupled ``weight_decay`` on trainable weights, ``clipnorm`` /
``clipvalue`` / ``global_clipnorm``, ``learning_rate`` a float or a schedule from
``fl.optimizers.schedules``); :class:`TorchOptimizer` (what a ``torch.optim`` class,
partial or instance given to ``compile`` becomes) keeps torch's own math. The engine's
:class:`~frostline.engine.live.LiveOptimizer` builds the torch optimizer from a spec
and keeps it in step with the trainable set.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import Any

import torch

from frostline.api import keras_optimizers
from frostline.api import lr_schedules as schedules

Rate = float | Callable[[int], float]


class Optimizer:
    """Base spec: a torch optimizer class, a learning rate (or schedule) and options.

    ``learning_rate`` is the nominal rate (a schedule's initial/peak rate, see
    docs/optimizers.md); ``schedule`` the schedule, or None. Setting
    ``learning_rate`` to a number drops the schedule.

    >>> spec = SGD(0.1, momentum=0.9)
    >>> spec.learning_rate, spec.slots
    (0.1, 1)
    >>> Adam(schedules.ExponentialDecay(0.01, 100, 0.5)).learning_rate_at(100)
    0.005
    """

    torch_class: type[torch.optim.Optimizer] = torch.optim.SGD
    #: tensors of optimizer state per parameter (for memory estimates)
    slots: int = 0

    def __init__(self, learning_rate: Rate = 0.001, **options) -> None:
        self.schedule: Callable[[int], float] | None = None
        if callable(learning_rate) and not isinstance(learning_rate, bool):
            self.schedule = learning_rate
            self._rate = schedules.nominal_rate(learning_rate)
        else:
            self.learning_rate = learning_rate  # type: ignore[assignment]
        self.options = options

    @property
    def learning_rate(self) -> float:
        return self._rate

    @learning_rate.setter
    def learning_rate(self, value: float) -> None:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise TypeError(
                f"learning_rate must be a number or a schedule (callable of the step), "
                f"got {type(value).__name__}: {value!r}"
            )
        if not math.isfinite(value) or value < 0:
            raise ValueError(f"learning_rate must be a finite number >= 0, got {value!r}")
        self._rate = float(value)
        self.schedule = None

    def learning_rate_at(self, step: int) -> float:
        """The headline rate at optimizer step ``step`` (the schedule's value, or the rate)."""
        return self._rate if self.schedule is None else float(self.schedule(step))

    def torch_options(self) -> dict:
        return dict(self.options)

    def build(self, groups: list[dict]) -> torch.optim.Optimizer:
        """A torch optimizer over ``groups`` (each a dict with ``params`` and ``lr``)."""
        make: Any = self.torch_class
        return make(groups, lr=self.learning_rate, **self.torch_options())

    def _rate_config(self) -> Any:
        return (
            self.learning_rate
            if self.schedule is None
            else schedules.schedule_config(self.schedule)
        )

    def get_config(self) -> dict:
        return {"class": type(self).__name__, "learning_rate": self._rate_config(), **self.options}

    def __repr__(self) -> str:
        opts = "".join(f", {k}={v!r}" for k, v in self.options.items())
        rate = self.learning_rate if self.schedule is None else self.schedule
        return f"{type(self).__name__}({rate}{opts})"


class KerasSpec(Optimizer):
    """A spec that builds one of the Keras-math optimizers (options passed through as given)."""

    torch_class: type[torch.optim.Optimizer] = keras_optimizers.SGD

    def __init__(
        self,
        learning_rate: Rate,
        *,
        clipnorm: float | None = None,
        clipvalue: float | None = None,
        global_clipnorm: float | None = None,
        **options,
    ) -> None:
        clips = {"clipnorm": clipnorm, "clipvalue": clipvalue, "global_clipnorm": global_clipnorm}
        super().__init__(
            learning_rate, **options, **{k: v for k, v in clips.items() if v is not None}
        )
        # validate now (a bad option fails at construction, not at the first fit)
        probe = torch.nn.Parameter(torch.zeros(1))
        self.build([{"params": [probe], "lr": self.learning_rate}])

    def build(self, groups: list[dict]) -> torch.optim.Optimizer:
        rate: Rate = self.learning_rate if self.schedule is None else self.schedule
        make: Any = self.torch_class  # each Keras-math class has its own signature
        return make(groups, rate, **self.torch_options())


class SGD(KerasSpec):
    """Keras SGD: ``SGD(learning_rate=0.01, momentum=0.0, nesterov=False, weight_decay=0.0)``.

    >>> SGD(0.1, momentum=0.9, nesterov=True).build([{"params": [torch.zeros(1)]}]).defaults["nesterov"]
    True
    """

    torch_class = keras_optimizers.SGD

    def __init__(
        self,
        learning_rate: Rate = 0.01,
        momentum: float = 0.0,
        nesterov: bool = False,
        weight_decay: float | None = 0.0,
        *,
        clipnorm: float | None = None,
        clipvalue: float | None = None,
        global_clipnorm: float | None = None,
    ):
        if nesterov and not (isinstance(momentum, int | float) and momentum > 0):
            raise ValueError(f"nesterov=True needs momentum > 0, got momentum={momentum!r}")
        super().__init__(
            learning_rate,
            momentum=momentum,
            nesterov=nesterov,
            weight_decay=weight_decay,
            clipnorm=clipnorm,
            clipvalue=clipvalue,
            global_clipnorm=global_clipnorm,
        )
        self.slots = 1 if momentum else 0


class Adam(KerasSpec):
    """Keras Adam: ``Adam(learning_rate=0.001, beta_1=0.9, beta_2=0.999, epsilon=1e-7, amsgrad=False)``.

    >>> Adam(amsgrad=True).slots
    3
    """

    torch_class = keras_optimizers.Adam

    def __init__(
        self,
        learning_rate: Rate = 0.001,
        beta_1: float = 0.9,
        beta_2: float = 0.999,
        epsilon: float = 1e-7,
        amsgrad: bool = False,
        weight_decay: float | None = 0.0,
        *,
        clipnorm: float | None = None,
        clipvalue: float | None = None,
        global_clipnorm: float | None = None,
    ):
        super().__init__(
            learning_rate,
            beta_1=beta_1,
            beta_2=beta_2,
            epsilon=epsilon,
            amsgrad=amsgrad,
            weight_decay=weight_decay,
            clipnorm=clipnorm,
            clipvalue=clipvalue,
            global_clipnorm=global_clipnorm,
        )
        self.slots = 3 if amsgrad else 2


class AdamW(KerasSpec):
    """Keras AdamW: ``AdamW(learning_rate=0.001, weight_decay=0.004, beta_1=0.9, beta_2=0.999, epsilon=1e-7)``.

    >>> AdamW(1e-3).options["weight_decay"]
    0.004
    """

    torch_class = keras_optimizers.AdamW

    def __init__(
        self,
        learning_rate: Rate = 0.001,
        weight_decay: float = 0.004,
        beta_1: float = 0.9,
        beta_2: float = 0.999,
        epsilon: float = 1e-7,
        amsgrad: bool = False,
        *,
        clipnorm: float | None = None,
        clipvalue: float | None = None,
        global_clipnorm: float | None = None,
    ):
        super().__init__(
            learning_rate,
            weight_decay=weight_decay,
            beta_1=beta_1,
            beta_2=beta_2,
            epsilon=epsilon,
            amsgrad=amsgrad,
            clipnorm=clipnorm,
            clipvalue=clipvalue,
            global_clipnorm=global_clipnorm,
        )
        self.slots = 3 if amsgrad else 2


class RMSprop(KerasSpec):
    """Keras RMSprop: ``RMSprop(learning_rate=0.001, rho=0.9, momentum=0.0, epsilon=1e-7, centered=False)``.

    >>> RMSprop(momentum=0.5, centered=True).slots
    3
    """

    torch_class = keras_optimizers.RMSprop

    def __init__(
        self,
        learning_rate: Rate = 0.001,
        rho: float = 0.9,
        momentum: float = 0.0,
        epsilon: float = 1e-7,
        centered: bool = False,
        weight_decay: float | None = 0.0,
        *,
        clipnorm: float | None = None,
        clipvalue: float | None = None,
        global_clipnorm: float | None = None,
    ):
        super().__init__(
            learning_rate,
            rho=rho,
            momentum=momentum,
            epsilon=epsilon,
            centered=centered,
            weight_decay=weight_decay,
            clipnorm=clipnorm,
            clipvalue=clipvalue,
            global_clipnorm=global_clipnorm,
        )
        self.slots = 1 + (1 if momentum else 0) + (1 if centered else 0)


class Adamax(KerasSpec):
    """Keras Adamax: ``Adamax(learning_rate=0.001, beta_1=0.9, beta_2=0.999, epsilon=1e-7)``.

    >>> Adamax().slots
    2
    """

    torch_class = keras_optimizers.Adamax
    slots = 2

    def __init__(
        self,
        learning_rate: Rate = 0.001,
        beta_1: float = 0.9,
        beta_2: float = 0.999,
        epsilon: float = 1e-7,
        weight_decay: float | None = 0.0,
        *,
        clipnorm: float | None = None,
        clipvalue: float | None = None,
        global_clipnorm: float | None = None,
    ):
        super().__init__(
            learning_rate,
            beta_1=beta_1,
            beta_2=beta_2,
            epsilon=epsilon,
            weight_decay=weight_decay,
            clipnorm=clipnorm,
            clipvalue=clipvalue,
            global_clipnorm=global_clipnorm,
        )


class Nadam(KerasSpec):
    """Keras Nadam: ``Nadam(learning_rate=0.001, beta_1=0.9, beta_2=0.999, epsilon=1e-7)``.

    >>> Nadam(2e-3).learning_rate
    0.002
    """

    torch_class = keras_optimizers.Nadam
    slots = 2

    def __init__(
        self,
        learning_rate: Rate = 0.001,
        beta_1: float = 0.9,
        beta_2: float = 0.999,
        epsilon: float = 1e-7,
        weight_decay: float | None = 0.0,
        *,
        clipnorm: float | None = None,
        clipvalue: float | None = None,
        global_clipnorm: float | None = None,
    ):
        super().__init__(
            learning_rate,
            beta_1=beta_1,
            beta_2=beta_2,
            epsilon=epsilon,
            weight_decay=weight_decay,
            clipnorm=clipnorm,
            clipvalue=clipvalue,
            global_clipnorm=global_clipnorm,
        )


class Adagrad(KerasSpec):
    """Keras Adagrad: ``Adagrad(learning_rate=0.001, initial_accumulator_value=0.1, epsilon=1e-7)``.

    >>> Adagrad().slots
    1
    """

    torch_class = keras_optimizers.Adagrad
    slots = 1

    def __init__(
        self,
        learning_rate: Rate = 0.001,
        initial_accumulator_value: float = 0.1,
        epsilon: float = 1e-7,
        weight_decay: float | None = 0.0,
        *,
        clipnorm: float | None = None,
        clipvalue: float | None = None,
        global_clipnorm: float | None = None,
    ):
        super().__init__(
            learning_rate,
            initial_accumulator_value=initial_accumulator_value,
            epsilon=epsilon,
            weight_decay=weight_decay,
            clipnorm=clipnorm,
            clipvalue=clipvalue,
            global_clipnorm=global_clipnorm,
        )


class Lion(KerasSpec):
    """Keras Lion: ``Lion(learning_rate=0.001, beta_1=0.9, beta_2=0.99)``.

    >>> Lion(3e-4).slots
    1
    """

    torch_class = keras_optimizers.Lion
    slots = 1

    def __init__(
        self,
        learning_rate: Rate = 0.001,
        beta_1: float = 0.9,
        beta_2: float = 0.99,
        weight_decay: float | None = 0.0,
        *,
        clipnorm: float | None = None,
        clipvalue: float | None = None,
        global_clipnorm: float | None = None,
    ):
        super().__init__(
            learning_rate,
            beta_1=beta_1,
            beta_2=beta_2,
            weight_decay=weight_decay,
            clipnorm=clipnorm,
            clipvalue=clipvalue,
            global_clipnorm=global_clipnorm,
        )


class TorchOptimizer(Optimizer):
    """Any torch optimizer class with its keyword options: ``TorchOptimizer(torch.optim.NAdam, lr=2e-3)``."""

    def __init__(self, torch_class: type[torch.optim.Optimizer], lr: Rate | None = None, **options):
        if not (isinstance(torch_class, type) and issubclass(torch_class, torch.optim.Optimizer)):
            raise TypeError(f"expected a torch.optim.Optimizer subclass, got {torch_class!r}")
        if lr is None:
            lr = _default_lr(torch_class)
        if callable(lr) and not issubclass(torch_class, keras_optimizers.KerasOptimizer):
            raise TypeError(
                f"{torch_class.__name__} takes a number as lr, got the callable {lr!r}; give a "
                "torch scheduler to compile(scheduler=...) or use an fl.optimizers optimizer"
            )
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

    def build(self, groups: list[dict]) -> torch.optim.Optimizer:
        """A ``torch_class`` optimizer over ``groups`` (a Keras-math class gets the schedule).

        Where the class has torch's fused kernel (Adam, AdamW, SGD, Adagrad) and the options
        choose neither ``fused`` nor ``foreach``, the fused kernel runs: the same update
        formula in one pass over the weights, ~8x faster than the per-tensor loop torch
        picks by default on CPU.

        >>> net = torch.nn.Linear(2, 1)
        >>> TorchOptimizer(torch.optim.Adam, lr=0.1).build([{"params": list(net.parameters())}]).defaults["fused"]
        True
        >>> TorchOptimizer(torch.optim.Adam, foreach=False).build([{"params": list(net.parameters())}]).defaults["fused"]
        """
        rate: Rate = self.learning_rate if self.schedule is None else self.schedule
        make: Any = self.torch_class
        options = self.torch_options()
        if _fused_applies(make, groups, options):
            try:
                return make(groups, lr=rate, fused=True, **options)
            except (RuntimeError, ValueError, TypeError):  # a case the kernel refuses
                pass
        return make(groups, lr=rate, **options)

    def get_config(self) -> dict:
        return {
            "class": "TorchOptimizer",
            "torch_class": self.torch_class.__name__,
            "learning_rate": self._rate_config(),
            **self.options,
        }

    def __repr__(self) -> str:
        return f"TorchOptimizer({self.torch_class.__name__}, lr={self.learning_rate})"


def _fused_applies(cls: type, groups: list[dict], options: dict) -> bool:
    """Whether torch's fused kernel may replace the default for ``cls`` over ``groups``."""
    import inspect

    if "fused" in options or "foreach" in options or options.get("differentiable"):
        return False
    if issubclass(cls, keras_optimizers.KerasOptimizer):
        return False
    if "fused" not in inspect.signature(cls.__init__).parameters:
        return False
    params = [p for g in groups for p in g["params"]]
    return bool(params) and all(
        p.is_floating_point() and not p.is_sparse and p.device.type in ("cpu", "cuda")
        for p in params
    )


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
    "adamax": Adamax,
    "nadam": Nadam,
    "adagrad": Adagrad,
    "lion": Lion,
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
    if isinstance(identifier, keras_optimizers.KerasOptimizer):
        # its configuration: hyperparameters (not its step counters), clipping, schedule
        defaults = {k: v for k, v in identifier.defaults.items() if k not in identifier.global_keys}
        lr = identifier.schedule or defaults.pop("lr")
        defaults.pop("lr", None)
        clips = {k: getattr(identifier, k) for k in ("clipnorm", "clipvalue", "global_clipnorm")}
        return TorchOptimizer(
            type(identifier), lr, **defaults, **{k: v for k, v in clips.items() if v is not None}
        )
    if isinstance(identifier, torch.optim.Optimizer):
        defaults = dict(identifier.defaults)
        defaults.pop("differentiable", None)
        return TorchOptimizer(type(identifier), **defaults)
    raise TypeError(
        f"optimizer must be a name ({sorted(_STRINGS)}), an fl.optimizers spec, a torch.optim class, "
        f"partial or instance; got {type(identifier).__name__}: {identifier!r}"
    )


__all__ = [
    "Adagrad",
    "Adam",
    "AdamW",
    "Adamax",
    "KerasSpec",
    "Lion",
    "Nadam",
    "Optimizer",
    "RMSprop",
    "SGD",
    "schedules",
    "TorchOptimizer",
    "get",
]
