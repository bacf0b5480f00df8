"""Freezing a module tree: the ``trainable`` setter's effect, and the whole tree's state as data.

>>> from torch import nn
>>> net = nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2))
>>> set_module_trainable(net, False)
>>> trainable_state(net)["frozen"]
['0.weight', '0.bias', '1.weight', '1.bias']
"""

from __future__ import annotations

from typing import Any

from torch import nn

from frostline.core import batchnorm
from frostline.core.lora import apply_lora_state, lora_state
from frostline.core.state import (
    clear_learning_rates,
    learning_rate_of,
    own_flag,
    pinned_frozen,
    set_learning_rate,
    set_own_flag,
)

__all__ = ["apply_trainable_state", "set_module_trainable", "trainable_state"]


def set_module_trainable(module: nn.Module, value: bool, *, recurse: bool = True) -> None:
    """Set the trainable flag (and ``requires_grad``) of ``module`` and, by default, its subtree.

    Freezing also drops ``.grad``: a frozen parameter owns no gradient buffer, so even a
    stale optimizer in a hand-written loop (any ``zero_grad`` style) cannot move it. A
    parameter pinned frozen (the kernel of a LoRA-enabled layer) stays frozen.
    BatchNorm layers below get the policy hooks of :mod:`frostline.core.batchnorm`.

    >>> lin = nn.Linear(2, 2); set_module_trainable(lin, False); lin.weight.requires_grad
    False
    """
    if not isinstance(value, bool):
        raise TypeError(
            f"trainable must be a bool (True or False), got {type(value).__name__}: {value!r}"
        )
    modules = list(module.modules()) if recurse else [module]
    for m in modules:
        set_own_flag(m, value)
        for p in m.parameters(recurse=False):
            on = value and not pinned_frozen(p)
            p.requires_grad_(on)
            if not on:
                p.grad = None
        if batchnorm.is_batchnorm(m):
            batchnorm.install(m)


# -- a whole tree's state, as data ----------------------------------------------------
def trainable_state(module: nn.Module) -> dict[str, Any]:
    """JSON-able record of flags, frozen parameters, BatchNorm modes and per-parameter rates
    (and, under ``"lora"``, the LoRA layers: :func:`frostline.core.lora.lora_state`, which a
    loader applies with :func:`frostline.core.lora.apply_lora_state` before the weights).

    >>> net = nn.Sequential(nn.Linear(1, 1)); set_module_trainable(net[0], False)
    >>> trainable_state(net)["frozen"]
    ['0.weight', '0.bias']
    """
    flags = {p: own_flag(m) for p, m in module.named_modules() if own_flag(m) is not None}
    frozen = [n for n, p in module.named_parameters() if not p.requires_grad]
    lrs = {
        n: learning_rate_of(p)
        for n, p in module.named_parameters()
        if learning_rate_of(p) is not None
    }
    state: dict[str, Any] = {
        "flags": flags,
        "frozen": frozen,
        "batchnorm_modes": batchnorm.batchnorm_modes(module),
        "learning_rates": lrs,
    }
    lora = lora_state(module)
    if lora:
        state["lora"] = lora
    return state


def apply_trainable_state(module: nn.Module, state: dict[str, Any]) -> None:
    """Restore what :func:`trainable_state` recorded (LoRA layers first, where not yet enabled).

    Names that no longer exist raise ``KeyError`` naming them.

    >>> net = nn.Sequential(nn.Linear(1, 1)); apply_trainable_state(net, {"frozen": ["0.bias"]})
    >>> net[0].bias.requires_grad, net[0].weight.requires_grad
    (False, True)
    """
    apply_lora_state(module, state.get("lora"))
    modules = dict(module.named_modules())
    params = dict(module.named_parameters())
    unknown = [p for p in state.get("flags", {}) if p not in modules] + [
        n for n in state.get("frozen", []) if n not in params
    ]
    if unknown:
        raise KeyError(
            f"the saved trainable state names layers this model does not have: {unknown[:10]}"
        )
    for path, flag in state.get("flags", {}).items():
        set_own_flag(modules[path], bool(flag))
    frozen = set(state.get("frozen", []))
    for n, p in params.items():
        on = n not in frozen and not pinned_frozen(p)
        p.requires_grad_(on)
        if not on:
            p.grad = None
    clear_learning_rates(module)
    for n, lr in state.get("learning_rates", {}).items():
        if n in params:
            set_learning_rate(params[n], float(lr))
    batchnorm.reset_modes(module)
    for path, mode in state.get("batchnorm_modes", {}).items():
        if path in modules:
            batchnorm.set_mode(modules[path], mode)
