"""Fingerprints that tell when a cache of the frozen part's outputs is still valid.

:func:`data_fingerprint` (the inputs, exactly), :func:`weights_version` (the frozen
weights, cheaply, every step), :func:`weights_checksum` (writes that bypass the version
counter), :class:`StepCounter` (fused optimizers' steps) and :class:`CacheKey`.

Which weights key to use
------------------------
``weights_version(tensors)`` is O(#tensors) and reads no tensor data. It changes on
every modification that goes through the tensor objects themselves: in-place ops
(also under ``torch.no_grad()``), optimizer steps (including fused optimizers, which
do not bump ``Tensor._version``; see :class:`StepCounter`), ``load_state_dict``,
``p.data = other``, ``p.set_(...)`` and replacing a parameter object. It does *not* see
writes that bypass the autograd version counter: ``p.data.copy_(...)`` / any in-place op
on ``p.data``, writes through a numpy view, DLPack or ``untyped_storage()`` aliases. Pass
``checksum=True`` (or use :func:`weights_checksum`), or compare a
:func:`frostline.core.digest.content_digest`, to cover those as well.
"""

from __future__ import annotations

import hashlib
import os
import weakref
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import cache, lru_cache
from typing import Any, Final

import numpy as np
import torch
from torch import Tensor

__all__ = ["CacheKey", "StepCounter", "data_fingerprint", "weights_checksum", "weights_version"]

_LEAF_BYTES: Final[int] = 1 << 20  # data_fingerprint leaf size (part of the digest!)
_PARALLEL_MIN_BYTES: Final[int] = 8 << 20  # hash in threads above this many bytes
_CHECKSUM_CHUNK: Final[int] = 1 << 20  # elements per weights_checksum chunk


@cache
def _torch_dtype_name(dtype: torch.dtype) -> str:
    """numpy's ``dtype.str`` where numpy has the dtype, so arrays and tensors agree."""
    try:
        return torch.empty((), dtype=dtype).numpy().dtype.str
    except TypeError:  # bfloat16, float8 ...: no numpy equivalent
        return str(dtype)


def _bytes_of(obj: object) -> tuple[str, tuple[int, ...], memoryview]:
    """(dtype name, shape, C-order bytes) of an array or tensor."""
    if isinstance(obj, Tensor):
        if obj.layout != torch.strided:
            raise TypeError(f"data_fingerprint needs dense tensors, got layout {obj.layout}")
        t = obj.detach()
        if t.device.type != "cpu":
            t = t.cpu()
        t = t.resolve_conj().resolve_neg().contiguous()
        raw = t.reshape(-1).view(torch.uint8).numpy()
        return _torch_dtype_name(t.dtype), tuple(t.shape), raw.data
    if isinstance(obj, np.ndarray | np.generic):
        arr = np.asarray(obj)
        if arr.dtype.hasobject:
            raise TypeError("data_fingerprint cannot hash numpy object arrays")
        name = arr.dtype.str if arr.dtype.fields is None else repr(arr.dtype.descr)
        raw = np.ascontiguousarray(arr).reshape(-1).view(np.uint8)
        return name, tuple(arr.shape), raw.data
    raise TypeError(
        f"data_fingerprint takes numpy arrays and torch tensors, got {type(obj).__name__}"
    )


def _leaf_digest(chunk: memoryview) -> bytes:
    # SHA-256: CPUs with SHA extensions hash it about twice as fast as BLAKE2b (3.5 ms
    # against 6.8 ms for a 6 MB training set, read at every fit); as frostline.core.digest
    h = hashlib.sha256(b"frostline-leaf")
    h.update(chunk)
    return h.digest()


def _default_workers() -> int:
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - non-Linux
        cpus = os.cpu_count() or 1
    return max(1, min(16, cpus))


def data_fingerprint(*arrays: np.ndarray | Tensor, workers: int | None = None) -> str:
    """Exact content hash of arrays/tensors: dtype, shape and every byte of each.

    SHA-256 over 1 MiB leaves (hashed in parallel threads for large inputs; the
    digest does not depend on ``workers``) combined with each array's dtype and
    shape into a root BLAKE2b. A numpy array and a CPU/CUDA tensor holding the same
    values with the same dtype and shape hash alike; the memory layout (strides,
    non-contiguity) does not matter. Non-contiguous inputs are copied once.

    Example:
        >>> import numpy as np, torch
        >>> a = np.arange(6, dtype=np.float32).reshape(2, 3)
        >>> data_fingerprint(a) == data_fingerprint(torch.arange(6.0).reshape(2, 3))
        True
        >>> data_fingerprint(a) == data_fingerprint(a.reshape(3, 2))
        False
    """
    items = [_bytes_of(a) for a in arrays]
    leaves = [
        buf[start : start + _LEAF_BYTES]
        for _, _, buf in items
        for start in range(0, len(buf), _LEAF_BYTES)
    ]
    total = sum(len(buf) for _, _, buf in items)
    workers = _default_workers() if workers is None else max(1, workers)
    if workers > 1 and total >= _PARALLEL_MIN_BYTES and len(leaves) > 1:
        # hashlib releases the GIL while hashing, so threads scale with cores.
        with ThreadPoolExecutor(max_workers=min(workers, len(leaves))) as pool:
            digests = list(pool.map(_leaf_digest, leaves))
    else:
        digests = [_leaf_digest(leaf) for leaf in leaves]

    root = hashlib.blake2b(digest_size=32, person=b"frostline-data1")
    root.update(len(items).to_bytes(8, "little"))
    it = iter(digests)
    for name, shape, buf in items:
        header = f"{name}|{shape}|{len(buf)}".encode()
        root.update(len(header).to_bytes(8, "little") + header)
        for _ in range(-(-len(buf) // _LEAF_BYTES)):
            root.update(next(it))
    return root.hexdigest()


class StepCounter:
    """Counts optimizer steps per parameter, for the optimizers it watches.

    Fused optimizers (``fused=True``) update parameters without bumping
    ``Tensor._version``; :func:`weights_version` adds these counts so it still sees
    their steps. The hook is registered on each watched optimizer only (never
    process-wide) and removed by :meth:`detach`.

    Example:
        >>> import torch
        >>> p = torch.nn.Parameter(torch.ones(2))
        >>> opt = torch.optim.SGD([p], lr=0.1)
        >>> steps = StepCounter(); steps.watch(opt)
        >>> p.grad = torch.ones(2); opt.step()
        >>> steps[p]
        1
        >>> steps.detach(); opt.step(); steps[p]
        1
    """

    def __init__(self) -> None:
        # keyed by id(): a plain dict is ~10x faster to read per step than a weak one; an id
        # reused after its tensor died can only make a key differ (a spurious rebuild)
        self._counts: dict[int, int] = {}
        self._watched: list[tuple[weakref.ref, Any]] = []

    def watch(self, optimizer: torch.optim.Optimizer) -> None:
        """Count the steps of ``optimizer`` from now on (idempotent)."""
        if any(ref() is optimizer for ref, _ in self._watched):
            return
        handle = optimizer.register_step_post_hook(self._count)
        self._watched.append((weakref.ref(optimizer), handle))

    def _count(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        for group in optimizer.param_groups:
            for p in group["params"]:
                if p.grad is not None:  # torch optimizers skip parameters without a grad
                    self._counts[id(p)] = self._counts.get(id(p), 0) + 1

    def __getitem__(self, tensor: Tensor) -> int:
        return self._counts.get(id(tensor), 0)

    def detach(self) -> None:
        """Remove the hooks from every watched optimizer."""
        for _, handle in self._watched:
            handle.remove()
        self._watched.clear()


def _version_of(t: Tensor) -> int | tuple[int, ...]:
    try:
        return t._version
    except RuntimeError:  # inference tensors have no version counter: read the data
        return weights_checksum([t])[0]


def weights_version(
    tensors: Iterable[Tensor], *, checksum: bool = False, steps: StepCounter | None = None
) -> tuple:
    """A cheap key that changes whenever one of ``tensors`` is modified.

    Per tensor: ``id``, ``data_ptr``, ``_version``, the number of optimizer steps
    that updated it as counted by ``steps`` (a :class:`StepCounter` watching the
    optimizers: fused optimizers do not bump ``_version``), shape, dtype, device.
    O(#tensors), no data read, no device sync. Blind to writes that bypass the
    version counter (``p.data.copy_(...)``, numpy/DLPack/storage aliases); with
    ``checksum=True`` the key also includes :func:`weights_checksum`, which sees
    them at the cost of one pass over the data. Forward passes do not change it
    (BatchNorm in train mode does: its running stats are modified).

    Example:
        >>> import torch
        >>> layer = torch.nn.Linear(2, 2)
        >>> key = weights_version(layer.parameters())
        >>> _ = layer.eval()(torch.ones(1, 2))
        >>> weights_version(layer.parameters()) == key
        True
        >>> with torch.no_grad():
        ...     _ = layer.weight.mul_(2)
        >>> weights_version(layer.parameters()) == key
        False
    """
    ts = list(tensors)
    for t in ts:
        if not isinstance(t, Tensor):
            raise TypeError(f"weights_version takes tensors, got {type(t).__name__}")
    key = tuple(
        (
            id(t),
            t.data_ptr(),
            _version_of(t),
            steps[t] if steps is not None else 0,
            t.shape,
            t.dtype,
            t.device,
        )
        for t in ts
    )
    if checksum:
        return key + weights_checksum(ts)
    return key


@lru_cache(maxsize=8)
def _positions(device: torch.device) -> Tensor:
    return torch.arange(1, _CHECKSUM_CHUNK + 1, dtype=torch.int64, device=device)


_WORD_DTYPES: Final = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def _checksum_one(t: Tensor) -> Tensor:
    """``[sum(w_i), sum((i + 1) * w_i)]`` mod 2**64 over the bit patterns ``w_i``."""
    flat = t.detach().resolve_conj().resolve_neg().contiguous().reshape(-1)
    size = flat.element_size()
    words = flat.view(_WORD_DTYPES.get(size, torch.int64))
    acc = torch.zeros(2, dtype=torch.int64, device=words.device)
    positions = _positions(words.device)
    for start in range(0, words.numel(), _CHECKSUM_CHUNK):
        chunk = words[start : start + _CHECKSUM_CHUNK].to(torch.int64)
        plain = chunk.sum()
        weighted = (chunk * positions[: chunk.numel()]).sum()
        acc[0] += plain
        acc[1] += weighted + start * plain
    return acc


def weights_checksum(tensors: Iterable[Tensor]) -> tuple[tuple[int, int], ...]:
    """Bit-exact checksum per tensor that also sees writes hidden from ``_version``.

    For each tensor, over the raw bit patterns ``w_i`` of its elements (int64
    arithmetic, computed on the tensor's device, one sync per device): ``sum(w_i)``
    and ``sum((i + 1) * w_i)``. Any change to one element changes the first; any
    change to two elements, including a swap, changes the pair; NaN payloads and
    ``-0.0`` count. One read of the data: use it for occasional validity checks
    (e.g. once per epoch), :func:`weights_version` for frequent ones.

    Example:
        >>> import torch
        >>> p = torch.nn.Parameter(torch.ones(3))
        >>> before = weights_checksum([p])
        >>> p.data[0] = 2.0  # invisible to p._version
        >>> weights_checksum([p]) == before
        False
    """
    ts = list(tensors)
    sums: list[Tensor] = []
    for t in ts:
        if not isinstance(t, Tensor):
            raise TypeError(f"weights_checksum takes tensors, got {type(t).__name__}")
        sums.append(_checksum_one(t))
    result: list[tuple[int, int]] = [(0, 0)] * len(ts)
    by_device: dict[torch.device, list[int]] = {}
    for i, s in enumerate(sums):
        by_device.setdefault(s.device, []).append(i)
    for positions in by_device.values():
        values = torch.stack([sums[i] for i in positions]).cpu().tolist()
        for i, (plain, weighted) in zip(positions, values):
            result[i] = (int(plain), int(weighted))
    return tuple(result)


# ------------------------------------------------------------------------- the key


@dataclass(frozen=True)
class CacheKey:
    """Everything an activation cache depends on; equal keys mean the cache is valid.

    Attributes:
        boundary: names of the frontier tensors the cache holds (where the frozen
            part ends, :attr:`frostline.engine.frozen.Partition.boundary`).
        data: :func:`data_fingerprint` of the inputs (and their order).
        weights: :func:`weights_version` (optionally with ``checksum=True``) of the
            prefix's parameters and buffers.
        mode: anything else the outputs depend on, e.g. BatchNorm mode and dtype,
            as a string such as ``"bn=eval;dtype=float32"``.

    Example:
        >>> import torch
        >>> x = torch.randn(4, 3)
        >>> prefix = torch.nn.Linear(3, 3)
        >>> def key() -> CacheKey:
        ...     weights = weights_version(prefix.parameters())
        ...     return CacheKey(("flatten",), data_fingerprint(x), weights, "bn=eval;dtype=float32")
        >>> k = key()
        >>> k == key(), hash(k) == hash(key())
        (True, True)
        >>> prefix.load_state_dict({n: v + 1 for n, v in prefix.state_dict().items()})
        <All keys matched successfully>
        >>> k == key()
        False
    """

    boundary: tuple[str, ...]
    data: str
    weights: tuple
    mode: str = ""
