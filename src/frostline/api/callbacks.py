"""Keras-style callbacks. ``self.model`` is the Model being trained.

Built-ins: :class:`EarlyStopping`, :class:`ModelCheckpoint`, :class:`CSVLogger`,
:class:`LearningRateScheduler`, :class:`ReduceLROnPlateau`, :class:`TerminateOnNaN`.
A callback that keeps state across epochs implements ``get_state``/``set_state``
(JSON-able) so an exact resume restores it.
"""

from __future__ import annotations

import csv
import io
import math
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from frostline.engine.callbacks import Callback, CallbackList, History
from frostline.engine.distributed import is_main
from frostline.io.atomic import atomic_write_text


def _is_main() -> bool:
    return is_main()


def _better(mode: str, value: float, best: float, min_delta: float) -> bool:
    if math.isnan(value):
        return False
    return value < best - min_delta if mode == "min" else value > best + min_delta


def _mode_for(monitor: str, mode: str) -> str:
    if mode not in ("auto", "min", "max"):
        raise ValueError(f"mode must be 'auto', 'min' or 'max', got {mode!r}")
    if mode != "auto":
        return mode
    return "max" if any(s in monitor for s in ("acc", "auc", "precision", "recall")) else "min"


class EarlyStopping(Callback):
    """Stop when ``monitor`` stops improving; optionally restore the best weights.

    >>> EarlyStopping(monitor="val_loss", patience=2, restore_best_weights=True).mode
    'min'
    """

    def __init__(
        self,
        monitor: str = "val_loss",
        min_delta: float = 0.0,
        patience: int = 0,
        mode: str = "auto",
        restore_best_weights: bool = False,
        start_from_epoch: int = 0,
    ) -> None:
        if not isinstance(patience, int) or patience < 0:
            raise ValueError(f"patience must be an int >= 0, got {patience!r}")
        self.monitor = monitor
        self.min_delta = abs(min_delta)
        self.patience = patience
        self.mode = _mode_for(monitor, mode)
        self.restore_best_weights = restore_best_weights
        self.start_from_epoch = start_from_epoch
        self._reset()

    def _reset(self) -> None:
        self.wait = 0
        self.best = math.inf if self.mode == "min" else -math.inf
        self.best_epoch = -1
        self.best_weights: dict[str, torch.Tensor] | None = None
        self.stopped_epoch = -1

    def on_train_begin(self, logs=None):
        if not getattr(self, "_restored", False):
            self._reset()
        self._restored = False

    def on_epoch_end(self, epoch, logs=None):
        value = (logs or {}).get(self.monitor)
        if value is None:
            raise KeyError(
                f"EarlyStopping monitors {self.monitor!r}, which is not in the logs: {sorted(logs or {})}"
            )
        if epoch < self.start_from_epoch:
            return
        if _better(self.mode, float(value), self.best, self.min_delta):
            self.best, self.best_epoch, self.wait = float(value), epoch, 0
            if self.restore_best_weights:
                self.best_weights = {
                    k: v.detach().clone() for k, v in self.model.module.state_dict().items()
                }
            return
        self.wait += 1
        if self.wait > self.patience:
            self.stopped_epoch = epoch
            self.model.stop_training = True

    def on_train_end(self, logs=None):
        if self.restore_best_weights and self.best_weights is not None and self.stopped_epoch >= 0:
            self.model.module.load_state_dict(self.best_weights)

    def get_state(self) -> dict:
        return {"wait": self.wait, "best": self.best, "best_epoch": self.best_epoch}

    def set_state(self, state: dict) -> None:
        self.wait = state.get("wait", 0)
        self.best = state.get("best", self.best)
        self.best_epoch = state.get("best_epoch", -1)
        self._restored = True


class TerminateOnNaN(Callback):
    """Stop training as soon as a batch loss is NaN or infinite (``fit`` also raises by default)."""

    stops_on_nan = True

    def on_train_batch_end(self, batch, logs=None):
        loss = (logs or {}).get("loss")
        if loss is not None and not math.isfinite(loss):
            self.model.stop_training = True


class LearningRateScheduler(Callback):
    """``schedule(epoch, lr) -> new lr`` at the start of each epoch (every group keeps its ratio)."""

    def __init__(self, schedule: Callable[[int, float], float], verbose: int = 0) -> None:
        if not callable(schedule):
            raise TypeError(f"schedule must be callable(epoch, lr) -> lr, got {schedule!r}")
        self.schedule = schedule
        self.verbose = verbose

    def on_epoch_begin(self, epoch, logs=None):
        lr = float(self.schedule(epoch, self.model.learning_rate))
        self.model.learning_rate = lr
        if self.verbose and _is_main():
            print(f"Epoch {epoch + 1}: LearningRateScheduler setting learning rate to {lr:g}.")

    def on_epoch_end(self, epoch, logs=None):
        if logs is not None:
            logs["learning_rate"] = self.model.learning_rate


class ReduceLROnPlateau(Callback):
    """Multiply the learning rate by ``factor`` after ``patience`` epochs without improvement."""

    def __init__(
        self,
        monitor: str = "val_loss",
        factor: float = 0.1,
        patience: int = 10,
        mode: str = "auto",
        min_delta: float = 1e-4,
        cooldown: int = 0,
        min_lr: float = 0.0,
        verbose: int = 0,
    ) -> None:
        if not 0 < factor < 1:
            raise ValueError(f"factor must be in (0, 1), got {factor!r}")
        self.monitor, self.factor, self.patience = monitor, factor, patience
        self.mode = _mode_for(monitor, mode)
        self.min_delta, self.cooldown, self.min_lr, self.verbose = (
            min_delta,
            cooldown,
            min_lr,
            verbose,
        )
        self.wait, self.cooldown_counter = 0, 0
        self.best = math.inf if self.mode == "min" else -math.inf

    def on_epoch_end(self, epoch, logs=None):
        value = (logs or {}).get(self.monitor)
        if value is None:
            raise KeyError(
                f"ReduceLROnPlateau monitors {self.monitor!r}, which is not in the logs: {sorted(logs or {})}"
            )
        if logs is not None:
            logs["learning_rate"] = self.model.learning_rate
        if self.cooldown_counter > 0:
            self.cooldown_counter -= 1
            self.wait = 0
        if _better(self.mode, float(value), self.best, self.min_delta):
            self.best, self.wait = float(value), 0
        elif self.cooldown_counter <= 0:
            self.wait += 1
            if self.wait >= self.patience:
                old = self.model.learning_rate
                new = max(old * self.factor, self.min_lr)
                if new < old:
                    self.model.learning_rate = new
                    if self.verbose and _is_main():
                        print(
                            f"Epoch {epoch + 1}: ReduceLROnPlateau reducing learning rate to {new:g}."
                        )
                self.cooldown_counter, self.wait = self.cooldown, 0

    def get_state(self) -> dict:
        return {"wait": self.wait, "cooldown_counter": self.cooldown_counter, "best": self.best}

    def set_state(self, state: dict) -> None:
        self.wait = state.get("wait", 0)
        self.cooldown_counter = state.get("cooldown_counter", 0)
        self.best = state.get("best", self.best)


class ModelCheckpoint(Callback):
    """Save the model (safetensors + metadata, atomically) after each epoch, or only the best.

    ``filepath`` may hold Keras fields: ``"ckpt/model-{epoch:02d}-{val_loss:.3f}.safetensors"``.
    For resumable checkpoints with optimizer and RNG state use ``fit(checkpoint_dir=...)``.
    """

    def __init__(
        self,
        filepath: str | os.PathLike,
        monitor: str = "val_loss",
        save_best_only: bool = False,
        mode: str = "auto",
        verbose: int = 0,
    ) -> None:
        if not str(filepath).endswith(".safetensors"):
            raise ValueError(
                f"ModelCheckpoint writes safetensors: filepath must end in .safetensors, got {str(filepath)!r}"
            )
        self.filepath = str(filepath)
        self.monitor = monitor
        self.save_best_only = save_best_only
        self.mode = _mode_for(monitor, mode)
        self.verbose = verbose
        self.best = math.inf if self.mode == "min" else -math.inf
        self.saved: list[str] = []

    def on_epoch_end(self, epoch, logs=None):
        logs = logs or {}
        if self.save_best_only:
            value = logs.get(self.monitor)
            if value is None:
                raise KeyError(
                    f"ModelCheckpoint monitors {self.monitor!r}, which is not in the logs: {sorted(logs)}"
                )
            if not _better(self.mode, float(value), self.best, 0.0):
                return
            self.best = float(value)
        try:
            path = self.filepath.format(epoch=epoch + 1, **logs)
        except (KeyError, ValueError, IndexError) as e:
            raise ValueError(
                f"ModelCheckpoint filepath {self.filepath!r} could not be filled from epoch and logs {sorted(logs)}: {e}"
            ) from None

        if is_main():  # one writer under torchrun
            self.model.save(path)
        self.saved.append(path)
        if self.verbose and _is_main():
            print(f"Epoch {epoch + 1}: saved model to {path}")

    def get_state(self) -> dict:
        return {"best": self.best, "saved": self.saved}

    def set_state(self, state: dict) -> None:
        self.best = state.get("best", self.best)
        self.saved = list(state.get("saved", []))


class CSVLogger(Callback):
    """Append one row per epoch to a CSV file (rewritten atomically, so it is never half-written)."""

    def __init__(
        self, filename: str | os.PathLike, separator: str = ",", append: bool = False
    ) -> None:
        self.filename = Path(filename)
        self.separator = separator
        self.append = append
        self.rows: list[dict[str, Any]] = []

    def on_train_begin(self, logs=None):
        if self.append and self.filename.exists() and not self.rows:
            with open(self.filename, newline="") as f:
                self.rows = list(csv.DictReader(f, delimiter=self.separator))
        elif not self.append and not getattr(self, "_restored", False):
            self.rows = []
        self._restored = False

    def on_epoch_end(self, epoch, logs=None):
        self.rows.append({"epoch": epoch, **(logs or {})})
        keys: list[str] = []
        for r in self.rows:
            keys += [k for k in r if k not in keys]
        buf = io.StringIO()
        w = csv.DictWriter(buf, fieldnames=keys, delimiter=self.separator)
        w.writeheader()
        w.writerows(self.rows)

        if is_main():
            atomic_write_text(self.filename, buf.getvalue())

    def get_state(self) -> dict:
        return {"rows": self.rows}

    def set_state(self, state: dict) -> None:
        self.rows = list(state.get("rows", []))
        self._restored = True


__all__ = [
    "CSVLogger",
    "Callback",
    "CallbackList",
    "EarlyStopping",
    "History",
    "LearningRateScheduler",
    "ModelCheckpoint",
    "ReduceLROnPlateau",
    "TerminateOnNaN",
]
