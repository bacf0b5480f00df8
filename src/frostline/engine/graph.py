"""The frozen part of any model, found from its dataflow graph.

:func:`trace` records a model's forward as a ``torch.fx`` graph: first with
module-level symbolic tracing (``torch.nn`` layers and timm's no-trace modules stay
``call_module`` nodes, so BatchNorm policy hooks and Conv+BN folding keep working; a
submodule that cannot be traced becomes a leaf of its own), and where that fails with
``torch.export`` (ATen-level; how Hugging Face models trace). Python bools such as
``self.training`` are baked into a trace, so a trace belongs to one set of module modes.

:func:`partition` marks every value that depends only on the inputs, frozen parameters
and buffers, and takes the *frontier*: the frozen, per-sample tensors that trainable
computation (or the output) consumes, one tensor or several (skips, attention masks).
It returns a frozen ``GraphModule`` (inputs -> tuple of frontier tensors) and a
trainable module (frontier tensors -> the model's output) that hold the user's own
submodules and ``nn.Parameter`` objects by reference, so the optimizer, saving and the
user's module see one set of weights. Frozen values that are not per-sample tensors
(shapes, constants computed from frozen weights, non-batch-first tensors) are recomputed
on the trainable side instead of being cached.

Example:
    >>> import torch
    >>> from torch import nn
    >>> class Net(nn.Module):
    ...     def __init__(self):
    ...         super().__init__()
    ...         self.a, self.b, self.head = nn.Linear(4, 4), nn.Linear(4, 2), nn.Linear(4, 2)
    ...     def forward(self, x):
    ...         h = torch.relu(self.a(x))
    ...         return self.head(h) + self.b(h)
    >>> net = Net()
    >>> net.a.requires_grad_(False); net.b.requires_grad_(False)  # doctest: +ELLIPSIS
    Linear(...)
    Linear(...)
    >>> x = torch.randn(3, 4)
    >>> part = partition(trace(net, x))
    >>> part.boundary
    ('relu', 'b')
    >>> torch.allclose(part.trainable(*part.frozen(x)), net(x))
    True
    >>> any(p is net.head.weight for p in part.trainable.parameters())  # the user's own
    True
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import keyword
import math
import operator
import sys
from collections.abc import Callable, Collection, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx
from torch import Tensor, nn
from torch.fx.proxy import Attribute as _FxAttribute
from torch.fx.proxy import TraceError as _TraceError
from torch.utils import _pytree as pytree

from frostline.core import batchnorm
from frostline.core.lora import is_lora
from frostline.engine import rng

__all__ = [
    "GraphError",
    "Partition",
    "RandomnessError",
    "Traced",
    "call_model",
    "inputs_of",
    "mode_key",
    "module_at",
    "bridge",
    "describe_boundary",
    "frozen_calls",
    "joint_frozen",
    "partition",
    "same_outputs",
    "batch_statistics",
    "stochastic_frozen",
    "timm_no_trace",
    "trace",
]


class GraphError(RuntimeError):
    """The model could not be traced or partitioned; ``str(err)`` says why."""


class RandomnessError(GraphError):
    """Randomness stops the trace or the split: the model's own forward draws random
    numbers while it is traced (the draw, or a branch on it, would be baked into the graph),
    or the split would change the order of the model's random draws."""


# --------------------------------------------------------------------------- inputs


def inputs_of(module: nn.Module, x: Any) -> tuple[tuple[str, ...], tuple[Any, ...], bool]:
    """How ``module`` takes the batch ``x``: (argument names, values, as keywords).

    A dict whose keys the module's ``forward`` accepts is passed as keyword arguments
    (``input_ids`` + ``attention_mask``), a tuple as positional arguments, anything else
    (a tensor, a list, a dict the forward takes as one argument) as one argument.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> names, values, kw = inputs_of(nn.Linear(2, 2), torch.zeros(1, 2))
        >>> names, kw
        (('input',), False)
    """
    params = _forward_params(module)
    if isinstance(x, Mapping) and _accepts_keywords(params, list(x)):
        return tuple(str(k) for k in x), tuple(x.values()), True
    if isinstance(x, tuple):
        values = tuple(x)
    else:
        values = (x,)
    positional = [p.name for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    names = tuple(positional[: len(values)])
    if len(names) < len(values):
        names += tuple(f"input_{i}" for i in range(len(names), len(values)))
    return names, values, False


def call_model(module: nn.Module, x: Any) -> Any:
    """Call ``module`` with the batch ``x`` as :func:`inputs_of` reads it.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> call_model(nn.Linear(2, 3), torch.zeros(4, 2)).shape
        torch.Size([4, 3])
    """
    names, values, kw = inputs_of(module, x)
    if kw:
        return module(**dict(zip(names, values)))
    return module(*values)


def _forward_params(module: nn.Module) -> list[inspect.Parameter]:
    try:
        return list(inspect.signature(module.forward).parameters.values())
    except (TypeError, ValueError):
        return []


def _accepts_keywords(params: list[inspect.Parameter], keys: list) -> bool:
    if not keys or not all(isinstance(k, str) for k in keys):
        return False
    if any(p.kind is p.VAR_KEYWORD for p in params):
        return True
    named = {p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
    return set(keys) <= named


def mode_key(module: nn.Module) -> tuple[bool, ...]:
    """Every submodule's ``training`` flag: a trace is valid for one such key.

    Example:
        >>> from torch import nn
        >>> mode_key(nn.Sequential(nn.Linear(1, 1)).eval())
        (False, False)
    """
    return tuple(m.training for m in module.modules())


# --------------------------------------------------------------------------- tracing


def timm_no_trace() -> tuple[tuple[type, ...], tuple[Callable, ...]]:
    """timm's modules and functions that fx must not trace into (its registered leaves).

    A model can hold timm classes only once timm is imported, so timm is never imported
    here (``import frostline`` stays free of timm and what timm imports).

    Example:
        >>> modules, functions = timm_no_trace()
        >>> all(isinstance(m, type) for m in modules) and all(map(callable, functions))
        True
    """
    if "timm" not in sys.modules:  # no timm model without timm imported: skip the import
        return (), ()
    return _timm_no_trace()


@functools.cache
def _timm_no_trace() -> tuple[tuple[type, ...], tuple[Callable, ...]]:
    try:
        from timm.layers._fx import get_notrace_functions, get_notrace_modules
    except ImportError:  # pragma: no cover - timm is a dependency
        return (), ()
    fns = tuple(f for f in get_notrace_functions() if callable(f))
    return tuple(get_notrace_modules()), fns


class _DrewWhileTracing(Exception):
    """A module's Python code drew random numbers while it was traced (``kinds``: which
    generators moved): a trace would bake the draw, or a branch taken on it."""

    def __init__(self, path: str, kinds: tuple[str, ...]) -> None:
        super().__init__(f"{path or 'the model'} draws random numbers ({', '.join(kinds)})")
        self.path, self.kinds = path, kinds


class _Tracer(fx.Tracer):
    """Module-level tracer: torch.nn layers, timm no-trace modules and ``extra`` are leaves.

    With ``watch``, every module it traces through is watched: when a generator moves
    while its Python code runs (``torch.rand(1) >= p``, ``random.random() < 0.5``), tracing
    stops with :class:`_DrewWhileTracing` for that module, which the caller then makes a
    leaf (it runs as written, drawing afresh at every call). A trace runs unwatched first
    and again watched only when a generator moved."""

    def __init__(
        self, extra_leaves: set[str], generators: tuple[Any, ...] = (), watch: bool = False
    ) -> None:
        leaves, fns = timm_no_trace()
        super().__init__(autowrap_functions=fns)
        self.timm_leaves = leaves
        self.extra_leaves = extra_leaves
        self.generators = generators
        self.watch = watch  # capture the generators around every module call
        self.stack: list[str] = []

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        if module_qualified_name in self.extra_leaves:
            return True
        if is_lora(m):  # called whole: a graph never holds a LoRA state enable/merge changes
            return True
        if self.timm_leaves and isinstance(m, self.timm_leaves):
            return True
        return super().is_leaf_module(m, module_qualified_name)

    def call_module(self, m: nn.Module, forward: Callable, args: Any, kwargs: Any) -> Any:
        path = self.path_of_module(m)
        self.stack.append(path)
        if not self.watch:
            out = super().call_module(m, forward, args, kwargs)
            self.stack.pop()
            return out
        before = rng.capture(self.generators)
        out = super().call_module(m, forward, args, kwargs)
        moved = before.moved()
        if moved:  # the stack keeps ``path`` on top: the caller makes it a leaf
            before.restore()
            raise _DrewWhileTracing(_strip(path), moved)
        self.stack.pop()
        return out


# ----------------------------------------------------------- fx with example values


_STATIC_ATTRS = frozenset({"shape", "ndim", "dtype", "device", "is_cuda", "layout", "is_sparse"})
_STATIC_METHODS = frozenset({"size", "dim", "numel", "nelement", "is_floating_point"})
_STATIC_METHODS |= {"is_complex", "element_size", "get_device", "is_contiguous"}
_CONCRETE_ATTRS = frozenset({"ndim", "dtype", "device", "is_cuda", "layout", "is_sparse"})


class _ValueProxy(fx.Proxy):
    """A proxy that also holds the value it takes on the example batch.

    ``static`` values come from tensor metadata only (shapes, ranks, dtypes) and
    Python arithmetic on them: Python control flow may read those (``if x.ndim < 4``).
    Control flow on anything computed from tensor contents stays an error.
    """

    value: Any = None
    static: bool = False

    def __getattr__(self, k: str) -> Any:
        if k.startswith("__") or k in ("value", "static"):
            raise AttributeError(k)
        tracer = self.tracer
        assert isinstance(tracer, _ValueTracer)
        try:
            v = getattr(self.value, k)
        except AttributeError:
            return _FxAttribute(self, k)
        if callable(v):
            return _FxAttribute(self, k)  # a method: recorded when called
        if k in _CONCRETE_ATTRS and isinstance(self.value, Tensor):
            return v  # fixed for a trace (rank, dtype, device): not recorded
        return tracer.create_proxy("call_function", getattr, (self, k), {})

    def __len__(self) -> int:
        if self.static:
            return len(self.value)
        raise _TraceError("len() of a traced tensor")

    def __index__(self) -> int:
        if self.static and isinstance(self.value, int):
            return int(self.value)
        raise _TraceError("a traced value used as a Python integer")

    def __int__(self) -> int:
        return self.__index__()


def _value_of(a: Any) -> Any:
    if isinstance(a, _ValueProxy):
        return a.value
    if isinstance(a, _FxAttribute):
        return getattr(_value_of(a.root), a.attr)
    if isinstance(a, fx.Proxy):
        raise _TraceError(f"no example value for {a}")
    return a


def _is_static(a: Any) -> bool:
    ok = True

    def visit(x: Any) -> None:
        nonlocal ok
        if isinstance(x, fx.Proxy) and not (isinstance(x, _ValueProxy) and x.static):
            ok = False

    pytree.tree_map_(visit, a)
    return ok


class _ValueTracer(_Tracer):
    """Module-level fx tracing that runs every recorded operation on the example batch.

    Where plain ``torch.fx`` stops at Python control flow on shapes (Hugging Face's
    ``if attention_mask.ndim < 4``, slicing a buffer to ``seq_length``), this tracer
    knows the example's value and takes the branch it takes; the trace is then checked
    on two batch sizes (:func:`_probe`) like any other.
    """

    proxy_buffer_attributes = True

    def __init__(
        self,
        extra_leaves: set[str],
        inputs: dict[str, Any],
        generators: tuple[Any, ...] = (),
        watch: bool = False,
    ) -> None:
        super().__init__(extra_leaves, generators, watch)
        self.inputs = inputs
        self.concrete = 0  # > 0 while computing an example value: plain calls, no recording

    def call_module(self, m: nn.Module, forward: Callable, args: Any, kwargs: Any) -> Any:
        if self.concrete:
            return forward(*args, **kwargs)
        return super().call_module(m, forward, args, kwargs)

    def getattr(self, attr: str, attr_val: Any, parameter_proxy_cache: dict[str, Any]) -> Any:
        if self.concrete:
            return attr_val
        return super().getattr(attr, attr_val, parameter_proxy_cache)

    def proxy(self, node: fx.Node) -> fx.Proxy:
        return _ValueProxy(node, self)

    def create_proxy(
        self, kind, target, args, kwargs, name=None, type_expr=None, proxy_factory_fn=None
    ):  # type: ignore[override]
        proxy = super().create_proxy(kind, target, args, kwargs, name, type_expr, None)
        assert isinstance(proxy, _ValueProxy)
        static = False
        if kind == "placeholder":
            value = self.inputs[str(target)]
        elif kind == "get_attr":
            self.concrete += 1
            try:
                value = _fetch(self.root, str(target))
            finally:
                self.concrete -= 1
        else:
            a = pytree.tree_map(_value_of, args)
            kw = pytree.tree_map(_value_of, kwargs)
            self.concrete += 1
            try:  # a recorded operation draws when the graph runs, not while it is traced
                with rng.kept(self.generators):
                    value, static = self._run(kind, target, args, kwargs, a, kw)
            finally:
                self.concrete -= 1
        proxy.value, proxy.static = value, static
        return proxy

    def _run(self, kind: str, target: Any, args: Any, kwargs: Any, a: Any, kw: Any) -> Any:
        """The operation's value on the example, and whether it is static (shape-only)."""
        if kind == "call_function":
            value = target(*a, **kw)
            if target is getattr:
                return value, args[1] in _STATIC_ATTRS
            return value, not isinstance(value, Tensor) and _is_static((args, kwargs))
        if kind == "call_method":
            value = getattr(a[0], str(target))(*a[1:], **kw)
            static = (str(target) in _STATIC_METHODS) or (
                not isinstance(value, Tensor) and _is_static((args, kwargs))
            )
            return value, static
        return self.root.get_submodule(str(target))(*a, **kw), False  # call_module

    def to_bool(self, obj: fx.Proxy) -> bool:
        if isinstance(obj, _ValueProxy) and obj.static:
            return bool(obj.value)
        raise _TraceError("Python control flow on a value computed from tensor contents")

    def iter(self, obj: fx.Proxy):
        if isinstance(obj, _ValueProxy) and obj.static:
            items: Any = obj
            return iter([items[i] for i in range(len(obj.value))])
        return super().iter(obj)


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
            found = self.draws[key] = _draws(self)
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
                if n.op == "get_attr" and _fetch(self.gm, target) is not _fetch(root, target):
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
    module: nn.Module, example: Any, *, max_leaves: int = 32, like: Traced | None = None
) -> Traced:
    """Trace ``module`` as called with ``example`` (one batch of at least one sample).

    Tries module-level ``torch.fx`` first, making a submodule that fails to trace a leaf
    (up to ``max_leaves`` times), then ``torch.export`` with a dynamic batch dimension.
    ``like``, an earlier trace of the same module (in other modes), is where to start:
    its tracer first, with its leaves (the tracers that failed then are tried last).
    The trace is checked against the real forward on ``example`` (and on one sample
    fewer) and probed for which values are per-sample tensors.

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
    batch = _batch_size(values)
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
            _probe(t, values)
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
    """Module-level fx; with ``example``, the :class:`_ValueTracer` (flat outputs).
    The submodules in ``start`` are leaves from the first attempt (an earlier trace's)."""
    root = _root_for(module, names, kw, flat=example is not None)
    leaves: set[str] = set(start)
    generators = rng.generators_of(module)
    watch = False  # each module is watched once a trace drew somewhere
    for _ in range(max_leaves + 2):
        if example is None:
            tracer = _Tracer(leaves, generators, watch)
        else:
            tracer = _ValueTracer(leaves, dict(zip(names, example)), generators, watch)
        state = _restored_state(module)
        try:
            grad = torch.no_grad() if example is not None else contextlib.nullcontext()
            with state, grad:
                graph = tracer.trace(root)
        except Exception as e:
            inner = [p for p in tracer.stack if p not in leaves]
            if not inner or inner[-1] in ("", "model"):
                if isinstance(e, _DrewWhileTracing):
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
    with _restored_state(module) as watch:
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


class _restored_state:
    """Buffers and every random number generator (:mod:`frostline.engine.rng`, with those
    the model holds) put back as they were: probes must not change the model, nor what
    its training draws. ``moved`` then says which generators the block drew from."""

    def __init__(self, module: nn.Module) -> None:
        self.module = module
        self.moved: tuple[str, ...] = ()

    def __enter__(self) -> _restored_state:
        self.buffers = [(b, b.detach().clone()) for b in self.module.buffers()]
        self.rng = rng.kept(rng.generators_of(self.module))
        self.rng.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self.rng.__exit__(None, None, None)
        self.moved = self.rng.moved
        with torch.no_grad():
            for b, saved in self.buffers:
                if b.shape == saved.shape and not torch.equal(b, saved):
                    b.copy_(saved)


def _batch_size(values: Iterable[Any]) -> int | None:
    for v in pytree.tree_leaves(list(values)):
        if isinstance(v, Tensor) and v.dim() >= 1:
            return int(v.shape[0])
    return None


def _take(values: tuple, rows: Tensor) -> tuple:
    return tuple(
        pytree.tree_map(
            lambda v: v[rows.to(v.device)] if isinstance(v, Tensor) and v.dim() else v, v
        )
        for v in values
    )


def _probe_rows(batch: int) -> tuple[Tensor, Tensor]:
    return torch.arange(3) % batch, torch.arange(2) % batch


def _probe(t: Traced, values: tuple) -> None:
    """Check the trace against the model on two batch sizes; learn which nodes are per-sample."""
    batch = _batch_size(values)
    assert batch is not None
    runs = []
    for rows in _probe_rows(batch):
        inputs = _take(values, rows)
        if t.example is None:
            t.example = inputs  # three samples: what partition() checks frontiers on
        with _restored_state(t.module), torch.no_grad():
            ref = call_model(
                t.module, inputs if not t.keywords else dict(zip(t.input_names, inputs))
            )
        with _restored_state(t.module), torch.no_grad():
            rec = _Recorder(t.gm)
            out = rec.run(*inputs)
        if t.out_spec is not None:
            out = pytree.tree_unflatten(out, t.out_spec)
        if not same_outputs(ref, out):
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


class _DrawWatcher(fx.Interpreter):
    """Runs a graph and notes each node during which a generator moved."""

    def __init__(self, gm: fx.GraphModule, generators: tuple[Any, ...]) -> None:
        super().__init__(gm)
        self.generators = generators
        self.found: dict[str, tuple[str, ...]] = {}
        self.state = rng.capture(generators)

    def run_node(self, n: fx.Node) -> Any:
        out = super().run_node(n)
        moved = self.state.moved()
        if moved:
            self.found[n.name] = moved
            self.state = rng.capture(self.generators)
        return out


def _draws(t: Traced) -> dict[str, tuple[str, ...]]:
    """:meth:`Traced.random_nodes`, computed: one run of the graph on the example."""
    if t.example is None:
        return {}
    held = rng.generators_of(t.module) + rng.generators_in(
        a for n in t.gm.graph.nodes for a in (*n.args, *n.kwargs.values())
    )
    try:
        with _restored_state(t.module) as state, torch.no_grad():
            t.gm(*t.example)  # one plain run first: most graphs draw nothing
        if not state.moved:
            return {}
        with _restored_state(t.module), torch.no_grad():
            watcher = _DrawWatcher(t.gm, held)
            watcher.run(*t.example)
    except Exception as e:  # the probe ran it: only a model that changed gets here
        raise GraphError(f"the graph no longer runs: {type(e).__name__}: {_short(e)}") from e
    return watcher.found


class _Recorder(fx.Interpreter):
    """Runs a graph and keeps a small summary (tensors as empty stand-ins) of every value."""

    def __init__(self, gm: fx.GraphModule) -> None:
        super().__init__(gm)
        self.values: dict[str, Any] = {}

    def run_node(self, n: fx.Node) -> Any:
        out = super().run_node(n)
        self.values[n.name] = (
            torch.empty(out.shape, device="meta", dtype=out.dtype)
            if isinstance(out, Tensor)
            else None
        )
        return out


def same_outputs(ref: Any, y: Any, rtol: float = 1e-4, atol: float = 1e-5) -> bool:
    """Tensors, or dicts/lists/tuples/ModelOutputs of them, equal within tolerance.

    Example:
        >>> import torch
        >>> same_outputs({"a": torch.ones(2)}, {"a": torch.ones(2)})
        True
        >>> same_outputs(torch.ones(2), torch.zeros(2))
        False
    """
    if isinstance(ref, Tensor):
        if not isinstance(y, Tensor) or ref.shape != y.shape or ref.dtype != y.dtype:
            return False
        if not ref.is_floating_point() and not ref.is_complex():
            return bool(torch.equal(ref, y))
        return bool(torch.allclose(ref, y, rtol=rtol, atol=atol, equal_nan=True))
    if isinstance(ref, Mapping):
        return (
            isinstance(y, Mapping)
            and list(ref) == list(y)
            and all(same_outputs(ref[k], y[k], rtol, atol) for k in ref)
        )
    if isinstance(ref, list | tuple):
        return (
            isinstance(y, list | tuple)
            and len(ref) == len(y)
            and all(same_outputs(a, b, rtol, atol) for a, b in zip(ref, y))
        )
    return ref == y if isinstance(ref, int | float | bool | str | type(None)) else False


# ------------------------------------------------------------------------ partition

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
    batch = _batch_size(values)
    if batch is None:
        return None
    inputs = _take(values, _probe_rows(batch)[0])
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
        tracer = _Tracer(set())
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
    state = _restored_state(module)
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
    watch = _watched_run(module, example, _batch_size(values) or 0)
    return [m for m, ok in watch.calls.items() if ok and m is not module and m not in watch.movable]


def _runs_inference(m: nn.Module) -> bool:
    """A BatchNorm whose policy makes it use running statistics even in train mode."""
    return batchnorm.is_batchnorm(m) and batchnorm.runs_inference(m)


def _arg(n: fx.Node, pos: int, name: str, default: Any) -> Any:
    if name in n.kwargs:
        return n.kwargs[name]
    return n.args[pos] if len(n.args) > pos else default


def _batch_statistics_op(n: fx.Node, root: nn.Module, named: dict[str, nn.Module]) -> str | None:
    """Why node ``n`` normalises with batch statistics (None when it does not); ``named``:
    see :func:`module_at`."""
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


def _inplace(n: fx.Node, root: nn.Module, named: dict[str, nn.Module]) -> bool:
    """Whether ``n`` writes into its first argument; ``named``: see :func:`module_at`."""
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


def module_at(named: Mapping[str, nn.Module], root: nn.Module, path: str) -> nn.Module:
    """``root.get_submodule(path)``, read from ``named`` (``root.named_modules()``, one walk
    of the tree instead of one per path) when there.

    Example:
        >>> from torch import nn
        >>> net = nn.Sequential(nn.Linear(2, 2), nn.Sequential(nn.ReLU()))
        >>> module_at(dict(net.named_modules()), net, "1.0") is net[1][0]
        True
        >>> module_at({}, net, "0") is net[0]  # not listed: looked up in the tree
        True
    """
    m = named.get(path)
    return m if m is not None else root.get_submodule(path)


def _fetch(root: nn.Module, target: str) -> Any:
    obj: Any = root
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


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
            v = _fetch(gm, str(n.target))
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
        if n in frozen_side and _inplace(n, gm, named) and n.args:
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
        stats = stats or _batch_statistics_op(n, gm, named)
        if stateful is None and _inplace(n, gm, named) and n.args:
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
                target = n.args[0] if n.args and _inplace(n, gm, named) else None
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
            kind == "batch" and n not in forced and not _inplace(n, gm, named)
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
    with _restored_state(traced.module), torch.no_grad():
        a = tuple(frozen_gm(*example))
        b = frozen_gm(*_take(example, torch.tensor([1, 2])))
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
    runs over the stored frontier instead of the raw data. ``None`` when the new frontier
    needs anything but the old frontier (a raw input, another trace).

    Example:
        >>> import torch
        >>> from torch import nn
        >>> net = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 4), nn.Linear(4, 2))
        >>> t = trace(net, torch.randn(3, 4))
        >>> _ = net[:3].requires_grad_(False); deep = partition(t)
        >>> _ = net[2].requires_grad_(True); shallow = partition(t)
        >>> step = bridge(shallow, deep)
        >>> x = torch.randn(3, 4)
        >>> torch.allclose(step(*shallow.run_frozen(x))[0], deep.run_frozen(x)[0])
        True
    """
    if old.traced is not new.traced:
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


def _strip(path: str) -> str:
    return path[len("model.") :] if path.startswith("model.") else ("" if path == "model" else path)


def _describe(gm: fx.GraphModule, n: fx.Node) -> str:
    if n.op == "placeholder":
        return f"input:{n.target}"
    if n.op == "call_module":
        return _strip(str(n.target))
    scope = [p for p in map(_strip, _scope(n)) if p]
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
    return tuple(sorted(_strip(p) for p, ok in state.items() if ok and _strip(p)))


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
