"""``ReduceLROnPlateau``, deciding as Keras 3's does."""

from __future__ import annotations

from frostline.api.callbacks.monitor import MonitorCallback, from_json_number, json_number
from frostline.core.checks import require_int
from frostline.engine.distributed import is_main


class ReduceLROnPlateau(MonitorCallback):
    """Multiply the learning rate by ``factor`` after ``patience`` epochs without improvement.

    Keras 3's rule: during ``cooldown`` epochs after a reduction, ``wait`` stays 0; an
    improvement (by more than ``min_delta``) resets ``wait``; otherwise ``wait += 1``
    and at ``wait >= patience`` the rate becomes ``max(lr * factor, min_lr)`` if it is
    above ``min_lr`` (then cooldown starts and ``wait`` resets). Each group keeps its
    ratio to the headline rate; with a learning-rate schedule the whole schedule is
    scaled. Logs ``learning_rate``.

    >>> ReduceLROnPlateau(factor=0.5, patience=2).factor
    0.5
    """

    writes_weights = False

    def __init__(
        self,
        monitor: str = "val_loss",
        factor: float = 0.1,
        patience: int = 10,
        verbose: int = 0,
        mode: str = "auto",
        min_delta: float = 1e-4,
        cooldown: int = 0,
        min_lr: float = 0.0,
    ) -> None:
        super().__init__(monitor, mode, min_delta=min_delta)
        if isinstance(factor, bool) or not isinstance(factor, int | float) or not 0 <= factor < 1:
            raise ValueError(f"ReduceLROnPlateau needs 0 <= factor < 1, got factor={factor!r}")
        require_int("patience", patience)
        require_int("cooldown", cooldown)
        if isinstance(min_lr, bool) or not isinstance(min_lr, int | float) or min_lr < 0:
            raise ValueError(f"min_lr must be a number >= 0, got {min_lr!r}")
        self.factor = float(factor)
        self.patience = patience
        self.verbose = verbose
        self.cooldown = cooldown
        self.min_lr = float(min_lr)
        self._restored = False
        self._reset()

    def _reset(self) -> None:
        self.best = None
        self.cooldown_counter = 0
        self.wait = 0

    def in_cooldown(self) -> bool:
        return self.cooldown_counter > 0

    def on_train_begin(self, logs=None):
        if not self._restored:
            self._reset()
        self._restored = False

    def on_epoch_end(self, epoch, logs=None):
        _ = self.direction  # resolve mode="auto" first, as Keras (unknown direction: error)
        if logs is not None:
            logs["learning_rate"] = float(self.model.learning_rate)
        current = self.get_monitor_value(logs, "Learning rate reduction")
        if current is None:
            return
        if self.in_cooldown():
            self.cooldown_counter -= 1
            self.wait = 0
        if self.is_improvement(current, self.best):
            self.best = current
            self.wait = 0
        elif not self.in_cooldown():
            self.wait += 1
            if self.wait >= self.patience:
                old = float(self.model.learning_rate)
                if old > self.min_lr:
                    new = max(old * self.factor, self.min_lr)
                    self.model.learning_rate = new
                    if self.verbose > 0 and is_main():
                        print(
                            f"Epoch {epoch + 1}: ReduceLROnPlateau reducing learning rate to {new}."
                        )
                    self.cooldown_counter = self.cooldown
                    self.wait = 0

    def get_state(self) -> dict:
        return {
            "wait": self.wait,
            "cooldown_counter": self.cooldown_counter,
            "best": json_number(self.best),
        }

    def set_state(self, state: dict) -> None:
        self.wait = int(state.get("wait", 0))
        self.cooldown_counter = int(state.get("cooldown_counter", 0))
        self.best = from_json_number(state.get("best"))
        self._restored = True
