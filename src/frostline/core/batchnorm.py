"""Frozen BatchNorm runs in inference mode, whatever ``model.train()`` says.

Each BatchNorm module (every ``_BatchNorm`` subclass, ``SyncBatchNorm`` included)
gets a forward pre-hook that switches it to running statistics for the call when
its policy says so, and a forward hook that switches it back. The hooks live on the
module, so plain PyTorch loops see the same behaviour as ``fit``.
"""

from __future__ import annotations

from torch import nn

from frostline.core.state import module_flag

_MODE = "_frostline_bn_mode"
_SAVED = "_frostline_bn_saved_training"
_HOOKED = "_frostline_bn_hooked"
MODES = ("auto", "batch_stats", "inference")


def is_batchnorm(module: nn.Module) -> bool:
    """True for BatchNorm1d/2d/3d, SyncBatchNorm, LazyBatchNorm and subclasses (timm's too)."""
    return isinstance(module, nn.modules.batchnorm._BatchNorm)


def mode_of(module: nn.Module) -> str:
    """The module's BatchNorm policy (``"auto"`` unless set)."""
    return module.__dict__.get(_MODE, "auto")


def runs_inference(module: nn.Module) -> bool:
    """Whether this BatchNorm normalises with running statistics when called in train mode."""
    mode = mode_of(module)
    if mode == "inference":
        return True
    if mode == "batch_stats":
        return False
    # what module_flag says for a BatchNorm (a leaf: its affine parameters decide), read
    # directly: this runs before every BatchNorm call
    affine = [p for p in (module.weight, module.bias) if isinstance(p, nn.Parameter)]
    if affine:
        return not any(p.requires_grad for p in affine)
    return not module_flag(module)


def _pre_hook(module: nn.Module, args):
    if module.training and runs_inference(module):
        module.__dict__[_SAVED] = True
        module.training = False
    return None


def _post_hook(module: nn.Module, args, output):
    if module.__dict__.pop(_SAVED, False):
        module.training = True
    return None


def install(module: nn.Module) -> None:
    """Attach the policy hooks to one BatchNorm module (idempotent)."""
    if module.__dict__.get(_HOOKED):
        return
    module.register_forward_pre_hook(_pre_hook)
    module.register_forward_hook(_post_hook, always_call=True)
    module.__dict__[_HOOKED] = True


def reset_modes(root: nn.Module) -> None:
    """Every BatchNorm below ``root`` back to the ``"auto"`` policy (hooks attached).

    >>> bn = nn.BatchNorm1d(3); set_mode(bn, "inference"); reset_modes(bn); mode_of(bn)
    'auto'
    """
    for m in root.modules():
        if is_batchnorm(m):
            m.__dict__.pop(_MODE, None)
            install(m)


def install_all(root: nn.Module) -> None:
    """Attach the hooks to every BatchNorm module below ``root``."""
    for m in root.modules():
        if is_batchnorm(m):
            install(m)


def set_mode(root: nn.Module, mode: str) -> None:
    """Set the policy of every BatchNorm below ``root``: ``auto``, ``batch_stats`` or ``inference``.

    >>> bn = nn.BatchNorm1d(3); set_mode(bn, "inference"); mode_of(bn)
    'inference'
    """
    if mode not in MODES:
        raise ValueError(f"batchnorm mode must be one of {MODES}, got {mode!r}")
    found = False
    for m in root.modules():
        if is_batchnorm(m):
            m.__dict__[_MODE] = mode
            install(m)
            found = True
    if not found:
        raise ValueError(
            f"no BatchNorm layer below {type(root).__name__}: set_batchnorm_mode({mode!r}) would do nothing"
        )


def batchnorm_modes(root: nn.Module) -> dict[str, str]:
    """``{path: mode}`` for every BatchNorm whose policy is not the default."""
    return {
        p: mode_of(m) for p, m in root.named_modules() if is_batchnorm(m) and mode_of(m) != "auto"
    }


__all__ = [
    "MODES",
    "batchnorm_modes",
    "install",
    "install_all",
    "is_batchnorm",
    "mode_of",
    "reset_modes",
    "runs_inference",
    "set_mode",
]
