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
    "FrozenWatch",
    "batch_statistics",
    "batch_statistics_op",
    "draw_reason",
    "frozen_calls",
    "stochastic_frozen",
    "watch_frozen",
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
    :func:`partition` then reports as ``random``) when that layer holds frozen weights, or
    a frozen layer fx calls whole that holds weights takes its output as it is: the draw
    cannot move to the trainable side. It is reported where the split would gain nothing:
    where the inputs are not images, which the split could run folded around the drawing
    layer (:func:`~frostline.engine.fuse.inference_copy`'s ``as_set``). A BatchNorm in
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
    return watch_frozen(module, example).effect


@dataclass(frozen=True)
class FrozenWatch:
    """What one watched forward of a model found (:func:`watch_frozen`).

    ``effect``: what certainly makes the frozen part random (see
    :func:`stochastic_frozen`); ``output``: the model's output (detached) on the first
    probe batch (:func:`~frostline.engine.frozen.calling.probe_rows`), which a trace's
    probe takes as its reference instead of running the model again (``None`` when the
    batch has no batch dimension and nothing ran); ``moved``: the generators the run drew
    from (restored since).

    Example:
        >>> import torch
        >>> from torch import nn
        >>> w = watch_frozen(nn.Sequential(nn.Linear(2, 2), nn.Dropout()), torch.randn(4, 2))
        >>> tuple(w.output.shape), w.moved
        ((3, 2), ('torch generator',))
    """

    effect: FrozenEffect | None
    output: Any
    moved: tuple[str, ...]


def watch_frozen(module: nn.Module, example: Any) -> FrozenWatch:
    """One watched forward of ``module`` on the first probe rows of ``example`` (autograd
    on, buffers and every generator restored): :func:`stochastic_frozen`'s finding, and
    the output and draws of that forward, so that the trace that follows needs no forward
    of its own for them (:func:`~frostline.engine.frozen.traced.trace`'s ``reference``).

    Example:
        >>> import torch
        >>> from torch import nn
        >>> net = nn.Sequential(nn.Linear(4, 4), nn.Dropout(0.5), nn.Linear(4, 4), nn.Linear(4, 2))
        >>> _ = net[:3].requires_grad_(False)
        >>> w = watch_frozen(net, torch.randn(4, 4))
        >>> str(w.effect), w.output.requires_grad
        ("layer '1' draws random numbers (torch generator)", False)
    """
    names, values, kw = inputs_of(module, example)
    batch = batch_size_of(values)
    if batch is None:
        return FrozenWatch(None, None, ())
    inputs = take_rows(values, probe_rows(batch)[0])
    x = dict(zip(names, inputs)) if kw else inputs
    images = any(isinstance(v, Tensor) and v.dim() == 4 for v in values)
    watch = _watched_run(module, x, len(inputs[0]) if inputs else 0, images)
    found = watch.found
    output = pytree.tree_map(lambda t: t.detach() if isinstance(t, Tensor) else t, watch.output)
    return FrozenWatch(found[0] if found else None, output, watch.moved)


def _watched_run(module: nn.Module, x: Any, batch: int, images: bool = False) -> _Watch:
    """A :class:`_Watch` of ``module`` on ``x``: one run capturing torch's own generators
    at each call (cheap: what Dropout and most random layers draw from), and, only when
    that run drew from another (Python's, NumPy's, one the model holds), one capturing at
    each call the generators it drew from (only those can move in a call)."""
    watch = _Watch(module, batch, images).run(x, rng.TORCH_KINDS)
    return watch if set(watch.moved) <= set(rng.TORCH_KINDS) else watch.run(x, watch.moved)


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
    what certainly makes the frozen part random (see :func:`stochastic_frozen`). The
    model's structure is read once; :meth:`run` may run it again."""

    def __init__(self, module: nn.Module, batch: int, images: bool = False) -> None:
        #: whether the inputs are images: a split then runs folded around a drawing layer
        #: (only the trace can tell whether it pays), so such a draw is not reported
        self.module, self.batch, self.images = module, batch, images
        self.trains = _holds_trainable(module)
        self.held = rng.generators_of(module)
        self.path = {m: n for n, m in module.named_modules()}
        tracer = Tracer(set())
        self.whole = {m: tracer.is_leaf_module(m, "") for m in module.modules()}
        self.weighted = _in_subtree(
            module,
            lambda m: any(t is not None for t in (*m._parameters.values(), *m._buffers.values())),
        )
        self.reset(None)

    def reset(self, draws: tuple[str, ...] | None) -> None:
        """Forget what a run found; ``draws``: the generators (as :meth:`rng.RngState.moved`
        names them) to capture around each call, ``None``: none."""
        self.draws = draws
        self.moved: tuple[str, ...] = ()  # what the whole run drew
        self.output: Any = None  # what the whole run returned
        self.stack: list[_Call] = []
        self.found: list[FrozenEffect] = []
        self.calls: dict[nn.Module, bool] = {}  # every call on frozen values only
        #: modules that drew on frozen values, unless certainly in the frozen part
        self.movable: set[nn.Module] = set()
        #: id(output) -> (output, why, the module that drew it, whether fx calls it whole)
        self.drawn: dict[int, tuple[Tensor, str, nn.Module, bool]] = {}

    def run(self, x: Any, draws: tuple[str, ...] | None = None) -> _Watch:
        """Run the model on ``x`` (see :meth:`reset` for ``draws``)."""
        self.reset(draws)
        self.moved, self.output = _run_watched(self.module, x, self.pre, self.post)
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
                        if hit[3] and not self.images:  # the split could not fold it
                            self.found.append(FrozenEffect("random", hit[1]))
        # a module traced through has no node of its own; one fx calls whole is one node,
        # trainable when it holds trainable weights or reads trainable values
        state = rng.capture(self.held, self.draws) if self.draws is not None else None
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
            if not self.images:
                self.found.append(FrozenEffect("random", why))
            return
        self.movable.add(node)
        if node is m:
            for t in pytree.tree_leaves(out):
                if isinstance(t, Tensor) and t.dim() and t.shape[0] == self.batch:
                    self.drawn[id(t)] = (t, why, m, self.whole[m])


def _holds_trainable(module: nn.Module) -> dict[nn.Module, bool]:
    """For each submodule, whether it holds a parameter that requires grad."""
    return _in_subtree(
        module, lambda m: any(p is not None and p.requires_grad for p in m._parameters.values())
    )


def _in_subtree(module: nn.Module, own: Callable[[nn.Module], bool]) -> dict[nn.Module, bool]:
    """For each submodule, whether ``own`` holds for it or a module below it: one visit
    per module (asking each module's whole subtree took 60 ms on a MobileNetV2)."""
    found: dict[nn.Module, bool] = {}

    def visit(m: nn.Module) -> bool:
        if m not in found:
            found[m] = False  # a module met again on its own path (a cycle) adds nothing
            found[m] = own(m) | any([visit(c) for c in m.children()])
        return found[m]

    visit(module)
    return found


def _reads_grad(args: Any) -> bool:
    """Whether a tensor in ``args`` (any nesting) requires grad."""
    return any(isinstance(t, Tensor) and t.requires_grad for t in pytree.tree_leaves(args))


def _run_watched(
    module: nn.Module,
    x: Any,
    pre: Callable[[nn.Module, Any, Any], None],
    post: Callable[[nn.Module, Any, Any, Any], None],
) -> tuple[tuple[str, ...], Any]:
    """Run ``module`` on ``x`` (autograd on, buffers and every generator restored) with
    ``pre(m, args, kwargs)`` called as each submodule is entered and ``post(m, args,
    kwargs, out)`` as it returns; returns the generators the run drew from and the
    output."""
    handles = []
    state = restored_state(module)
    try:
        for m in module.modules():
            handles.append(m.register_forward_pre_hook(pre, with_kwargs=True))
            handles.append(m.register_forward_hook(post, with_kwargs=True, always_call=True))
        with state, torch.enable_grad():
            out = call_model(module, x)
    finally:
        for h in handles:
            h.remove()
    return state.moved, out


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
