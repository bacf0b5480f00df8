"""Activation caching for the frozen prefix of a model.

While the layers before the first trainable layer are frozen, their outputs are a
pure function of the input data. :class:`ActivationStore` computes those outputs
once per dataset and serves batches of them afterwards, in memory or spilled to a
memory-mapped file. The fingerprints below (:func:`data_fingerprint`,
:func:`weights_version`, :func:`weights_checksum`) and :class:`CacheKey` tell the
trainer when a store is still valid.

Which weights key to use
------------------------
``weights_version(tensors)`` is O(#tensors) and reads no tensor data. It changes on
every modification that goes through the tensor objects themselves: in-place ops
(also under ``torch.no_grad()``), optimizer steps (including fused optimizers, which
do not bump ``Tensor._version``; see below), ``load_state_dict``, ``p.data = other``,
``p.set_(...)`` and replacing a parameter object. It does *not* see writes that
bypass the autograd version counter: ``p.data.copy_(...)`` / any in-place op on
``p.data``, writes through a numpy view (``p.detach().numpy()[...] = ...``), DLPack
or ``untyped_storage()`` aliases. Pass ``checksum=True`` (or use
:func:`weights_checksum`) to cover those as well: one read of every element, on the
tensors' own device, with one synchronisation per device. For the once-per-epoch
"is my cache still valid" check that read is negligible next to a forward pass
over the dataset, so ``checksum=True`` is the safe default there.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import math
import os
import shutil
import tempfile
import weakref
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import cache, lru_cache
from pathlib import Path
from typing import Any, Final

import numpy as np
import torch
from torch import Tensor
from torch.utils.weak import WeakIdKeyDictionary

__all__ = [
    "DEFAULT_MEMORY_BUDGET",
    "INHERIT",
    "ActivationStore",
    "CacheKey",
    "StepCounter",
    "data_fingerprint",
    "weights_checksum",
    "weights_version",
]

DEFAULT_MEMORY_BUDGET: Final[int] = 2 * 1024**3
"""Default ``memory_budget_bytes`` of :meth:`ActivationStore.build` (2 GiB)."""

_LEAF_BYTES: Final[int] = 1 << 20  # data_fingerprint leaf size (part of the digest!)
_PARALLEL_MIN_BYTES: Final[int] = 8 << 20  # hash in threads above this many bytes
_CHECKSUM_CHUNK: Final[int] = 1 << 20  # elements per weights_checksum chunk


class _Inherit:
    """Sentinel type: ``ActivationStore.map`` keeps the source store's setting."""

    def __repr__(self) -> str:
        return "INHERIT"


INHERIT: Final = _Inherit()


# --------------------------------------------------------------------------- store


def _remove_spill(path: str, directory: str | None, owner_pid: int) -> None:
    """Delete a spill file (and the directory frostline created for it)."""
    if os.getpid() != owner_pid:  # a forked child must not delete its parent's file
        return
    with contextlib.suppress(OSError):
        os.remove(path)
    if directory is not None:
        shutil.rmtree(directory, ignore_errors=True)


def _allocate_file(path: str, nbytes: int) -> None:
    """Create ``path`` with ``nbytes`` reserved, so a full disk fails here, not in mmap."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        if hasattr(os, "posix_fallocate"):
            try:
                os.posix_fallocate(fd, 0, nbytes)
            except OSError as exc:  # filesystems without fallocate support
                if exc.errno not in (errno.EOPNOTSUPP, errno.EINVAL):
                    raise
                os.ftruncate(fd, nbytes)
        else:  # pragma: no cover - non-POSIX
            os.ftruncate(fd, nbytes)
    finally:
        os.close(fd)


def _as_index(indices: Any) -> Tensor:
    """Indices as a 1-D int64 CPU tensor."""
    idx = torch.as_tensor(indices)
    if idx.dtype == torch.bool or idx.is_floating_point() or idx.is_complex():
        raise TypeError(f"sample indices must be integers, got dtype {idx.dtype}")
    return idx.to(device="cpu", dtype=torch.long).reshape(-1)


@dataclass(frozen=True)
class _Options:
    memory_budget_bytes: int
    spill_dir: str | Path | None
    dtype: torch.dtype | None
    device: torch.device


class ActivationStore:
    """N cached outputs of a function, one per sample, in memory or in a spill file.

    Create one with :meth:`build` (or :meth:`map` from another store). Gathering
    ``store[indices]`` returns a fresh, contiguous ``(len(indices), *sample_shape)``
    tensor of the dtype the function produced, on ``store.device``. Disk stores keep
    their data in a memory-mapped file that is deleted by :meth:`close`, when the
    store is garbage collected, or at normal interpreter exit, whichever is first.

    Example:
        >>> import torch
        >>> x = torch.arange(12.0).reshape(6, 2)
        >>> order = torch.tensor([4, 0, 2, 1, 5, 3])
        >>> batches = [(order[:3], x[order[:3]]), (order[3:], x[order[3:]])]
        >>> store = ActivationStore.build(lambda t: t * 10, batches, n=6)
        >>> store[torch.tensor([0, 5])]
        tensor([[  0.,  10.],
                [100., 110.]])
        >>> len(store), store.location, store.sample_shape, store.nbytes
        (6, 'memory', torch.Size([2]), 48)
        >>> store.close()
    """

    def __init__(
        self,
        data: Tensor,
        dtype: torch.dtype,
        options: _Options,
        *,
        path: str | None = None,
        finalizer: weakref.finalize | None = None,
    ) -> None:
        """Internal: use :meth:`build` or :meth:`map`."""
        self._data: Tensor | None = data
        self._dtype = dtype
        self._options = options
        self._path = path
        self._n = int(data.shape[0])
        self._sample_shape = torch.Size(data.shape[1:])
        self._storage_dtype = data.dtype
        self._nbytes = data.numel() * data.element_size()
        self._finalizer = finalizer

    # ---------------------------------------------------------------- creation
    @classmethod
    def _allocate(
        cls, n: int, sample_shape: torch.Size, dtype: torch.dtype, options: _Options
    ) -> ActivationStore:
        storage_dtype = options.dtype if options.dtype is not None else dtype
        shape = (n, *sample_shape)
        numel = math.prod(shape)
        itemsize = torch.empty((), dtype=storage_dtype).element_size()
        nbytes = numel * itemsize
        if nbytes <= options.memory_budget_bytes:
            return cls(torch.empty(shape, dtype=storage_dtype), dtype, options)

        if options.spill_dir is None:
            directory: str | None = tempfile.mkdtemp(prefix="frostline-cache-")
            path = os.path.join(directory, "activations.bin")
        else:
            directory = None
            spill_dir = Path(options.spill_dir)
            spill_dir.mkdir(parents=True, exist_ok=True)
            fd, path = tempfile.mkstemp(prefix="frostline-cache-", suffix=".bin", dir=spill_dir)
            os.close(fd)
        try:
            _allocate_file(path, nbytes)
            data = torch.from_file(path, shared=True, size=numel, dtype=storage_dtype).view(shape)
        except BaseException:
            _remove_spill(path, directory, os.getpid())
            raise
        store = cls(data, dtype, options, path=path)
        store._finalizer = weakref.finalize(store, _remove_spill, path, directory, os.getpid())
        return store

    @classmethod
    def build(
        cls,
        fn: Callable[[Tensor], Tensor],
        batches: Iterable[tuple[Tensor, Tensor]],
        n: int,
        *,
        memory_budget_bytes: int = DEFAULT_MEMORY_BUDGET,
        spill_dir: str | Path | None = None,
        dtype: torch.dtype | None = None,
        device: torch.device | str = "cpu",
    ) -> ActivationStore:
        """Run ``fn`` over ``(indices, inputs)`` batches and store the outputs by index.

        Args:
            fn: maps an input batch to an output batch with the same first dimension.
                Called under ``torch.no_grad()``.
            batches: ``(indices, inputs)`` pairs; together the indices must cover
                ``0..n-1`` exactly once.
            n: number of samples.
            memory_budget_bytes: stores up to this size (``n * bytes per sample`` in
                the storage dtype) live in a CPU tensor, larger ones in a spill file.
            spill_dir: where spill files go; default a fresh
                ``tempfile.mkdtemp(prefix="frostline-cache-")`` directory.
            dtype: storage dtype (e.g. ``torch.float16`` halves the size); gathers are
                cast back to ``fn``'s output dtype. ``None`` stores that dtype as is.
                A float cast that turns finite values into inf raises ``ValueError``.
            device: device that gathered batches (and the inputs that :meth:`map`
                feeds to its function) are delivered on. Storage is always CPU.

        Raises:
            ValueError: an index is out of range or given twice, some indices are
                never given (the message names how many), ``batches`` is empty, or the
                outputs change shape/dtype between batches.

        Example:
            >>> import torch
            >>> x = torch.randn(10, 3)
            >>> batches = [(torch.arange(i, i + 5), x[i : i + 5]) for i in (0, 5)]
            >>> store = ActivationStore.build(torch.tanh, batches, 10, memory_budget_bytes=0)
            >>> store.location
            'disk'
            >>> torch.equal(store[torch.tensor([7, 2])], torch.tanh(x[[7, 2]]))
            True
            >>> store.close()
        """
        if n < 0:
            raise ValueError(f"n must be >= 0, got {n}")
        if memory_budget_bytes < 0:
            raise ValueError(f"memory_budget_bytes must be >= 0, got {memory_budget_bytes}")
        options = _Options(int(memory_budget_bytes), spill_dir, dtype, torch.device(device))
        filled = torch.zeros(n, dtype=torch.bool)
        store: ActivationStore | None = None
        try:
            with torch.no_grad():
                for indices, inputs in batches:
                    idx = _as_index(indices)
                    _check_new_indices(idx, filled)
                    out = fn(inputs)
                    if not isinstance(out, Tensor):
                        raise TypeError(f"fn must return a Tensor, got {type(out).__name__}")
                    if out.dim() == 0 or out.shape[0] != idx.numel():
                        raise ValueError(
                            f"fn returned shape {tuple(out.shape)} for a batch of "
                            f"{idx.numel()} indices; the first dimension must match"
                        )
                    if store is None:
                        store = cls._allocate(n, out.shape[1:], out.dtype, options)
                    store._write(idx, out)
                    filled[idx] = True
            if store is None:
                raise ValueError("batches was empty: cannot infer the output shape")
            missing = n - int(filled.sum())
            if missing:
                first = torch.nonzero(~filled).flatten()[:5].tolist()
                raise ValueError(
                    f"{missing} of {n} sample indices were never filled (first missing: {first})"
                )
        except BaseException:
            if store is not None:
                store.close()
            raise
        return store

    @classmethod
    def build_many(
        cls,
        fn: Callable[..., Sequence[Tensor]],
        batches: Iterable[tuple[Tensor, Sequence[Tensor]]],
        n: int,
        *,
        memory_budget_bytes: int = DEFAULT_MEMORY_BUDGET,
        spill_dir: str | Path | None = None,
        dtype: torch.dtype | None = None,
        device: torch.device | str = "cpu",
        free_bytes: int | None = None,
    ) -> list[ActivationStore]:
        """:meth:`build` for a function of several inputs returning several tensors.

        ``fn(*inputs)`` returns a tuple of tensors; each gets a store. The memory budget
        is shared: when all of them together exceed it, all spill to disk. ``dtype``
        applies to floating-point outputs only (integer outputs are stored as they are).

        Raises:
            MemoryError: the outputs exceed the budget and ``free_bytes`` (the space
                left where spill files go), so they fit neither in memory nor on disk.

        Example:
            >>> import torch
            >>> x = torch.randn(6, 2)
            >>> stores = ActivationStore.build_many(
            ...     lambda t: (t * 2, t.argmax(1)), [(torch.arange(6), (x,))], 6)
            >>> [tuple(s.sample_shape) for s in stores], stores[1].dtype
            ([(2,), ()], torch.int64)
            >>> for s in stores: s.close()
        """
        if n < 0:
            raise ValueError(f"n must be >= 0, got {n}")
        if memory_budget_bytes < 0:
            raise ValueError(f"memory_budget_bytes must be >= 0, got {memory_budget_bytes}")
        filled = torch.zeros(n, dtype=torch.bool)
        stores: list[ActivationStore] | None = None
        try:
            with torch.no_grad():
                for indices, inputs in batches:
                    idx = _as_index(indices)
                    _check_new_indices(idx, filled)
                    outs = tuple(fn(*inputs))
                    for out in outs:
                        if not isinstance(out, Tensor):
                            raise TypeError(f"fn must return tensors, got {type(out).__name__}")
                        if out.dim() == 0 or out.shape[0] != idx.numel():
                            raise ValueError(
                                f"fn returned shape {tuple(out.shape)} for a batch of "
                                f"{idx.numel()} indices; the first dimension must match"
                            )
                    if stores is None:
                        stores = cls._allocate_many(
                            n, outs, memory_budget_bytes, spill_dir, dtype, device, free_bytes
                        )
                    for store, out in zip(stores, outs):
                        store._write(idx, out)
                    filled[idx] = True
            if stores is None:
                raise ValueError("batches was empty: cannot infer the output shape")
            missing = n - int(filled.sum())
            if missing:
                first = torch.nonzero(~filled).flatten()[:5].tolist()
                raise ValueError(
                    f"{missing} of {n} sample indices were never filled (first missing: {first})"
                )
        except BaseException:
            for store in stores or ():
                store.close()
            raise
        return stores

    @classmethod
    def _allocate_many(
        cls,
        n: int,
        outs: Sequence[Tensor],
        budget: int,
        spill_dir: str | Path | None,
        dtype: torch.dtype | None,
        device: torch.device | str,
        free_bytes: int | None,
    ) -> list[ActivationStore]:
        def storage(out: Tensor) -> torch.dtype:
            return dtype if dtype is not None and out.is_floating_point() else out.dtype

        total = sum(
            n * math.prod(o.shape[1:]) * torch.empty((), dtype=storage(o)).element_size()
            for o in outs
        )
        if total > budget and free_bytes is not None and total > free_bytes:
            raise MemoryError(
                f"the cache needs {total} bytes: more than the memory budget ({budget}) "
                f"and the free space for spill files ({free_bytes})"
            )
        shared = budget if total <= budget else 0  # all in memory, or all spilled
        stores: list[ActivationStore] = []
        try:
            for o in outs:
                options = _Options(
                    max(shared, total) if shared else 0,
                    spill_dir,
                    storage(o) if o.is_floating_point() else None,
                    torch.device(device),
                )
                stores.append(cls._allocate(n, o.shape[1:], o.dtype, options))
        except BaseException:
            for store in stores:
                store.close()
            raise
        return stores

    def _write(self, idx: Tensor, out: Tensor) -> None:
        data = self._require_open()
        if out.shape[1:] != self._sample_shape or out.dtype != self._dtype:
            raise ValueError(
                f"fn output changed from {tuple(self._sample_shape)} {self._dtype} to "
                f"{tuple(out.shape[1:])} {out.dtype} (per sample)"
            )
        stored = out.detach().to(dtype=self._storage_dtype)
        if stored.dtype != out.dtype and stored.is_floating_point() and out.is_floating_point():
            lost = torch.isfinite(out) & ~torch.isfinite(stored)
            if bool(lost.any()):
                raise ValueError(
                    f"activations overflow the storage dtype {self._storage_dtype}; "
                    "use dtype=torch.bfloat16 or dtype=None"
                )
        data.index_copy_(0, idx, stored.to("cpu"))

    def map(
        self,
        fn: Callable[[Tensor], Tensor],
        batch_size: int,
        *,
        memory_budget_bytes: int | None = None,
        spill_dir: str | Path | None | _Inherit = INHERIT,
        dtype: torch.dtype | None | _Inherit = INHERIT,
        device: torch.device | str | None = None,
    ) -> ActivationStore:
        """A new store holding ``fn`` applied to this store's outputs, sample by sample.

        Used when the frozen prefix grows: the extra stages run over the cached
        outputs instead of the raw data. ``fn`` sees batches as ``self[indices]``
        returns them (so values stored as float16 arrive rounded). Options default to
        this store's (``INHERIT`` / ``None``); this store stays open.

        Example:
            >>> import torch
            >>> x = torch.randn(8, 4)
            >>> a = ActivationStore.build(torch.relu, [(torch.arange(8), x)], 8)
            >>> b = a.map(lambda t: t * 2, batch_size=3)
            >>> torch.equal(b[torch.arange(8)], torch.relu(x) * 2)
            True
            >>> a.close(); b.close()
        """
        if batch_size <= 0:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        self._require_open()
        opts = self._options
        n = self._n

        def batches() -> Iterator[tuple[Tensor, Tensor]]:
            for start in range(0, n, batch_size):
                idx = torch.arange(start, min(n, start + batch_size))
                yield idx, self[idx]

        return ActivationStore.build(
            fn,
            batches(),
            n,
            memory_budget_bytes=(
                opts.memory_budget_bytes if memory_budget_bytes is None else memory_budget_bytes
            ),
            spill_dir=opts.spill_dir if isinstance(spill_dir, _Inherit) else spill_dir,
            dtype=opts.dtype if isinstance(dtype, _Inherit) else dtype,
            device=opts.device if device is None else device,
        )

    # ---------------------------------------------------------------- access
    def _require_open(self) -> Tensor:
        if self._data is None:
            raise RuntimeError("ActivationStore is closed")
        return self._data

    def __getitem__(self, indices: Tensor | Sequence[int] | np.ndarray | int | slice) -> Tensor:
        """Gather samples: a 1-D index batch gives ``(k, *sample_shape)``, an int one sample."""
        data = self._require_open()
        if isinstance(indices, slice):
            indices = torch.arange(self._n)[indices]
        idx = torch.as_tensor(indices)
        single = idx.dim() == 0
        if idx.dim() > 1:
            raise IndexError(f"indices must be 0-d or 1-d, got shape {tuple(idx.shape)}")
        idx = _as_index(idx)
        if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= self._n):
            bad = idx[(idx < 0) | (idx >= self._n)][0].item()
            raise IndexError(f"index {bad} is out of range for a store of {self._n} samples")
        out = data.index_select(0, idx)  # a fresh, contiguous copy
        out = out.to(self._options.device).to(self._dtype)
        return out[0] if single else out

    def __len__(self) -> int:
        return self._n

    @property
    def nbytes(self) -> int:
        """Bytes held by the storage (``n * bytes per sample`` in the storage dtype)."""
        return self._nbytes

    @property
    def location(self) -> str:
        """``"memory"`` (a CPU tensor) or ``"disk"`` (a memory-mapped spill file)."""
        return "memory" if self._path is None else "disk"

    @property
    def sample_shape(self) -> torch.Size:
        """Shape of one sample's output."""
        return self._sample_shape

    @property
    def dtype(self) -> torch.dtype:
        """Dtype of gathered batches (what ``fn`` produced)."""
        return self._dtype

    @property
    def storage_dtype(self) -> torch.dtype:
        """Dtype the values are kept in (``dtype`` unless a storage dtype was given)."""
        return self._storage_dtype

    @property
    def device(self) -> torch.device:
        """Device gathered batches are returned on."""
        return self._options.device

    @property
    def path(self) -> Path | None:
        """The spill file of a disk store (``None`` in memory)."""
        return None if self._path is None else Path(self._path)

    @property
    def closed(self) -> bool:
        """Whether :meth:`close` was called."""
        return self._data is None

    def close(self) -> None:
        """Release the storage and delete the spill file, if any. Idempotent."""
        self._data = None
        if self._finalizer is not None:
            self._finalizer()

    def __enter__(self) -> ActivationStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self.closed else self.location
        storage = "" if self._storage_dtype == self._dtype else f" as {self._storage_dtype}"
        return (
            f"ActivationStore(n={self._n}, sample_shape={tuple(self._sample_shape)}, "
            f"dtype={self._dtype}{storage}, nbytes={self._nbytes}, {state})"
        )


def _check_new_indices(idx: Tensor, filled: Tensor) -> None:
    n = filled.numel()
    if idx.numel() == 0:
        return
    out_of_range = (idx < 0) | (idx >= n)
    if bool(out_of_range.any()):
        raise ValueError(f"sample index {idx[out_of_range][0].item()} is out of range 0..{n - 1}")
    uniq, counts = torch.unique(idx, return_counts=True)
    dups = torch.cat([uniq[counts > 1], idx[filled[idx]]])
    if dups.numel():
        raise ValueError(f"sample index {dups[0].item()} was filled more than once")


# --------------------------------------------------------------------- fingerprints


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
        return _torch_dtype_name(t.dtype), tuple(t.shape), memoryview(raw)
    if isinstance(obj, np.ndarray | np.generic):
        arr = np.asarray(obj)
        if arr.dtype.hasobject:
            raise TypeError("data_fingerprint cannot hash numpy object arrays")
        name = arr.dtype.str if arr.dtype.fields is None else repr(arr.dtype.descr)
        raw = np.ascontiguousarray(arr).reshape(-1).view(np.uint8)
        return name, tuple(arr.shape), memoryview(raw)
    raise TypeError(
        f"data_fingerprint takes numpy arrays and torch tensors, got {type(obj).__name__}"
    )


def _leaf_digest(chunk: memoryview) -> bytes:
    return hashlib.blake2b(chunk, digest_size=32, person=b"frostline-leaf").digest()


def _default_workers() -> int:
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - non-Linux
        cpus = os.cpu_count() or 1
    return max(1, min(16, cpus))


def data_fingerprint(*arrays: np.ndarray | Tensor, workers: int | None = None) -> str:
    """Exact content hash of arrays/tensors: dtype, shape and every byte of each.

    BLAKE2b over 1 MiB leaves (hashed in parallel threads for large inputs; the
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
        self._counts: WeakIdKeyDictionary = WeakIdKeyDictionary()
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
                    self._counts[p] = self._counts.get(p, 0) + 1

    def __getitem__(self, tensor: Tensor) -> int:
        return self._counts.get(tensor, 0)

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
            tuple(t.shape),
            str(t.dtype),
            str(t.device),
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


def content_digest(tensors: Iterable[Tensor]) -> str:
    """One BLAKE2b digest over the bytes of all ``tensors`` (in order): exact, one pass.

    Sees every write, including those hidden from ``_version`` (``p.data.copy_``). About
    10x faster than :func:`weights_checksum` on a model's many small tensors because it
    reads them as one buffer.

    Example:
        >>> import torch
        >>> p = torch.nn.Parameter(torch.ones(3))
        >>> before = content_digest([p])
        >>> p.data[0] = 2.0
        >>> content_digest([p]) == before
        False
    """
    h = hashlib.blake2b(digest_size=20)
    flat = []
    for t in tensors:
        if not isinstance(t, Tensor):
            raise TypeError(f"content_digest takes tensors, got {type(t).__name__}")
        d = t.detach()
        h.update(f"{tuple(d.shape)}{d.dtype};".encode())
        flat.append(
            d.reshape(-1).contiguous().view(torch.uint8)
            if d.numel()
            else d.new_empty(0, dtype=torch.uint8)
        )
    if flat:
        blob = torch.cat([f.cpu() for f in flat])
        h.update(memoryview(blob.numpy()))
    return h.hexdigest()


# ------------------------------------------------------------------------- the key


@dataclass(frozen=True)
class CacheKey:
    """Everything an activation cache depends on; equal keys mean the cache is valid.

    Attributes:
        boundary: stage index where the frozen prefix ends (the stages before it
            are cached).
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
        ...     return CacheKey(1, data_fingerprint(x), weights, "bn=eval;dtype=float32")
        >>> k = key()
        >>> k == key(), hash(k) == hash(key())
        (True, True)
        >>> prefix.load_state_dict({n: v + 1 for n, v in prefix.state_dict().items()})
        <All keys matched successfully>
        >>> k == key()
        False
    """

    boundary: int
    data: str
    weights: tuple
    mode: str = ""
