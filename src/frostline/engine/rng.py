"""Randomness found by what it consumes: snapshots of every random number generator.

A computation draws random numbers when a generator's state moves while it runs. The
generators watched are torch's default generators (CPU, and every CUDA device once CUDA
is initialised), Python's global ``random``, NumPy's legacy global RNG
(``np.random.rand`` and friends), and the generators a model holds as attributes of its
modules (a ``torch.Generator``, a ``random.Random``, a NumPy ``Generator`` or
``RandomState``, also inside a list, tuple or dict attribute). A generator made inside
``forward`` and thrown away (``np.random.default_rng()`` called per batch) is local to that
call: nothing outside it can see it move, so it cannot be watched; hold it on the module
(``self.rng = np.random.default_rng(0)``) and it is.

:func:`capture` takes a :class:`RngState`; :meth:`RngState.moved` says which generators
moved since, and :meth:`RngState.restore` puts them all back. :class:`kept` restores
every generator on exit (checks and probes must not change what the user's training
draws).

Example:
    >>> import random
    >>> before = capture()
    >>> _ = random.random()
    >>> before.moved()
    ('Python random',)
    >>> before.restore()
    >>> before.moved()
    ()
"""

from __future__ import annotations

import random
from collections.abc import Collection, Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

__all__ = ["TORCH_KINDS", "RngState", "capture", "generators_in", "generators_of", "kept"]

#: torch's own generators, as :meth:`RngState.moved` names them: cheap to capture (a few
#: microseconds, where NumPy's state takes ~30), and what Dropout and most random layers
#: draw from, so a watch may capture them around every call from the start
TORCH_KINDS = ("torch generator", "CUDA generator")

Generator = torch.Generator | random.Random | np.random.Generator | np.random.RandomState
_GENERATOR_TYPES = (torch.Generator, random.Random, np.random.Generator, np.random.RandomState)


def generators_of(module: nn.Module | None) -> tuple[Any, ...]:
    """The generators ``module`` and its submodules hold as attributes (one level into
    lists, tuples and dicts), each once.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> m = nn.Sequential(nn.Linear(2, 2))
        >>> m[0].gen = torch.Generator()
        >>> generators_of(m) == (m[0].gen,)
        True
    """
    if module is None:
        return ()
    found: dict[int, Any] = {}
    for m in module.modules():
        for key, value in vars(m).items():
            if key in _MODULE_STATE:  # torch's own tables (parameters, hooks, children)
                continue
            for g in _generators(value):
                found.setdefault(id(g), g)
    return tuple(found.values())


_MODULE_STATE = frozenset(vars(nn.Module()))


def generators_in(values: Iterable[Any]) -> tuple[Any, ...]:
    """The generators among ``values`` (one level into lists, tuples and dicts), each once:
    e.g. a traced call's arguments (``torch.rand(n, generator=g)``).

    Example:
        >>> import torch
        >>> g = torch.Generator()
        >>> generators_in([1, {"generator": g}]) == (g,)
        True
    """
    found: dict[int, Any] = {}
    for v in values:
        for g in _generators(v):
            found.setdefault(id(g), g)
    return tuple(found.values())


def _generators(value: Any) -> list[Any]:
    if isinstance(value, _GENERATOR_TYPES):
        return [value]
    if isinstance(value, list | tuple):
        return [v for v in value if isinstance(v, _GENERATOR_TYPES)]
    if isinstance(value, dict):
        return [v for v in value.values() if isinstance(v, _GENERATOR_TYPES)]
    return []


def _kind(g: Any) -> str:
    if isinstance(g, torch.Generator):
        return f"torch.Generator on {g.device.type}"
    if isinstance(g, random.Random):
        return "random.Random"
    return "NumPy Generator" if isinstance(g, np.random.Generator) else "NumPy RandomState"


def _state_of(g: Any) -> Any:
    if isinstance(g, torch.Generator):
        return g.get_state()
    if isinstance(g, random.Random):
        return g.getstate()
    if isinstance(g, np.random.Generator):
        return g.bit_generator.state
    return g.get_state(legacy=False)


def _set_state(g: Any, state: Any) -> None:
    if isinstance(g, torch.Generator):
        g.set_state(state)
    elif isinstance(g, random.Random):
        g.setstate(state)
    elif isinstance(g, np.random.Generator):
        g.bit_generator.state = state
    else:
        g.set_state(state)


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and torch.equal(a, b)
    if isinstance(a, np.ndarray):
        return isinstance(b, np.ndarray) and np.array_equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, tuple | list):
        return (
            isinstance(b, tuple | list)
            and len(a) == len(b)
            and all(_same(x, y) for x, y in zip(a, b))
        )
    return bool(a == b)


def _cuda_devices() -> range:
    return range(torch.cuda.device_count()) if torch.cuda.is_initialized() else range(0)


@dataclass
class RngState:
    """The state of every watched generator at one moment (see :func:`capture`); a field
    is ``None`` where that generator was not captured (``capture(kinds=...)``)."""

    torch_cpu: torch.Tensor | None
    cuda: tuple[torch.Tensor, ...] | None
    python: Any
    numpy: Any
    held: tuple[tuple[Any, Any], ...]  # (generator, its state) for generators a model holds

    def moved(self) -> tuple[str, ...]:
        """Which generators moved since this state was taken (``()``: none did).

        Example:
            >>> import torch
            >>> before = capture()
            >>> _ = torch.rand(1)
            >>> before.moved()
            ('torch generator',)
            >>> before.restore()
        """
        kinds: list[str] = []
        if self.torch_cpu is not None and not torch.equal(self.torch_cpu, torch.get_rng_state()):
            kinds.append("torch generator")
        if self.cuda is not None and (
            any(
                not torch.equal(s, torch.cuda.get_rng_state(i))
                for i, s in zip(_cuda_devices(), self.cuda)
            )
            or len(self.cuda) != len(_cuda_devices())
        ):
            kinds.append("CUDA generator")
        if self.python is not None and self.python != random.getstate():
            kinds.append("Python random")
        if self.numpy is not None and not _same(self.numpy, _numpy_state()):
            kinds.append("NumPy global RNG")
        for g, state in self.held:
            kind = _kind(g)
            if kind not in kinds and not _same(state, _state_of(g)):
                kinds.append(kind)
        return tuple(kinds)

    def restore(self) -> None:
        """Put every generator back in this state.

        Example:
            >>> import numpy as np
            >>> before = capture()
            >>> a = np.random.rand()
            >>> before.restore()
            >>> bool(np.random.rand() == a)
            True
        """
        if self.torch_cpu is not None:
            torch.set_rng_state(self.torch_cpu)
        for i, s in zip(_cuda_devices(), self.cuda or ()):
            torch.cuda.set_rng_state(s, i)
        if self.python is not None:
            random.setstate(self.python)
        if self.numpy is not None:
            np.random.set_state(self.numpy)
        for g, state in self.held:
            _set_state(g, state)


def _numpy_state() -> Any:
    return np.random.get_state()


def capture(generators: Iterable[Any] = (), kinds: Collection[str] | None = None) -> RngState:
    """The state of the global generators and of ``generators`` (e.g. :func:`generators_of`).

    ``kinds`` captures only the generators of those kinds, as :meth:`RngState.moved` names
    them (a watch that knows which generators a run drew from needs no others: the NumPy
    state alone costs ~30 us to read); the state then watches and restores only those.

    Example:
        >>> capture().moved()
        ()
        >>> import random
        >>> only = capture(kinds=["torch generator"])
        >>> _ = random.random()
        >>> only.moved()
        ()
    """

    def wanted(kind: str) -> bool:
        return kinds is None or kind in kinds

    return RngState(
        torch.get_rng_state() if wanted("torch generator") else None,
        tuple(torch.cuda.get_rng_state(i) for i in _cuda_devices())
        if wanted("CUDA generator")
        else None,
        random.getstate() if wanted("Python random") else None,
        _numpy_state() if wanted("NumPy global RNG") else None,
        tuple((g, _state_of(g)) for g in generators if wanted(_kind(g))),
    )


class kept:
    """Every generator as it was on entry, again on exit; ``moved`` then says which ones
    the block drew from (``()`` inside the block).

    Example:
        >>> import random
        >>> with kept() as k:
        ...     a = random.random()
        >>> k.moved, random.random() == a
        (('Python random',), True)
    """

    def __init__(self, generators: Iterable[Any] = ()) -> None:
        self.generators = tuple(generators)
        self.moved: tuple[str, ...] = ()

    def __enter__(self) -> kept:
        self.state = capture(self.generators)
        return self

    def __exit__(self, *exc: object) -> None:
        self.moved = self.state.moved()
        self.state.restore()
