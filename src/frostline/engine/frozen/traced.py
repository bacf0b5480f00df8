"""One trace of a model (:class:`Traced`): fx first, fx with example values, then
``torch.export``; checked against the model on two batch sizes, and watched for the
nodes that draw random numbers."""

from __future__ import annotations

import contextlib
import keyword
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx
from torch import Tensor, nn
from torch.utils import _pytree as pytree

from frostline.engine import rng
from frostline.engine.frozen.calling import (
    batch_size_of,
    call_model,
    fetch,
    inputs_of,
    mode_key,
    module_at,
    probe_rows,
    restored_state,
    same_outputs,
    take_rows,
)
from frostline.engine.frozen.errors import GraphError, RandomnessError
from frostline.engine.frozen.tracers import DrewWhileTracing, Tracer, ValueTracer

__all__ = ["Traced", "trace"]


class _Root(nn.Module):
    """Holds the user's model as ``model``; its generated forward takes named inputs."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.out_spec: Any = None

    def flatten(self, out: Any) -> tuple[Any, ...]:
        """The output's leaves (its structure, e.g. a ModelOutput, kept in ``out_spec``)."""
        leaves, self.out_spec = pytree.tree_flatten(out)
        return tuple(leaves)


def _root_for(module: nn.Module, names: tuple[str, ...], kw: bool, flat: bool = False) -> _Root:
    for n in names:
        if not n.isidentifier() or keyword.iskeyword(n) or n in ("self", "model"):
            raise GraphError(f"input name {n!r} is not usable as an argument name")
    call = ", ".join(f"{n}={n}" for n in names) if kw else ", ".join(names)
    body = f"self.flatten(self.model({call}))" if flat else f"self.model({call})"
    src = f"def forward(self, {', '.join(names)}):\n    return {body}\n"
    scope: dict[str, Any] = {}
    exec(compile(src, "<frostline.graph>", "exec"), scope)  # noqa: S102 - fixed template
    cls = type("TracedModel", (_Root,), {"forward": scope["forward"]})
    return cls(module)


@dataclass
class Traced:
    """One trace of a model, valid for the module modes in ``modes``.

    ``gm`` computes ``model(*inputs)`` from the flat inputs named ``input_names``;
    ``out_spec`` (export traces) turns the graph's flat outputs back into the model's
    output structure. ``meta`` maps node names to ``(kind, per_sample_shape)`` learned
    from two probe batches: kind ``"batch"`` (a tensor with the batch along dim 0),
    ``"tensor"`` (another tensor) or ``"other"``.
    """

    module: nn.Module
    gm: fx.GraphModule
    backend: str
    input_names: tuple[str, ...]
    keywords: bool
    modes: tuple[bool, ...]
    out_spec: Any = None
    meta: dict[str, tuple[str, tuple[int, ...] | None]] = field(default_factory=dict)
    leaves: tuple[str, ...] = ()
    example: tuple[Any, ...] | None = None
    root: nn.Module | None = None
    #: the modules whose ``training`` flag the graph baked in (``modes`` holds their flags
    #: at trace time): for fx, those it traced through; layers it calls as whole modules read
    #: their flag when they run. An export trace inlines every module.
    baked: tuple[nn.Module, ...] = ()
    sample_shapes: tuple[Any, ...] | None = None  # fx-values: per-sample input shapes
    device: torch.device | None = None
    #: per mode key (:func:`mode_key`): the nodes that drew random numbers on the example
    draws: dict[tuple[bool, ...], dict[str, tuple[str, ...]]] = field(default_factory=dict)
    #: per mode key: the generators a run of the graph on the example drew from (the
    #: probe's run, watched as a whole: most graphs draw nothing and need no per-node watch)
    drew: dict[tuple[bool, ...], tuple[str, ...]] = field(default_factory=dict)

    def random_nodes(self) -> dict[str, tuple[str, ...]]:
        """The nodes that draw random numbers in the modules' current modes, with the
        generators each one moved: found by running the graph on the example with every
        generator watched (:mod:`frostline.engine.rng`), not from a list of operations.
        A layer called whole counts as one node. Generators are restored afterwards.

        Example:
            >>> import torch
            >>> from torch import nn
            >>> net = nn.Sequential(nn.Linear(2, 2), nn.Dropout(0.5))
            >>> t = trace(net, torch.randn(3, 2))
            >>> t.random_nodes()
            {'model_1': ('torch generator',)}
            >>> _ = net.eval(); t.random_nodes()
            {}
        """
        key = mode_key(self.module)
        found = self.draws.get(key)
        if found is None:
            found = self.draws[key] = _draws(self, self.drew.get(key))
        return found

    def fits_modes(self) -> bool:
        """Whether the modules' ``training`` flags are still those the graph baked in.

        Example:
            >>> import torch
            >>> from torch import nn
            >>> net = nn.Sequential(nn.Linear(2, 2), nn.Dropout(0.5))
            >>> t = trace(net, torch.randn(2, 2))
            >>> _ = net.eval(); t.fits_modes()  # Dropout runs whole, Sequential never reads it
            True
        """
        baked = self.baked or tuple(self.module.modules())
        return tuple(m.training for m in baked) == self.modes

    def current(self) -> bool:
        """Whether the graph still holds the model's current weights and submodules (a
        parameter replaced by assignment since the trace makes it stale).

        Example:
            >>> import torch
            >>> from torch import nn
            >>> net = nn.Linear(2, 2)
            >>> t = trace(net, torch.randn(2, 2))
            >>> t.current()
            True
        """
        root = self.root if self.root is not None else self.module
        if self.device is not None and self.device != _device_of(self.module):
            return False  # moved: a trace may hold device constants
        # one walk of each module tree instead of a path walk per node (4 ms -> 0.5 ms on
        # a ConvNeXt); a path a tree lists under another name is looked up as before
        ours, theirs = dict(self.gm.named_modules()), dict(root.named_modules())
        for n in self.gm.graph.nodes:
            target = str(n.target)
            try:
                if n.op == "get_attr" and fetch(self.gm, target) is not fetch(root, target):
                    return False
                if n.op == "call_module" and (
                    module_at(ours, self.gm, target) is not module_at(theirs, root, target)
                ):
                    return False
            except AttributeError:  # the tracer's own helper (torch.export's guards)
                continue
        return True

    def flat(self, x: Any) -> tuple[Any, ...]:
        """The batch ``x`` as this trace's flat inputs."""
        names, values, _ = inputs_of(self.module, x)
        if names != self.input_names:
            raise GraphError(f"inputs {names} differ from the traced inputs {self.input_names}")
        if self.sample_shapes is not None and _sample_shapes(values) != self.sample_shapes:
            raise GraphError(
                f"inputs with per-sample shapes {_sample_shapes(values)}; the model was traced "
                f"for {self.sample_shapes} (shapes steered its Python control flow)"
            )
        return values

    def run(self, x: Any) -> Any:
        """The traced forward (for checks)."""
        out = self.gm(*self.flat(x))
        return out if self.out_spec is None else pytree.tree_unflatten(out, self.out_spec)


def trace(
    module: nn.Module,
    example: Any,
    *,
    max_leaves: int = 32,
    like: Traced | None = None,
    reference: Any = None,
) -> Traced:
    """Trace ``module`` as called with ``example`` (one batch of at least one sample).

    Tries module-level ``torch.fx`` first, making a submodule that fails to trace a leaf
    (up to ``max_leaves`` times), then ``torch.export`` with a dynamic batch dimension.
    ``like``, an earlier trace of the same module (in other modes), is where to start:
    its tracer first, with its leaves (the tracers that failed then are tried last).
    The trace is checked against the real forward on ``example`` (and on one sample
    fewer) and probed for which values are per-sample tensors. ``reference``, when given,
    is the model's output on the first probe batch (:func:`probe_rows`) in the modes as
    set, from the generators as they are now (the forward
    :func:`~frostline.engine.frozen.effects.watch_frozen` ran): the check takes it instead
    of running the model once more. The graph's run on the example is watched for random
    draws as it runs (:meth:`Traced.random_nodes` then needs no run where none drew).

    Raises:
        GraphError: neither tracer reproduced the model; the message says why.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> t = trace(nn.Sequential(nn.Linear(3, 4), nn.ReLU()), torch.randn(3, 3))
        >>> t.backend, t.input_names
        ('fx', ('input',))
    """
    names, values, kw = inputs_of(module, example)
    batch = batch_size_of(values)
    if batch is None or batch < 1:
        raise GraphError("the inputs hold no tensor with a batch dimension")
    errors = []
    order = ["fx", "fx-values", "export"]
    leaves: tuple[str, ...] = ()
    if like is not None and like.module is module and like.backend in order:
        order.remove(like.backend)
        order.insert(0, like.backend)
        leaves = like.leaves
    drew = False
    for backend in order:
        try:
            if backend == "fx":
                t = _trace_fx(module, names, kw, max_leaves, start=leaves)
            elif backend == "fx-values":
                t = _trace_fx(module, names, kw, max_leaves, example=values, start=leaves)
            else:
                t = _trace_export(module, names, values, kw)
            _probe(t, values, reference)
            return t
        except GraphError as e:
            errors.append(f"{backend}: {e}")
            drew = drew or isinstance(e, RandomnessError)
        except Exception as e:  # any tracer failure means: try the next, else fall back
            errors.append(f"{backend}: {type(e).__name__}: {_short(e)}")
    raise (RandomnessError if drew else GraphError)("; ".join(errors))


def _short(e: BaseException, limit: int = 160) -> str:
    s = str(e).strip().splitlines()
    line = s[0] if s else ""
    return line if len(line) <= limit else line[: limit - 3] + "..."


def _trace_fx(
    module: nn.Module,
    names: tuple[str, ...],
    kw: bool,
    max_leaves: int,
    example: tuple[Any, ...] | None = None,
    start: Iterable[str] = (),
) -> Traced:
    """Module-level fx; with ``example``, the :class:`ValueTracer` (flat outputs).
    The submodules in ``start`` are leaves from the first attempt (an earlier trace's)."""
    root = _root_for(module, names, kw, flat=example is not None)
    leaves: set[str] = set(start)
    generators = rng.generators_of(module)
    watch = False  # each module is watched once a trace drew somewhere
    for _ in range(max_leaves + 2):
        if example is None:
            tracer = Tracer(leaves, generators, watch)
        else:
            tracer = ValueTracer(leaves, dict(zip(names, example)), generators, watch)
        state = restored_state(module)
        try:
            grad = torch.no_grad() if example is not None else contextlib.nullcontext()
            with state, grad:
                graph = tracer.trace(root)
        except Exception as e:
            inner = [p for p in tracer.stack if p not in leaves]
            if not inner or inner[-1] in ("", "model"):
                if isinstance(e, DrewWhileTracing):
                    raise RandomnessError(f"{e} while it is traced") from e
                raise GraphError(f"{type(e).__name__}: {_short(e)}") from e
            leaves.add(inner[-1])
            continue
        if state.moved:
            if watch:  # not in any module's code: the tracer's own (cannot happen)
                raise RandomnessError(f"tracing drew random numbers ({', '.join(state.moved)})")
            watch = True
            continue
        gm = fx.GraphModule(root, graph)
        baked = _traced_through(root, graph)
        return Traced(
            module,
            gm,
            "fx" if example is None else "fx-values",
            names,
            kw,
            tuple(m.training for m in baked),
            out_spec=root.out_spec,
            leaves=tuple(sorted(leaves)),
            root=root,
            baked=baked,
            sample_shapes=None if example is None else _sample_shapes(example),
            device=_device_of(module),
        )
    raise GraphError(f"more than {max_leaves} submodules could not be traced")


def _traced_through(root: nn.Module, graph: fx.Graph) -> tuple[nn.Module, ...]:
    """The modules an fx graph inlined and whose flag it may have read: all but those it
    calls whole (and their insides) and containers whose forward never reads ``training``
    (``nn.Sequential``'s, ``nn.ModuleList``/``nn.ModuleDict`` that have none)."""
    whole: set[int] = set()
    for n in graph.nodes:
        if n.op == "call_module":
            whole.update(id(m) for m in root.get_submodule(str(n.target)).modules())
    blind = (nn.Sequential.forward, nn.Module.forward)
    return tuple(m for m in root.modules() if id(m) not in whole and type(m).forward not in blind)


def _trace_export(module: nn.Module, names: tuple[str, ...], values: tuple, kw: bool) -> Traced:
    from torch.export import Dim

    batch = Dim("batch", min=1)
    shapes = [{0: batch} if isinstance(v, Tensor) and v.dim() >= 1 else None for v in values]
    flags = [(m, m.training) for m in module.modules()]
    with restored_state(module) as watch:
        if kw:
            ep = torch.export.export(
                module,
                (),
                dict(zip(names, values)),
                dynamic_shapes=dict(zip(names, shapes)),
                strict=False,
            )
        else:
            ep = torch.export.export(
                module, tuple(values), dynamic_shapes=tuple(shapes), strict=False
            )
    for m, t in flags:  # export may flip modes while tracing
        m.training = t
    if watch.moved:  # export draws no real random numbers: Python code did, and was baked
        raise RandomnessError(f"the model draws random numbers ({', '.join(watch.moved)})")
    gm = ep.module()
    # a flat graph: the pytree (de)serialisation of ep.module() is done by Traced.run
    out_spec = gm._out_spec if hasattr(gm, "_out_spec") else None
    flat = fx.GraphModule(gm, _flat_graph(gm.graph))
    _check_shared_weights(module, flat)
    return Traced(
        module,
        flat,
        "export",
        names,
        kw,
        mode_key(module),
        out_spec=out_spec,
        device=_device_of(module),
    )


def _sample_shapes(values: tuple[Any, ...]) -> tuple[Any, ...]:
    return tuple(
        tuple(v.shape[1:]) if isinstance(v, Tensor) and v.dim() else None
        for v in pytree.tree_leaves(list(values))
    )


def _device_of(module: nn.Module) -> torch.device | None:
    for t in (*module.parameters(), *module.buffers()):
        return t.device
    return None


def _flat_graph(graph: fx.Graph) -> fx.Graph:
    g = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    for n in graph.nodes:
        if n.op == "output":
            g.output(pytree.tree_map(lambda a: env[a] if isinstance(a, fx.Node) else a, n.args[0]))
        else:
            env[n] = g.node_copy(n, lambda a: env[a])
    return g


def _check_shared_weights(module: nn.Module, gm: nn.Module) -> None:
    own = {id(t) for t in (*module.parameters(), *module.buffers())}
    for name, p in gm.named_parameters():
        if id(p) not in own:
            raise GraphError(f"the exported graph holds a copy of parameter {name!r}")


def _probe(t: Traced, values: tuple, reference: Any = None) -> None:
    """Check the trace against the model on two batch sizes; learn which nodes are
    per-sample, and whether the graph draws random numbers on the example (``reference``:
    the model's output on the first probe batch, see :func:`trace`)."""
    batch = batch_size_of(values)
    assert batch is not None
    held = _held(t)
    runs = []
    for first, rows in zip((True, False), probe_rows(batch)):
        inputs = take_rows(values, rows)
        if t.example is None:
            t.example = inputs  # three samples: what partition() checks frontiers on
        with restored_state(t.module), rng.kept(held) as drawn, torch.no_grad():
            rec = _Recorder(t.gm, held)
            out = rec.run(*inputs)
        if first:  # the run random_nodes() makes, on the same example: watched here
            key = mode_key(t.module)
            t.drew[key] = drawn.moved
            if set(drawn.moved) <= set(rng.TORCH_KINDS):  # each node's draws are known
                t.draws[key] = rec.found
        if t.out_spec is not None:
            out = pytree.tree_unflatten(out, t.out_spec)
        given = reference is not None and first
        ref = reference if given else _reference(t, inputs)
        if not same_outputs(ref, out) and (
            not given or not same_outputs(_reference(t, inputs), out)
        ):
            raise GraphError("the traced graph does not reproduce the model's output")
        runs.append((len(rows), rec.values))
    (b1, v1), (b2, v2) = runs
    meta: dict[str, tuple[str, tuple[int, ...] | None]] = {}
    for name, a in v1.items():
        b = v2.get(name)
        if isinstance(a, Tensor) and isinstance(b, Tensor):
            if (
                a.dim() >= 1
                and a.shape[0] == b1
                and b.shape[0] == b2
                and a.shape[1:] == b.shape[1:]
            ):
                meta[name] = ("batch", tuple(a.shape[1:]))
            else:
                meta[name] = ("tensor", None)
        else:
            meta[name] = ("other", None)
    t.meta = meta


def _reference(t: Traced, inputs: tuple[Any, ...]) -> Any:
    """The model's own output on ``inputs`` (no autograd, nothing changed)."""
    with restored_state(t.module), torch.no_grad():
        return call_model(t.module, inputs if not t.keywords else dict(zip(t.input_names, inputs)))


def _held(t: Traced) -> tuple[Any, ...]:
    """The generators a run of ``t``'s graph may draw from besides the global ones: those
    the model holds and those its nodes take as arguments."""
    return rng.generators_of(t.module) + rng.generators_in(
        a for n in t.gm.graph.nodes for a in (*n.args, *n.kwargs.values())
    )


class _DrawWatcher(fx.Interpreter):
    """Runs a graph and notes each node during which a generator moved."""

    def __init__(
        self, gm: fx.GraphModule, generators: tuple[Any, ...], kinds: tuple[str, ...]
    ) -> None:
        super().__init__(gm)
        self.generators, self.kinds = generators, kinds
        self.found: dict[str, tuple[str, ...]] = {}
        self.state = rng.capture(generators, kinds)

    def run_node(self, n: fx.Node) -> Any:
        out = super().run_node(n)
        moved = self.state.moved()
        if moved:
            self.found[n.name] = moved
            self.state = rng.capture(self.generators, self.kinds)
        return out


def _draws(t: Traced, drew: tuple[str, ...] | None = None) -> dict[str, tuple[str, ...]]:
    """:meth:`Traced.random_nodes`, computed: one run of the graph on the example, watched
    node by node where a plain run drew (``drew``: the generators one drew from, when
    known; only those are captured around each node)."""
    if t.example is None or drew == ():
        return {}
    held = _held(t)
    try:
        if drew is None:
            with restored_state(t.module), rng.kept(held) as state, torch.no_grad():
                t.gm(*t.example)  # one plain run first: most graphs draw nothing
            if not state.moved:
                return {}
            drew = state.moved
        with restored_state(t.module), torch.no_grad():
            watcher = _DrawWatcher(t.gm, held, drew)
            watcher.run(*t.example)
    except Exception as e:  # the probe ran it: only a model that changed gets here
        raise GraphError(f"the graph no longer runs: {type(e).__name__}: {_short(e)}") from e
    return watcher.found


class _Recorder(_DrawWatcher):
    """Runs a graph and keeps a small summary (tensors as empty stand-ins) of every value,
    and the nodes during which torch's generators moved (:data:`rng.TORCH_KINDS`)."""

    def __init__(self, gm: fx.GraphModule, generators: tuple[Any, ...]) -> None:
        super().__init__(gm, generators, rng.TORCH_KINDS)
        self.values: dict[str, Any] = {}

    def run_node(self, n: fx.Node) -> Any:
        out = super().run_node(n)
        self.values[n.name] = (
            torch.empty(out.shape, device="meta", dtype=out.dtype)
            if isinstance(out, Tensor)
            else None
        )
        return out
