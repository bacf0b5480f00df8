"""Optimizer specs with Keras names: ``fl.optimizers.Adam(1e-3)`` says *how* to optimise.

The engine's :class:`~frostline.engine.live.LiveOptimizer` builds the torch optimizer
from a spec and keeps it in step with the trainable set.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable

import torch


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


__all__ = [
    "Adam",
    "AdamW",
    "Optimizer",
    "RMSprop",
    "SGD",
    "TorchOptimizer",
    "get",
]
