"""The frozen part's outputs for a dataset, computed once: ``fit``'s activation cache for your own loop.

:class:`FrozenFeatures` is a thin public face over the runner ``fit`` uses
(:class:`frostline.engine.runner.Runner`): the model is split at the frontier of its
frozen part (from its dataflow graph), the frozen part's outputs for every sample are
computed once and stored (memory, spilling to disk past a budget), and your loop trains
the rest on them. The cache has ``fit``'s keys: the frontier, a fingerprint of the data,
a content digest of the frozen weights and the frozen part's modes. Freezing or
unfreezing moves the frontier (the cache is extended or rebuilt); a frozen weight that
changes invalidates it; nothing stale is ever served.

>>> import torch, frostline as fl
>>> from torch import nn
>>> model = fl.wrap(nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2)))
>>> model.layers[0].trainable = False
>>> feats = FrozenFeatures(model, torch.randn(32, 4), torch.randint(0, 2, (32,)))
>>> feats.status.state.value, feats.boundary
('built', ('1',))
>>> idx = torch.arange(8)
>>> out = feats.trainable(*feats.inputs(idx))
>>> torch.allclose(out, model(feats.gather(idx)[0]), atol=1e-6)
True
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from frostline.engine import data as data_mod
from frostline.engine.runner import CacheOptions, CacheState, CacheStatus, Runner, fingerprint_of

__all__ = ["FrozenFeatures"]

ROLE = "features"


def _to(obj: Any, device: torch.device) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if isinstance(obj, dict):
        return {k: _to(v, device) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return type(obj)(_to(v, device) for v in obj)
    return obj


class FrozenFeatures:
    """Cached outputs of ``model``'s frozen part for the samples of ``x``.

    ``x`` (and ``y``): what ``fit`` takes with random access — arrays, tensors, a
    ``Dataset`` (cached when it is deterministic: arrays, ``TensorDataset``, or a
    dataset with ``deterministic = True``). ``batch_size``: how many samples the frozen
    part runs on at once while the cache is built. ``cache``: ``True``/``"auto"`` or
    ``False`` (then :meth:`inputs` computes the frozen part for each batch, without
    autograd). ``memory_budget_bytes``/``spill_dir``/``cache_dtype``: as for ``fit``.

    In the loop: ``feats.trainable(*feats.inputs(idx))`` is the model's output for the
    samples ``idx``; call :meth:`refresh` when an epoch begins (``fit`` re-reads the frozen
    weights then too) and :meth:`watch` your optimizer if it is ``fused=True``.
    """

    def __init__(
        self,
        model: Any,
        x: Any,
        y: Any = None,
        *,
        batch_size: int = 256,
        device: str | torch.device | None = None,
        cache: bool | str = "auto",
        memory_budget_bytes: int = 2 << 30,
        spill_dir: Any = None,
        cache_dtype: torch.dtype | None = None,
    ) -> None:
        module = model if isinstance(model, nn.Module) else getattr(model, "module", None)
        if not isinstance(module, nn.Module):
            raise TypeError(
                f"model must be a torch.nn.Module or a frostline Layer/Model, got {type(model).__name__}"
            )
        data = data_mod.prepare(x, y)
        if not isinstance(data, data_mod.IndexedData):
            raise TypeError(
                "FrozenFeatures needs random access to the samples (arrays, tensors or a Dataset), "
                f"got {type(x).__name__}; a DataLoader's batches cannot be cached by index"
            )
        self.batch_size = data_mod.check_batch_size(batch_size)
        if device is None:
            first = next(module.parameters(), None)
            device = first.device if first is not None else torch.device("cpu")
        self.device = torch.device(device)
        self.module = module
        self.data = data
        self.fingerprint = fingerprint_of(data)
        self.runner = Runner(
            module,
            CacheOptions(
                cache=cache,
                cache_memory_bytes=memory_budget_bytes,
                cache_dtype=cache_dtype,
                cache_dir=spill_dir,
            ),
        )
        x0, _ = data.gather(torch.arange(min(4, data.n)))
        self.runner.verify(_to(x0, self.device))
        self.refresh()

    def __len__(self) -> int:
        return self.data.n

    # -- what the loop uses ---------------------------------------------------------
    @property
    def trainable(self) -> nn.Module:
        """The rest of the model: takes :meth:`inputs` and returns the model's output."""
        self.runner.refresh()
        return self.runner.suffix

    @property
    def boundary(self) -> tuple[str, ...]:
        """Names of the frozen part's output tensors (empty when nothing is frozen)."""
        return self.runner.boundary

    @property
    def status(self) -> CacheStatus:
        """The cache's state (built, extended, reused, invalidated, off) and why."""
        return self.runner.status[ROLE]

    def refresh(self) -> CacheStatus:
        """Re-split if the trainable set moved, re-read the frozen weights, then build, extend or reuse."""
        self.runner.new_fit()
        self.runner.refresh()
        return self.runner.prepare_data(
            ROLE,
            self.data,
            indices=None,
            device=self.device,
            batch_size=self.batch_size,
            fingerprint=self.fingerprint,
        )

    def inputs(self, idx: torch.Tensor) -> tuple:
        """What the trainable part takes for samples ``idx`` (from the cache when it can serve them)."""
        idx = torch.as_tensor(idx, dtype=torch.long)
        if self.runner.refresh():  # freezing changed since the last batch
            self.refresh()
        cached = self.runner.cached_inputs(ROLE, idx)
        if cached is None and self.status.state is CacheState.INVALIDATED:
            self.refresh()  # a frozen weight changed: rebuild, never serve stale outputs
            cached = self.runner.cached_inputs(ROLE, idx)
        if cached is not None:
            return tuple(t.to(self.device) for t in cached)
        x, _ = self.data.gather(idx)
        return self.runner.run_prefix(_to(x, self.device))

    def targets(self, idx: torch.Tensor) -> Any:
        """The targets of samples ``idx`` (no input loading where the dataset allows)."""
        return _to(self.data.targets(torch.as_tensor(idx, dtype=torch.long)), self.device)

    def gather(self, idx: torch.Tensor) -> tuple:
        """The raw ``(x, y)`` of samples ``idx``."""
        return self.data.gather(torch.as_tensor(idx, dtype=torch.long))

    def watch(self, optimizer: torch.optim.Optimizer) -> None:
        """Count ``optimizer``'s steps (needed for ``fused=True`` optimizers, which bump no version)."""
        self.runner.steps.watch(optimizer)

    def close(self) -> None:
        """Free the stored outputs (memory and spill files) and stop watching optimizers."""
        self.runner.close()
        self.runner.end_fit()

    def __enter__(self) -> FrozenFeatures:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"FrozenFeatures({self.data.n} samples, boundary={self.runner.boundary_name}, {self.status})"
