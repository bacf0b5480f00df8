"""What ``fit`` asks of the frozen part and its cache, and what the cache did.

:class:`CacheOptions` is fit's cache options as one frozen dataclass, carried unchanged
from ``Model.fit``, the CLI and the recipes to the :class:`~frostline.engine.runner.Runner`;
:class:`CacheStatus` is the typed status of one data role (its :class:`CacheState`, and
the :class:`OffReason` when the cache is off).
"""

from __future__ import annotations

import enum
import os
from dataclasses import dataclass, fields
from typing import Any

import torch

from frostline.engine.frozen import describe_boundary

__all__ = ["CacheOptions", "CacheState", "CacheStatus", "OffReason"]


@dataclass(frozen=True)
class CacheOptions:
    """``fit``'s options for the frozen part and its activation cache, named as ``fit``
    names them and carried unchanged to the :class:`Runner`.

    ``cache``: True, False or "auto"; ``cache_memory_bytes``: what the cache may hold in
    memory before it spills to ``cache_dir`` (the system's temporary folder when None);
    ``cache_dtype``: the dtype floating-point frontier tensors are stored in;
    ``frozen_inference``: run the frozen part in inference mode; ``augment_views``: cache
    this many augmented passes of a random frozen part and cycle them.

    Example:
        >>> CacheOptions(cache=False).cache_memory_bytes == 2 << 30
        True
        >>> CacheOptions(cache="yes")
        Traceback (most recent call last):
        ...
        ValueError: cache must be True, False or 'auto', got 'yes'
        >>> CacheOptions(cache_dtype="float16")
        Traceback (most recent call last):
        ...
        TypeError: cache_dtype must be None or a floating-point torch.dtype such as torch.float16, got 'float16'
    """

    cache: bool | str = "auto"
    cache_memory_bytes: int = 2 << 30
    cache_dtype: torch.dtype | None = None
    cache_dir: Any = None
    frozen_inference: bool = False
    augment_views: int | None = None

    def __post_init__(self) -> None:
        if self.cache not in (True, False, "auto"):
            raise ValueError(f"cache must be True, False or 'auto', got {self.cache!r}")
        if not isinstance(self.frozen_inference, bool):
            raise TypeError(f"frozen_inference must be a bool, got {self.frozen_inference!r}")
        memory = self.cache_memory_bytes
        if isinstance(memory, bool) or not isinstance(memory, int) or memory < 0:
            raise ValueError(f"cache_memory_bytes must be an int >= 0 (bytes), got {memory!r}")
        dtype = self.cache_dtype
        if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
            raise TypeError(
                "cache_dtype must be None or a floating-point torch.dtype such as "
                f"torch.float16, got {dtype!r}"
            )
        if self.cache_dir is not None and not isinstance(self.cache_dir, str | os.PathLike):
            raise TypeError(
                f"cache_dir must be None, a str or an os.PathLike folder, got {self.cache_dir!r}"
            )
        views = self.augment_views
        if views is not None and (
            isinstance(views, bool) or not isinstance(views, int) or views < 1
        ):
            raise ValueError(f"augment_views must be None or an int >= 1, got {views!r}")

    @classmethod
    def names(cls) -> tuple[str, ...]:
        """The option names, as ``fit`` takes them as keywords.

        Example:
            >>> CacheOptions.names()[:2]
            ('cache', 'cache_memory_bytes')
        """
        return tuple(f.name for f in fields(cls))

    @classmethod
    def of(cls, given: CacheOptions | None = None, **keywords: Any) -> CacheOptions:
        """``given`` itself, unchanged, or the options the keywords name (each keyword
        left at its default counts as not given); both given is a TypeError.

        Example:
            >>> opts = CacheOptions(cache=False)
            >>> CacheOptions.of(opts, cache="auto") is opts
            True
            >>> CacheOptions.of(None, cache_memory_bytes=1 << 20).cache_memory_bytes
            1048576
            >>> CacheOptions.of(opts, cache_dir="/tmp")
            Traceback (most recent call last):
            ...
            TypeError: pass the cache options either as cache_options=CacheOptions(...) or as keywords, not both (got cache_options and cache_dir)
        """
        unknown = sorted(set(keywords) - set(cls.names()))
        if unknown:
            raise TypeError(
                f"unknown cache option(s) {', '.join(unknown)}; the cache options are "
                f"{', '.join(cls.names())}"
            )
        if given is None:
            return cls(**keywords)
        if not isinstance(given, CacheOptions):
            raise TypeError(
                f"cache_options must be a CacheOptions, got {type(given).__name__}: {given!r}"
            )
        default = cls()
        set_too = [n for n, v in keywords.items() if not _same(v, getattr(default, n))]
        if set_too:
            raise TypeError(
                "pass the cache options either as cache_options=CacheOptions(...) or as "
                f"keywords, not both (got cache_options and {', '.join(set_too)})"
            )
        return given


def _same(a: Any, b: Any) -> bool:
    """Whether a keyword's value is its default (``cache=True`` is not ``"auto"``)."""
    return type(a) is type(b) and a == b


class CacheState(enum.Enum):
    """What the activation cache did for one data role this epoch."""

    BUILT = "built"
    EXTENDED = "extended"
    REUSED = "reused"
    INVALIDATED = "invalidated"
    OFF = "off"


class OffReason(enum.Enum):
    """Why the cache is off (or was invalidated); the value is the log's wording."""

    DISABLED = "cache=False"
    NOT_TRACEABLE = "the model could not be traced"
    NOT_VERIFIED = "the traced graph does not reproduce the model"
    NO_FROZEN_PART = "no frozen part: the first computation is trainable"
    NOT_DETERMINISTIC = (
        "data is not declared deterministic: a DataLoader, or a Dataset without deterministic=True"
    )
    NO_FINGERPRINT = "data could not be fingerprinted"
    RANDOM = "randomness in the frozen part"
    DATA_RANDOM = "data declared deterministic is not"
    STOCHASTIC = "the frozen part has an active stochastic layer"
    STATEFUL = "the frozen part writes to model state"
    MIXES_SAMPLES = "frozen values depend on other samples in the batch"
    TOO_LARGE = "the frontier does not fit the memory budget nor the spill directory"
    WEIGHTS_CHANGED = "frozen weights changed"


@dataclass(frozen=True)
class CacheStatus:
    """The typed cache status of one data role ("train", "val", "evaluate").

    ``boundary`` names the frontier tensors (empty when there is no frozen part),
    ``reason`` says why the cache is off or was invalidated, ``detail`` adds specifics
    (a module name, a tracing error). ``frozen_mode`` is ``"inference"`` when the frozen
    part runs in inference mode (``fit(frozen_inference=True)``), else ``"as set"``.
    ``str(status)`` is the epoch log's wording.

    Example:
        >>> s = CacheStatus(CacheState.OFF, reason=OffReason.DISABLED)
        >>> str(s), s.cached
        ('off (cache=False)', False)
    """

    state: CacheState
    boundary: tuple[str, ...] = ()
    reason: OffReason | None = None
    detail: str = ""
    samples: int = 0
    nbytes: int = 0
    location: str = ""
    frozen_mode: str = "as set"
    view: int = 0  # with fit(augment_views=K): which of the K cached augmented views
    views: int = 0

    @property
    def cached(self) -> bool:
        """Whether the frozen part's outputs come from the cache."""
        return self.state in (CacheState.BUILT, CacheState.EXTENDED, CacheState.REUSED)

    def __str__(self) -> str:
        mode = " (frozen part in inference mode)" if self.frozen_mode == "inference" else ""
        if self.views:
            mode += f" (augmented view {self.view + 1} of {self.views})"
        if self.cached:
            where = describe_boundary(self.boundary)
            mb = self.nbytes / 2**20
            return (
                f"{self.state.value} ({self.samples} samples after {where}, "
                f"{mb:.1f} MB in {self.location}){mode}"
            )
        assert self.reason is not None
        text = self.reason.value + (f": {self.detail}" if self.detail else "")
        return f"{self.state.value} ({text}){mode}"
