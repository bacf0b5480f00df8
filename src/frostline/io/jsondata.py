"""Plain JSON data: checked conversion and the byte form every frostline JSON file uses."""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

__all__ = ["json_bytes", "to_json_data"]


def to_json_data(value: Any, where: str) -> Any:
    """Return ``value`` as plain JSON data (tuples become lists) or raise TypeError.

    ``where`` names the value in the error message, e.g. ``"state['lr']"``.

    Example:
        >>> to_json_data({"betas": (0.9, 0.999), "n": 3}, "group")
        {'betas': [0.9, 0.999], 'n': 3}
        >>> to_json_data({"f": open}, "state")
        Traceback (most recent call last):
        ...
        TypeError: state['f'] is a builtin_function_or_method, which is not JSON data (allowed: dict with str keys, list, tuple, str, int, float, bool, None)
    """
    if value is None or isinstance(value, (bool, str)):
        return value
    if isinstance(value, int):
        return int(value)
    if isinstance(value, float):
        return float(value)
    if isinstance(value, (list, tuple)):
        return [to_json_data(v, f"{where}[{i}]") for i, v in enumerate(value)]
    if isinstance(value, Mapping):
        out = {}
        for k, v in value.items():
            if not isinstance(k, str):
                raise TypeError(
                    f"{where}: key {k!r} is a {type(k).__name__}; JSON keys must be str"
                )
            out[k] = to_json_data(v, f"{where}[{k!r}]")
        return out
    raise TypeError(
        f"{where} is a {type(value).__name__}, which is not JSON data "
        "(allowed: dict with str keys, list, tuple, str, int, float, bool, None)"
    )


def json_bytes(obj: Any) -> bytes:
    """``obj`` as UTF-8 JSON, indented, with a trailing newline.

    Example:
        >>> json_bytes({"epoch": 3})
        b'{\\n  "epoch": 3\\n}\\n'
    """
    return (json.dumps(obj, indent=2, ensure_ascii=False) + "\n").encode("utf-8")
