"""Layers: Keras-style views over ``torch.nn.Module`` trees.

A :class:`Layer` never copies its module and keeps no freezing state of its own:
the ``trainable`` flag lives on the module (see :mod:`frostline.core.state`) and in
the parameters' ``requires_grad``, so two wrappers of one module, and plain
PyTorch code training it, always agree.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Iterator, Sequence
from typing import overload

import torch
from torch import nn

from frostline.api import select
from frostline.core import batchnorm
from frostline.core.freezing import set_module_trainable
from frostline.core.state import module_flag, own_weights, tensor_numel, unique_tensors, view_of


def snake_case(name: str) -> str:
    """``"BatchNorm2d"`` -> ``"batch_norm2d"`` (Keras-style default layer names)."""
    s = re.sub(r"(.)([A-Z][a-z]+)", r"\1_\2", name)
    return re.sub(r"([a-z0-9])([A-Z])", r"\1_\2", s).lower()


class LayerList(Sequence["Layer"]):
    """Direct children of a layer: indexable (negative too), sliceable, iterable.

    >>> m = Layer(nn.Sequential(nn.Linear(2, 3), nn.ReLU(), nn.Linear(3, 1)))
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

        >>> m = Layer(nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2)))
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
        model = view_of(module)
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

        >>> m = Layer(nn.Sequential(nn.Sequential(nn.Linear(2, 2)), nn.ReLU()))
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
        these (see :mod:`frostline.api.select`).

        >>> m = Layer(nn.Sequential(nn.Sequential(nn.Linear(2, 2), nn.ReLU()), nn.Linear(2, 1)))
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
        return unique_tensors(t for m in self._module.modules() for t in own_weights(m))

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

        >>> m = Layer(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)))
        >>> m.set_batchnorm_mode("inference")
        """
        batchnorm.set_mode(self._module, mode)

    # -- selection -----------------------------------------------------------------
    def freeze(self, selector=None, *, dry_run: bool = False):
        """Freeze the leaf layers a selector matches (all when None); returns the plan.

        >>> m = Layer(nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2)))
        >>> from frostline import select
        >>> print(m.freeze(select.first(1), dry_run=True).summary_line())
        freeze first(1): 1 layer(s) change, 6 params
        """
        return select.apply(self, selector, False, dry_run=dry_run)

    def unfreeze(self, selector=None, *, dry_run: bool = False, learning_rate: float | None = None):
        """Unfreeze the leaf layers a selector matches; optionally give them their own rate.

        >>> m = Layer(nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2))); m.trainable = False
        >>> from frostline import select
        >>> _ = m.unfreeze(select.last(1)); len(m.trainable_weights)
        2
        """
        return select.apply(self, selector, True, dry_run=dry_run, learning_rate=learning_rate)


class SequentialModule(nn.Sequential):
    """The module behind ``fl.Sequential`` (a plain ``nn.Sequential`` with named children)."""
