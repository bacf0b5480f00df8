"""Reading data for the cache with every generator watched, and the stores it fills.

:func:`read` and :func:`watched` raise :class:`Drew` when reading the data or running the
frozen part drew random numbers (:mod:`frostline.engine.rng`; every generator is put back
first): data declared deterministic that is not, or a frozen part that is random.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor

from frostline.engine import rng
from frostline.engine.activations import ActivationStore
from frostline.engine.fingerprints import data_fingerprint

__all__ = [
    "Drew",
    "close",
    "data_name",
    "fingerprint_of",
    "free_bytes",
    "read",
    "store_batches",
    "to_device",
    "watched",
]


class Drew(Exception):
    """The data or the frozen part drew random numbers while the cache was built or
    checked: ``source`` is ``"data"`` or ``"frozen"``, ``why`` the log's detail."""

    def __init__(self, source: str, why: str) -> None:
        super().__init__(why)
        self.source, self.why = source, why


def data_name(data) -> str:
    """How the log names the data: ``"dataset Digits"``.

    Example:
        >>> data_name([1, 2])
        'dataset list'
    """
    ds = getattr(data, "dataset", data)
    return f"dataset {type(ds).__name__}"


def read(data, idx: Tensor, held: tuple) -> Any:
    """The inputs of samples ``idx``; raises :class:`Drew` when reading them drew random
    numbers (every generator is put back first)."""
    with rng.kept(held) as watch:
        x, _ = data.gather(idx)
    if watch.moved:
        raise Drew(
            "data",
            f"{data_name(data)} is declared deterministic, but reading it draws random "
            f"numbers ({', '.join(watch.moved)})",
        )
    return x


def watched(fn, held: tuple):
    """``fn`` (the frozen part, run for the cache) that raises :class:`Drew` when it
    draws random numbers (every generator is put back first)."""

    def run(*values: Any) -> Any:
        with rng.kept(held) as watch:
            out = fn(*values)
        if watch.moved:
            raise Drew(
                "frozen",
                f"the frozen part draws random numbers ({', '.join(watch.moved)}) while "
                "its outputs are cached",
            )
        return out

    return run


def close(stores: list[ActivationStore]) -> None:
    """Close every store (memory freed, spill files removed)."""
    for s in stores:
        s.close()


def store_batches(
    stores: list[ActivationStore], batch_size: int, device: torch.device
) -> Iterator[tuple[Tensor, tuple]]:
    """The stores' rows in order, ``batch_size`` at a time, on ``device``."""
    n = len(stores[0])
    for start in range(0, n, batch_size):
        idx = torch.arange(start, min(n, start + batch_size))
        yield idx, tuple(s[idx].to(device) for s in stores)


def free_bytes(spill_dir) -> int | None:
    """Free bytes where the cache would spill (None when that cannot be read).

    Example:
        >>> free_bytes(None) is None or free_bytes(None) >= 0
        True
    """
    try:
        return shutil.disk_usage(spill_dir or tempfile.gettempdir()).free
    except OSError:
        return None


def to_device(obj: Any, device: torch.device) -> Any:
    """``obj`` (a tensor, or a dict/list/tuple of them) on ``device``."""
    if isinstance(obj, dict):
        return {k: to_device(v, device) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return type(obj)(to_device(v, device) for v in obj)
    return obj.to(device, non_blocking=True) if isinstance(obj, Tensor) else obj


def fingerprint_of(data) -> str | None:
    """Exact fingerprint of in-memory data (None when the data is not in memory)."""
    arrays = data.inputs() if hasattr(data, "inputs") else ()
    if not arrays:
        ds = getattr(data, "dataset", None)
        fp = getattr(ds, "fingerprint", None)
        return str(fp() if callable(fp) else fp) if fp is not None else None
    return data_fingerprint(*arrays)
