"""The callback protocol the training loop drives: Keras hooks, a list, and History.

The Keras-named callbacks built on it live in :mod:`frostline.api.callbacks`.
A callback that keeps state across epochs implements ``get_state``/``set_state``
(JSON-able) so an exact resume restores it.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any


class Callback:
    """Subclass and override any hook.

    >>> class Unfreeze(Callback):
    ...     def on_epoch_begin(self, epoch, logs=None):
    ...         if epoch == 2:
    ...             self.model.trainable = True
    """

    model: Any
    #: what the loop tells callbacks, as in Keras: ``epochs``, ``steps`` (per epoch, None
    #: when unknown), ``verbose``, and ``epoch_note`` (what the epoch log adds, e.g. the cache)
    params: dict[str, Any] = {}  # noqa: RUF012  (replaced, never mutated, by set_params)
    #: True for callbacks that end training on a NaN/inf loss instead of raising
    stops_on_nan: bool = False
    #: False promises that, during ``fit``, this callback never writes into the model's
    #: weights or buffers (changing ``trainable`` is fine). While every callback promises
    #: that, frozen weights are hashed for the activation cache once per ``fit`` instead of
    #: once per epoch. The default, True, is always safe.
    writes_weights: bool = True

    def set_model(self, model: Any) -> None:
        self.model = model

    def set_params(self, params: dict[str, Any]) -> None:
        self.params = params

    def on_train_begin(self, logs: dict | None = None) -> None: ...
    def on_train_end(self, logs: dict | None = None) -> None: ...
    def on_epoch_begin(self, epoch: int, logs: dict | None = None) -> None: ...
    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None: ...
    def on_train_batch_begin(self, batch: int, logs: dict | None = None) -> None: ...
    def on_train_batch_end(self, batch: int, logs: dict | None = None) -> None: ...
    def on_test_begin(self, logs: dict | None = None) -> None: ...
    def on_test_end(self, logs: dict | None = None) -> None: ...
    def on_predict_begin(self, logs: dict | None = None) -> None: ...
    def on_predict_end(self, logs: dict | None = None) -> None: ...

    def get_state(self) -> dict:
        """JSON-able state for checkpoints (default: none)."""
        return {}

    def set_state(self, state: dict) -> None:
        """Restore what :meth:`get_state` returned."""

    def get_tensors(self) -> dict[str, Any]:
        """Tensors for checkpoints, stored with safetensors beside :meth:`get_state` (default: none)."""
        return {}

    def set_tensors(self, tensors: dict[str, Any]) -> None:
        """Restore what :meth:`get_tensors` returned (called after :meth:`set_state`)."""


class BackupCallback(Callback):
    """A callback that asks ``fit`` to keep exact checkpoints in ``backup_dir`` and to
    resume from the newest one there when ``fit`` starts (the engine side of
    ``BackupAndRestore``). ``fit`` writes a checkpoint where :meth:`save_now` says, after
    every callback's hook for that batch or epoch has run (so each callback's state in
    it is complete), keeping the newest ``keep_checkpoints``.
    """

    backup_dir: Path
    keep_checkpoints: int = 1

    def save_now(self, batch: int | None) -> bool:
        """Whether to write a checkpoint after training batch ``batch`` of the current
        epoch (0-based), or, with ``None``, at the epoch's end. Called once for each."""
        return batch is None


class CallbackList(Callback):
    """Calls every callback in order."""

    def __init__(self, callbacks: Iterable[Callback] | None, model: Any) -> None:
        cbs = list(callbacks or [])
        for cb in cbs:
            if not isinstance(cb, Callback):
                raise TypeError(
                    f"callbacks must be fl.callbacks.Callback instances, got {type(cb).__name__}"
                )
            cb.set_model(model)
        self.callbacks = cbs

    def set_params(self, params: dict[str, Any]) -> None:
        self.params = params
        for cb in self.callbacks:
            cb.set_params(params)

    def _call(self, hook: str, *args) -> None:
        for cb in self.callbacks:
            getattr(cb, hook)(*args)

    def on_train_begin(self, logs=None):
        self._call("on_train_begin", logs)

    def on_train_end(self, logs=None):
        self._call("on_train_end", logs)

    def on_epoch_begin(self, epoch, logs=None):
        self._call("on_epoch_begin", epoch, logs)

    def on_epoch_end(self, epoch, logs=None):
        self._call("on_epoch_end", epoch, logs)

    def on_train_batch_begin(self, batch, logs=None):
        self._call("on_train_batch_begin", batch, logs)

    def on_train_batch_end(self, batch, logs=None):
        self._call("on_train_batch_end", batch, logs)

    def on_test_begin(self, logs=None):
        self._call("on_test_begin", logs)

    def on_test_end(self, logs=None):
        self._call("on_test_end", logs)

    def on_predict_begin(self, logs=None):
        self._call("on_predict_begin", logs)

    def on_predict_end(self, logs=None):
        self._call("on_predict_end", logs)

    def states(self) -> list[dict]:
        return [{"class": type(cb).__name__, "state": cb.get_state()} for cb in self.callbacks]

    def tensors(self) -> dict[str, Any]:
        """Every callback's :meth:`~Callback.get_tensors`, keys ``"<index>/<name>"``."""
        return {
            f"{i}/{k}": v
            for i, cb in enumerate(self.callbacks)
            for k, v in cb.get_tensors().items()
        }

    def restore(self, states: list[dict], tensors: dict[str, Any] | None = None) -> None:
        tensors = tensors or {}
        for i, (cb, st) in enumerate(zip(self.callbacks, states)):
            if st.get("class") == type(cb).__name__:
                cb.set_state(st.get("state") or {})
                prefix = f"{i}/"
                cb.set_tensors(
                    {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}
                )


class History(Callback):
    """``fit``'s return value: ``history.history`` maps each log key to per-epoch values."""

    writes_weights = False

    def __init__(self) -> None:
        self.history: dict[str, list[float]] = {}
        self.epoch: list[int] = []

    def on_epoch_end(self, epoch, logs=None):
        self.epoch.append(epoch)
        for k, v in (logs or {}).items():
            self.history.setdefault(k, []).append(v)

    def get_state(self) -> dict:
        return {"history": self.history, "epoch": self.epoch}

    def set_state(self, state: dict) -> None:
        self.history = {k: list(v) for k, v in state.get("history", {}).items()}
        self.epoch = list(state.get("epoch", []))

    def __repr__(self) -> str:
        return f"History(epochs={len(self.epoch)}, keys={list(self.history)})"


__all__ = ["BackupCallback", "Callback", "CallbackList", "History"]
