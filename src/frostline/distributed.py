"""torch.distributed support: ``fit`` under ``torchrun`` runs unchanged.

``fit`` detects a process group from the environment (``torchrun`` sets
``WORLD_SIZE``/``RANK``/``LOCAL_RANK``), wraps the *trainable part* of the model in
``DistributedDataParallel`` and rebuilds that wrapper whenever the trainable set
changes, so freezing and unfreezing between or during phases never meets a stale
reducer.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn


@dataclass
class DistContext:
    """Where this process stands: ``rank`` of ``world`` (1 when not distributed)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    backend: str | None = None

    @property
    def enabled(self) -> bool:
        return self.world > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def detect(device: torch.device | None = None, *, timeout_s: float = 300.0) -> DistContext:
    """The process group from the environment, initialised on first use (gloo on CPU, nccl on GPU)."""
    if not dist.is_available():
        return DistContext()
    if dist.is_initialized():
        return DistContext(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", 0)), dist.get_backend())
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistContext()
    use_cuda = device.type == "cuda" if device is not None else torch.cuda.is_available()
    backend = "nccl" if use_cuda else "gloo"
    dist.init_process_group(backend=backend, timeout=datetime.timedelta(seconds=timeout_s))
    return DistContext(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", 0)), backend)


def broadcast_state(module: nn.Module, ctx: DistContext) -> None:
    """Make every rank start from rank 0's weights and buffers."""
    if not ctx.enabled:
        return
    with torch.no_grad():
        for t in list(module.state_dict(keep_vars=True).values()):
            data = t.data if isinstance(t, nn.Parameter) else t
            dist.broadcast(data, src=0)


def wrap_trainable(module: nn.Module, ctx: DistContext, device: torch.device, *, find_unused_parameters: bool = False) -> nn.Module:
    """``module`` wrapped in DDP over its current trainable parameters (as is when not distributed)."""
    if not ctx.enabled:
        return module
    from torch.nn.parallel import DistributedDataParallel as DDP

    if not any(p.requires_grad for p in module.parameters()):
        return module
    ids = [device.index if device.index is not None else torch.cuda.current_device()] if device.type == "cuda" else None
    return DDP(module, device_ids=ids, broadcast_buffers=False, find_unused_parameters=find_unused_parameters)


def reduce_sums(state: dict[str, tuple[float, int]], ctx: DistContext) -> dict[str, float]:
    """Average ``{name: (sum, count)}`` over all ranks."""
    if not state:
        return {}
    keys = sorted(state)
    if ctx.enabled:
        t = torch.tensor([[state[k][0], state[k][1]] for k in keys], dtype=torch.float64)
        dist.all_reduce(t)
        return {k: (float(t[i, 0] / t[i, 1]) if t[i, 1] else float("nan")) for i, k in enumerate(keys)}
    return {k: (s / c if c else float("nan")) for k, (s, c) in state.items()}


def barrier(ctx: DistContext) -> None:
    if ctx.enabled:
        dist.barrier()
