"""The activation cache: the frozen part's frontier tensors kept across epochs and fits.

:class:`ActivationCache` builds, extends or reuses the cache of each data role
("train", "val", "evaluate") and serves a batch's frontier tensors from it. An entry is
keyed by the frontier, a fingerprint of the data, a content digest of the frozen weights
and the frozen part's modes (:class:`~frostline.engine.fingerprints.CacheKey`), so it is
rebuilt, never silently stale, when any of them changes; a cheap per-step version of the
frozen weights is checked at every batch. Every generator is watched while the data is
read and the frozen part runs for the cache (:mod:`.reading`); the first reuse in each fit
recomputes a few entries and compares. A planned unfreeze (:meth:`ActivationCache.plan_next`)
keeps the frontier the next fit needs from the same run over the data.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, replace

import torch
from torch import Tensor, nn

from frostline.engine import rng
from frostline.engine.activations import ActivationStore
from frostline.engine.fingerprints import CacheKey, weights_version
from frostline.engine.frozen import (
    GraphError,
    Partition,
    bridge,
    joint_frozen,
    partition,
    same_outputs,
)
from frostline.engine.runner.executor import FrozenExecutor
from frostline.engine.runner.reading import (
    Drew,
    close,
    data_name,
    free_bytes,
    read,
    store_batches,
    to_device,
    watched,
)
from frostline.engine.runner.splits import Splits
from frostline.engine.runner.status import CacheOptions, CacheState, CacheStatus, OffReason
from frostline.engine.runner.weights import (
    WeightKeys,
    frozen_tensors,
    mode_string,
    running_statistics,
)

__all__ = ["ActivationCache"]

_CHECKED = 4  # entries of a reused cache recomputed and compared, once per fit
# Samples per call of the frozen part while a cache is built or extended on the CPU,
# whatever batch size the trainer asks for (max(the fit's, 64)): a smaller call's
# activations stay in the CPU's caches and its peak memory is smaller. EfficientNet-Lite0,
# one thread, first epoch (the build) of 1,200 images at 96 px: 64 a call 3.4 s, 16 a
# call 2.6-2.7 s, 8: 4.4 s, 4: 5.2 s; peak RSS 1002-1024 -> 842-859 MiB. 256 images at
# 224 px: 64 a call 6.7 s, 32: 5.4 s, 16: 4.4-4.6 s, 8: 5.7 s; 1700 -> 1028-1086 MiB.
# An accelerator keeps the asked size.
_CPU_BUILD_CHUNK = 16


@dataclass
class _Prepared:
    """Frontier tensors kept for the split a planned unfreeze needs (see ``plan_next``)."""

    key: CacheKey  # mode: which BatchNorms use running statistics; ``check``: the rest
    stores: list[ActivationStore]
    local: Tensor | None
    check: tuple  # the frontier on the runner's example batch, to compare at reuse
    fit: int  # the fit that built it: it serves the next fit only


@dataclass
class _Entry:
    key: CacheKey
    stores: list[ActivationStore]
    local: Tensor | None  # global sample index -> row in the stores (sharded data)
    version: tuple  # cheap per-step weights key, checked every batch
    partition: Partition
    checked: int = -1  # the fit whose first reuse recomputed a sample of it (-1: none yet)


def _build_chunk(batch_size: int, device: torch.device) -> int:
    """Samples per call of the frozen part when a cache is built for ``device``."""
    return min(batch_size, _CPU_BUILD_CHUNK) if device.type == "cpu" else batch_size


class ActivationCache:
    """The cache of each data role for the splits of one module (see the module doc).

    ``status`` holds the last :class:`CacheStatus` of each role.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
        >>> _ = net[0].requires_grad_(False)
        >>> splits = Splits(net, CacheOptions())
        >>> splits.verify(torch.randn(4, 4))
        >>> cache = ActivationCache(splits, FrozenExecutor(splits), WeightKeys())
        >>> str(cache.cacheable(False))
        'off (data is not declared deterministic: a DataLoader, or a Dataset without deterministic=True)'
    """

    def __init__(self, splits: Splits, executor: FrozenExecutor, weights: WeightKeys) -> None:
        self.splits = splits
        self.executor = executor
        self.weights = weights
        self.options: CacheOptions = splits.options
        self.entries: dict[str, _Entry] = {}
        self.prepared: dict[str, _Prepared] = {}
        self.status: dict[str, CacheStatus] = {}
        self.views: dict[str, int] = {}  # the view each role's cache serves this epoch
        # found drawing random numbers by the cache build or check: per split (this fit),
        # and per data key (declared deterministic, it is not: for good)
        self.drew: dict[int, tuple[Partition, str]] = {}
        self.untrusted: dict[str, str] = {}
        self.next_ids: frozenset[int] = frozenset()
        self.fits = 0

    def _version(self) -> tuple:
        """Per-step key of the frozen weights: version counters, storage, optimizer steps."""
        return self.weights.version(self.splits.prefix_tensors())

    def cacheable(self, deterministic: bool) -> CacheStatus | None:
        """None when the frozen part's output may be cached, else the OFF status saying why."""
        mode = "inference" if self.options.frozen_inference else "as set"

        def off(reason: OffReason, detail: str = "") -> CacheStatus:
            return CacheStatus(
                CacheState.OFF, self.splits.boundary, reason, detail, frozen_mode=mode
            )

        if self.options.cache is False:
            return off(OffReason.DISABLED)
        if self.splits.part is None:
            reason, detail = self.splits.failure or (OffReason.NO_FROZEN_PART, "")
            if reason in (OffReason.STOCHASTIC, OffReason.RANDOM) and not deterministic:
                return off(OffReason.NOT_DETERMINISTIC)  # the first reason, as with a split
            return off(reason, detail)
        if not deterministic:
            return off(OffReason.NOT_DETERMINISTIC)
        drew = self.drew.get(id(self.splits.part))
        drew_why = drew[1] if drew is not None and drew[0] is self.splits.part else None
        if (self.splits.part.random or drew_why) and not self.options.augment_views:
            return off(OffReason.RANDOM, self.splits.part.random or drew_why or "")
        if self.splits.part.batch_statistics:
            return off(OffReason.STOCHASTIC, self.splits.part.batch_statistics)
        if self.splits.part.stateful:
            return off(OffReason.STATEFUL, self.splits.part.stateful)
        if self.splits.part.mixes_samples:
            return off(OffReason.MIXES_SAMPLES, self.splits.part.mixes_samples)
        return None

    def ensure_cache(
        self,
        role: str,
        data,
        *,
        indices: Tensor | None,
        device: torch.device,
        batch_size: int,
        fingerprint: str | None,
        epoch: int = 0,
    ) -> CacheStatus:
        """Build, extend or reuse the cache for ``role``; returns (and records) its status.

        With ``augment_views=K`` and a frozen part that draws random numbers, each of K
        caches holds one augmented pass over the data, built at its first use; epoch
        ``e`` is served by view ``e % K``."""
        views = (
            self.options.augment_views
            if self.splits.part is not None and self.splits.part.random
            else None
        )
        view = epoch % views if views else 0
        slot = f"{role}@view{view}" if views else role
        self.views[role] = view if views else -1
        status = self._ensure(role, slot, data, indices, device, batch_size, fingerprint)
        if views:
            status = replace(status, view=view, views=views)
            self.status[role] = status
        return status

    def _slot(self, role: str) -> str:
        """The entry that serves ``role`` now: its cache, or this epoch's augmented view."""
        view = self.views.get(role, -1)
        return role if view < 0 else f"{role}@view{view}"

    def _ensure(
        self,
        role: str,
        slot: str,
        data,
        indices: Tensor | None,
        device: torch.device,
        batch_size: int,
        fingerprint: str | None,
    ) -> CacheStatus:
        """:meth:`ensure_cache` for the entry ``slot``.

        Every generator is watched (:mod:`frostline.engine.rng`) while the data is read and
        the frozen part runs for the cache, and restored: a draw there means the data (or
        the frozen part, outside an augmented view) is random, and the cache is off. The
        first reuse of a cache in each fit recomputes a few of its entries from the data
        and compares them; data declared deterministic that reads otherwise turns the
        cache off for it, with one warning naming the dataset.
        """
        status = self.cacheable(getattr(data, "deterministic", False))
        if status is None and fingerprint is None:
            status = CacheStatus(CacheState.OFF, self.splits.boundary, OffReason.NO_FINGERPRINT)
        if status is not None:
            return self._off(role, slot, status)
        part = self.splits.part
        assert part is not None
        rows = indices if indices is not None else torch.arange(data.n)
        key = CacheKey(
            part.boundary,
            f"{fingerprint}:{hash(tuple(rows.tolist()))}",
            self.weights.content_key(self.splits.prefix_tensors()),
            mode_string(part),
        )
        untrusted = self.untrusted.get(key.data)
        if untrusted is not None:
            return self._off(role, slot, self._off_status(OffReason.DATA_RANDOM, untrusted))
        held = rng.generators_of(self.splits.module)
        try:
            return self._fill(role, slot, data, part, key, rows, indices, device, batch_size, held)
        except Drew as e:
            if e.source == "frozen":
                self.drew[id(part)] = (part, e.why)
                return self._off(role, slot, self._off_status(OffReason.RANDOM, e.why))
            self.untrusted[key.data] = e.why
            warnings.warn(
                f"{e.why}: the activation cache is off for it (declare a Dataset "
                "deterministic only when every read of a sample gives the same values)",
                UserWarning,
                stacklevel=2,
            )
            return self._off(role, slot, self._off_status(OffReason.DATA_RANDOM, e.why))

    def _off_status(self, reason: OffReason, detail: str = "") -> CacheStatus:
        mode = "inference" if self.options.frozen_inference else "as set"
        return CacheStatus(CacheState.OFF, self.splits.boundary, reason, detail, frozen_mode=mode)

    def _off(self, role: str, slot: str, status: CacheStatus) -> CacheStatus:
        """Record ``status`` (off) for ``role``, dropping the cache in ``slot``."""
        old = self.entries.pop(slot, None)
        if old is not None:
            close(old.stores)
        self.status[role] = status
        return status

    def _fill(
        self,
        role: str,
        slot: str,
        data,
        part: Partition,
        key: CacheKey,
        rows: Tensor,
        indices: Tensor | None,
        device: torch.device,
        batch_size: int,
        held: tuple,
    ) -> CacheStatus:
        """Reuse, extend or build the entry ``slot``; raises :class:`Drew`."""
        view = slot != role  # an augmented view: its frozen part draws, by design

        def watch(fn):
            return fn if view else watched(fn, held)

        entry = self.entries.get(slot)
        if entry is not None and entry.key == key:
            entry.version = self._version()  # same contents, maybe new counters
            entry.partition = part
            if not view:
                self._check(entry, data, rows, device, held)
            return self._record(role, CacheState.REUSED, entry)
        ready = self.prepared.pop(role, None) if not view else None
        if ready is not None:
            if self._serves(ready, key, part):
                if entry is not None:
                    close(entry.stores)
                self.entries[slot] = _Entry(key, ready.stores, ready.local, self._version(), part)
                self._check(self.entries[slot], data, rows, device, held)
                return self._record(role, CacheState.REUSED, self.entries[slot])
            close(ready.stores)
        local = None
        if indices is not None:
            local = torch.full((data.n,), -1, dtype=torch.long)
            local[indices] = torch.arange(len(indices))
        extra = None
        if entry is not None and entry.key.data == key.data:
            extra = self._extension(entry, part)
        if extra is not None and entry is not None:
            step = watch(extra)
            chunks = store_batches(entry.stores, _build_chunk(batch_size, device), device)
            stores = self._build(step, chunks, len(rows))
            if stores is None:
                return self._too_large(role)
            close(entry.stores)
            self.entries[slot] = _Entry(key, stores, local, self._version(), part)
            self.executor.release()  # the epochs read the cache now
            return self._record(role, CacheState.EXTENDED, self.entries[slot])
        self.entries.pop(slot, None)
        if entry is not None:
            close(entry.stores)

        def batches() -> Iterator[tuple[Tensor, tuple]]:
            for chunk in torch.arange(len(rows)).split(_build_chunk(batch_size, device)):
                x = read(data, rows[chunk], held)
                yield chunk, part.traced.flat(to_device(x, device))

        later, joint = self._next_split(part)
        stores = None
        if joint is not None:  # in memory or not at all (refused at the first batch): the
            # planned split's tensors must not push this fit's cache to disk
            fn = self.executor.frozen_fn
            both = watch(lambda *v: fn(v, joint)(*v))
            stores = self._build(both, batches(), len(rows), spill=False)
        if stores is None:
            later = None
            one = watch(lambda *v: self.executor.frozen_fn(v)(*v))
            stores = self._build(one, batches(), len(rows))
        if stores is None:
            return self._too_large(role)
        if later is not None:
            self._keep(role, later, key, stores[len(part.frontier) :], local)
            stores = stores[: len(part.frontier)]
        self.entries[slot] = _Entry(key, stores, local, self._version(), part)
        self.executor.release()  # the epochs read the cache now
        return self._record(role, CacheState.BUILT, self.entries[slot])

    def _check(self, entry: _Entry, data, rows: Tensor, device: torch.device, held) -> None:
        """At the first reuse of ``entry`` in this fit, recompute a few of its entries
        (spread over the data) and compare; raises :class:`Drew` when they differ."""
        if entry.checked == self.fits:
            return
        pos = torch.linspace(0, len(rows) - 1, steps=min(_CHECKED, len(rows))).round().long()
        pos = pos.unique()
        idx = rows[pos]
        values = entry.partition.traced.flat(to_device(read(data, idx, held), device))
        frozen = entry.partition.frozen
        assert frozen is not None
        with torch.no_grad():
            # the plain frozen part: folding a copy for a few samples costs more than it
            # saves, and would replace the folded copy of the other role (train / eval)
            now = watched(frozen, held)(*values)
        for store, fresh in zip(entry.stores, now):
            kept = store[pos].to(fresh.device)  # the stores hold ``rows`` in order
            fresh = fresh.to(kept.dtype)
            # loose: another batch size, TF32 convolutions or a half-precision store move
            # the last digits; data that reads otherwise (an augmentation) moves far more
            tol = 1e-2 if kept.dtype in (torch.float32, torch.float64) else 1e-1
            same = [
                torch.allclose(a, b, rtol=tol, atol=tol / 10, equal_nan=True)
                for a, b in zip(kept, fresh)
            ]
            if not all(same):
                raise Drew(
                    "data",
                    f"{data_name(data)} is declared deterministic, but sample "
                    f"{int(idx[same.index(False)])} read again gives other values than "
                    "when its cache was built",
                )
        entry.checked = self.fits

    def _next_split(self, part: Partition) -> tuple[Partition | None, nn.Module | None]:
        """The split the planned unfreeze needs, and the frozen module giving both frontiers."""
        if not self.next_ids or self.splits.key is None:
            return None, None
        ids = set(self.splits.key[0]) | self.next_ids
        try:
            later = partition(part.traced, trainable=ids)
        except GraphError:
            return None, None
        if (
            later.frozen is None
            or later.boundary == part.boundary
            or later.random
            or later.batch_statistics
            or later.stateful
            or later.mixes_samples
        ):
            return None, None
        joint = joint_frozen(part, later)
        return (later, joint) if joint is not None else (None, None)

    def _keep(
        self, role: str, later: Partition, key: CacheKey, stores: list, local: Tensor | None
    ) -> None:
        """Keep ``later``'s frontier (built with this fit's cache) for the next fit."""
        check = self.executor.example_frontier(later, fresh=True)  # split just now: computed then
        if check is None:
            close(stores)
            return
        old = self.prepared.pop(role, None)
        if old is not None:
            close(old.stores)
        self.prepared[role] = _Prepared(
            CacheKey(
                later.boundary,
                key.data,
                self.weights.content_key(frozen_tensors(later)),
                running_statistics(later),
            ),
            stores,
            local,
            check,
            self.fits,
        )

    def _serves(self, ready: _Prepared, key: CacheKey, part: Partition) -> bool:
        """Whether frontier tensors kept by the last fit are this split's cache: the same
        frontier, data, frozen weights and BatchNorm modes, and the same values on the
        example batch (which stands for the modes a trace baked in)."""
        if ready.fit != self.fits - 1 or part.frozen is None:
            return False
        if (ready.key.boundary, ready.key.data, ready.key.weights) != (
            key.boundary,
            key.data,
            key.weights,
        ) or ready.key.mode != running_statistics(part):
            return False
        now = self.executor.example_frontier(
            part, fresh=self.splits.split_holds(part, weights_version(self.splits.prefix_tensors()))
        )
        return (
            now is not None
            and len(now) == len(ready.check)
            and all(same_outputs(a, b) for a, b in zip(now, ready.check))
        )

    def _extension(self, entry: _Entry, part: Partition):
        """A graph from the stored frontier to the new one, when the new one lies past it.

        The new split may come from another trace (a newly frozen stage put in eval mode
        by ``frozen_inference``): :func:`bridge` then checks that it computes the stored
        frontier as the stored split's trace did; the stored part's BatchNorm modes and
        weights must be those it was built with."""
        old = entry.partition
        if entry.key.boundary == part.boundary:
            return None
        if entry.key.mode.split("|")[0] != mode_string(old).split("|")[0]:
            return None
        # whether the new frontier lies past the stored one is a walk over the graph; the
        # stored part's weights are hashed only then (a phase-2 split that unfreezes more
        # never extends, and its old weights need not be read)
        step = bridge(old, part)
        if step is None:
            return None
        if entry.key.weights != self.weights.content_key(frozen_tensors(old)):
            return None
        return step

    def _build(self, fn, batches, n: int, spill: bool = True) -> list[ActivationStore] | None:
        """The stores, or None when they fit neither in memory nor (``spill``) on disk."""
        try:
            return ActivationStore.build_many(
                fn,
                batches,
                n,
                memory_budget_bytes=self.options.cache_memory_bytes,
                spill_dir=self.options.cache_dir,
                dtype=self.options.cache_dtype,
                free_bytes=free_bytes(self.options.cache_dir) if spill else 0,
            )
        except MemoryError:
            return None

    def _too_large(self, role: str) -> CacheStatus:
        status = CacheStatus(CacheState.OFF, self.splits.boundary, OffReason.TOO_LARGE)
        self.status[role] = status
        return status

    def _record(self, role: str, state: CacheState, entry: _Entry) -> CacheStatus:
        status = CacheStatus(
            state,
            entry.key.boundary,
            samples=len(entry.stores[0]),
            nbytes=sum(s.nbytes for s in entry.stores),
            location="disk" if any(s.location == "disk" for s in entry.stores) else "memory",
            frozen_mode="inference" if self.options.frozen_inference else "as set",
        )
        self.status[role] = status
        return status

    def cached_inputs(self, role: str, idx: Tensor) -> tuple[Tensor, ...] | None:
        """Cached frontier tensors for these samples, or None when the cache cannot serve them."""
        slot = self._slot(role)
        entry = self.entries.get(slot)
        if entry is None or entry.partition is not self.splits.part:
            return None
        if entry.version != self._version():
            self.entries.pop(slot, None)  # weights changed under us: never serve stale outputs
            close(entry.stores)
            self.status[role] = CacheStatus(
                CacheState.INVALIDATED, entry.key.boundary, OffReason.WEIGHTS_CHANGED
            )
            return None
        rows = idx if entry.local is None else entry.local[idx]
        if (rows < 0).any():
            return None
        return tuple(s[rows] for s in entry.stores)

    def plan_next(self, params: Iterable[Tensor] = ()) -> None:
        """Start a fit whose next fit will also train ``params`` (a planned unfreeze).

        When this fit builds its cache from the data, the same run also keeps the frontier
        of the split the next fit will need (the frozen values right below ``params``), as
        memory allows; the next fit then reuses it instead of running the frozen part over
        the data again. What the fit before the last one kept is dropped.
        """
        self.fits += 1
        self.next_ids = frozenset(id(p) for p in params)
        for role, old in list(self.prepared.items()):
            if old.fit < self.fits - 1:
                close(self.prepared.pop(role).stores)

    def drop(self) -> None:
        for e in self.entries.values():
            close(e.stores)
        self.entries.clear()
        for p in self.prepared.values():
            close(p.stores)
        self.prepared.clear()
