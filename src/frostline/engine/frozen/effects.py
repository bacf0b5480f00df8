"""What the frozen part does besides computing values: random draws (found by what they
consume, :mod:`frostline.engine.rng`), batch statistics and writes into its inputs or
state; the watched forward that finds them before anything is traced."""

from __future__ import annotations

import operator
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx
from torch import Tensor, nn
from torch.utils import _pytree as pytree

from frostline.core import batchnorm
from frostline.engine import rng
from frostline.engine.frozen.calling import (
    batch_size_of,
    call_model,
    inputs_of,
    module_at,
    probe_rows,
    restored_state,
    take_rows,
)
from frostline.engine.frozen.tracers import Tracer

__all__ = [
    "FrozenEffect",
    "batch_statistics",
    "batch_statistics_op",
    "draw_reason",
    "frozen_calls",
    "stochastic_frozen",
    "writes_in_place",
]


_INPLACE_OPERATORS = frozenset(
    {operator.iadd, operator.isub, operator.imul, operator.itruediv, operator.ifloordiv}
    | {operator.imod, operator.ipow, operator.iand, operator.ior, operator.ixor}
    | {operator.ilshift, operator.irshift, operator.imatmul, operator.setitem}
)


def batch_statistics(m: nn.Module) -> str | None:
    """Why ``m`` (or a submodule) normalises with the statistics of the batch it is given
    (a BatchNorm in training mode whose policy does not make it use running statistics, or
    one without running statistics): its outputs are then no function of one sample, and it
    writes its running statistics.

    Example:
        >>> from torch import nn
        >>> batch_statistics(nn.Sequential(nn.BatchNorm1d(2)))
        'BatchNorm1d in batch-statistics mode'
        >>> batch_statistics(nn.BatchNorm1d(2).eval()) is None
        True
    """
    for sub in m.modules():
        why = _batch_statistics_itself(sub)
        if why is not None:
            return why
    return None


def _batch_statistics_itself(sub: nn.Module) -> str | None:
    """:func:`batch_statistics` for ``sub`` alone (not its submodules)."""
    if not isinstance(sub, nn.modules.batchnorm._NormBase):
        return None
    if sub.running_mean is None:
        return f"{type(sub).__name__} in batch-statistics mode (no running statistics)"
    if sub.training and sub.track_running_stats and not _runs_inference(sub):
        return f"{type(sub).__name__} in batch-statistics mode"
    return None


@dataclass(frozen=True)
class FrozenEffect:
    """What makes the frozen part's output no function of its inputs and weights alone:
    ``kind`` is ``"random"`` (it draws random numbers) or ``"batch-statistics"`` (a
    BatchNorm normalising with batch statistics); ``detail`` says where.

    Example:
        >>> str(FrozenEffect("random", "layer 'aug' draws random numbers (Python random)"))
        "layer 'aug' draws random numbers (Python random)"
    """

    kind: str
    detail: str

    def __str__(self) -> str:
        return self.detail


def draw_reason(where: str, kinds: Iterable[str]) -> str:
    """The log's wording for a layer (a module path) that draws random numbers.

    Example:
        >>> draw_reason("0", ["torch generator"])
        "layer '0' draws random numbers (torch generator)"
    """
    return f"layer {where!r} draws random numbers ({', '.join(kinds)})"


def stochastic_frozen(module: nn.Module, example: Any) -> FrozenEffect | None:
    """What certainly makes the frozen part of ``module`` random, found without tracing.

    Runs ``module`` once on three samples of ``example`` (autograd on, buffers and every
    generator restored, :mod:`frostline.engine.rng`) and watches each module call: a call
    during which a generator moved (and during none of whose inner calls one did) draws
    random numbers, whatever its class. A call is frozen when its module holds no trainable
    parameter, receives no tensor that requires grad, its input is per-sample (dim 0
    follows the batch), and no module it runs inside that fx calls whole (torch.nn layers,
    timm's no-trace modules) holds trainable weights or reads trainable values. A frozen
    draw in a layer fx calls whole is certainly in the trace's frozen part (which
    :func:`partition` then reports as ``random``, and which could not be folded) when that
    layer holds frozen weights, or a frozen layer fx calls whole that holds weights takes
    its output as it is: the draw cannot move to the trainable side. A BatchNorm in
    batch-statistics mode on frozen, per-sample values is reported as
    ``"batch-statistics"``. ``None`` says nothing (tracing decides): a draw feeding only
    weightless computation (a Dropout head, which :func:`partition` moves to the trainable
    side), a draw by operations a trace records (augmentation in front of a frozen base,
    which the split runs folded), an in-place layer, a draw fed by trainable computation.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> net = nn.Sequential(nn.Linear(4, 4), nn.Dropout(0.5), nn.Linear(4, 4), nn.Linear(4, 2))
        >>> _ = net[:3].requires_grad_(False)
        >>> str(stochastic_frozen(net, torch.randn(4, 4)))
        "layer '1' draws random numbers (torch generator)"
        >>> _ = net[2].requires_grad_(True)  # the dropout now feeds trainable computation only
        >>> stochastic_frozen(net, torch.randn(4, 4)) is None
        True
    """
    names, values, kw = inputs_of(module, example)
    batch = batch_size_of(values)
    if batch is None:
        return None
    inputs = take_rows(values, probe_rows(batch)[0])
    x = dict(zip(names, inputs)) if kw else inputs
    found = _watched_run(module, x, len(inputs[0]) if inputs else 0).found
    return found[0] if found else None


def _watched_run(module: nn.Module, x: Any, batch: int) -> _Watch:
    """A :class:`_Watch` of ``module`` on ``x``: one run without capturing the generators,
    and one with, only when that run drew."""
    watch = _Watch(module, batch, draws=False).run(x)
    return _Watch(module, batch, draws=True).run(x) if watch.moved else watch


@dataclass
class _Call:
    """One open module call of a watched run."""

    module: nn.Module
    frozen: bool  # no trainable node could hold what runs in it
    here: bool  # this call is frozen (see stochastic_frozen)
    state: rng.RngState | None  # the generators as the call began (when watching draws)
    inner_drew: bool = False


class _Watch:
    """One watched forward of a model (autograd on, buffers and every generator restored),
    with hooks on every submodule: which calls are frozen, which draw random numbers, and
    what certainly makes the frozen part random (see :func:`stochastic_frozen`)."""

    def __init__(self, module: nn.Module, batch: int, draws: bool = True) -> None:
        self.module, self.batch, self.draws = module, batch, draws
        self.moved: tuple[str, ...] = ()  # what the whole run drew
        self.trains = _holds_trainable(module)
        self.held = rng.generators_of(module)
        self.path = {m: n for n, m in module.named_modules()}
        tracer = Tracer(set())
        self.whole = {m: tracer.is_leaf_module(m, "") for m in module.modules()}
        self.weighted = {
            m: any(True for _ in (*m.parameters(), *m.buffers())) for m in module.modules()
        }
        self.stack: list[_Call] = []
        self.found: list[FrozenEffect] = []
        self.calls: dict[nn.Module, bool] = {}  # every call on frozen values only
        #: modules that drew on frozen values, unless certainly in the frozen part
        self.movable: set[nn.Module] = set()
        #: id(output) -> (output, why, the module that drew it, whether fx calls it whole)
        self.drawn: dict[int, tuple[Tensor, str, nn.Module, bool]] = {}

    def run(self, x: Any) -> _Watch:
        self.moved = _run_watched(self.module, x, self.pre, self.post)
        return self

    def frozen_call(self, m: nn.Module, args: Any, kwargs: Any) -> bool:
        if self.trains[m] or _reads_grad((args, kwargs)) or getattr(m, "inplace", False):
            return False
        if not all(c.frozen for c in self.stack[1:]):
            return False
        first = next((t for t in pytree.tree_leaves(args) if isinstance(t, Tensor)), None)
        return first is not None and first.dim() > 0 and first.shape[0] == self.batch

    def pre(self, m: nn.Module, args: Any, kwargs: Any) -> None:
        trainable = self.trains[m] or _reads_grad((args, kwargs))
        self.calls[m] = self.calls.get(m, True) and not trainable
        if isinstance(m, nn.Identity):  # recomputed after the frontier, as are its callers
            for open_call in self.stack:
                self.calls[open_call.module] = False
            self.calls[m] = False
        frozen = self.frozen_call(m, args, kwargs)
        why = _batch_statistics_itself(m)
        if why and frozen:
            self.found.append(FrozenEffect("batch-statistics", why))
        if frozen and self.whole[m] and self.weighted[m]:  # frozen weights reading a draw
            for t in pytree.tree_leaves((args, kwargs)):
                for seen in (t, t._base) if isinstance(t, Tensor) else ():
                    hit = self.drawn.get(id(seen)) if seen is not None else None
                    if hit is not None and hit[0] is seen:
                        self.movable.discard(hit[2])  # certainly stays in the frozen part
                        if hit[3]:  # an opaque layer: the split could not fold it
                            self.found.append(FrozenEffect("random", hit[1]))
        # a module traced through has no node of its own; one fx calls whole is one node,
        # trainable when it holds trainable weights or reads trainable values
        state = rng.capture(self.held) if self.draws else None
        self.stack.append(_Call(m, not (self.whole[m] and trainable), frozen, state))

    def post(self, m: nn.Module, args: Any, kwargs: Any, out: Any) -> None:
        call = self.stack.pop()
        moved = call.state.moved() if call.state is not None else ()
        if moved and self.stack:
            self.stack[-1].inner_drew = True
        if not moved or call.inner_drew or not call.here:
            return
        # the node the draw lies in: the outermost open layer fx calls whole, or this one
        node = next((c.module for c in self.stack[1:] if self.whole[c.module]), m)
        why = draw_reason(self.path.get(node, ""), moved)
        if self.whole[node] and self.weighted[node]:
            self.found.append(FrozenEffect("random", why))
            return
        self.movable.add(node)
        if node is m:
            for t in pytree.tree_leaves(out):
                if isinstance(t, Tensor) and t.dim() and t.shape[0] == self.batch:
                    self.drawn[id(t)] = (t, why, m, self.whole[m])


def _holds_trainable(module: nn.Module) -> dict[nn.Module, bool]:
    """For each submodule, whether it holds a parameter that requires grad."""
    return {m: any(p.requires_grad for p in m.parameters()) for m in module.modules()}


def _reads_grad(args: Any) -> bool:
    """Whether a tensor in ``args`` (any nesting) requires grad."""
    return any(isinstance(t, Tensor) and t.requires_grad for t in pytree.tree_leaves(args))


def _run_watched(
    module: nn.Module,
    x: Any,
    pre: Callable[[nn.Module, Any, Any], None],
    post: Callable[[nn.Module, Any, Any, Any], None],
) -> tuple[str, ...]:
    """Run ``module`` on ``x`` (autograd on, buffers and every generator restored) with
    ``pre(m, args, kwargs)`` called as each submodule is entered and ``post(m, args,
    kwargs, out)`` as it returns; returns the generators the run drew from."""
    handles = []
    state = restored_state(module)
    try:
        for m in module.modules():
            handles.append(m.register_forward_pre_hook(pre, with_kwargs=True))
            handles.append(m.register_forward_hook(post, with_kwargs=True, always_call=True))
        with state, torch.enable_grad():
            call_model(module, x)
    finally:
        for h in handles:
            h.remove()
    return state.moved


def frozen_calls(module: nn.Module, example: Any) -> list[nn.Module]:
    """The submodules whose every call runs on frozen values only (a guess of the
    frozen part's modules, :attr:`Partition.frozen_modules`, without tracing).

    Runs ``module`` once on ``example`` (autograd on, buffers and every generator
    restored): a call is frozen when the submodule holds no trainable parameter and
    receives no tensor that requires grad. A module that draws random numbers on frozen
    values is left out unless it certainly stays in the frozen part (see
    :func:`stochastic_frozen`): a Dropout head runs on the trainable side. A guess only:
    the caller checks it against the partition.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> net = nn.Sequential(nn.Linear(4, 4), nn.Dropout(0.5), nn.Linear(4, 4), nn.Linear(4, 2))
        >>> _ = net[:3].requires_grad_(False)
        >>> [type(m).__name__ for m in frozen_calls(net, torch.randn(3, 4))]
        ['Linear', 'Dropout', 'Linear']
        >>> _ = net[2].requires_grad_(True)  # the Dropout feeds trainable computation only
        >>> [type(m).__name__ for m in frozen_calls(net, torch.randn(3, 4))]
        ['Linear']
    """
    _, values, _ = inputs_of(module, example)
    watch = _watched_run(module, example, batch_size_of(values) or 0)
    return [m for m, ok in watch.calls.items() if ok and m is not module and m not in watch.movable]


def _runs_inference(m: nn.Module) -> bool:
    """A BatchNorm whose policy makes it use running statistics even in train mode."""
    return batchnorm.is_batchnorm(m) and batchnorm.runs_inference(m)


def _arg(n: fx.Node, pos: int, name: str, default: Any) -> Any:
    if name in n.kwargs:
        return n.kwargs[name]
    return n.args[pos] if len(n.args) > pos else default


def batch_statistics_op(n: fx.Node, root: nn.Module, named: dict[str, nn.Module]) -> str | None:
    """Why node ``n`` normalises with batch statistics (None when it does not); ``named``:
    see :func:`module_at`.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> from frostline.engine.frozen.traced import trace
        >>> t = trace(nn.Sequential(nn.BatchNorm1d(2, track_running_stats=False)), torch.randn(3, 2))
        >>> named = dict(t.gm.named_modules())
        >>> [batch_statistics_op(n, t.gm, named) for n in t.gm.graph.nodes if n.op == "call_module"]
        ['BatchNorm1d in batch-statistics mode (no running statistics)']
    """
    if n.op == "call_module":
        return batch_statistics(module_at(named, root, str(n.target)))
    t = n.target
    if n.op != "call_function" or not isinstance(t, torch._ops.OpOverload):
        return None
    base = t.name()
    if base in ("aten::batch_norm", "aten::_native_batch_norm_legit", "aten::native_batch_norm"):
        return f"{base} in batch-statistics mode" if _batchnorm_trains(n, base) else None
    return None


def _batchnorm_trains(n: fx.Node, base: str) -> bool:
    pos = {
        "aten::batch_norm": 5,
        "aten::native_batch_norm": 5,
        "aten::_native_batch_norm_legit": 5,
    }[base]
    if base == "aten::_native_batch_norm_legit" and len(n.args) == 6:  # no running stats overload
        return True
    return bool(_arg(n, pos, "training", True))


def writes_in_place(n: fx.Node, root: nn.Module, named: dict[str, nn.Module]) -> bool:
    """Whether ``n`` writes into its first argument; ``named``: see :func:`module_at`.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> from frostline.engine.frozen.traced import trace
        >>> t = trace(nn.Sequential(nn.ReLU(inplace=True)), torch.randn(3, 2))
        >>> named = dict(t.gm.named_modules())
        >>> [writes_in_place(n, t.gm, named) for n in t.gm.graph.nodes if n.op == "call_module"]
        [True]
    """
    if n.op == "call_method":
        name = str(n.target)
        return name.endswith("_") and not name.endswith("__")
    if n.op == "call_module":
        return bool(getattr(module_at(named, root, str(n.target)), "inplace", False))
    if n.op == "call_function":
        if n.target in _INPLACE_OPERATORS or n.kwargs.get("inplace") is True:
            return True
        t = n.target
        if isinstance(t, torch._ops.OpOverload):
            return any(
                a.alias_info is not None and a.alias_info.is_write for a in t._schema.arguments
            )
    return False
