"""``ModelCheckpoint``, deciding as Keras 3's does."""

from __future__ import annotations

import os

from frostline.api.callbacks.monitor import MonitorCallback, from_json_number, json_number
from frostline.api.callbacks.save_freq import SaveFrequency
from frostline.engine.distributed import is_main


class ModelCheckpoint(MonitorCallback):
    """Save the model (safetensors + metadata, atomically) after each epoch or every
    ``save_freq`` batches, or only the best.

    ``filepath`` may hold Keras fields: ``"ckpt/model-{epoch:02d}-{val_loss:.3f}.safetensors"``
    (and ``{batch}`` with an int ``save_freq``). With ``save_best_only`` a file is
    written when ``monitor`` improves on the best so far (which starts at
    ``initial_value_threshold``, and persists across ``fit`` calls as in Keras); when
    ``monitor`` is missing from the logs Keras's warning is given and the model is saved.
    ``save_freq="epoch"`` saves at each epoch's end; an int N saves after every N
    training batches (counted across epochs, on that batch's running logs, as Keras
    does). ``save_weights_only=True`` writes the weights alone (``model.save_weights``;
    the path must end in ``.weights.safetensors``, as Keras's in ``.weights.h5``), read
    back with ``model.load_weights``. ``saved`` lists the paths written. For resumable
    checkpoints with optimizer and RNG state use ``fit(checkpoint_dir=...)`` or
    :class:`BackupAndRestore`.

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
        save_weights_only: bool = False,
        mode: str = "auto",
        save_freq: str | int = "epoch",
        initial_value_threshold: float | None = None,
    ) -> None:
        super().__init__(monitor, mode, initial_value_threshold)
        self.save_weights_only = bool(save_weights_only)
        path = str(filepath)
        if self.save_weights_only and not path.endswith(".weights.safetensors"):
            raise ValueError(
                "ModelCheckpoint(save_weights_only=True) writes weights alone: filepath must "
                f"end in .weights.safetensors (as Keras's in .weights.h5), got {path!r}"
            )
        if not path.endswith(".safetensors"):
            raise ValueError(
                "ModelCheckpoint writes safetensors: filepath must end in .safetensors, "
                f"got {path!r}"
            )
        self.filepath = path
        self.save_best_only = bool(save_best_only)
        self.save_freq = SaveFrequency(save_freq, "ModelCheckpoint")
        self.verbose = verbose
        self.saved: list[str] = []
        self._epoch = 0

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

    def _path(self, epoch: int, batch: int | None, logs: dict) -> str:
        fields = {"epoch": epoch + 1, **logs}
        if batch is not None and "batch" not in logs:
            fields["batch"] = batch + 1
        try:
            return self.filepath.format(**fields)
        except (KeyError, ValueError, IndexError) as e:
            raise ValueError(
                f"ModelCheckpoint filepath {self.filepath!r} could not be filled from the epoch"
                f"{'' if batch is None else ', the batch'} and the logs {sorted(logs)}: {e}"
            ) from None

    def _save(self, epoch: int, batch: int | None, logs) -> None:
        logs = dict(logs or {})
        path = self._path(epoch, batch, logs)
        if not self._should_save(epoch, logs):
            return
        if is_main():  # one writer under torchrun
            if self.save_weights_only:
                self.model.save_weights(path)
            else:
                self.model.save(path)
        self.saved.append(path)
        if self.verbose and is_main():
            print(f"Epoch {epoch + 1}: saved model to {path}")

    def on_epoch_begin(self, epoch, logs=None):
        self._epoch = epoch

    def on_train_batch_end(self, batch, logs=None):
        if self.save_freq.on_batch(batch):
            self._save(self._epoch, batch, logs)

    def on_epoch_end(self, epoch, logs=None):
        if self.save_freq.per_epoch:
            self._save(epoch, None, logs)

    def get_state(self) -> dict:
        return {
            "best": json_number(self.best),
            "saved": self.saved,
            "save_freq": self.save_freq.get_state(),
        }

    def set_state(self, state: dict) -> None:
        self.best = from_json_number(state.get("best"))
        self.saved = list(state.get("saved", []))
        self.save_freq.set_state(state.get("save_freq") or {})
