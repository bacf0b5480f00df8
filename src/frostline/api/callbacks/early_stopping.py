"""``EarlyStopping``, deciding as Keras 3's does."""

from __future__ import annotations

import torch

from frostline.api.callbacks.monitor import MonitorCallback, from_json_number, json_number
from frostline.core.checks import require_int
from frostline.engine.distributed import is_main


class EarlyStopping(MonitorCallback):
    """Stop when ``monitor`` has stopped improving; optionally restore the best weights.

    Keras 3's rule, epoch by epoch (from ``start_from_epoch`` on): ``wait += 1``; an
    improvement on the best value resets ``wait`` to 0 (unless it does not also beat
    ``baseline``); otherwise training stops once ``wait >= patience`` (never at epoch 0).
    With ``restore_best_weights``, the weights of the best epoch (or of the first
    monitored epoch, if nothing improved) are put back when training ends, whether it
    stopped early or ran all its epochs. The best weights go into ``fit`` checkpoints
    (safetensors), so a resumed run restores them too.

    >>> es = EarlyStopping(monitor="val_loss", patience=2, restore_best_weights=True)
    >>> es.patience, es.direction
    (2, 'min')
    """

    writes_weights = False  # restores best weights only in on_train_end, after training

    def __init__(
        self,
        monitor: str = "val_loss",
        min_delta: float = 0.0,
        patience: int = 0,
        verbose: int = 0,
        mode: str = "auto",
        baseline: float | None = None,
        restore_best_weights: bool = False,
        start_from_epoch: int = 0,
    ) -> None:
        super().__init__(monitor, mode, min_delta=min_delta)
        require_int("patience", patience)
        require_int("start_from_epoch", start_from_epoch)
        if baseline is not None and (
            isinstance(baseline, bool) or not isinstance(baseline, int | float)
        ):
            raise TypeError(f"baseline must be a number or None, got {baseline!r}")
        self.patience = patience
        self.verbose = verbose
        self.baseline = None if baseline is None else float(baseline)
        self.restore_best_weights = bool(restore_best_weights)
        self.start_from_epoch = start_from_epoch
        self._restored = False
        self._reset()

    def _reset(self) -> None:
        self.wait = 0
        self.stopped_epoch = 0
        self.best = None
        self.best_weights: dict[str, torch.Tensor] | None = None
        self.best_epoch = 0

    def _weights(self) -> dict[str, torch.Tensor]:
        return {k: v.detach().clone() for k, v in self.model.module.state_dict().items()}

    def on_train_begin(self, logs=None):
        if not self._restored:
            self._reset()
        self._restored = False

    def on_epoch_end(self, epoch, logs=None):
        _ = self.direction  # resolve mode="auto" first, as Keras (unknown direction: error)
        current = self.get_monitor_value(logs, "Early stopping")
        if current is None or epoch < self.start_from_epoch:
            return
        if self.restore_best_weights and self.best_weights is None:
            self.best_weights = self._weights()
            self.best_epoch = epoch
        self.wait += 1
        if self.is_improvement(current, self.best):
            self.best = current
            self.best_epoch = epoch
            if self.restore_best_weights:
                self.best_weights = self._weights()
            if self.baseline is None or self.is_improvement(current, self.baseline):
                self.wait = 0
            return
        if self.wait >= self.patience and epoch > 0:
            self.stopped_epoch = epoch
            self.model.stop_training = True

    def on_train_end(self, logs=None):
        if self.stopped_epoch > 0 and self.verbose > 0 and is_main():
            print(f"Epoch {self.stopped_epoch + 1}: early stopping")
        if self.restore_best_weights and self.best_weights is not None:
            if self.verbose > 0 and is_main():
                print(
                    "Restoring model weights from the end of the best epoch: "
                    f"{self.best_epoch + 1}."
                )
            with torch.no_grad():
                self.model.module.load_state_dict(self.best_weights)

    def get_state(self) -> dict:
        return {
            "wait": self.wait,
            "stopped_epoch": self.stopped_epoch,
            "best": json_number(self.best),
            "best_epoch": self.best_epoch,
        }

    def set_state(self, state: dict) -> None:
        self.wait = int(state.get("wait", 0))
        self.stopped_epoch = int(state.get("stopped_epoch", 0))
        self.best = from_json_number(state.get("best"))
        self.best_epoch = int(state.get("best_epoch", 0))
        self.best_weights = None
        self._restored = True

    def get_tensors(self) -> dict[str, torch.Tensor]:
        return dict(self.best_weights) if self.best_weights is not None else {}

    def set_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        self.best_weights = {k: v.clone() for k, v in tensors.items()} if tensors else None
