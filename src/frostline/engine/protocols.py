"""The engine's view of the model it trains: what ``Trainer`` reads and writes, as
Protocols (the model API's ``Model``, ``CompileConfig`` and ``Objective`` satisfy them),
so the engine never imports the model API, not even for type checking."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Protocol

import torch
from torch import nn

if TYPE_CHECKING:  # engine modules only
    from frostline.engine.callbacks import History
    from frostline.engine.live import LiveOptimizer
    from frostline.engine.verify import Report


class Objective(Protocol):
    """Losses and metrics: the loss of a batch, and running sums over an epoch."""

    keys: list

    def __call__(
        self, outputs: Any, targets: Any, sample_weight: Any = None
    ) -> tuple[torch.Tensor, dict[str, float]]: ...

    def reset(self) -> None: ...

    def update(
        self,
        outputs: Any,
        targets: Any,
        loss: float,
        parts: dict[str, float],
        n: int,
        sample_weight: Any = None,
    ) -> None: ...

    def results(self) -> dict[str, float]: ...

    def state(self) -> dict[str, tuple[float, float]]: ...

    def load_state(self, state: dict) -> None: ...


class CompileSettings(Protocol):
    """What ``compile`` set that the training loop uses."""

    @property
    def objective(self) -> Objective: ...

    @property
    def device(self) -> torch.device: ...

    @property
    def precision(self) -> str | None: ...

    @property
    def scheduler_interval(self) -> str: ...

    @property
    def find_unused_parameters(self) -> bool: ...

    @property
    def scaler(self) -> Any: ...


class TrainableModel(Protocol):
    """The model a :class:`~frostline.engine.trainer.Trainer` trains.

    >>> import frostline as fl
    >>> from frostline.engine.trainer import Trainer
    >>> Trainer(fl.wrap(nn.Linear(2, 2))).model.module
    Linear(in_features=2, out_features=2, bias=True)
    """

    stop_training: bool
    history: History | None
    last_verification: Report | None

    @property
    def module(self) -> nn.Module: ...

    @property
    def compile_config(self) -> CompileSettings | None: ...

    @property
    def live_optimizer(self) -> LiveOptimizer | None: ...


__all__ = ["CompileSettings", "Objective", "TrainableModel"]
