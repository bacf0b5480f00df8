"""torch.distributed support: ``fit`` under ``torchrun`` runs unchanged.

``fit`` detects a process group from the environment (``torchrun`` sets
``WORLD_SIZE``/``RANK``/``LOCAL_RANK``/``MASTER_ADDR``/``MASTER_PORT``) or uses one
the script initialised itself, and picks the backend from the device: gloo on CPU,
nccl on CUDA. It wraps the *trainable part* of the model in
``DistributedDataParallel`` and rebuilds that wrapper whenever the trainable set
changes, so freezing and unfreezing between or during phases never meets a stale
reducer (and needs no ``find_unused_parameters``).

Set-ups that cannot work fail at the start of ``fit`` with the same message on every
rank, instead of hanging in a collective: a model whose structure or trainable set
differs between ranks (the message names the first differing parameter), two ranks
on one GPU, a model on a device other than the one ``fit`` trains on, a process group
whose world size disagrees with ``WORLD_SIZE``, an FSDP- or DDP-wrapped module.
See ``docs/distributed.md``.
"""

from __future__ import annotations

import datetime
import math
import os
import socket
import sys
import warnings
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import nn

from frostline._version import __version__
from frostline.core.digest import text_digest

#: environment variable: seconds a collective (and start-up) may wait for the other ranks
TIMEOUT_ENV = "FROSTLINE_DIST_TIMEOUT"
DEFAULT_TIMEOUT_S = 300.0


class DistributedSetupError(RuntimeError):
    """The distributed set-up cannot work (raised on every rank, before any training step)."""


@dataclass
class DistContext:
    """Where this process stands: ``rank`` of ``world`` (1 when not distributed)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    backend: str | None = None
    #: id(parameter) -> its name in the whole model (for messages about the trainable part)
    names: dict[int, str] = field(default_factory=dict, repr=False)
    #: id(module) -> its name in the whole model
    module_names: dict[int, str] = field(default_factory=dict, repr=False)
    #: (trainable key, digest, names) of the last trainable set compared across ranks
    trainable_digest: tuple | None = field(default=None, repr=False, compare=False)

    @property
    def enabled(self) -> bool:
        return self.world > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def uses_nccl(self) -> bool:
        return self.backend is not None and "nccl" in self.backend and "gloo" not in self.backend


# -- helpers for user code -------------------------------------------------------------
def rank() -> int:
    """This process's rank (0 when not distributed)."""
    return (
        dist.get_rank()
        if dist.is_available() and dist.is_initialized()
        else int(os.environ.get("RANK", "0"))
    )


def world_size() -> int:
    """Number of processes (1 when not distributed)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return int(os.environ.get("WORLD_SIZE", "1"))


def is_main() -> bool:
    """True on rank 0: guard your own printing and file writing with it (``model.save`` included)."""
    return rank() == 0


# -- start-up --------------------------------------------------------------------------
def _env_int(name: str) -> int | None:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return None
    try:
        return int(raw)
    except ValueError:
        raise DistributedSetupError(
            f"environment variable {name}={raw!r} is not an integer"
        ) from None


def timeout_seconds(timeout_s: float | None = None) -> float:
    """The collective timeout: the argument, else ``$FROSTLINE_DIST_TIMEOUT``, else 300 s."""
    if timeout_s is not None:
        return float(timeout_s)
    raw = os.environ.get(TIMEOUT_ENV)
    if raw:
        try:
            value = float(raw)
        except ValueError:
            raise DistributedSetupError(
                f"{TIMEOUT_ENV}={raw!r} is not a number of seconds"
            ) from None
        if not math.isfinite(value) or value <= 0:
            raise DistributedSetupError(
                f"{TIMEOUT_ENV}={raw!r} must be a positive number of seconds"
            )
        return value
    return DEFAULT_TIMEOUT_S


def _bind_cuda(device: torch.device | None, local_rank: int) -> None:
    """Make ``cuda`` (no index) mean this rank's GPU: ``cuda:LOCAL_RANK`` unless one was named."""
    n = torch.cuda.device_count()
    index = device.index if device is not None and device.index is not None else local_rank
    if index >= n:
        how = (
            f"device {device}"
            if device is not None and device.index is not None
            else f"LOCAL_RANK={local_rank}"
        )
        raise DistributedSetupError(
            f"{how} needs CUDA device {index}, but only {n} CUDA device(s) are visible to this process: "
            "start at most as many processes per node as there are GPUs (torchrun --nproc-per-node), "
            "and do not narrow CUDA_VISIBLE_DEVICES per process"
        )
    torch.cuda.set_device(index)


def _check_backend(backend: str, device: torch.device | None) -> None:
    if (
        device is not None
        and device.type == "cpu"
        and "gloo" not in backend
        and "mpi" not in backend
    ):
        raise DistributedSetupError(
            f"the process group uses the {backend!r} backend, which cannot train a model on the CPU; "
            "compile(device='cuda') or initialise the process group with backend='gloo'"
        )


def detect(
    device: torch.device | None = None,
    *,
    timeout_s: float | None = None,
    module: nn.Module | None = None,
) -> DistContext:
    """The process group: an initialised one, else one from torchrun's environment (gloo on CPU, nccl on GPU).

    ``module`` (optional) is checked first: FSDP- or DDP-wrapped modules are refused.
    On CUDA, ``cuda`` without an index then means ``cuda:LOCAL_RANK`` in this process.
    """
    if module is not None:
        refuse_wrapped(module)
    if not dist.is_available():
        return DistContext()
    env_world = _env_int("WORLD_SIZE")
    local_rank = _env_int("LOCAL_RANK")
    if dist.is_initialized():
        r, w, backend = dist.get_rank(), dist.get_world_size(), str(dist.get_backend())
        if env_world is not None and env_world != w:
            raise DistributedSetupError(
                f"the process group has {w} processes but WORLD_SIZE={env_world}: "
                "initialise it with world_size=int(os.environ['WORLD_SIZE']) or unset WORLD_SIZE"
            )
        if local_rank is None:
            n = torch.cuda.device_count()
            local_rank = r % n if n else 0
        if w > 1:
            _check_backend(backend, device)
            if device is not None and device.type == "cuda":
                _bind_cuda(device, local_rank)
        return DistContext(r, w, local_rank, backend)
    if env_world is None or env_world <= 1:
        return DistContext()
    env_rank = _env_int("RANK")
    if env_rank is None:
        raise DistributedSetupError(
            f"WORLD_SIZE={env_world} is set but RANK is not: start the script with torchrun (see docs/distributed.md)"
        )
    r = env_rank
    if not 0 <= r < env_world:
        raise DistributedSetupError(
            f"RANK={r} is outside 0..{env_world - 1} (WORLD_SIZE={env_world})"
        )
    missing = [v for v in ("MASTER_ADDR", "MASTER_PORT") if not os.environ.get(v)]
    if missing:
        raise DistributedSetupError(
            f"WORLD_SIZE={env_world} is set but {' and '.join(missing)} {'is' if len(missing) == 1 else 'are'} not: "
            "start the script with torchrun, which sets them (see docs/distributed.md)"
        )
    local_rank = local_rank or 0
    use_cuda = device.type == "cuda" if device is not None else torch.cuda.is_available()
    if use_cuda:
        _bind_cuda(device, local_rank)
    backend = "nccl" if use_cuda else "gloo"
    timeout = timeout_seconds(timeout_s)
    try:
        dist.init_process_group(backend=backend, timeout=datetime.timedelta(seconds=timeout))
    except Exception as e:  # store timeouts, refused connections: say what to check
        raise DistributedSetupError(
            f"rank {r} of {env_world} could not join the process group at "
            f"{os.environ['MASTER_ADDR']}:{os.environ['MASTER_PORT']} ({backend}, timeout {timeout:g}s): {e}. "
            "Check that every node runs the same --nnodes and --nproc-per-node, and that the "
            "rendezvous endpoint is reachable from every node."
        ) from e
    return DistContext(dist.get_rank(), dist.get_world_size(), local_rank, backend)


def refuse_wrapped(module: nn.Module) -> None:
    """Raise for modules ``fit`` cannot train: FSDP-sharded or already DDP-wrapped."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    fsdp_types: tuple[type, ...] = ()
    if "torch.distributed.fsdp" in sys.modules:  # FSDP objects exist only once it was imported
        from torch.distributed import fsdp

        fsdp_types = tuple(
            t
            for t in (
                getattr(fsdp, "FullyShardedDataParallel", None),
                getattr(fsdp, "FSDPModule", None),
            )
            if isinstance(t, type)
        )
    for name, m in module.named_modules():
        where = f"{name!r}" if name else "the model"
        if fsdp_types and isinstance(m, fsdp_types):
            raise DistributedSetupError(
                f"{where} is FSDP-sharded ({type(m).__name__}); fit does not train FSDP models. Pass the "
                "unwrapped module: fit wraps only its trainable part in DistributedDataParallel (frozen "
                "weights need no gradients or optimizer state, which is often what makes a model fit). "
                "For a model too large for one GPU even so, train it in your own loop with FSDP "
                "(set requires_grad with model.freeze/unfreeze before sharding; see docs/distributed.md)."
            )
        if isinstance(m, DDP):
            raise DistributedSetupError(
                f"{where} is already wrapped in DistributedDataParallel; pass the plain module "
                "(ddp.module): fit wraps the trainable part itself and rewraps it whenever the "
                "trainable set changes"
            )


def _device_label(device: torch.device) -> str:
    if device.type == "cuda" and device.index is None and torch.cuda.is_available():
        return f"cuda:{torch.cuda.current_device()}"
    return str(device)


def _same_device(t: torch.Tensor, device: torch.device) -> bool:
    if t.device.type != device.type:
        return False
    if device.type == "cuda":
        want = device.index if device.index is not None else torch.cuda.current_device()
        return t.device.index == want
    return True


def check_device(
    module: nn.Module,
    device: torch.device,
    names: dict[int, str] | None = None,
    *,
    allow_lazy: bool = False,
) -> None:
    """Every parameter and buffer of ``module`` is on ``device`` (names the first one that is not).

    Lazy (uninitialised) parameters are an error unless ``allow_lazy``: DDP and the
    start-of-fit broadcast need their shapes.
    """
    for n, t in [*module.named_parameters(), *module.named_buffers()]:
        if isinstance(t, nn.parameter.UninitializedParameter | nn.parameter.UninitializedBuffer):
            if allow_lazy:
                continue
            raise DistributedSetupError(
                f"{n!r} is not initialised yet (a lazy module): under torch.distributed run one "
                "forward pass on an example batch before fit"
            )
        if not _same_device(t, device):
            name = (names or {}).get(id(t), n)
            raise DistributedSetupError(
                f"{name!r} is on {t.device}, but fit trains on {_device_label(device)} "
                "(compile(device=...)). fit moves the model once, when it starts: a layer added or "
                "replaced later (in a callback) must be moved there too, e.g. layer.to(device)"
            )


def _signature(module: nn.Module) -> list[str]:
    out = []
    for n, p in module.named_parameters():
        out.append(
            f"parameter {n!r}: shape {tuple(p.shape)}, {p.dtype}, {'trainable' if p.requires_grad else 'frozen'}"
        )
    for n, b in module.named_buffers():
        out.append(f"buffer {n!r}: shape {tuple(b.shape)}, {b.dtype}")
    return out


def first_difference(a: list[str], b: list[str]) -> str:
    """Describe the first entry where two signatures differ.

    >>> first_difference(["p 'a': (2,)", "p 'b': (3,)"], ["p 'a': (2,)", "p 'b': (4,)"])
    "entry 2: p 'b': (3,)  vs  p 'b': (4,)"
    >>> first_difference(["x"], ["x", "y"])
    'entry 2: (missing)  vs  y'
    """
    for i in range(max(len(a), len(b))):
        x = a[i] if i < len(a) else "(missing)"
        y = b[i] if i < len(b) else "(missing)"
        if x != y:
            return f"entry {i + 1}: {x}  vs  {y}"
    return "(no difference)"


def _gather(obj, ctx: DistContext) -> list:
    out: list = [None] * ctx.world
    dist.all_gather_object(out, obj)
    return out


def set_difference(a: list[str], b: list[str], ra: int = 0, rb: int = 1) -> str:
    """Describe how two sets of names differ.

    >>> set_difference(["w", "b"], ["w", "b", "v"])
    "only rank 1 has 'v'"
    """
    only_a = [x for x in a if x not in set(b)]
    only_b = [x for x in b if x not in set(a)]
    parts = [
        f"only rank {r} has {', '.join(map(repr, xs[:5]))}{' ...' if len(xs) > 5 else ''}"
        for r, xs in ((ra, only_a), (rb, only_b))
        if xs
    ]
    return "; ".join(parts) or "same names in a different order"


def agree(
    items: list[str], ctx: DistContext, what: str, hint: str = "", *, as_set: bool = False
) -> None:
    """Raise on every rank unless ``items`` is the same on all ranks (naming the first difference).

    Collective: every rank must call it at the same point.
    """
    if not ctx.enabled:
        return
    digests = _gather(text_digest(items), ctx)
    if len(set(digests)) == 1:
        return
    every = _gather(items, ctx)  # every rank saw the mismatch, so every rank gathers
    other = next(r for r, d in enumerate(digests) if d != digests[0])
    if as_set:
        detail = set_difference(every[0], every[other], 0, other)
    else:
        detail = f"{first_difference(every[0], every[other])} (rank 0 vs rank {other})"
    raise DistributedSetupError(
        f"{what} differs between rank 0 and rank {other}: {detail}.{(' ' + hint) if hint else ''}"
    )


def check_ranks(module: nn.Module, ctx: DistContext, device: torch.device) -> None:
    """Same versions, world size and model structure on every rank; no GPU shared by two ranks."""
    if not ctx.enabled:
        return

    info = {
        "host": socket.gethostname(),
        "device": _device_label(device),
        "versions": f"torch {torch.__version__}, frostline {__version__}",
        "env_world": os.environ.get("WORLD_SIZE"),
    }
    try:
        infos = _gather(info, ctx)
    except RuntimeError as e:  # timeouts, closed connections: the first collective of fit
        raise DistributedSetupError(
            f"rank {ctx.rank} of {ctx.world} could not reach the other ranks at the start of fit ({e}). "
            "A rank may have failed before calling fit, may call it at another point, or the "
            "ranks disagree on WORLD_SIZE (every node must use the same --nnodes and --nproc-per-node)."
        ) from e
    for key, label in (("versions", "installed versions"), ("env_world", "WORLD_SIZE")):
        values = [i[key] for i in infos]
        if len(set(values)) > 1:
            other = next(r for r, v in enumerate(values) if v != values[0])
            raise DistributedSetupError(
                f"{label} differ between ranks: rank 0 has {values[0]}, rank {other} has {values[other]}"
            )
    seen: dict[tuple[str, str], int] = {}
    for r, i in enumerate(infos):
        if not i["device"].startswith("cuda"):
            continue
        k = (i["host"], i["device"])
        if k in seen:
            raise DistributedSetupError(
                f"ranks {seen[k]} and {r} both train on {i['device']} of host {i['host']}: compile(device='cuda') "
                "so that each rank uses cuda:LOCAL_RANK, or pass device=f\"cuda:{os.environ['LOCAL_RANK']}\""
            )
        seen[k] = r
    agree(
        _signature(module),
        ctx,
        "the model",
        "Build the same model on every rank, and freeze/unfreeze the same layers on every rank.",
    )


def prepare_module(module: nn.Module, ctx: DistContext, device: torch.device) -> None:
    """Start-of-fit checks (wrappers, devices, same model everywhere), then rank 0's weights to all."""
    refuse_wrapped(module)
    check_device(module, device, allow_lazy=not ctx.enabled)
    if not ctx.enabled:
        return
    ctx.names = {id(p): n for n, p in module.named_parameters()}
    ctx.module_names = {id(m): n for n, m in module.named_modules()}
    check_ranks(module, ctx, device)
    broadcast_state(module, ctx)


def broadcast_state(module: nn.Module, ctx: DistContext) -> None:
    """Make every rank start from rank 0's weights and buffers."""
    if not ctx.enabled:
        return
    with torch.no_grad():
        for t in list(module.state_dict(keep_vars=True).values()):
            if isinstance(t, torch.Tensor):
                _take_rank0(t.detach())


def _take_rank0(t: torch.Tensor) -> None:
    """Copy rank 0's value into ``t`` only where it differs: an unchanged tensor keeps its
    version counter, so activation caches keyed on the frozen weights survive."""
    tmp = t.clone()
    dist.broadcast(tmp, src=0)
    if not torch.equal(tmp, t):
        t.copy_(tmp)


# -- the trainable part ----------------------------------------------------------------
def check_sync_batchnorm(
    module: nn.Module, device: torch.device, module_names: dict[int, str] | None = None
) -> None:
    """torch's DDP refuses SyncBatchNorm in a CPU module: say where it is and what to do instead."""
    if device.type != "cpu":
        return
    for n, m in module.named_modules():
        if isinstance(m, nn.SyncBatchNorm):
            label = (module_names or {}).get(id(m), n)
            raise DistributedSetupError(
                f"SyncBatchNorm {label!r} is in the part of the model that DDP wraps (from the first "
                "trainable layer on), and torch's DDP accepts SyncBatchNorm only in GPU modules (a "
                "trainable SyncBatchNorm in batch-statistics mode needs CUDA anyway). On the CPU keep "
                "it frozen and before the first trainable layer (it then runs in inference mode, "
                "outside DDP), or use plain BatchNorm: skip convert_sync_batchnorm for CPU runs"
            )


_TRAINABLE_HINT = "Freeze and unfreeze the same layers at the same step on every rank."


def _trainable_names(ids, ctx: DistContext) -> list[str]:
    return [ctx.names.get(i, "(a parameter added after fit started)") for i in ids]


def same_trainable(key: tuple[int, ...] | None, ctx: DistContext) -> None:
    """Every step, before the forward pass: all ranks train the same parameters.

    ``key`` is the local trainable set (parameter ids, as the runner keeps it). One tiny
    all-reduce compares a digest of the parameter names; on a mismatch every rank raises,
    naming the first differing parameter, instead of one rank rebuilding its DDP wrapper
    (a collective) while the others wait in a different collective until the timeout.
    """
    if not ctx.enabled:
        return
    cached = ctx.trainable_digest
    if cached is None or cached[0] != key:
        names = _trainable_names(key or (), ctx)
        cached = ctx.trainable_digest = (key, int(text_digest(names)[:12], 16), names)
    h = float(cached[1])
    t = torch.tensor([h, -h], dtype=torch.float64, device=_collective_device(ctx))
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    if float(t[0]) != h or float(t[1]) != -h:
        agree(cached[2], ctx, "the trainable set", _TRAINABLE_HINT, as_set=True)


def wrap_trainable(
    module: nn.Module,
    ctx: DistContext,
    device: torch.device,
    *,
    find_unused_parameters: bool = False,
) -> nn.Module:
    """``module`` wrapped in DDP over its current trainable parameters (as is when not distributed).

    Called whenever the trainable set changes; checks first, on every rank, that all
    ranks train the same parameters (a callback that froze a layer on one rank only
    fails here, naming the layer, instead of hanging in the gradient all-reduce).
    """
    if not ctx.enabled:
        return module
    from torch.nn.parallel import DistributedDataParallel as DDP

    trainable = [p for p in module.parameters() if p.requires_grad]
    agree(
        _trainable_names([id(p) for p in trainable], ctx),
        ctx,
        "the trainable set",
        _TRAINABLE_HINT,
        as_set=True,
    )
    check_device(module, device, ctx.names)
    if not trainable:
        return module
    check_sync_batchnorm(module, device, ctx.module_names)
    ids = (
        [device.index if device.index is not None else torch.cuda.current_device()]
        if device.type == "cuda"
        else None
    )
    # buffers (BatchNorm statistics in the trainable part) follow rank 0 each step: DDP's default
    return DDP(module, device_ids=ids, find_unused_parameters=find_unused_parameters)


# -- during training -------------------------------------------------------------------
def _collective_device(ctx: DistContext) -> torch.device:
    return (
        torch.device("cuda", torch.cuda.current_device()) if ctx.uses_nccl else torch.device("cpu")
    )


def reduce_sums(state: dict[str, tuple[float, int]], ctx: DistContext) -> dict[str, float]:
    """Average ``{name: (sum, count)}`` over all ranks (every rank gets the same numbers)."""
    if not state:
        return {}
    if ctx.enabled:
        keys = sorted(state)  # reduce in a rank-independent order, report in the objective's order
        t = torch.tensor(
            [[state[k][0], state[k][1]] for k in keys],
            dtype=torch.float64,
            device=_collective_device(ctx),
        )
        dist.all_reduce(t)
        t = t.cpu()
        row = {k: i for i, k in enumerate(keys)}
        return {
            k: (float(t[row[k], 0] / t[row[k], 1]) if t[row[k], 1] else float("nan")) for k in state
        }
    return {k: (s / c if c else float("nan")) for k, (s, c) in state.items()}


def agreed_loss(value: float, ctx: DistContext) -> float:
    """The local loss, or NaN when the loss is not finite on some rank.

    Every rank then takes the same branch (stop or raise), instead of one rank leaving
    the step while the others wait for its gradients.
    """
    if not ctx.enabled:
        return value
    t = torch.tensor([0.0 if math.isfinite(value) else 1.0], device=_collective_device(ctx))
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    if float(t) == 0.0 or not math.isfinite(value):
        return value
    return float("nan")


def same_logs(logs: dict, ctx: DistContext) -> dict:
    """Rank 0's epoch logs on every rank: callbacks (EarlyStopping, ...) decide alike; History matches."""
    if not ctx.enabled:
        return logs
    box = [logs if ctx.is_main else None]
    dist.broadcast_object_list(box, src=0)
    return dict(box[0] or {})


def end_epoch(model, ctx: DistContext) -> None:
    """Epoch boundary: ranks agree on ``stop_training`` (any rank stops, all stop) and take rank 0's buffers."""
    if not ctx.enabled:
        return
    dev = _collective_device(ctx)
    flag = torch.tensor([1.0 if model.stop_training else 0.0], device=dev)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    model.stop_training = bool(float(flag))
    with torch.no_grad():
        for b in model.module.buffers():
            _take_rank0(b)


_warned_loader = False


def prepare_loader(loader, ctx: DistContext, epoch: int) -> None:
    """For a user's DataLoader: ``set_epoch`` on a DistributedSampler; equal batch counts on all ranks."""
    global _warned_loader
    if not ctx.enabled:
        return
    from torch.utils.data import DistributedSampler

    sampler = getattr(loader, "sampler", None)
    batch_sampler = getattr(loader, "batch_sampler", None)
    inner = getattr(batch_sampler, "sampler", None)
    dsampler = next((s for s in (sampler, inner) if isinstance(s, DistributedSampler)), None)
    if dsampler is not None:
        dsampler.set_epoch(epoch)
    elif not _warned_loader and ctx.is_main:
        _warned_loader = True
        warnings.warn(
            "fit got a DataLoader without a DistributedSampler under torch.distributed: every rank reads "
            "the whole data each epoch. Pass arrays or a Dataset (fit shards them) or use "
            "DataLoader(..., sampler=DistributedSampler(ds)).",
            stacklevel=3,
        )
    try:
        n = len(loader)
    except TypeError:
        n = -1
    counts = _gather(n, ctx)
    if len(set(counts)) > 1:
        if -1 in counts:
            raise DistributedSetupError(
                "the training data has no length on some ranks (an IterableDataset) and a length on "
                "others; every rank must run the same number of steps"
            )
        raise DistributedSetupError(
            f"ranks would run different numbers of steps per epoch ({', '.join(f'rank {r}: {c}' for r, c in enumerate(counts))}); "
            "DDP needs the same count on every rank: use DistributedSampler (it pads to equal shards)"
        )


def barrier(ctx: DistContext) -> None:
    if ctx.enabled:
        dist.barrier()
