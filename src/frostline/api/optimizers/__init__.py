"""Optimizers with Keras names: ``fl.optimizers.Adam(1e-3)`` says *how* to optimise.

One class per optimizer, one file each (as ``keras/src/optimizers/``): ``SGD``,
``Adam``, ``AdamW``, ``RMSprop``, ``Adamax``, ``Nadam``, ``Adagrad`` and ``Lion`` hold
Keras 3's signature, defaults and update, with Keras's base options (decoupled
``weight_decay``, clipping, EMA, gradient accumulation, ``loss_scale_factor``); they
build a :class:`~frostline.api.optimizers.base.KerasTorchOptimizer`.
:class:`TorchOptimizer` (what a ``torch.optim`` class, partial or instance given to
``compile`` becomes) keeps torch's own math. The engine's
:class:`~frostline.engine.live.LiveOptimizer` builds the torch optimizer and keeps it
in step with the trainable set.
"""

from __future__ import annotations

import copy
import functools
from collections.abc import Callable

import torch

from frostline.api import lr_schedules as schedules
from frostline.api.optimizers.adagrad import Adagrad
from frostline.api.optimizers.adam import Adam
from frostline.api.optimizers.adamax import Adamax
from frostline.api.optimizers.adamw import AdamW
from frostline.api.optimizers.base import KerasOptimizer, KerasTorchOptimizer, Optimizer
from frostline.api.optimizers.lion import Lion
from frostline.api.optimizers.nadam import Nadam
from frostline.api.optimizers.rmsprop import RMSprop
from frostline.api.optimizers.sgd import SGD
from frostline.api.optimizers.torch_optimizer import TorchOptimizer

__all__ = [
    "Adagrad",
    "Adam",
    "AdamW",
    "Adamax",
    "KerasOptimizer",
    "Lion",
    "Nadam",
    "Optimizer",
    "RMSprop",
    "SGD",
    "TorchOptimizer",
    "get",
    "schedules",
]

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
    """Resolve ``compile(optimizer=...)``: a Keras string, an optimizer, a torch class, partial or instance.

    A built optimizer (``model.optimizer`` of a Keras-math optimizer) gives a copy of
    the optimizer it was built from: same configuration, fresh state.

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
    if isinstance(identifier, KerasTorchOptimizer):
        spec = copy.copy(identifier.spec)
        spec.built = False
        return spec
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
        f"optimizer must be a name ({sorted(_STRINGS)}), an fl.optimizers optimizer, a torch.optim "
        f"class, partial or instance; got {type(identifier).__name__}: {identifier!r}"
    )
