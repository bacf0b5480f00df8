"""The fx tracers of the frozen part: module-level tracing that keeps torch.nn layers,
timm's no-trace modules and modules that draw random numbers while traced whole, and
the tracer that also runs every recorded operation on an example batch (after timm's
``timm/layers/_fx.py``)."""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable
from typing import Any

import torch.fx as fx
from torch import Tensor, nn
from torch.fx.proxy import Attribute as _FxAttribute
from torch.fx.proxy import TraceError as _TraceError
from torch.utils import _pytree as pytree

from frostline.core.lora import is_lora
from frostline.engine import rng
from frostline.engine.frozen.calling import fetch, strip_root

__all__ = ["DrewWhileTracing", "Tracer", "ValueTracer", "timm_no_trace"]


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


class DrewWhileTracing(Exception):
    """A module's Python code drew random numbers while it was traced (``kinds``: which
    generators moved): a trace would bake the draw, or a branch taken on it.

    Example:
        >>> str(DrewWhileTracing("aug", ("Python random",)))
        'aug draws random numbers (Python random)'
    """

    def __init__(self, path: str, kinds: tuple[str, ...]) -> None:
        super().__init__(f"{path or 'the model'} draws random numbers ({', '.join(kinds)})")
        self.path, self.kinds = path, kinds


class Tracer(fx.Tracer):
    """Module-level tracer: torch.nn layers, timm no-trace modules and ``extra`` are leaves.

    With ``watch``, every module it traces through is watched: when a generator moves
    while its Python code runs (``torch.rand(1) >= p``, ``random.random() < 0.5``), tracing
    stops with :class:`DrewWhileTracing` for that module, which the caller then makes a
    leaf (it runs as written, drawing afresh at every call). A trace runs unwatched first
    and again watched only when a generator moved.

    Example:
        >>> from torch import nn
        >>> net = nn.Sequential(nn.Linear(2, 2), nn.ReLU())
        >>> [n.op for n in Tracer(set()).trace(net).nodes]
        ['placeholder', 'call_module', 'call_module', 'output']
    """

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
            raise DrewWhileTracing(strip_root(path), moved)
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
        assert isinstance(tracer, ValueTracer)
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


class ValueTracer(Tracer):
    """Module-level fx tracing that runs every recorded operation on the example batch.

    Where plain ``torch.fx`` stops at Python control flow on shapes (Hugging Face's
    ``if attention_mask.ndim < 4``, slicing a buffer to ``seq_length``), this tracer
    knows the example's value and takes the branch it takes; the trace is then checked
    on two batch sizes (:func:`~frostline.engine.frozen.traced.trace`) like any other.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> class Rank(nn.Module):
        ...     def forward(self, x):
        ...         return x * 2 if x.ndim == 2 else x
        >>> graph = ValueTracer(set(), {"x": torch.ones(3, 2)}).trace(Rank())
        >>> [n.op for n in graph.nodes]
        ['placeholder', 'call_function', 'output']
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
                value = fetch(self.root, str(target))
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
