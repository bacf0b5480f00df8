"""``MonitorCallback``: the base of callbacks that watch one logged value (Keras 3's)."""

from __future__ import annotations

import math
import warnings

from frostline.engine.callbacks import Callback


class MonitorCallback(Callback):
    """Knows which way ``monitor`` should go and whether a value is an improvement.

    ``mode="auto"`` reads the direction as Keras does: a loss (``loss``, ``val_loss``,
    ``<output>_loss``) goes down; a compiled metric goes the way its ``direction``
    says (accuracy, AUC, precision, recall up; MAE, MSE down; a torchmetrics metric
    by its ``higher_is_better``); anything else is an error asking for ``mode``.
    An improvement beats the reference by more than ``min_delta``; the first value
    always improves on "no reference" (``None``).

    >>> cb = MonitorCallback("val_loss", mode="min", min_delta=0.1)
    >>> cb.is_improvement(0.85, 1.0), cb.is_improvement(0.95, 1.0), cb.is_improvement(5.0, None)
    (True, False, True)
    """

    def __init__(
        self,
        monitor: str = "val_loss",
        mode: str = "auto",
        baseline: float | None = None,
        min_delta: float = 0.0,
    ) -> None:
        if not isinstance(monitor, str) or not monitor:
            raise TypeError(f"monitor must be the name of a logged value, got {monitor!r}")
        if mode not in ("auto", "min", "max"):
            raise ValueError(
                f"{type(self).__name__}: mode must be 'auto', 'min' or 'max', got {mode!r}"
            )
        if isinstance(min_delta, bool) or not isinstance(min_delta, int | float):
            raise TypeError(f"min_delta must be a number, got {min_delta!r}")
        if baseline is not None and (
            isinstance(baseline, bool) or not isinstance(baseline, int | float)
        ):
            raise TypeError(f"baseline must be a number or None, got {baseline!r}")
        self.monitor = monitor
        self.mode = mode
        self.best: float | None = None if baseline is None else float(baseline)
        self.min_delta = abs(float(min_delta))
        self._direction: str | None = mode if mode != "auto" else None

    @property
    def direction(self) -> str:
        """``"min"`` or ``"max"``: ``mode``, or what ``mode="auto"`` found for ``monitor``."""
        if self._direction is None:
            self._direction = self._auto_direction()
        return self._direction

    def _auto_direction(self) -> str:
        name = self.monitor.removeprefix("val_")
        found = "down" if name == "loss" else None
        config = getattr(getattr(self, "model", None), "compile_config", None)
        if found is None and config is not None:
            found = config.objective.direction(self.monitor)
        if found is None:
            raise ValueError(
                f"{type(self).__name__} callback received monitor={self.monitor!r}, but "
                "frostline can't tell whether that value should be maximized or minimized "
                "(it is neither a loss nor a compiled metric with a known direction). Pass "
                "mode='max' to monitor the highest value, or mode='min' for the lowest."
            )
        return "max" if found == "up" else "min"

    def is_improvement(self, value: float, reference: float | None) -> bool:
        """Whether ``value`` beats ``reference`` by more than ``min_delta`` (Keras's test)."""
        if reference is None:
            return True
        if self.direction == "min":
            return value + self.min_delta < reference
        return value - self.min_delta > reference

    def get_monitor_value(self, logs: dict | None, what: str) -> float | None:
        """``logs[monitor]``, or None with Keras's warning when it is not there."""
        logs = logs or {}
        value = logs.get(self.monitor)
        if value is None:
            warnings.warn(
                f"{what} conditioned on metric `{self.monitor}` which is not available. "
                f"Available metrics are: {','.join(logs)}",
                stacklevel=3,
            )
            return None
        return float(value)


def json_number(value: float | None) -> float | str | None:
    """A float for JSON state (non-finite values as strings, which JSON lacks).

    >>> json_number(float("inf")), from_json_number("inf")
    ('inf', inf)
    """
    if value is None or math.isfinite(value):
        return value
    return repr(float(value))


def from_json_number(value: float | str | None) -> float | None:
    return None if value is None else float(value)
