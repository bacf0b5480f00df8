"""How a model takes a batch, and running it without changing it: the calling convention
the tracers and checks of the frozen part share (inputs, module paths, probes, outputs)."""

from __future__ import annotations

import inspect
from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils import _pytree as pytree

from frostline.engine import rng

__all__ = [
    "batch_size_of",
    "call_model",
    "fetch",
    "inputs_of",
    "mode_key",
    "module_at",
    "probe_rows",
    "restored_state",
    "same_outputs",
    "strip_root",
    "take_rows",
]


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


def fetch(root: nn.Module, target: str) -> Any:
    """The attribute at the dotted path ``target`` below ``root`` (a graph's ``get_attr``).

    Example:
        >>> from torch import nn
        >>> net = nn.Sequential(nn.Linear(2, 2))
        >>> fetch(net, "0.weight") is net[0].weight
        True
    """
    obj: Any = root
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def strip_root(path: str) -> str:
    """A module path in a trace (below the root's ``model``) as the user's model names it.

    Example:
        >>> strip_root("model.layer1.0"), strip_root("model")
        ('layer1.0', '')
    """
    return path[len("model.") :] if path.startswith("model.") else ("" if path == "model" else path)


class restored_state:
    """Buffers and every random number generator (:mod:`frostline.engine.rng`, with those
    the model holds) put back as they were: probes must not change the model, nor what
    its training draws. ``moved`` then says which generators the block drew from.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> bn = nn.BatchNorm1d(2)
        >>> with restored_state(bn) as state:
        ...     _ = bn(torch.randn(4, 2)), torch.rand(1)
        >>> float(bn.running_mean.abs().sum()), state.moved
        (0.0, ('torch generator',))
    """

    def __init__(self, module: nn.Module) -> None:
        self.module = module
        self.moved: tuple[str, ...] = ()

    def __enter__(self) -> restored_state:
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


def batch_size_of(values: Iterable[Any]) -> int | None:
    """The batch size: dim 0 of the first tensor (of rank 1 or more) among ``values``.

    Example:
        >>> import torch
        >>> batch_size_of([{"ids": torch.zeros(5, 3)}]), batch_size_of([1.0])
        (5, None)
    """
    for v in pytree.tree_leaves(list(values)):
        if isinstance(v, Tensor) and v.dim() >= 1:
            return int(v.shape[0])
    return None


def take_rows(values: tuple, rows: Tensor) -> tuple:
    """The samples ``rows`` of every tensor (of rank 1 or more) in ``values``.

    Example:
        >>> import torch
        >>> take_rows((torch.arange(4), 7), torch.tensor([2, 0]))
        (tensor([2, 0]), 7)
    """
    return tuple(
        pytree.tree_map(
            lambda v: v[rows.to(v.device)] if isinstance(v, Tensor) and v.dim() else v, v
        )
        for v in values
    )


def probe_rows(batch: int) -> tuple[Tensor, Tensor]:
    """The rows of the two probe batches (3 and 2 samples) taken from a batch of ``batch``.

    Example:
        >>> [r.tolist() for r in probe_rows(2)]
        [[0, 1, 0], [0, 1]]
    """
    return torch.arange(3) % batch, torch.arange(2) % batch


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
