"""Argument checks shared by every layer (one wording for one kind of bad input)."""

from __future__ import annotations

from typing import Any

__all__ = ["require_int"]


def require_int(name: str, value: Any, minimum: int = 0) -> int:
    """``value`` if it is an int (not a bool) ``>= minimum``; else a ValueError naming both.

    >>> require_int("epochs", 3)
    3
    >>> require_int("keep_last", 0, minimum=1)
    Traceback (most recent call last):
    ...
    ValueError: keep_last must be an int >= 1, got 0
    """
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")
    return value
