"""Progress output as a callback (Keras' ``ProgbarLogger``): a rich progress bar per epoch
on a terminal, one line per epoch otherwise.

rich is optional (the ``app`` extra installs it): without it a terminal gets the
one-line-per-epoch output too.
"""

from __future__ import annotations

import math
import sys
import time
from typing import Any

from frostline.engine.callbacks import Callback


def _fmt(logs: dict) -> str:
    parts = []
    for k, v in logs.items():
        if isinstance(v, float):
            parts.append(
                f"{k}: {v:.4g}"
                if (math.isfinite(v) and abs(v) < 1e-3 and v != 0)
                else f"{k}: {v:.4f}"
            )
        else:
            parts.append(f"{k}: {v}")
    return " - ".join(parts)


def resolve_verbose(verbose) -> int:
    """Keras' ``verbose``: "auto" is 1 (bar) on a terminal, 2 (one line per epoch) otherwise."""
    if verbose == "auto":
        return 1 if sys.stdout.isatty() else 2
    if verbose not in (0, 1, 2):
        raise ValueError(f"verbose must be 0, 1, 2 or 'auto', got {verbose!r}")
    return int(verbose)


class EpochProgress:
    """Shows one epoch: a bar (verbose=1) or a closing line (verbose=2)."""

    def __init__(
        self, verbose: int, epoch: int, epochs: int, steps: int | None, enabled: bool = True
    ) -> None:
        self.verbose = verbose if enabled else 0
        self.epoch, self.epochs, self.steps = epoch, epochs, steps
        self.start = time.perf_counter()
        self._bar = None
        if self.verbose == 1:
            try:
                from rich.progress import (
                    BarColumn,
                    MofNCompleteColumn,
                    Progress,
                    TextColumn,
                    TimeElapsedColumn,
                )
            except ModuleNotFoundError:  # rich is optional: plain lines instead of a bar
                self.verbose = 2
                return

            self._bar = Progress(
                TextColumn(f"Epoch {epoch + 1}/{epochs}"),
                BarColumn(),
                MofNCompleteColumn(),
                TimeElapsedColumn(),
                TextColumn("{task.fields[logs]}"),
                transient=False,
            )
            self._bar.start()
            self._task = self._bar.add_task("train", total=steps, logs="")

    def update(self, step: int, logs: dict) -> None:
        if self._bar is not None:
            self._bar.update(self._task, completed=step + 1, logs=_fmt(logs))

    def close(self, logs: dict, note: str = "", elapsed: float | None = None) -> float:
        """End the epoch's display. ``elapsed``: the epoch's whole time as recorded in the
        History (cache build and validation included); shown as given, so the printed
        time and ``history["epoch_time"]`` agree. Default: time since this display began."""
        if elapsed is None:
            elapsed = time.perf_counter() - self.start
        if self._bar is not None:
            self._bar.update(self._task, logs=_fmt(logs))
            self._bar.stop()
            print(f"  epoch time {elapsed:.2f}s" + (f" - {note}" if note else ""))
        elif self.verbose == 2:
            line = f"Epoch {self.epoch + 1}/{self.epochs} - {elapsed:.2f}s - {_fmt(logs)}"
            print(line + (f" - {note}" if note else ""), flush=True)
        return elapsed


class ProgressLogger(Callback):
    """Shows each epoch (``verbose=1``: a bar; ``2``: one line), as Keras' ``ProgbarLogger``.

    ``fit`` adds one, last, when ``verbose`` is not 0 (on the main rank only). It reads
    ``epochs``, ``steps`` and ``epoch_note`` from the loop's params and prints the
    epoch's whole time as recorded in the logs (``epoch_time``, so the printed time and
    the History agree).

    >>> p = ProgressLogger(2); p.set_params({"epochs": 3, "steps": 2, "epoch_note": "cache: off"})
    >>> p.on_epoch_begin(0); p.on_train_batch_end(0, {"loss": 0.5})
    >>> p.on_epoch_end(0, {"loss": 0.25, "epoch_time": 1.5})
    Epoch 1/3 - 1.50s - loss: 0.2500 - cache: off
    """

    writes_weights = False

    def __init__(self, verbose: int) -> None:
        self.verbose = resolve_verbose(verbose)
        self._epoch = 0
        self._display: EpochProgress | None = None

    def _show(self) -> EpochProgress:
        if self._display is None:
            self._display = EpochProgress(
                self.verbose,
                self._epoch,
                int(self.params.get("epochs", 0)),
                self.params.get("steps"),
            )
        return self._display

    def on_epoch_begin(self, epoch: int, logs: dict | None = None) -> None:
        self._epoch, self._display = epoch, None

    def on_train_batch_begin(self, batch: int, logs: dict | None = None) -> None:
        self._show()  # the bar starts with the epoch's first step (steps are known by then)

    def on_train_batch_end(self, batch: int, logs: dict | None = None) -> None:
        self._show().update(batch, dict(logs or {}))

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        logs = dict(logs or {})
        elapsed: Any = logs.pop("epoch_time", None)
        self._show().close(logs, str(self.params.get("epoch_note", "")), elapsed=elapsed)
        self._display = None
