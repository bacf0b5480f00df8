"""Keras 3 learning-rate schedules: a rate as a function of the optimizer's step count.

Pass one as ``learning_rate=`` to any ``fl.optimizers`` optimizer; it is evaluated at
``iterations`` (the number of updates applied so far, 0 for the first), exactly as Keras
does. Any callable ``step -> rate`` works too. Formulas follow
``keras/src/optimizers/schedules/learning_rate_schedule.py``; they are computed in
float64 (Keras: float32), so rates agree to float32 precision.

>>> s = ExponentialDecay(0.1, decay_steps=10, decay_rate=0.5)
>>> s(0), s(10), round(s(5), 6)
(0.1, 0.05, 0.070711)
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

from frostline.core.checks import require_int

__all__ = [
    "LearningRateSchedule",
    "ExponentialDecay",
    "PiecewiseConstantDecay",
    "PolynomialDecay",
    "InverseTimeDecay",
    "CosineDecay",
    "nominal_rate",
    "schedule_config",
]


def _rate(value: object, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TypeError(f"{what} must be a number, got {type(value).__name__}: {value!r}")
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"{what} must be a finite number >= 0, got {value!r}")
    return float(value)


def _steps(value: object, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{what} must be an int > 0, got {value!r}")
    return value


class LearningRateSchedule:
    """Base class: subclass and implement ``__call__(step) -> float`` and ``get_config()``.

    ``nominal`` is the rate that per-layer rates are measured against (see
    docs/optimizers.md); by default the schedule's value at step 0.

    >>> class Halving(LearningRateSchedule):
    ...     def __call__(self, step):
    ...         return 0.1 / 2 ** (step // 100)
    >>> Halving()(250), Halving().nominal
    (0.025, 0.1)
    """

    def __call__(self, step: int) -> float:
        raise NotImplementedError(f"{type(self).__name__} must implement __call__(step)")

    @property
    def nominal(self) -> float:
        value = float(self(0))
        return value if value > 0 else 1.0

    def get_config(self) -> dict[str, Any]:
        return {}

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.get_config().items())
        return f"{type(self).__name__}({args})"


class ExponentialDecay(LearningRateSchedule):
    """``initial_learning_rate * decay_rate ** (step / decay_steps)`` (floored when ``staircase``).

    >>> ExponentialDecay(1.0, 2, 0.5, staircase=True)(3)
    0.5
    """

    def __init__(
        self,
        initial_learning_rate: float,
        decay_steps: int,
        decay_rate: float,
        staircase: bool = False,
    ) -> None:
        self.initial_learning_rate = _rate(initial_learning_rate, "initial_learning_rate")
        self.decay_steps = _steps(decay_steps, "decay_steps")
        self.decay_rate = _rate(decay_rate, "decay_rate")
        self.staircase = bool(staircase)

    def __call__(self, step: int) -> float:
        p = step / self.decay_steps
        if self.staircase:
            p = math.floor(p)
        return self.initial_learning_rate * self.decay_rate**p

    @property
    def nominal(self) -> float:
        return self.initial_learning_rate or 1.0

    def get_config(self) -> dict[str, Any]:
        return {
            "initial_learning_rate": self.initial_learning_rate,
            "decay_steps": self.decay_steps,
            "decay_rate": self.decay_rate,
            "staircase": self.staircase,
        }


class PiecewiseConstantDecay(LearningRateSchedule):
    """``values[0]`` while ``step <= boundaries[0]``, ``values[i]`` up to ``boundaries[i]``, then the last.

    >>> s = PiecewiseConstantDecay([10, 20], [1.0, 0.5, 0.1])
    >>> s(10), s(11), s(21)
    (1.0, 0.5, 0.1)
    """

    def __init__(self, boundaries: Sequence[int], values: Sequence[float]) -> None:
        if len(boundaries) != len(values) - 1:
            raise ValueError(
                "the length of boundaries should be 1 less than the length of values; got "
                f"boundaries={list(boundaries)} (length {len(boundaries)}) and "
                f"values={list(values)} (length {len(values)})"
            )
        if list(boundaries) != sorted(boundaries):
            raise ValueError(f"boundaries must be increasing, got {list(boundaries)}")
        self.boundaries = [int(b) for b in boundaries]
        self.values = [_rate(v, "values[i]") for v in values]

    def __call__(self, step: int) -> float:
        for boundary, value in zip(self.boundaries, self.values):
            if step <= boundary:
                return value
        return self.values[-1]

    @property
    def nominal(self) -> float:
        return self.values[0] or 1.0

    def get_config(self) -> dict[str, Any]:
        return {"boundaries": self.boundaries, "values": self.values}


class PolynomialDecay(LearningRateSchedule):
    """From ``initial_learning_rate`` to ``end_learning_rate`` over ``decay_steps`` along ``(1 - p) ** power``.

    >>> PolynomialDecay(1.0, 10, end_learning_rate=0.0)(5), PolynomialDecay(1.0, 10, 0.0)(99)
    (0.5, 0.0)
    """

    def __init__(
        self,
        initial_learning_rate: float,
        decay_steps: int,
        end_learning_rate: float = 0.0001,
        power: float = 1.0,
        cycle: bool = False,
    ) -> None:
        self.initial_learning_rate = _rate(initial_learning_rate, "initial_learning_rate")
        self.decay_steps = _steps(decay_steps, "decay_steps")
        self.end_learning_rate = _rate(end_learning_rate, "end_learning_rate")
        self.power = float(power)
        self.cycle = bool(cycle)

    def __call__(self, step: int) -> float:
        decay_steps = float(self.decay_steps)
        s = float(step)
        if self.cycle:
            decay_steps *= 1.0 if s == 0 else math.ceil(s / self.decay_steps)
        else:
            s = min(s, decay_steps)
        p = s / decay_steps
        return (self.initial_learning_rate - self.end_learning_rate) * (
            1 - p
        ) ** self.power + self.end_learning_rate

    @property
    def nominal(self) -> float:
        return self.initial_learning_rate or 1.0

    def get_config(self) -> dict[str, Any]:
        return {
            "initial_learning_rate": self.initial_learning_rate,
            "decay_steps": self.decay_steps,
            "end_learning_rate": self.end_learning_rate,
            "power": self.power,
            "cycle": self.cycle,
        }


class InverseTimeDecay(LearningRateSchedule):
    """``initial_learning_rate / (1 + decay_rate * step / decay_steps)`` (floored when ``staircase``).

    >>> InverseTimeDecay(1.0, 1, 0.5)(2)
    0.5
    """

    def __init__(
        self,
        initial_learning_rate: float,
        decay_steps: int,
        decay_rate: float,
        staircase: bool = False,
    ) -> None:
        self.initial_learning_rate = _rate(initial_learning_rate, "initial_learning_rate")
        self.decay_steps = _steps(decay_steps, "decay_steps")
        self.decay_rate = _rate(decay_rate, "decay_rate")
        self.staircase = bool(staircase)

    def __call__(self, step: int) -> float:
        p = step / self.decay_steps
        if self.staircase:
            p = math.floor(p)
        return self.initial_learning_rate / (1 + self.decay_rate * p)

    @property
    def nominal(self) -> float:
        return self.initial_learning_rate or 1.0

    def get_config(self) -> dict[str, Any]:
        return {
            "initial_learning_rate": self.initial_learning_rate,
            "decay_steps": self.decay_steps,
            "decay_rate": self.decay_rate,
            "staircase": self.staircase,
        }


class CosineDecay(LearningRateSchedule):
    """Cosine decay, with optional linear warmup from ``initial_learning_rate`` to ``warmup_target``.

    Without ``warmup_target``: cosine from ``initial_learning_rate`` to
    ``alpha * initial_learning_rate`` over ``decay_steps``. With it: a linear ramp over
    ``warmup_steps``, then cosine from ``warmup_target`` over ``decay_steps``.

    >>> s = CosineDecay(0.0, decay_steps=10, warmup_target=1.0, warmup_steps=5)
    >>> s(0), s(1), s(5), s(10), s(15), s(99)
    (0.0, 0.2, 1.0, 0.5, 0.0, 0.0)
    """

    def __init__(
        self,
        initial_learning_rate: float,
        decay_steps: int,
        alpha: float = 0.0,
        warmup_target: float | None = None,
        warmup_steps: int = 0,
    ) -> None:
        self.initial_learning_rate = _rate(initial_learning_rate, "initial_learning_rate")
        self.decay_steps = _steps(decay_steps, "decay_steps")
        self.alpha = _rate(alpha, "alpha")
        self.warmup_target = (
            None if warmup_target is None else _rate(warmup_target, "warmup_target")
        )
        self.warmup_steps = require_int("warmup_steps", warmup_steps)

    def _decay(self, step: float, start: float) -> float:
        cosine = 0.5 * (1.0 + math.cos(math.pi * step / self.decay_steps))
        return start * ((1 - self.alpha) * cosine + self.alpha)

    def __call__(self, step: int) -> float:
        s = float(step)
        if self.warmup_target is None:
            return self._decay(min(s, self.decay_steps), self.initial_learning_rate)
        s = min(s, float(self.decay_steps + self.warmup_steps))
        if s < self.warmup_steps:
            delta = self.warmup_target - self.initial_learning_rate
            return delta * (s / self.warmup_steps) + self.initial_learning_rate
        return self._decay(s - self.warmup_steps, self.warmup_target)

    @property
    def nominal(self) -> float:
        peak = self.initial_learning_rate if self.warmup_target is None else self.warmup_target
        return peak or 1.0

    def get_config(self) -> dict[str, Any]:
        return {
            "initial_learning_rate": self.initial_learning_rate,
            "decay_steps": self.decay_steps,
            "alpha": self.alpha,
            "warmup_target": self.warmup_target,
            "warmup_steps": self.warmup_steps,
        }


def nominal_rate(schedule: Callable[[int], float]) -> float:
    """The rate that per-group rates are measured against under ``schedule``.

    A :class:`LearningRateSchedule` says (its peak or initial rate); any other callable
    uses its value at step 0, or 1.0 when that is 0.

    >>> nominal_rate(CosineDecay(0.0, 100, warmup_target=1e-3, warmup_steps=10))
    0.001
    >>> nominal_rate(lambda step: 0.5 / (step + 1))
    0.5
    """
    if isinstance(schedule, LearningRateSchedule):
        return float(schedule.nominal)
    value = float(schedule(0))
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"learning-rate schedule {schedule!r} gives {value!r} at step 0")
    return value if value > 0 else 1.0


def schedule_config(schedule: Callable[[int], float]) -> dict[str, Any] | str:
    """JSON-able description of a schedule (its config, or ``repr`` for a plain callable).

    >>> schedule_config(ExponentialDecay(0.1, 10, 0.9))["class"]
    'ExponentialDecay'
    """
    if isinstance(schedule, LearningRateSchedule):
        return {"class": type(schedule).__name__, **schedule.get_config()}
    return repr(schedule)
