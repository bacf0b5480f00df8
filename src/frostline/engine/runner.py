"""How a training step runs the model: frozen prefix, then the trainable rest.

The model is seen as an ordered list of stages (:mod:`frostline.engine.stages`). The
stages before the first one holding a trainable parameter form the *frozen prefix*:
they run under ``torch.no_grad`` (optionally as a BatchNorm-folded inference copy),
and when the data is deterministic and the prefix has no active stochastic layer
their outputs are cached across epochs and fits (:mod:`frostline.engine.activations`). The cache
key holds the prefix boundary, a fingerprint of the data, the prefix weights'
version and the prefix modes, so it is rebuilt, never silently stale, when any of
them changes.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from frostline.core import batchnorm
from frostline.core.state import own_weights
from frostline.engine.activations import (
    ActivationStore,
    CacheKey,
    content_digest,
    data_fingerprint,
    weights_version,
)
from frostline.engine.fuse import inference_copy
from frostline.engine.stages import Stage, stages_of, verify_stages

# Bumped whenever any module (re)registers a parameter, buffer or submodule (assignment
# included), so per-step checks can reuse the prefix's tensor list until that happens.
_STRUCTURE = [0]


def _structure_changed(*_args) -> None:
    _STRUCTURE[0] += 1


nn.modules.module.register_module_parameter_registration_hook(_structure_changed)
nn.modules.module.register_module_buffer_registration_hook(_structure_changed)
nn.modules.module.register_module_module_registration_hook(_structure_changed)


class StageSequence(nn.Module):
    """Stages applied in order, as one module (what DDP wraps when a prefix is frozen)."""

    def __init__(self, stages: list[Stage]) -> None:
        super().__init__()
        self.stage_modules = nn.ModuleList([s.module for s in stages if s.module is not None])
        # A stage that is its module is called through ``stage_modules`` (an int here), so a
        # module swapped there is the one that runs: inference_copy folds a BatchNorm stage
        # into the conv stage before it by putting an Identity in the BatchNorm's place.
        self._fns: list = []
        slot = 0
        for s in stages:
            self._fns.append(slot if s.module is not None and s.fn is s.module else s.fn)
            slot += s.module is not None

    def forward(self, x):
        for fn in self._fns:
            x = self.stage_modules[fn](x) if isinstance(fn, int) else fn(x)
        return x


def _stochastic_active(module: nn.Module) -> str | None:
    """Name of the first module that would make a train-mode forward non-deterministic."""
    for m in module.modules():
        if batchnorm.is_batchnorm(m) and m.running_mean is None:  # batch statistics in any mode
            return f"{type(m).__name__} in batch-statistics mode (no running statistics)"
        if not m.training:
            continue
        if isinstance(m, nn.modules.dropout._DropoutNd) and m.p > 0:
            return type(m).__name__
        if (
            type(m).__name__ in ("DropPath", "StochasticDepth")
            and float(getattr(m, "drop_prob", getattr(m, "p", 0)) or 0) > 0
        ):
            return type(m).__name__
        if batchnorm.is_batchnorm(m) and not batchnorm.runs_inference(m) and m.track_running_stats:
            return f"{type(m).__name__} in batch-statistics mode"
    return None


@dataclass
class CacheEntry:
    key: CacheKey
    store: ActivationStore
    local: torch.Tensor | None  # global sample index -> row in the store (sharded data)
    version: tuple  # cheap per-step weights key (torch version counters), checked every batch


class Runner:
    """Runs a module as frozen prefix + trainable suffix, with an activation cache."""

    def __init__(
        self,
        module: nn.Module,
        *,
        cache: bool | str = "auto",
        memory_budget_bytes: int = 2 << 30,
        cache_dtype: torch.dtype | None = None,
        spill_dir=None,
        fuse: bool = True,
    ) -> None:
        if cache not in (True, False, "auto"):
            raise ValueError(f"cache must be True, False or 'auto', got {cache!r}")
        self.module = module
        self.cache_setting = cache
        self.memory_budget_bytes = memory_budget_bytes
        self.cache_dtype = cache_dtype
        self.spill_dir = spill_dir
        self.fuse = fuse
        self.stages: list[Stage] | None = stages_of(module)
        self.verified = False
        self.boundary = 0
        self._key: tuple | None = None
        self.suffix: nn.Module = module
        self.prefix: StageSequence | None = None
        self._fused = None
        self._fused_key = None
        self.entries: dict[str, CacheEntry] = {}
        self._checksums: dict[tuple, tuple] = {}
        self.status: dict[str, str] = {}
        self.reason = (
            ""
            if self.stages
            else "model is not decomposable into stages (see fl.stages.register_stages)"
        )

    # -- structure -----------------------------------------------------------------
    def verify(self, example: torch.Tensor) -> None:
        """Check once, on real input, that the stages compose to the model's forward."""
        if self.verified or self.stages is None:
            return
        self.verified = True
        try:
            ok = verify_stages(self.module, self.stages, example[:2])
        except Exception:  # any failure means: do not decompose
            ok = False
        if not ok:
            self.stages = None
            self.reason = "stage decomposition did not reproduce the model's output"
            self._key = None
            self.refresh()

    def _owns_trainable(self, stage: Stage) -> bool:
        return stage.module is not None and any(p.requires_grad for p in stage.module.parameters())

    def refresh(self) -> bool:
        """Recompute the prefix boundary when the trainable set changed; True if it moved."""
        memo = self.__dict__.get("_params_memo")
        if (
            memo is None or memo[0] != _STRUCTURE[0]
        ):  # called every step: walk the module only after a change
            memo = self._params_memo = (_STRUCTURE[0], list(self.module.parameters()))
        key = tuple(id(p) for p in memo[1] if p.requires_grad)
        if key == self._key:
            return False
        self._key = key
        old = self.boundary
        if self.stages is None:
            self.boundary = 0
        else:
            self.boundary = next(
                (i for i, s in enumerate(self.stages) if self._owns_trainable(s)), len(self.stages)
            )
            if self.boundary == len(
                self.stages
            ):  # nothing trainable: keep the last stage as the "suffix"
                self.boundary = max(len(self.stages) - 1, 0)
        if self.stages is None or self.boundary == 0:
            self.prefix, self.suffix = None, self.module
        else:
            self.prefix = StageSequence(self.stages[: self.boundary])
            self.suffix = StageSequence(self.stages[self.boundary :])
        self._fused = None
        return self.boundary != old

    @property
    def boundary_name(self) -> str:
        if not self.stages or self.boundary == 0:
            return "(none)"
        return self.stages[self.boundary - 1].path

    def prefix_tensors(self, fresh: bool = True) -> list[torch.Tensor]:
        """The prefix's weights; ``fresh=False`` (per step) reuses the list until a registration."""
        if self.prefix is None:
            return []
        memo = self.__dict__.get("_tensors_memo")
        if fresh or memo is None or memo[0] is not self.prefix or memo[1] != _STRUCTURE[0]:
            memo = self._tensors_memo = (
                self.prefix,
                _STRUCTURE[0],
                [t for m in self.prefix.modules() for t in own_weights(m)],
            )
        return memo[2]

    # -- running -------------------------------------------------------------------
    def run_prefix(self, x: torch.Tensor) -> torch.Tensor:
        """The frozen prefix's output for raw inputs (no autograd recording)."""
        if self.prefix is None:
            return x
        with torch.no_grad():
            fn = self._inference_prefix(x)
            return fn(x)

    def _inference_prefix(self, x: torch.Tensor):
        assert self.prefix is not None
        if not self.fuse or self._stochastic() is not None or x.shape[0] < 2:
            return self.prefix
        key = (self.boundary, weights_version(self.prefix_tensors()), x.device, x.dtype)
        if self._fused_key != key:
            self._fused_key = key
            self._fused = None
            try:
                self._fused = inference_copy(self.prefix, example=x[:4])
            except Exception:
                self._fused = None
        return self._fused if self._fused is not None else self.prefix

    def cacheable(self, deterministic: bool) -> str | None:
        """None when the prefix output may be cached, else the reason it may not."""
        if self.cache_setting is False:
            return "off (cache=False)"
        if self.stages is None:
            return f"off ({self.reason})"
        if self.prefix is None:
            return "off (no frozen prefix: the first stage is trainable)"
        if not deterministic:
            return "off (data is not declared deterministic: a DataLoader, or a Dataset without deterministic=True)"
        active = self._stochastic()
        if active:
            return f"off (the frozen prefix has an active stochastic layer: {active})"
        return None

    def _stochastic(self) -> str | None:
        """:func:`_stochastic_active` of the prefix, plus functional dropout stages (timm's
        head dropout, ``"...#dropout"``), which read the model's training flag."""
        assert self.prefix is not None and self.stages is not None
        active = _stochastic_active(self.prefix)
        if active is None and self.module.training:
            active = next(
                (
                    f"dropout ({s.path!r})"
                    for s in self.stages[: self.boundary]
                    if s.module is None and s.path.endswith("#dropout")
                ),
                None,
            )
        return active

    def _mode_string(self, stages: list[Stage] | None = None) -> str:
        assert self.prefix is not None
        mods = (
            self.prefix.modules()
            if stages is None
            else (m for s in stages if s.module is not None for m in s.module.modules())
        )
        return ",".join(
            f"{m.training}:{batchnorm.mode_of(m)}" for m in mods if batchnorm.is_batchnorm(m)
        )

    def ensure_cache(
        self,
        role: str,
        data,
        *,
        indices: torch.Tensor | None,
        device: torch.device,
        batch_size: int,
        fingerprint: str | None,
    ) -> str:
        """Build, extend or reuse the cache for ``role`` ("train"/"val"); returns a status line."""
        reason = self.cacheable(getattr(data, "deterministic", False))
        if reason is not None or fingerprint is None:
            self.entries.pop(role, None)
            self.status[role] = reason or "off (data could not be fingerprinted)"
            return self.status[role]
        rows = indices if indices is not None else torch.arange(data.n)
        # the checksum catches writes that bypass torch's version counter (p.data.copy_)
        key = CacheKey(
            self.boundary,
            f"{fingerprint}:{hash(tuple(rows.tolist()))}",
            self._content_key(self.prefix_tensors()),
            self._mode_string(),
        )
        entry = self.entries.get(role)
        if entry is not None and entry.key == key:
            entry.version = weights_version(
                self.prefix_tensors()
            )  # same contents, maybe new counters
            self.status[role] = f"reused ({self._describe(entry)})"
            return self.status[role]
        local = None
        if indices is not None:
            local = torch.full((data.n,), -1, dtype=torch.long)
            local[indices] = torch.arange(len(indices))
        assert self.stages is not None
        if (
            entry is not None
            and entry.key.data == key.data
            and entry.key.boundary < self.boundary
            and entry.key.mode
            == self._mode_string(self.stages[: entry.key.boundary])  # the modes of the stored part
            and entry.key.weights
            == self._content_key(self._tensors_of(self.stages[: entry.key.boundary]))
        ):
            extra = StageSequence(self.stages[entry.key.boundary : self.boundary])
            with torch.no_grad():
                store = entry.store.map(lambda t: extra(t.to(device)), batch_size=batch_size)
            self.entries[role] = CacheEntry(
                key, store, local, weights_version(self.prefix_tensors())
            )
            self.status[role] = f"extended ({self._describe(self.entries[role])})"
            return self.status[role]
        self.entries.pop(role, None)
        if entry is not None:
            entry.store.close()

        def batches():
            for chunk in torch.arange(len(rows)).split(batch_size):
                x, _ = data.gather(rows[chunk])
                yield chunk, x.to(device)

        store = ActivationStore.build(
            self.run_prefix,
            batches(),
            len(rows),
            memory_budget_bytes=self.memory_budget_bytes,
            spill_dir=self.spill_dir,
            dtype=self.cache_dtype,
        )
        self.entries[role] = CacheEntry(key, store, local, weights_version(self.prefix_tensors()))
        self.status[role] = f"built ({self._describe(self.entries[role])})"
        return self.status[role]

    def _tensors_of(self, stages: list[Stage]) -> list[torch.Tensor]:
        return [
            t
            for s in stages
            if s.module is not None
            for m in s.module.modules()
            for t in own_weights(m)
        ]

    def _describe(self, entry: CacheEntry) -> str:
        s = entry.store
        mb = s.nbytes / 2**20
        return f"{len(s)} samples after {self.boundary_name!r}, {mb:.1f} MB in {s.location}"

    def cached_inputs(self, role: str, idx: torch.Tensor) -> torch.Tensor | None:
        """Cached prefix outputs for these samples, or None when the cache cannot serve them."""
        entry = self.entries.get(role)
        if entry is None or entry.key.boundary != self.boundary:
            return None
        if entry.version != weights_version(self.prefix_tensors(fresh=False)):
            self.entries.pop(role, None)  # weights changed under us: never serve stale outputs
            self.status[role] = "invalidated (frozen-prefix weights changed)"
            return None
        rows = idx if entry.local is None else entry.local[idx]
        if (rows < 0).any():
            return None
        return entry.store[rows]

    def new_fit(self) -> None:
        """Forget memoised digests: the next cache check reads the weights again."""
        self._checksums.clear()

    def _content_key(self, tensors: list[torch.Tensor]) -> tuple:
        """Weights key with a content digest (catches ``p.data.copy_``), read once per check.

        ``fit`` calls :meth:`new_fit` before each epoch, so the train and validation
        checks of one epoch share one read of the weights.
        """
        plain = weights_version(tensors)
        cached = self._checksums.get(plain)
        if cached is None:
            cached = self._checksums[plain] = (*plain, content_digest(tensors))
        return cached

    def drop(self) -> None:
        for e in self.entries.values():
            e.store.close()
        self.entries.clear()


def fingerprint_of(data) -> str | None:
    """Exact fingerprint of in-memory data (None when the data is not in memory)."""
    arrays = data.inputs() if hasattr(data, "inputs") else ()
    if not arrays:
        ds = getattr(data, "dataset", None)
        fp = getattr(ds, "fingerprint", None)
        return str(fp() if callable(fp) else fp) if fp is not None else None
    return data_fingerprint(*arrays)
