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

from frostline.api import lora, select
from frostline.core import batchnorm
from frostline.core import lora as core_lora
from frostline.core.freezing import set_module_trainable
from frostline.core.leaves import LeafEntry, leaf_entries, own_named_weights
from frostline.core.lora import Initializer
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
    @overload
    def __getitem__(self, index: str) -> Layer: ...
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

        A leaf path naming a weight owned beside children (``"cls_token"``) gives that
        weight's :class:`OwnWeight` view.

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
        parts = name.split(".")
        for i, part in enumerate(parts):
            kids = layer.layers
            for child in kids:
                if child.name == part:
                    layer = child
                    break
            else:
                if name in kids.names:
                    return kids[name]
                if i == len(parts) - 1 and len(kids):  # a weight owned beside children
                    for own, _ in own_named_weights(layer.module):
                        if own == part:
                            return OwnWeight(
                                layer.module, own, ".".join(p for p in (layer.path, own) if p)
                            )
                known = [p for p, _ in self._module.named_modules() if p]
                known += [e.path for e in leaf_entries(self._module) if e.weight is not None]
                raise ValueError(_unknown_name_message(name, known, repr(self.name)))
        return layer

    def leaf_layers(self) -> list[Layer]:
        """Every leaf layer below, in registration order (what selectors count).

        A module that owns weights and has none below it is a leaf; a weight a module
        owns beside weighted children (ViT ``cls_token``, ConvNeXt ``gamma``) is a leaf
        of its own (an :class:`OwnWeight`, path ``"<module path>.<attribute>"``). Deep
        networks whose direct children are coarse blocks are selected through these
        (see :mod:`frostline.api.select`).

        >>> m = Layer(nn.Sequential(nn.Sequential(nn.Linear(2, 2), nn.ReLU()), nn.Linear(2, 1)))
        >>> [leaf.path for leaf in m.leaf_layers()]
        ['0.0', '1']
        """
        return [leaf_view(e, self.name) for e in leaf_entries(self._module, self._path)]

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

    # -- LoRA ----------------------------------------------------------------------
    @property
    def lora_enabled(self) -> bool:
        """Whether LoRA is enabled on this layer's module (Keras ``layer.lora_enabled``)."""
        return core_lora.is_lora(self._module)

    @property
    def lora_rank(self) -> int | None:
        """The LoRA rank (None without LoRA)."""
        return getattr(self._module, "lora_rank", None) if self.lora_enabled else None

    @property
    def lora_alpha(self) -> float | None:
        """The LoRA alpha; the adapters are scaled by ``lora_alpha / lora_rank`` (None without LoRA)."""
        return getattr(self._module, "lora_alpha", None) if self.lora_enabled else None

    def enable_lora(
        self,
        rank: int,
        selector=None,
        *,
        lora_alpha: float | None = None,
        a_initializer: Initializer = "he_uniform",
        b_initializer: Initializer = "zeros",
    ) -> list[str]:
        """Enable LoRA (Keras 3 semantics) on this layer, or on the leaf layers a selector picks.

        The kernel becomes non-trainable (pinned frozen: ``trainable = True`` later does not
        unfreeze it), ``lora_kernel_a`` (``a_initializer``) and ``lora_kernel_b``
        (``b_initializer``) train, and the layer computes with ``kernel + a @ b *
        (lora_alpha / rank)`` (``lora_alpha`` defaults to ``rank``; an Embedding's adapters
        are ``lora_embeddings_a``/``_b``). Linear, Conv1d/2d/3d and Embedding layers take
        LoRA; ``selector=None`` means every such layer below. Returns the paths enabled.
        See :func:`frostline.api.lora.enable`.

        >>> dense = Layer(nn.Linear(6, 3)); dense.enable_lora(2)
        ['']
        >>> len(dense.trainable_weights), sum(w.numel() for w in dense.trainable_weights)
        (3, 21)
        """
        return lora.enable(
            self,
            rank,
            selector,
            lora_alpha=lora_alpha,
            a_initializer=a_initializer,
            b_initializer=b_initializer,
        )

    def merge_lora(self) -> list[str]:
        """Fold every LoRA adapter below into its kernel (which stays frozen); the paths merged.

        >>> dense = Layer(nn.Linear(2, 2)); _ = dense.enable_lora(1); dense.merge_lora()
        ['']
        >>> dense.lora_enabled, len(dense.weights)
        (False, 2)
        """
        return lora.merge(self)


class OwnWeight(Layer):
    """One weight a module owns beside its children (ViT ``cls_token``, ConvNeXt ``gamma``)
    as a leaf layer: ``module`` is the owner, ``trainable`` is the tensor's own state, and
    setting it never changes the owner's flag.

    >>> class Scaled(nn.Module):
    ...     def __init__(self):
    ...         super().__init__(); self.scale = nn.Parameter(torch.ones(2)); self.lin = nn.Linear(2, 2)
    >>> m = Layer(Scaled()); scale = m.leaf_layers()[0]
    >>> scale.path, scale.class_name, scale.count_params()
    ('scale', 'Parameter', 2)
    >>> scale.trainable = False; m.trainable, m.module.scale.requires_grad
    (True, False)
    """

    def __init__(self, owner: nn.Module, attribute: str, path: str) -> None:
        super().__init__(owner, name=attribute, path=path)
        self._attribute = attribute

    @property
    def tensor(self) -> torch.Tensor:
        """The weight itself."""
        for n, t in own_named_weights(self._module):
            if n == self._attribute:
                return t
        raise AttributeError(
            f"{type(self._module).__name__} at {self._path!r} no longer has a weight {self._attribute!r}"
        )

    @property
    def is_parameter(self) -> bool:
        """False for a buffer (which never trains)."""
        tensor = self.tensor
        return any(p is tensor for p in self._module.parameters(recurse=False))

    @property
    def class_name(self) -> str:
        """``"Parameter"`` or ``"Buffer"``."""
        return "Parameter" if self.is_parameter else "Buffer"

    @property
    def trainable(self) -> bool:
        """True when this weight trains (a buffer never does)."""
        return self.is_parameter and self.tensor.requires_grad

    @trainable.setter
    def trainable(self, value: bool) -> None:
        if not isinstance(value, bool):
            raise TypeError(
                f"trainable must be a bool (True or False), got {type(value).__name__}: {value!r}"
            )
        if self.is_parameter:
            self.tensor.requires_grad_(value)
            if not value:
                self.tensor.grad = None

    @property
    def layers(self) -> LayerList:
        return LayerList([], owner=repr(self.name))

    @property
    def weights(self) -> list[torch.Tensor]:
        return [self.tensor]

    @property
    def trainable_weights(self) -> list[torch.Tensor]:
        return [self.tensor] if self.trainable else []

    @property
    def non_trainable_weights(self) -> list[torch.Tensor]:
        return [] if self.trainable else [self.tensor]

    def leaf_entry(self) -> LeafEntry:
        """This weight as the one leaf selectors see under it."""
        return LeafEntry("", self._module, self._attribute)

    def leaf_layers(self) -> list[Layer]:
        return [self]

    def set_batchnorm_mode(self, mode: str) -> None:
        raise TypeError(f"{self._path!r} is a single weight, not a module with BatchNorm layers")


def leaf_view(entry: LeafEntry, root_name: str | None = None) -> Layer:
    """The layer view of one leaf (a leaf that is the root itself is named ``root_name``).

    >>> leaf_view(LeafEntry("0", nn.Linear(1, 1))).name
    '0'
    """
    path, module = entry
    if entry.weight is not None:
        return OwnWeight(module, entry.weight, path)
    name = path.rsplit(".", 1)[-1] or root_name or snake_case(type(module).__name__)
    return Layer(module, name=name, path=path)


class SequentialModule(nn.Sequential):
    """The module behind ``fl.Sequential`` (a plain ``nn.Sequential`` with named children)."""
