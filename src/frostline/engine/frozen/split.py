"""The split of a trace at the frontier of its frozen part (:func:`partition`), and what
extends it (:func:`joint_frozen`, :func:`bridge`)."""

from __future__ import annotations

import math
import operator
from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx
from torch import Tensor, nn
from torch.utils import _pytree as pytree

from frostline.engine.frozen.calling import (
    fetch,
    module_at,
    restored_state,
    same_outputs,
    strip_root,
    take_rows,
)
from frostline.engine.frozen.effects import batch_statistics_op, draw_reason, writes_in_place
from frostline.engine.frozen.errors import GraphError, RandomnessError
from frostline.engine.frozen.traced import Traced

__all__ = [
    "Partition",
    "bridge",
    "computes_alike",
    "describe_boundary",
    "joint_frozen",
    "nbytes_per_sample",
    "partition",
]


@dataclass
class Partition:
    """A model split at the frontier of its frozen part.

    ``frozen`` maps the flat inputs to a tuple of frontier tensors (``None`` when nothing
    is frozen: then ``trainable`` takes the flat inputs); ``trainable`` maps those tensors
    to the model's output. ``boundary`` names each frontier tensor (the module that made
    it, ``#op`` for a function inside a module, ``input:NAME`` for a raw input).
    ``random`` says why the frozen part draws random numbers (found by what it draws,
    :meth:`Traced.random_nodes`), ``stateful`` why it writes to state, ``mixes_samples``
    which frontier rows depend on other samples of the batch, ``batch_statistics`` which
    BatchNorm normalises with batch statistics (all ``None`` when the frontier can be
    cached per sample), and
    ``frozen_modules`` lists the modules all of whose computation is frozen, and
    ``random_layers`` the layers called whole that draw random numbers in the frozen part.
    ``example_frontier`` holds the frozen part's outputs on ``traced.example`` as computed
    for the split (the modes as set, the weights then), or ``None``: a reference that
    checks of the frozen part (:func:`frostline.engine.fuse.inference_copy`) need not
    compute again.
    """

    traced: Traced
    frozen: fx.GraphModule | None
    trainable: nn.Module
    boundary: tuple[str, ...]
    frontier: tuple[str, ...]
    shapes: tuple[tuple[int, ...], ...]
    random: str | None
    stateful: str | None
    mixes_samples: str | None
    frozen_modules: tuple[str, ...]
    frozen_nodes: int
    trainable_nodes: int
    example_frontier: tuple[Any, ...] | None = None
    batch_statistics: str | None = None
    #: the layers called whole (opaque modules) that draw random numbers in the frozen part
    random_layers: tuple[str, ...] = ()

    def run_frozen(self, x: Any) -> tuple[Any, ...]:
        """The frontier tensors for the batch ``x`` (no autograd recording)."""
        values = self.traced.flat(x)
        if self.frozen is None:
            return values
        with torch.no_grad():
            return tuple(self.frozen(*values))


class _Trainable(nn.Module):
    """Frontier tensors -> the model's output, with the model's own modules and weights."""

    def __init__(self, gm: fx.GraphModule, out_spec: Any) -> None:
        super().__init__()
        self.graph_module = gm
        self.out_spec = out_spec

    def forward(self, *frontier: Any) -> Any:
        out = self.graph_module(*frontier)
        return out if self.out_spec is None else pytree.tree_unflatten(out, self.out_spec)


def partition(traced: Traced, *, trainable: Collection[int] | None = None) -> Partition:
    """Split ``traced`` at the frontier of what depends only on inputs and frozen weights.

    Frozen means: no trainable (``requires_grad``) parameter flows into the value.
    ``trainable``, ids of parameters, splits as if exactly those were trainable (the
    split a planned unfreeze will need); the flags themselves are not read or changed.
    A node that draws random numbers (:meth:`Traced.random_nodes`) on frozen values and
    feeds, through weightless computation only, trainable computation (a Dropout head)
    runs on the trainable side; any other frozen draw stays in the frozen part and is
    reported in ``random``.

    Raises:
        GraphError: a value the trainable part needs cannot be handed over (an input
            that is not a per-sample tensor) or the split would reorder a write into a
            frozen value that trainable computation reads first.
        RandomnessError: the split would change the order of the model's random draws
            (a frozen draw after a trainable one) or draw one twice.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> from frostline.engine.frozen import trace
        >>> net = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
        >>> net[0].requires_grad_(False)  # doctest: +ELLIPSIS
        Linear(...)
        >>> part = partition(trace(net, torch.randn(3, 4)))
        >>> part.boundary, part.shapes
        (('1',), ((4,),))
    """
    gm = traced.gm
    nodes = list(gm.graph.nodes)
    order = {n: i for i, n in enumerate(nodes)}
    named = dict(gm.named_modules())  # one walk of the tree, not one per node
    dep_in: dict[fx.Node, bool] = {}
    train: dict[fx.Node, bool] = {}

    def trains(t: Tensor) -> bool:
        return t.requires_grad if trainable is None else id(t) in trainable

    for n in nodes:
        ins = n.all_input_nodes
        if n.op == "placeholder":
            dep_in[n], train[n] = True, False
        elif n.op == "get_attr":
            v = fetch(gm, str(n.target))
            dep_in[n], train[n] = False, isinstance(v, Tensor) and trains(v)
        elif n.op == "output":
            continue
        else:
            dep_in[n] = any(dep_in[i] for i in ins)
            train[n] = any(train[i] for i in ins)
            if n.op == "call_module":
                m = module_at(named, gm, str(n.target))
                train[n] = train[n] or any(trains(p) for p in m.parameters())
    frozen_side = {n for n in nodes if n.op != "output" and dep_in[n] and not train[n]}
    out_node = next(n for n in nodes if n.op == "output")
    # a weightless draw on frozen values that feeds trainable computation only (a Dropout
    # head) runs on the trainable side: the frozen part in front of it stays deterministic
    draws = traced.random_nodes()
    frozen_side -= _weightless_draws(nodes, frozen_side, draws, gm, named)

    # a write into a frozen value must not move ahead of a trainable read of it
    for n in nodes:
        if n in frozen_side and writes_in_place(n, gm, named) and n.args:
            target = n.args[0]
            if isinstance(target, fx.Node) and any(
                u not in frozen_side and order[u] < order[n] for u in target.users
            ):
                raise GraphError(f"{n.name} writes in place into a value the trainable part reads")

    forced: set[fx.Node] = set()
    mixes = None
    example_frontier: tuple[Any, ...] | None = None
    for _attempt in range(4):
        example_frontier = None  # what a check ran this frozen part on, if it ran
        frontier, pulled, sized = _frontier(traced, nodes, frozen_side, forced, gm, named)
        frontier.sort(key=order.__getitem__)
        frozen_gm = None
        runs = _needed(nodes, frozen_side, frontier, pulled)
        if frontier and any(n.op != "placeholder" for n in frontier):
            frozen_gm = _frozen_module(gm, nodes, runs, frontier)
        # what the frozen part does besides computing values (recomputed values run later,
        # every step, on the trainable side: they do not count)
        random, stateful, stats = _side_effects(
            gm, [n for n in nodes if n in frozen_side and n not in pulled], named, draws
        )
        if frozen_gm is None or random or stateful or stats:
            break
        # a cached frontier row must depend on its own sample only (not arange(batch) etc.)
        bad, example_frontier = _batch_dependent(frozen_gm, traced, frontier)
        if not bad:
            mixes = None
            break
        mixes = ", ".join(_describe(gm, n) for n in bad)
        forced |= set(bad)
    if frozen_gm is None:
        frontier = [n for n in nodes if n.op == "placeholder"]  # nothing frozen to hand over
        pulled, sized = set(), {}
    trainable_side = [
        n for n in nodes if n.op != "output" and (n not in frozen_side or n in pulled)
    ]
    if frozen_gm is not None:
        _check_draw_order(gm, [n for n in nodes if n in runs], trainable_side, draws)
    trainable_gm = _trainable_module(
        gm, trainable_side, frontier, out_node, frozen_gm is None, sized
    )
    frozen_computed = [n for n in nodes if n in frozen_side and n not in pulled]
    return Partition(
        traced=traced,
        frozen=frozen_gm,
        trainable=_Trainable(trainable_gm, traced.out_spec),
        boundary=tuple(_describe(gm, n) for n in frontier) if frozen_gm is not None else (),
        frontier=tuple(n.name for n in frontier),
        shapes=tuple(traced.meta.get(n.name, ("", ()))[1] or () for n in frontier)
        if frozen_gm is not None
        else (),
        random=random,
        stateful=stateful,
        mixes_samples=mixes,
        batch_statistics=stats,
        random_layers=tuple(
            _describe(gm, n) for n in frozen_computed if n.op == "call_module" and n.name in draws
        )
        if frozen_gm is not None
        else (),
        example_frontier=example_frontier if frozen_gm is not None else None,
        frozen_modules=_frozen_modules(gm, nodes, frozen_side, pulled),
        frozen_nodes=sum(1 for n in frozen_computed if n.op not in ("placeholder", "get_attr"))
        if frozen_gm is not None
        else 0,
        trainable_nodes=sum(1 for n in trainable_side if n.op not in ("placeholder", "get_attr")),
    )


def _side_effects(
    gm: fx.GraphModule,
    frozen: list[fx.Node],
    named: dict[str, nn.Module],
    draws: Mapping[str, tuple[str, ...]],
) -> tuple[str | None, str | None, str | None]:
    """Why the frozen nodes draw random numbers (``draws``: :meth:`Traced.random_nodes`),
    why they write to model state, and why they normalise with batch statistics."""
    random = stateful = stats = None
    for n in frozen:
        if random is None and n.name in draws:
            random = _draw_reason(gm, n, draws[n.name])
        stats = stats or batch_statistics_op(n, gm, named)
        if stateful is None and writes_in_place(n, gm, named) and n.args:
            root_arg = _alias_root(n.args[0])
            if isinstance(root_arg, fx.Node) and root_arg.op == "get_attr":
                stateful = f"{n.name} writes into {root_arg.target}"
    return random, stateful, stats


def _draw_reason(gm: fx.GraphModule, n: fx.Node, kinds: tuple[str, ...]) -> str:
    """The log's wording for node ``n``, which draws from the generators ``kinds``."""
    where = _describe(gm, n)
    layer, _, op = where.partition("#")
    if n.op == "call_module" or op:
        return draw_reason(layer, kinds) + (f" in {op}" if op else "")
    return f"{where} draws random numbers ({', '.join(kinds)})"


def _weightless_draws(
    nodes: list[fx.Node],
    frozen_side: set[fx.Node],
    draws: Mapping[str, tuple[str, ...]],
    gm: fx.GraphModule,
    named: dict[str, nn.Module],
) -> set[fx.Node]:
    """The frozen nodes that move to the trainable side: each draw whose frozen users,
    and theirs in turn, read no weight (no parameter or buffer of a layer called whole, no
    weight read by an operation), together with those users, and the weightless tensor a
    draw overwrites in place when nothing else reads it (``x.new_empty(s).bernoulli_(p)``:
    its uninitialised values are never handed over)."""
    moved: set[fx.Node] = set()
    for r in nodes:
        if r.name not in draws or r not in frozen_side or r in moved:
            continue
        closure: set[fx.Node] = set()
        stack = [r]
        while stack:
            n = stack.pop()
            if n in closure:
                continue
            closure.add(n)
            stack.extend(u for u in n.users if u in frozen_side)
        if all(_weightless(n, gm, named) for n in closure):
            moved |= closure
            for n in closure:
                target = n.args[0] if n.args and writes_in_place(n, gm, named) else None
                if (
                    isinstance(target, fx.Node)
                    and target in frozen_side
                    and all(u in moved for u in target.users)
                    and _weightless(target, gm, named)
                ):
                    moved.add(target)
    return moved


def _weightless(n: fx.Node, gm: fx.GraphModule, named: dict[str, nn.Module]) -> bool:
    if n.op == "call_module":
        m = module_at(named, gm, str(n.target))
        return not any(True for _ in (*m.parameters(), *m.buffers()))
    return n.op in ("call_function", "call_method") and not any(
        i.op == "get_attr" for i in n.all_input_nodes
    )


def _check_draw_order(
    gm: fx.GraphModule,
    frozen: list[fx.Node],
    trainable: list[fx.Node],
    draws: Mapping[str, tuple[str, ...]],
) -> None:
    """The split keeps the model's order of random draws: the frozen part runs first, so
    none of its draws may come after one of the trainable side, nor be drawn twice.

    Raises:
        RandomnessError: the split would change what the model draws.
    """
    ours = [n for n in frozen if n.name in draws]
    theirs = [n for n in trainable if n.name in draws]
    if not ours or not theirs:
        return
    twice = set(ours) & set(theirs)
    if twice:
        n = min(twice, key=frozen.index)
        raise RandomnessError(f"{_draw_reason(gm, n, draws[n.name])}, and would run twice")
    first = theirs[0]
    late = [n for n in ours if _before(first, n)]
    if late:
        raise RandomnessError(
            f"{_draw_reason(gm, late[0], draws[late[0].name])} after "
            f"{_describe(gm, first)!r} draws: the split would change the order of the draws"
        )


def _before(a: fx.Node, b: fx.Node) -> bool:
    """Whether node ``a`` comes before node ``b`` in their graph."""
    n = a.next
    while n.op != "root":
        if n is b:
            return True
        n = n.next
    return False


def _frontier(
    traced: Traced,
    nodes: list[fx.Node],
    frozen_side: set[fx.Node],
    forced: set[fx.Node],
    gm: fx.GraphModule,
    named: dict[str, nn.Module],
) -> tuple[list[fx.Node], set[fx.Node], dict[fx.Node, tuple[int, ...]]]:
    """The frozen values handed over (per-sample tensors), those recomputed after them,
    and among those the shape queries answered from the batch size (``sized``)."""
    work = [n for n in nodes if n in frozen_side and any(u not in frozen_side for u in n.users)]
    frontier: list[fx.Node] = []
    pulled: set[fx.Node] = set()
    sized: dict[fx.Node, tuple[int, ...]] = {}
    while work or (sized and not frontier):
        if not work:  # only shape queries: no tensor to read the batch size from
            work.extend(q.args[0] for q in sized if isinstance(q.args[0], fx.Node))
            sized.clear()
            continue
        n = work.pop()
        if n in pulled or n in frontier:
            continue
        shape = _shape_query(n, traced)
        if shape is not None and n not in forced:
            # the shape of a per-sample tensor whose per-sample shape the trace fixed: any
            # handed-over tensor's batch size gives it, the tensor itself is not needed
            pulled.add(n)
            sized[n] = shape
            continue
        kind = traced.meta.get(n.name, ("other", None))[0]
        if n.op == "call_module" and isinstance(module_at(named, gm, str(n.target)), nn.Identity):
            kind = "identity"  # recomputed for free: its input is handed over, not a copy
        if n.op == "placeholder" or (
            kind == "batch" and n not in forced and not writes_in_place(n, gm, named)
        ):
            if n.op == "placeholder" and kind != "batch":
                raise GraphError(f"input {n.target!r} is not a per-sample tensor")
            frontier.append(n)
            continue
        pulled.add(n)  # recomputed on the trainable side
        work.extend(i for i in n.all_input_nodes if i in frozen_side)
    return frontier, pulled, sized


def _shape_query(n: fx.Node, traced: Traced) -> tuple[int, ...] | None:
    """The per-sample shape of ``x`` when ``n`` is ``x.size()``, ``x.size(d)`` or
    ``x.shape`` of a per-sample tensor in a trace that fixed the per-sample input shapes
    (``"fx-values"``), else None."""
    if traced.sample_shapes is None or n.kwargs or not n.args:
        return None
    query = (n.op == "call_method" and n.target == "size" and len(n.args) <= 2) or (
        n.op == "call_function" and n.target is getattr and n.args[1:] == ("shape",)
    )
    x = n.args[0]
    if not query or not isinstance(x, fx.Node):
        return None
    if n.target == "size" and len(n.args) == 2 and not isinstance(n.args[1], int):
        return None
    kind, shape = traced.meta.get(x.name, ("other", None))
    return shape if kind == "batch" and shape is not None else None


def _per_sample_size(ref: Tensor, shape: tuple[int, ...], dim: int | None = None) -> Any:
    """``x.size(dim)`` of a tensor with ``ref``'s batch size and per-sample ``shape``."""
    size = torch.Size((ref.shape[0], *shape))
    return size if dim is None else size[dim]


def _batch_dependent(
    frozen_gm: fx.GraphModule, traced: Traced, frontier: list[fx.Node]
) -> tuple[list[fx.Node], tuple[Any, ...] | None]:
    """Frontier values whose row for a sample changes with the other samples in the batch,
    and the frontier on the whole example (``None`` without one)."""
    example = traced.example
    if example is None:
        return [], None
    with restored_state(traced.module), torch.no_grad():
        a = tuple(frozen_gm(*example))
        b = frozen_gm(*take_rows(example, torch.tensor([1, 2])))
    return [
        n
        for n, x, y in zip(frontier, a, b)
        # loose: another batch size may pick another kernel (float noise); what this looks
        # for (positions in the batch, batch statistics) differs by far more
        if n.op != "placeholder" and not same_outputs(x[1:], y, rtol=1e-2, atol=1e-3)
    ], a


def joint_frozen(part: Partition, later: Partition) -> fx.GraphModule | None:
    """``part``'s frozen module, also returning ``later``'s frontier tensors (after its own).

    ``later`` is a split of the same trace with more trainable (:func:`partition` with
    ``trainable=``): its frontier lies inside ``part``'s frozen computation, so one run
    over the data yields both caches. ``None`` when a tensor of ``later``'s frontier is
    not computed by ``part``'s frozen module (another trace; recomputed after the frontier).

    Example:
        >>> import torch
        >>> from torch import nn
        >>> from frostline.engine.frozen import trace
        >>> net = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 4), nn.Linear(4, 2))
        >>> _ = net[:3].requires_grad_(False)
        >>> t = trace(net, torch.randn(3, 4))
        >>> now = partition(t)
        >>> later = partition(t, trainable={id(p) for p in net[2:].parameters()})
        >>> now.boundary, later.boundary
        (('2',), ('1',))
        >>> len(joint_frozen(now, later)(torch.randn(3, 4)))
        2
    """
    if part.frozen is None or later.frozen is None or part.traced is not later.traced:
        return None
    old = part.frozen.graph
    g = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    outs = g.graph_copy(old, env)
    by_name = {n.name: env[n] for n in old.nodes if n.op != "output"}
    extra = [by_name.get(name) for name in later.frontier]
    if not isinstance(outs, tuple) or any(e is None for e in extra):
        return None
    g.output((*outs, *extra))
    return fx.GraphModule(part.frozen, g)


def bridge(old: Partition, new: Partition) -> fx.GraphModule | None:
    """A module from ``old``'s frontier tensors to ``new``'s, when ``new`` lies past ``old``.

    Used to extend a cache when more of the model is frozen: the extra frozen computation
    runs over the stored frontier instead of the raw data. ``new`` may come from another
    trace of the same model (made in other modes: ``fit(frozen_inference=True)`` puts each
    newly frozen stage in eval mode, and a trace bakes flags in) when that trace computes
    ``old``'s frontier exactly as ``old``'s trace did (:func:`computes_alike`). ``None``
    when the new frontier needs anything but the old frontier (a raw input), or the other
    trace computes the old frontier otherwise.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> from frostline.engine.frozen import trace
        >>> net = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 4), nn.Linear(4, 2))
        >>> t = trace(net, torch.randn(3, 4))
        >>> _ = net[:3].requires_grad_(False); deep = partition(t)
        >>> _ = net[2].requires_grad_(True); shallow = partition(t)
        >>> step = bridge(shallow, deep)
        >>> x = torch.randn(3, 4)
        >>> torch.allclose(step(*shallow.run_frozen(x))[0], deep.run_frozen(x)[0])
        True
    """
    if old.traced is not new.traced and not computes_alike(old.traced, new.traced, old.frontier):
        return None
    gm = new.traced.gm
    by_name = {n.name: n for n in gm.graph.nodes}
    g = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    for i, name in enumerate(old.frontier):
        env[by_name[name]] = g.placeholder(f"cached_{i}")
    needed: set[fx.Node] = set()
    stack = [by_name[name] for name in new.frontier]
    while stack:
        n = stack.pop()
        if n in needed or n in env:
            continue
        if n.op == "placeholder":
            return None
        needed.add(n)
        stack.extend(n.all_input_nodes)
    for n in gm.graph.nodes:
        if n in needed:
            env[n] = _copy_into(g, n, env)
    g.output(tuple(env[by_name[name]] for name in new.frontier))
    return fx.GraphModule(gm, g)


def computes_alike(a: Traced, b: Traced, names: Iterable[str]) -> bool:
    """Whether traces ``a`` and ``b`` of one model compute the values ``names`` (nodes of
    ``a``) the same way: every node they depend on is in both graphs, by name, with the
    same operation, target (the same module or tensor object) and arguments. Traces made
    in other modes differ only where a flag was read; values below every such place match.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> from frostline.engine.frozen import trace
        >>> class Drop(nn.Module):
        ...     def forward(self, x):
        ...         return nn.functional.dropout(x, 0.5, self.training)
        >>> net = nn.Sequential(nn.Linear(4, 4), Drop(), nn.Linear(4, 2))
        >>> train = trace(net, torch.randn(3, 4))
        >>> _ = net[1].eval(); infer = trace(net, torch.randn(3, 4))
        >>> computes_alike(train, infer, ["model_0"]), computes_alike(train, infer, ["dropout"])
        (True, False)
    """
    if a.module is not b.module or a.input_names != b.input_names or a.keywords != b.keywords:
        return False
    mine = {n.name: n for n in a.gm.graph.nodes}
    theirs = {n.name: n for n in b.gm.graph.nodes}
    stack, seen = list(names), set()
    while stack:
        name = stack.pop()
        if name in seen:
            continue
        seen.add(name)
        x, y = mine.get(name), theirs.get(name)
        if x is None or y is None or not _same_node(a.gm, x, b.gm, y):
            return False
        stack.extend(n.name for n in x.all_input_nodes)
    return True


def _same_node(ga: fx.GraphModule, x: fx.Node, gb: fx.GraphModule, y: fx.Node) -> bool:
    if x.op != y.op:
        return False
    if x.op in ("get_attr", "call_module"):
        try:
            u, v = fetch(ga, str(x.target)), fetch(gb, str(y.target))
        except AttributeError:
            return False
        if u is not v and not (
            isinstance(u, Tensor)
            and isinstance(v, Tensor)
            and (u.shape, u.dtype, u.device) == (v.shape, v.dtype, v.device)
            and torch.equal(u, v)
        ):
            return False
    elif x.target != y.target:
        return False

    def named(args: Any) -> Any:
        return fx.node.map_arg(args, lambda n: ("node", n.name))

    try:
        return bool(named(x.args) == named(y.args) and named(x.kwargs) == named(y.kwargs))
    except (RuntimeError, TypeError, ValueError):  # a tensor argument: compare no further
        return False


def _alias_root(a: Any) -> Any:
    """Follow views (``view``, ``getitem``, ...) back to the value they alias."""
    views = {"view", "reshape", "transpose", "permute", "squeeze", "unsqueeze", "flatten", "expand"}
    while (
        isinstance(a, fx.Node)
        and a.args
        and (
            (a.op == "call_method" and a.target in views)
            or (a.op == "call_function" and a.target in (operator.getitem, torch.flatten))
        )
    ):
        a = a.args[0]
    return a


def _copy_into(g: fx.Graph, n: fx.Node, env: dict[fx.Node, fx.Node]) -> fx.Node:
    return g.node_copy(n, lambda a: env[a])


def _needed(
    nodes: list[fx.Node], frozen_side: set[fx.Node], frontier: list[fx.Node], pulled: set[fx.Node]
) -> set[fx.Node]:
    """The nodes the frozen part runs: the frontier, frozen writes and checks (nodes
    nobody reads), and what they read."""
    needed: set[fx.Node] = set()
    stack = list(frontier) + [
        n for n in nodes if n in frozen_side and n not in pulled and not n.users
    ]
    while stack:
        n = stack.pop()
        if n in needed:
            continue
        needed.add(n)
        stack.extend(n.all_input_nodes)
    return needed


def _frozen_module(
    gm: fx.GraphModule, nodes: list[fx.Node], needed: set[fx.Node], frontier: list[fx.Node]
) -> fx.GraphModule:
    g = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    for n in nodes:
        if n in needed:
            env[n] = _copy_into(g, n, env)
    g.output(tuple(env[n] for n in frontier))
    return fx.GraphModule(gm, g)


def _trainable_module(
    gm: fx.GraphModule,
    trainable_side: list[fx.Node],
    frontier: list[fx.Node],
    out_node: fx.Node,
    raw_inputs: bool,
    sized: dict[fx.Node, tuple[int, ...]] | None = None,
) -> fx.GraphModule:
    g = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    for i, n in enumerate(frontier):
        env[n] = g.placeholder(n.name if raw_inputs else f"frontier_{i}")
        env[n].meta = dict(n.meta)
    for n in trainable_side:
        if n in env:
            continue
        if n.op == "placeholder":
            continue  # an unused raw input (handed over only when needed)
        if sized and n in sized:
            dim = n.args[1] if n.target == "size" and len(n.args) == 2 else None
            env[n] = g.call_function(_per_sample_size, (env[frontier[0]], sized[n], dim))
            continue
        env[n] = _copy_into(g, n, env)
    g.output(pytree.tree_map(lambda a: env[a] if isinstance(a, fx.Node) else a, out_node.args[0]))
    return fx.GraphModule(gm, g)


def _scope(n: fx.Node) -> list[str]:
    stack = n.meta.get("nn_module_stack") or {}
    paths = [str(v[0]) if isinstance(v, tuple) else str(v) for v in stack.values()]
    if n.op == "call_module":
        paths.append(str(n.target))
    return paths


def _describe(gm: fx.GraphModule, n: fx.Node) -> str:
    if n.op == "placeholder":
        return f"input:{n.target}"
    if n.op == "call_module":
        return strip_root(str(n.target))
    scope = [p for p in map(strip_root, _scope(n)) if p]
    op = getattr(n.target, "__name__", None) or str(n.target).split(".")[-1]
    return f"{scope[-1]}#{op}" if scope else op


def _frozen_modules(
    gm: fx.GraphModule, nodes: list[fx.Node], frozen_side: set[fx.Node], pulled: set[fx.Node]
) -> tuple[str, ...]:
    """Modules every node of which runs in the frozen part (for inference-mode runs)."""
    state: dict[str, bool] = {}
    for n in nodes:
        if n.op in ("placeholder", "output", "get_attr"):
            continue
        frozen = n in frozen_side and n not in pulled
        for p in _scope(n):
            state[p] = state.get(p, True) and frozen
    return tuple(sorted(strip_root(p) for p, ok in state.items() if ok and strip_root(p)))


def describe_boundary(names: Iterable[str]) -> str:
    """One line for logs: ``'layer3' + 'input:attention_mask'``.

    Example:
        >>> describe_boundary(["layer3", "input:mask"])
        "'layer3' + 'input:mask'"
    """
    return " + ".join(repr(n) for n in names) or "(none)"


def nbytes_per_sample(part: Partition, dtypes: Iterable[torch.dtype]) -> int:
    """Bytes one sample's frontier takes in the given dtypes.

    Example:
        >>> nbytes_per_sample.__name__
        'nbytes_per_sample'
    """
    return sum(
        math.prod(s) * torch.empty((), dtype=d).element_size() for s, d in zip(part.shapes, dtypes)
    )
