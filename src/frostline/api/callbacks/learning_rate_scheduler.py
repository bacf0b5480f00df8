"""``LearningRateScheduler``, as Keras 3's."""

from __future__ import annotations

import inspect
from collections.abc import Callable

from frostline.engine.callbacks import Callback
from frostline.engine.distributed import is_main


def _takes_lr(schedule: Callable) -> bool:
    try:
        params = inspect.signature(schedule).parameters.values()
    except (TypeError, ValueError):
        return True
    positional = [
        p
        for p in params
        if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD, p.VAR_POSITIONAL)
    ]
    return len(positional) >= 2 or any(p.kind == p.VAR_POSITIONAL for p in positional)


class LearningRateScheduler(Callback):
    """``schedule(epoch, lr) -> new lr`` (or ``schedule(epoch)``) at the start of each epoch.

    Every param group keeps its ratio to the headline rate; with an optimizer
    learning-rate schedule, the whole schedule is scaled (Keras refuses that case).
    Logs ``learning_rate`` at the end of each epoch.

    >>> LearningRateScheduler(lambda epoch: 0.1 * 0.5**epoch).schedule(2)
    0.025
    """

    writes_weights = False

    def __init__(self, schedule: Callable[..., float], verbose: int = 0) -> None:
        if not callable(schedule):
            raise TypeError(f"schedule must be callable(epoch, lr) -> lr, got {schedule!r}")
        self.schedule = schedule
        self.verbose = verbose
        #: (epoch, the rate before the schedule ran) of the last epoch begun: a resume
        #: inside that epoch feeds the schedule the same rate again (no compounding)
        self._begun: tuple[int, float] | None = None

    def on_epoch_begin(self, epoch, logs=None):
        if _takes_lr(self.schedule):
            current = float(self.model.learning_rate)
            if self._begun is not None and self._begun[0] == epoch:
                current = self._begun[1]
            self._begun = (epoch, current)
            lr = self.schedule(epoch, current)
        else:
            lr = self.schedule(epoch)
        if isinstance(lr, bool) or not isinstance(lr, int | float):
            try:
                lr = float(lr)  # NumPy / 0-d tensor
            except (TypeError, ValueError):
                raise ValueError(
                    f"the output of the schedule function should be a float, got {lr!r}"
                ) from None
        self.model.learning_rate = float(lr)
        if self.verbose > 0 and is_main():
            print(f"Epoch {epoch + 1}: LearningRateScheduler setting learning rate to {lr}.")

    def on_epoch_end(self, epoch, logs=None):
        if logs is not None:
            logs["learning_rate"] = float(self.model.learning_rate)

    def get_state(self) -> dict:
        return {"begun": list(self._begun) if self._begun is not None else None}

    def set_state(self, state: dict) -> None:
        begun = state.get("begun")
        self._begun = (int(begun[0]), float(begun[1])) if begun else None
