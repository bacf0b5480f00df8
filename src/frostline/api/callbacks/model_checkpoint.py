"""``ModelCheckpoint``, deciding as Keras 3's does."""

from __future__ import annotations

import os

from frostline.api.callbacks.monitor import MonitorCallback, from_json_number, json_number
from frostline.engine.distributed import is_main


class ModelCheckpoint(MonitorCallback):
    """Save the model (safetensors + metadata, atomically) after each epoch, or only the best.

    ``filepath`` may hold Keras fields: ``"ckpt/model-{epoch:02d}-{val_loss:.3f}.safetensors"``.
    With ``save_best_only`` a file is written when ``monitor`` improves on the best so
    far (which starts at ``initial_value_threshold``, and persists across ``fit``
    calls as in Keras); when ``monitor`` is missing from the logs Keras's warning is
    given and the model is saved. ``saved`` lists the paths written. For resumable
    checkpoints with optimizer and RNG state use ``fit(checkpoint_dir=...)``.

    >>> ModelCheckpoint("best.safetensors", save_best_only=True, initial_value_threshold=0.5).best
    0.5
    """

    writes_weights = False

    def __init__(
        self,
        filepath: str | os.PathLike,
        monitor: str = "val_loss",
        verbose: int = 0,
        save_best_only: bool = False,
        mode: str = "auto",
        initial_value_threshold: float | None = None,
    ) -> None:
        super().__init__(monitor, mode, initial_value_threshold)
        if not str(filepath).endswith(".safetensors"):
            raise ValueError(
                "ModelCheckpoint writes safetensors: filepath must end in .safetensors, "
                f"got {str(filepath)!r}"
            )
        self.filepath = str(filepath)
        self.save_best_only = bool(save_best_only)
        self.verbose = verbose
        self.saved: list[str] = []

    def _should_save(self, epoch: int, logs: dict) -> bool:
        if not self.save_best_only:
            return True
        _ = self.direction
        current = self.get_monitor_value(logs, "ModelCheckpoint (save_best_only)")
        if current is None:
            return True  # Keras: "Can save best model only with <monitor> available" and saves
        if self.is_improvement(current, self.best):
            if self.verbose > 0 and is_main():
                print(
                    f"Epoch {epoch + 1}: {self.monitor} improved from {self.best} to {current:.5f}"
                )
            self.best = current
            return True
        if self.verbose > 0 and is_main():
            print(f"Epoch {epoch + 1}: {self.monitor} did not improve from {self.best:.5f}")
        return False

    def on_epoch_end(self, epoch, logs=None):
        logs = dict(logs or {})
        try:
            path = self.filepath.format(epoch=epoch + 1, **logs)
        except (KeyError, ValueError, IndexError) as e:
            raise ValueError(
                f"ModelCheckpoint filepath {self.filepath!r} could not be filled from the epoch "
                f"and the logs {sorted(logs)}: {e}"
            ) from None
        if not self._should_save(epoch, logs):
            return
        if is_main():  # one writer under torchrun
            self.model.save(path)
        self.saved.append(path)
        if self.verbose and is_main():
            print(f"Epoch {epoch + 1}: saved model to {path}")

    def get_state(self) -> dict:
        return {"best": json_number(self.best), "saved": self.saved}

    def set_state(self, state: dict) -> None:
        self.best = from_json_number(state.get("best"))
        self.saved = list(state.get("saved", []))
