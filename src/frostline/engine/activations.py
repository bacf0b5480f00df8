"""The activation store: the frozen part's outputs for a dataset, computed once.

While the frozen part's weights do not change, its outputs are a pure function of the
input data. :class:`ActivationStore` computes them once per dataset and serves batches
of them afterwards, in memory or spilled to a memory-mapped file. When it is still valid
is decided with :mod:`frostline.engine.fingerprints`.
"""

from __future__ import annotations

import contextlib
import errno
import math
import os
import shutil
import tempfile
import weakref
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import numpy as np
import torch
from torch import Tensor

__all__ = [
    "DEFAULT_MEMORY_BUDGET",
    "INHERIT",
    "ActivationStore",
]

DEFAULT_MEMORY_BUDGET: Final[int] = 2 * 1024**3
"""Default ``memory_budget_bytes`` of :meth:`ActivationStore.build` (2 GiB)."""


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
            made = tempfile.mkdtemp(prefix="frostline-cache-")
            directory: str | None = made
            path = os.path.join(made, "activations.bin")
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
            dtype: storage dtype for a floating-point output (e.g. ``torch.float16``
                halves the size); gathers are cast back to ``fn``'s output dtype.
                ``None`` (and any integer output) stores the output's dtype as is.
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
        (store,) = cls.build_many(
            lambda inputs: (fn(inputs),),
            ((indices, (inputs,)) for indices, inputs in batches),
            n,
            memory_budget_bytes=memory_budget_bytes,
            spill_dir=spill_dir,
            dtype=dtype,
            device=device,
        )
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
        """Run ``fn(*inputs)`` over ``(indices, inputs)`` batches; one store per output tensor.

        What :meth:`build` does for one input and one output (it calls this).

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
