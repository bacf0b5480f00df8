"""Progress output as a callback (Keras' ``ProgbarLogger``): a rich progress bar per epoch
on a terminal, one line per epoch otherwise.

Every epoch ends with the line ``Epoch 3/10 - 1.52s - ETA 0:11 - loss: 0.4210 - ...``: the
ETA is the rest of the fit at the pace of the epochs so far (the first, which may build
the activation cache, counts only while it is the only one). On a terminal, or where
``COLUMNS`` is set, the line breaks between its `` - `` parts to fit the width (the
continuation indented), so at 80 columns the epoch number and every metric stay in view;
the bar shows the step, the elapsed time, the epoch's ETA and as many metrics as fit.

rich is optional (the ``app`` extra installs it): without it a terminal gets the
one-line-per-epoch output too.
"""

from __future__ import annotations

import math
import os
import shutil
import sys
import time
from collections.abc import Sequence
from typing import Any

from frostline.engine.callbacks import Callback


def _parts(logs: dict) -> list[str]:
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
    return parts


def _fmt(logs: dict) -> str:
    return " - ".join(_parts(logs))


def clock(seconds: float) -> str:
    """``m:ss`` or ``h:mm:ss``.

    >>> clock(5), clock(75.4), clock(3725)
    ('0:05', '1:15', '1:02:05')
    """
    s = max(0, int(round(seconds)))
    h, rest = divmod(s, 3600)
    m, sec = divmod(rest, 60)
    return f"{h}:{m:02d}:{sec:02d}" if h else f"{m}:{sec:02d}"


def width() -> int | None:
    """The width to fit: ``COLUMNS`` when set, the terminal's on a terminal, else None (no limit)."""
    columns = os.environ.get("COLUMNS", "")
    if columns.isdigit() and int(columns) > 0:
        return int(columns)
    if sys.stdout.isatty():
        return shutil.get_terminal_size().columns
    return None


def wrap(parts: Sequence[str], limit: int | None, sep: str = " - ", indent: str = "  ") -> str:
    """``parts`` joined by ``sep``, broken between parts so no line passes ``limit`` columns.

    >>> print(wrap(["Epoch 1/3", "0.50s", "loss: 0.2500", "accuracy: 0.9000"], 30))
    Epoch 1/3 - 0.50s
      - loss: 0.2500
      - accuracy: 0.9000
    >>> wrap(["Epoch 1/3", "0.50s"], None)
    'Epoch 1/3 - 0.50s'
    """
    lines = [parts[0]] if parts else [""]
    for part in parts[1:]:
        if limit is None or len(lines[-1]) + len(sep) + len(part) <= limit:
            lines[-1] += sep + part
        else:
            lines.append(indent + sep.lstrip() + part)
    return "\n".join(lines)


def remaining(times: Sequence[float], epochs_left: int) -> float:
    """Seconds left for ``epochs_left`` more epochs at the pace of ``times`` (the first epoch,
    which may build a cache, left out once there are others).

    >>> remaining([3.0, 1.0, 1.0], 4)
    4.0
    """
    pace = times[1:] if len(times) > 1 else times
    return epochs_left * (sum(pace) / len(pace)) if pace else 0.0


def bar_tail(step: int, steps: int | None, elapsed: float, logs: dict, room: int) -> str:
    """What follows the bar: ``step/steps``, elapsed, the epoch's ETA, then the metrics that fit ``room``.

    >>> bar_tail(9, 40, 5.0, {"loss": 0.25, "accuracy": 0.5}, 80)
    '10/40 0:05 ETA 0:15 loss: 0.2500 - accuracy: 0.5000'
    >>> bar_tail(9, 40, 5.0, {"loss": 0.25, "accuracy": 0.5}, 36)
    '10/40 0:05 ETA 0:15 loss: 0.2500'
    """
    done = step + 1
    head = f"{done}/{steps}" if steps else f"{done}"
    head += f" {clock(elapsed)}"
    if steps and done < steps:
        head += f" ETA {clock(elapsed / done * (steps - done))}"
    shown = ""
    for part in _parts(logs):
        more = f"{shown} - {part}" if shown else part
        if len(head) + 1 + len(more) > room:
            break
        shown = more
    return f"{head} {shown}" if shown else head


def resolve_verbose(verbose) -> int:
    """Keras' ``verbose``: "auto" is 1 (bar) on a terminal, 2 (one line per epoch) otherwise."""
    if verbose == "auto":
        return 1 if sys.stdout.isatty() else 2
    if verbose not in (0, 1, 2):
        raise ValueError(f"verbose must be 0, 1, 2 or 'auto', got {verbose!r}")
    return int(verbose)


class EpochProgress:
    """Shows one epoch: a bar (verbose=1) or a closing line (verbose=2).

    ``times``: the earlier epochs' times, for the fit's ETA in the closing line.
    """

    def __init__(
        self,
        verbose: int,
        epoch: int,
        epochs: int,
        steps: int | None,
        enabled: bool = True,
        times: Sequence[float] = (),
        console: Any = None,
    ) -> None:
        self.verbose = verbose if enabled else 0
        self.epoch, self.epochs, self.steps = epoch, epochs, steps
        self.times = list(times)
        self.start = time.perf_counter()
        self._bar = None
        if self.verbose == 1:
            try:
                from rich.progress import BarColumn, Progress, TextColumn
            except ModuleNotFoundError:  # rich is optional: plain lines instead of a bar
                self.verbose = 2
                return

            head = f"Epoch {epoch + 1}/{epochs}"
            cols = (console.width if console is not None else None) or width() or 80
            bar_width = 20 if cols >= 80 else max(5, cols // 6)
            self._room = max(10, cols - len(head) - bar_width - 3)
            self._bar = Progress(
                TextColumn(head),
                BarColumn(bar_width=bar_width),
                TextColumn("{task.fields[tail]}"),
                transient=True,
                console=console,
            )
            self._bar.start()
            self._task = self._bar.add_task("train", total=steps, tail="")

    def update(self, step: int, logs: dict) -> None:
        if self._bar is not None:
            elapsed = time.perf_counter() - self.start
            tail = bar_tail(step, self.steps, elapsed, logs, self._room)
            self._bar.update(self._task, completed=step + 1, tail=tail)

    def line(self, logs: dict, note: str, elapsed: float) -> str:
        """The epoch's closing line, fitted to :func:`width`."""
        parts = [f"Epoch {self.epoch + 1}/{self.epochs}", f"{elapsed:.2f}s"]
        left = self.epochs - self.epoch - 1
        if left > 0:
            parts.append(f"ETA {clock(remaining([*self.times, elapsed], left))}")
        parts += _parts(logs) + ([note] if note else [])
        return wrap(parts, width())

    def close(self, logs: dict, note: str = "", elapsed: float | None = None) -> float:
        """End the epoch's display. ``elapsed``: the epoch's whole time as recorded in the
        History (cache build and validation included); shown as given, so the printed
        time and ``history["epoch_time"]`` agree. Default: time since this display began."""
        if elapsed is None:
            elapsed = time.perf_counter() - self.start
        if self._bar is not None:
            self._bar.stop()
        if self.verbose:
            print(self.line(logs, note, elapsed), flush=True)
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
    Epoch 1/3 - 1.50s - ETA 0:03 - loss: 0.2500 - cache: off
    """

    writes_weights = False

    def __init__(self, verbose: int) -> None:
        self.verbose = resolve_verbose(verbose)
        self._epoch = 0
        self._display: EpochProgress | None = None
        self._times: list[float] = []  # this fit's epoch times so far, for the ETA

    def _show(self) -> EpochProgress:
        if self._display is None:
            self._display = EpochProgress(
                self.verbose,
                self._epoch,
                int(self.params.get("epochs", 0)),
                self.params.get("steps"),
                times=self._times,
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
        shown = self._show().close(logs, str(self.params.get("epoch_note", "")), elapsed=elapsed)
        self._times.append(float(shown))
        self._display = None
