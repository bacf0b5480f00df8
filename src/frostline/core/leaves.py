"""Leaf layers: the units selectors count, freeze and report.

A module that owns weights and has none below it is one leaf. A module that owns
weights *beside* weighted children (ViT's ``cls_token`` and ``pos_embed``, ConvNeXt's
layer-scale ``gamma``, a BERT LM head's ``bias``) contributes one leaf per such
weight, named by its attribute path, so that every weight sits in exactly one leaf
and selecting it never touches the owner's own flag.

>>> from torch import nn
>>> [e.path for e in leaf_entries(nn.Sequential(nn.Linear(2, 2), nn.ReLU(), nn.Linear(2, 1)))]
['0', '2']
"""

from __future__ import annotations

import torch
from torch import nn

from frostline.core.state import has_weighted_descendant, is_weight_buffer, module_flag, own_weights

__all__ = [
    "LeafEntry",
    "is_module_leaf",
    "leaf_entries",
    "leaf_state",
    "own_named_weights",
]


def own_named_weights(module: nn.Module) -> list[tuple[str, torch.Tensor]]:
    """``(attribute name, tensor)`` for each weight the module owns directly.

    >>> [n for n, _ in own_named_weights(nn.BatchNorm1d(2))]
    ['weight', 'bias', 'running_mean', 'running_var']
    """
    out: list[tuple[str, torch.Tensor]] = list(module.named_parameters(recurse=False))
    out += [(n, b) for n, b in module.named_buffers(recurse=False) if is_weight_buffer(b)]
    return out


def is_module_leaf(module: nn.Module) -> bool:
    """A module that owns weights and has no weights below it: one leaf layer.

    >>> is_module_leaf(nn.Linear(1, 1)), is_module_leaf(nn.Sequential(nn.Linear(1, 1)))
    (True, False)
    """
    return bool(own_weights(module)) and not has_weighted_descendant(module)


class LeafEntry(tuple):
    """One leaf: a ``(path, module)`` pair, plus ``weight``, the attribute name when the leaf
    is a single weight its module owns beside weighted children (else None).

    >>> e = LeafEntry("blocks.0.gamma", nn.Linear(1, 1), "weight"); e.path, e.weight
    ('blocks.0.gamma', 'weight')
    """

    weight: str | None

    def __new__(cls, path: str, module: nn.Module, weight: str | None = None) -> LeafEntry:
        self = super().__new__(cls, (path, module))
        self.weight = weight
        return self

    @property
    def path(self) -> str:
        return self[0]

    @property
    def module(self) -> nn.Module:
        return self[1]

    @property
    def key(self) -> tuple[int, str | None]:
        """Identity of the leaf (its module and weight name)."""
        return (id(self[1]), self.weight)

    def tensors(self) -> list[torch.Tensor]:
        """The weights this leaf stands for."""
        if self.weight is None:
            return own_weights(self[1])
        return [t for n, t in own_named_weights(self[1]) if n == self.weight]

    def params(self) -> list[torch.Tensor]:
        """The parameters among :meth:`tensors` (what can train)."""
        ids = {id(p) for p in self[1].parameters(recurse=False)}
        return [t for t in self.tensors() if id(t) in ids]

    @property
    def class_name(self) -> str:
        """Its module's class name, or ``Parameter``/``Buffer`` for a single weight."""
        if self.weight is None:
            return type(self[1]).__name__
        return "Parameter" if self.params() else "Buffer"


def leaf_entries(root: nn.Module, prefix: str = "") -> list[LeafEntry]:
    """Every leaf under ``root`` in registration order (paths below ``prefix``).

    >>> class Scaled(nn.Module):
    ...     def __init__(self):
    ...         super().__init__(); self.scale = nn.Parameter(torch.ones(2)); self.lin = nn.Linear(2, 2)
    >>> [e.path for e in leaf_entries(nn.Sequential(Scaled(), nn.Linear(2, 1)))]
    ['0.scale', '0.lin', '1']
    """
    out: list[LeafEntry] = []
    for path, module in root.named_modules():
        named = own_named_weights(module)
        if not named:
            continue
        full = ".".join(p for p in (prefix, path) if p)
        if has_weighted_descendant(module):
            out += [LeafEntry(f"{full}.{n}" if full else n, module, n) for n, _ in named]
        else:
            out.append(LeafEntry(full, module))
    return out


def leaf_state(entry: LeafEntry | nn.Module, trains: dict[int, bool] | None = None) -> str:
    """``"trainable"``, ``"frozen"`` or ``"partial"``; ``"buffer"`` for a single buffer.

    ``trains`` overrides ``requires_grad`` by tensor id (what a change would make).

    >>> lin = nn.Linear(1, 1); leaf_state(lin), leaf_state(lin, {id(lin.bias): False})
    ('trainable', 'partial')
    """
    if not isinstance(entry, LeafEntry):
        entry = LeafEntry("", entry)
    params = entry.params()
    if not params:
        if entry.weight is not None:
            return "buffer"
        return "trainable" if module_flag(entry.module) else "frozen"
    trains = trains or {}
    on = sum(trains.get(id(p), p.requires_grad) for p in params)
    return "trainable" if on == len(params) else "frozen" if on == 0 else "partial"
