"""Layers: Keras-style views over ``torch.nn.Module`` trees.

A :class:`Layer` never copies its module and keeps no freezing state of its own:
the ``trainable`` flag lives on the module (``module._frostline_trainable``) and in
the parameters' ``requires_grad``, so two wrappers of one module, and plain
PyTorch code training it, always agree.
"""

from __future__ import annotations

import difflib
import re
import weakref
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, overload

import torch
from torch import nn

from frostline import batchnorm

if TYPE_CHECKING:
    from frostline.model import Model

_FLAG = "_frostline_trainable"

# module -> weakref(Model): a module wrapped as a Model shows up as that Model when it
# is a child of another layer (a nested Model is one layer, as in Keras).
_MODEL_OF: weakref.WeakKeyDictionary[nn.Module, weakref.ReferenceType] = weakref.WeakKeyDictionary()


def snake_case(name: str) -> str:
    """``"BatchNorm2d"`` -> ``"batch_norm2d"`` (Keras-style default layer names)."""
    s = re.sub(r"(.)([A-Z][a-z]+)", r"\1_\2", name)
    return re.sub(r"([a-z0-9])([A-Z])", r"\1_\2", s).lower()


def is_weight_buffer(tensor: torch.Tensor | None) -> bool:
    """Floating-point buffers (BatchNorm running statistics) are weights; integer ones are not."""
    return tensor is not None and (tensor.is_floating_point() or tensor.is_complex())


def own_weights(module: nn.Module) -> list[torch.Tensor]:
    """The weights a module owns directly: its parameters, then its float buffers."""
    out: list[torch.Tensor] = [p for p in module.parameters(recurse=False)]
    out += [b for b in module.buffers(recurse=False) if is_weight_buffer(b)]
    return out


def module_flag(module: nn.Module) -> bool:
    """The module's own ``trainable`` flag.

    Never set: derived from ``requires_grad`` (False only when it has parameters and
    none of them requires grad), so a model frozen in plain PyTorch reads as frozen.
    """
    flag = module.__dict__.get(_FLAG)
    if flag is not None:
        return flag
    params = list(module.parameters())
    return not params or any(p.requires_grad for p in params)


def set_module_trainable(module: nn.Module, value: bool, *, recurse: bool = True) -> None:
    """Set the trainable flag (and ``requires_grad``) of ``module`` and, by default, its subtree.

    Freezing also drops ``.grad``: a frozen parameter owns no gradient buffer, so even a
    stale optimizer in a hand-written loop (any ``zero_grad`` style) cannot move it.

    >>> lin = nn.Linear(2, 2); set_module_trainable(lin, False); lin.weight.requires_grad
    False
    """
    if not isinstance(value, bool):
        raise TypeError(
            f"trainable must be a bool (True or False), got {type(value).__name__}: {value!r}"
        )
    modules = list(module.modules()) if recurse else [module]
    for m in modules:
        m.__dict__[_FLAG] = value
        for p in m.parameters(recurse=False):
            p.requires_grad_(value)
            if not value:
                p.grad = None
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            batchnorm.install(m)


def _unique(tensors: Iterator[torch.Tensor] | list[torch.Tensor]) -> list[torch.Tensor]:
    seen: set[int] = set()
    out = []
    for t in tensors:
        if id(t) not in seen:
            seen.add(id(t))
            out.append(t)
    return out


def tensor_numel(tensors: Sequence[torch.Tensor]) -> int:
    return sum(t.numel() for t in tensors)


class LayerList(Sequence["Layer"]):
    """Direct children of a layer: indexable (negative too), sliceable, iterable.

    >>> m = wrap(nn.Sequential(nn.Linear(2, 3), nn.ReLU(), nn.Linear(3, 1)))
    >>> [layer.name for layer in m.layers[-2:]]
    ['1', '2']
    """

    def __init__(self, items: list[Layer], owner: str = "model") -> None:
        self._items = items
        self._owner = owner

    def __len__(self) -> int:
        return len(self._items)

    @overload
    def __getitem__(self, index: int) -> Layer: ...
    @overload
    def __getitem__(self, index: slice) -> LayerList: ...
    def __getitem__(self, index):  # type: ignore[override]
        if isinstance(index, slice):
            return LayerList(self._items[index], self._owner)
        if isinstance(index, str):
            for item in self._items:
                if item.name == index:
                    return item
            raise KeyError(_unknown_name_message(index, [i.name for i in self._items], self._owner))
        if isinstance(index, bool) or not hasattr(index, "__index__"):
            raise TypeError(f"layer index must be an int or a slice, got {type(index).__name__}")
        index = index.__index__()  # NumPy / torch integers index like Python ints (as in a list)
        n = len(self._items)
        if not -n <= index < n:
            raise IndexError(
                f"layer index {index} is out of range for {self._owner}, which has {n} layers "
                f"(valid: {-n}..{n - 1})"
                if n
                else f"{self._owner} has no layers"
            )
        return self._items[index]

    def __iter__(self) -> Iterator[Layer]:
        return iter(self._items)

    def __repr__(self) -> str:
        return "LayerList([" + ", ".join(repr(i) for i in self._items) + "])"

    @property
    def names(self) -> list[str]:
        return [i.name for i in self._items]


def _unknown_name_message(name: str, known: list[str], owner: str) -> str:
    close = difflib.get_close_matches(name, known, n=5, cutoff=0.5)
    hint = f" Closest: {', '.join(close)}." if close else ""
    shown = ", ".join(known[:20]) + (f", ... ({len(known)} in all)" if len(known) > 20 else "")
    return f"no layer named {name!r} in {owner}.{hint} Layers: {shown or '(none)'}"


class Layer:
    """A Keras-style view of a ``torch.nn.Module`` (never a copy).

    >>> layer = Layer(nn.Linear(4, 2), name="dense")
    >>> layer.count_params(), layer.trainable
    (10, True)
    >>> layer.trainable = False
    >>> len(layer.trainable_weights), len(layer.non_trainable_weights)
    (0, 2)
    """

    def __init__(self, module: nn.Module, name: str | None = None, path: str = "") -> None:
        if not isinstance(module, nn.Module):
            raise TypeError(
                f"expected a torch.nn.Module, got {type(module).__module__}.{type(module).__name__}"
            )
        self._module = module
        self._name = name if name is not None else snake_case(type(module).__name__)
        self._path = path
        self._children: LayerList | None = None

    # -- identity ------------------------------------------------------------------
    @property
    def name(self) -> str:
        """The layer's name: for a child, its attribute name in the parent."""
        return self._name

    @property
    def path(self) -> str:
        """Dotted path from the root that this view was reached from (``""`` for a root)."""
        return self._path

    @property
    def class_name(self) -> str:
        """The module's class name, like TF.js ``getClassName()``: ``"Conv2d"``."""
        return type(self._module).__name__

    @property
    def module(self) -> nn.Module:
        """The underlying ``torch.nn.Module`` (the same object)."""
        return self._module

    def __repr__(self) -> str:
        return (
            f"<{type(self).__name__} {self.name!r} ({self.class_name}) trainable={self.trainable}>"
        )

    # -- trainable -----------------------------------------------------------------
    @property
    def trainable(self) -> bool:
        """The layer's own flag. Setting it sets every descendant and ``requires_grad``.

        >>> m = wrap(nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2)))
        >>> m.trainable = False; m.layers[1].trainable = True
        >>> m.trainable, len(m.trainable_weights)
        (False, 2)
        """
        return module_flag(self._module)

    @trainable.setter
    def trainable(self, value: bool) -> None:
        set_module_trainable(self._module, value)

    # -- structure -----------------------------------------------------------------
    def _child_view(self, name: str, module: nn.Module) -> Layer:
        ref = _MODEL_OF.get(module)
        model = ref() if ref is not None else None
        if model is not None:
            return model
        path = f"{self._path}.{name}" if self._path else name
        return Layer(module, name=name, path=path)

    @property
    def layers(self) -> LayerList:
        """Direct children, as layers (a wrapped nested Model appears as that Model)."""
        children = list(self._module.named_children())
        cached = self._children
        if cached is None or [c.module for c in cached] != [m for _, m in children]:
            self._children = LayerList(
                [self._child_view(n, m) for n, m in children], owner=repr(self.name)
            )
        return self._children  # type: ignore[return-value]

    def get_layer(self, name: str | None = None, index: int | None = None) -> Layer:
        """One descendant by (dotted) ``name`` or by ``index`` among direct children.

        >>> m = wrap(nn.Sequential(nn.Sequential(nn.Linear(2, 2)), nn.ReLU()))
        >>> m.get_layer("0.0").class_name, m.get_layer(index=-1).class_name
        ('Linear', 'ReLU')
        """
        if (name is None) == (index is None):
            raise ValueError(
                "get_layer takes exactly one of name= or index= "
                f"(got name={name!r}, index={index!r})"
            )
        if index is not None:
            return self.layers[index]
        if not isinstance(name, str):
            raise TypeError(f"get_layer name must be a str, got {type(name).__name__}")
        layer: Layer = self
        for part in name.split("."):
            kids = layer.layers
            for child in kids:
                if child.name == part:
                    layer = child
                    break
            else:
                if name in kids.names:
                    return kids[name]
                known = [p for p, _ in self._module.named_modules() if p]
                raise ValueError(_unknown_name_message(name, known, repr(self.name)))
        return layer

    def leaf_layers(self) -> list[Layer]:
        """Every module below that owns weights directly, in registration order.

        Deep networks whose direct children are coarse blocks are selected through
        these (see :mod:`frostline.select`).

        >>> m = wrap(nn.Sequential(nn.Sequential(nn.Linear(2, 2), nn.ReLU()), nn.Linear(2, 1)))
        >>> [leaf.path for leaf in m.leaf_layers()]
        ['0.0', '1']
        """
        out = []
        for path, module in self._module.named_modules():
            if own_weights(module):
                full = ".".join(p for p in (self._path, path) if p)
                out.append(Layer(module, name=path.rsplit(".", 1)[-1] or self.name, path=full))
        return out

    # -- weights -------------------------------------------------------------------
    @property
    def weights(self) -> list[torch.Tensor]:
        """Parameters and floating-point buffers of the subtree, each tensor once."""
        return _unique(t for m in self._module.modules() for t in own_weights(m))

    @property
    def trainable_weights(self) -> list[torch.Tensor]:
        """Exactly what ``fit`` trains: parameters that require grad."""
        params = {id(p) for p in self._module.parameters() if p.requires_grad}
        return [t for t in self.weights if id(t) in params]

    @property
    def non_trainable_weights(self) -> list[torch.Tensor]:
        """Frozen parameters and all floating-point buffers."""
        params = {id(p) for p in self._module.parameters() if p.requires_grad}
        return [t for t in self.weights if id(t) not in params]

    def count_params(self) -> int:
        """Number of scalars in ``weights``."""
        return tensor_numel(self.weights)

    # -- batchnorm policy ----------------------------------------------------------
    def set_batchnorm_mode(self, mode: str) -> None:
        """How the BatchNorm layers below run while the model trains.

        ``"auto"`` (default): inference mode while frozen, batch statistics while
        trainable. ``"batch_stats"``: always follow ``train()``, frozen or not (fastai
        ``train_bn`` style). ``"inference"``: always running statistics, even while
        trainable (Keras' ``base(x, training=False)`` advice).

        >>> m = wrap(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)))
        >>> m.set_batchnorm_mode("inference")
        """
        batchnorm.set_mode(self._module, mode)

    # -- selection -----------------------------------------------------------------
    def freeze(self, selector=None, *, dry_run: bool = False):
        """Freeze the leaf layers a selector matches (all when None); returns the plan.

        >>> m = wrap(nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2)))
        >>> from frostline import select
        >>> print(m.freeze(select.first(1), dry_run=True).summary_line())
        freeze first(1): 1 layer(s) change, 6 params
        """
        from frostline import select

        return select.apply(self, selector, False, dry_run=dry_run)

    def unfreeze(self, selector=None, *, dry_run: bool = False, learning_rate: float | None = None):
        """Unfreeze the leaf layers a selector matches; optionally give them their own rate.

        >>> m = wrap(nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2))); m.trainable = False
        >>> from frostline import select
        >>> _ = m.unfreeze(select.last(1)); len(m.trainable_weights)
        2
        """
        from frostline import select

        return select.apply(self, selector, True, dry_run=dry_run, learning_rate=learning_rate)


def wrap(module: nn.Module, name: str | None = None) -> Model:
    """Wrap any ``torch.nn.Module`` as a frostline :class:`~frostline.model.Model`.

    >>> import frostline as fl
    >>> model = fl.wrap(nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2)))
    >>> model.count_params()
    58
    """
    from frostline.model import Model

    if isinstance(module, Layer):
        module = module.module
    return Model(module, name=name)


def _register_model(module: nn.Module, model: Model) -> None:
    _MODEL_OF[module] = weakref.ref(model)
