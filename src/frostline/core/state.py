"""The freezing state of a module tree, behind named accessors.

Everything frostline remembers about a module or a parameter lives here, and only
here: a module's own ``trainable`` flag, a parameter's own learning rate, and (in
:mod:`frostline.core.batchnorm`) a BatchNorm layer's policy. The state is stored on
the objects themselves (so two wrappers of one module, and plain PyTorch code, see
the same thing) under one private key each; nothing else reads those keys.

>>> from torch import nn
>>> lin = nn.Linear(2, 2)
>>> set_own_flag(lin, False)
>>> own_flag(lin), lin.weight.requires_grad
(False, True)
"""

from __future__ import annotations

import weakref
from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch import nn

__all__ = [
    "clear_learning_rates",
    "has_weighted_descendant",
    "is_weight_buffer",
    "learning_rate_of",
    "module_flag",
    "own_flag",
    "own_weights",
    "pinned_frozen",
    "set_view",
    "view_of",
    "set_learning_rate",
    "set_own_flag",
    "set_pinned_frozen",
    "tensor_numel",
    "unique_tensors",
]

_FLAG = "_frostline_trainable"
_LR = "_frostline_lr"
_VIEW = "_frostline_view"
_PIN = "_frostline_pinned_frozen"


# -- weights --------------------------------------------------------------------------
def is_weight_buffer(tensor: torch.Tensor | None) -> bool:
    """Floating-point buffers (BatchNorm running statistics) are weights; integer ones are not.

    >>> is_weight_buffer(torch.zeros(2)), is_weight_buffer(torch.tensor(0))
    (True, False)
    """
    return tensor is not None and (tensor.is_floating_point() or tensor.is_complex())


def own_weights(module: nn.Module) -> list[torch.Tensor]:
    """The weights a module owns directly: its parameters, then its float buffers.

    >>> [tuple(t.shape) for t in own_weights(nn.BatchNorm1d(3))]
    [(3,), (3,), (3,), (3,)]
    """
    out: list[torch.Tensor] = [p for p in module.parameters(recurse=False)]
    out += [b for b in module.buffers(recurse=False) if is_weight_buffer(b)]
    return out


def unique_tensors(tensors: Iterable[torch.Tensor]) -> list[torch.Tensor]:
    """Tensors in order, each object once (a tied weight is counted once).

    >>> t = torch.zeros(1); len(unique_tensors([t, t]))
    1
    """
    seen: set[int] = set()
    out = []
    for t in tensors:
        if id(t) not in seen:
            seen.add(id(t))
            out.append(t)
    return out


def tensor_numel(tensors: Sequence[torch.Tensor]) -> int:
    """Number of scalars in ``tensors``.

    >>> tensor_numel([torch.zeros(2, 3), torch.zeros(4)])
    10
    """
    return sum(t.numel() for t in tensors)


# -- the trainable flag ---------------------------------------------------------------
def own_flag(module: nn.Module) -> bool | None:
    """The flag set on this module by the ``trainable`` setter, or None if never set.

    >>> lin = nn.Linear(1, 1); own_flag(lin) is None
    True
    """
    return module.__dict__.get(_FLAG)


def set_own_flag(module: nn.Module, value: bool | None) -> None:
    """Set (or, with None, forget) this module's own flag; ``requires_grad`` is untouched.

    >>> lin = nn.Linear(1, 1); set_own_flag(lin, False); own_flag(lin)
    False
    """
    if value is None:
        module.__dict__.pop(_FLAG, None)
    else:
        module.__dict__[_FLAG] = bool(value)


def has_weighted_descendant(module: nn.Module) -> bool:
    """Whether a module below ``module`` owns weights (so ``module`` is not a leaf itself).

    >>> has_weighted_descendant(nn.Sequential(nn.Linear(1, 1))), has_weighted_descendant(nn.Linear(1, 1))
    (True, False)
    """
    return any(own_weights(m) for m in module.modules() if m is not module)


def module_flag(module: nn.Module) -> bool:
    """The module's ``trainable`` flag.

    A leaf module that owns parameters (none below it) reads the flag from them: True
    when any of them trains. So a tensor shared by several modules (tied embeddings)
    gives every owner the same answer, and plain PyTorch ``requires_grad_`` is seen.
    Any other module keeps the flag the setter gave it (``base`` reads False after
    ``base.trainable = False`` even when a child was set back, as in Keras); never set,
    it is derived from ``requires_grad`` (False only when it has parameters and none
    of them requires grad), so a model frozen in plain PyTorch reads as frozen.

    >>> lin = nn.Linear(2, 2); _ = lin.requires_grad_(False); module_flag(lin)
    False
    >>> set_own_flag(lin, True); module_flag(lin)  # its parameters say otherwise
    False
    """
    own = list(module.parameters(recurse=False))
    if own and (next(module.children(), None) is None or not has_weighted_descendant(module)):
        return any(p.requires_grad for p in own)
    flag = own_flag(module)
    if flag is not None:
        return flag
    params = list(module.parameters())
    return not params or any(p.requires_grad for p in params)


# -- parameters a freezing state keeps frozen ------------------------------------------
def pinned_frozen(param: torch.Tensor) -> bool:
    """Whether a freezing state (LoRA: the kernel under its adapters) keeps ``param`` frozen
    whatever the ``trainable`` setter is given.

    >>> p = nn.Parameter(torch.zeros(1)); pinned_frozen(p)
    False
    """
    return bool(param.__dict__.get(_PIN, False))


def set_pinned_frozen(param: torch.Tensor, pinned: bool) -> None:
    """Pin ``param`` frozen (it stays ``requires_grad=False`` through the setter) or release it.

    >>> p = nn.Parameter(torch.zeros(1)); set_pinned_frozen(p, True); pinned_frozen(p)
    True
    """
    if pinned:
        param.__dict__[_PIN] = True
    else:
        param.__dict__.pop(_PIN, None)


# -- per-parameter learning rates -----------------------------------------------------
def learning_rate_of(param: torch.Tensor) -> float | None:
    """The parameter's own learning rate (``unfreeze(..., learning_rate=)``), or None.

    >>> p = nn.Parameter(torch.zeros(1)); learning_rate_of(p) is None
    True
    """
    return param.__dict__.get(_LR)


def set_learning_rate(param: torch.Tensor, lr: float | None) -> None:
    """Give the parameter its own learning rate (None: back to the optimizer's rate).

    >>> p = nn.Parameter(torch.zeros(1)); set_learning_rate(p, 1e-5); learning_rate_of(p)
    1e-05
    """
    if lr is None:
        param.__dict__.pop(_LR, None)
    else:
        param.__dict__[_LR] = float(lr)


def clear_learning_rates(module: nn.Module) -> None:
    """Forget every per-parameter rate below ``module``.

    >>> lin = nn.Linear(1, 1); set_learning_rate(lin.weight, 0.1); clear_learning_rates(lin)
    >>> learning_rate_of(lin.weight) is None
    True
    """
    for p in module.parameters():
        set_learning_rate(p, None)


# -- the Model a module is wrapped as -------------------------------------------------
def view_of(module: nn.Module) -> Any | None:
    """The live object ``module`` was wrapped as (a Model), or None.

    A nested Model shows up as itself when it is a child of another layer.

    >>> lin = nn.Linear(1, 1); view_of(lin) is None
    True
    """
    ref = module.__dict__.get(_VIEW)
    return ref() if ref is not None else None


def set_view(module: nn.Module, view: Any) -> None:
    """Remember (weakly) the object ``module`` is wrapped as.

    >>> class V: pass
    >>> lin, v = nn.Linear(1, 1), V(); set_view(lin, v); view_of(lin) is v
    True
    """
    module.__dict__[_VIEW] = weakref.ref(view)
