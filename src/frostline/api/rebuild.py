"""How to rebuild a timm or torchvision model: its registry name and arguments, read back.

A module made by ``timm.create_model(name, **kwargs)`` or a torchvision builder does not
keep its arguments. These functions read them back from the module (the registry name
timm records in ``pretrained_cfg``, the classifier size, input channels, image size and
attributes named like constructor arguments) and keep a recipe only when a rebuild from
it has exactly the module's structure: the same ``repr`` and state-dict shapes. Candidate
rebuilds are made on the meta device, so they allocate nothing.

>>> import torchvision
>>> recipe_for(torchvision.models.resnet18(num_classes=7))["args"]
['resnet18']
"""

from __future__ import annotations

import hashlib
import inspect
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn

__all__ = ["recipe_for", "rebuild_call", "structure_digest"]

_BUILD_ERRORS = (RuntimeError, TypeError, ValueError, NotImplementedError, AssertionError, KeyError)


def structure_digest(module: nn.Module) -> str:
    """A digest of the module's structure (``repr`` and state-dict names and shapes).

    >>> structure_digest(nn.Linear(2, 3)) == structure_digest(nn.Linear(2, 3))
    True
    """
    h = hashlib.sha1(repr(module).encode())
    for k, v in module.state_dict().items():
        h.update(f"{k}:{tuple(v.shape)};".encode())
    return h.hexdigest()


def _same_structure(a: nn.Module, b: nn.Module) -> bool:
    if repr(a) != repr(b):
        return False
    sa, sb = a.state_dict(), b.state_dict()
    return list(sa) == list(sb) and all(sa[k].shape == sb[k].shape for k in sa)


def _on_meta(factory: Callable[..., Any], *args, **kwargs) -> nn.Module | None:
    try:
        with torch.device("meta"):
            built = factory(*args, **kwargs)
    except _BUILD_ERRORS:
        return None
    return built if isinstance(built, nn.Module) else None


def _plain(value: Any) -> Any:
    """JSON-able constructor values (numbers, strings, tuples of them), else None."""
    if isinstance(value, bool | int | float | str):
        return value
    if isinstance(value, tuple | list) and all(
        isinstance(v, bool | int | float | str) for v in value
    ):
        return list(value)
    return None


def _defaults(cls: type) -> dict[str, Any]:
    try:
        params = inspect.signature(cls).parameters
    except (TypeError, ValueError):
        return {}
    return {
        k: p.default for k, p in params.items() if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)
    }


# -- timm -------------------------------------------------------------------------------
def _timm_name(module: nn.Module) -> str | None:
    if not type(module).__module__.startswith("timm."):
        return None
    cfg = getattr(module, "pretrained_cfg", None) or getattr(module, "default_cfg", None)
    name = cfg.get("architecture") if isinstance(cfg, dict) else None
    return name if isinstance(name, str) and name else None


def _timm_known(module: nn.Module) -> dict[str, Any]:
    """The arguments a timm module shows plainly: classes, input channels, image size."""
    defaults = _defaults(type(module))
    out: dict[str, Any] = {}
    if isinstance(getattr(module, "num_classes", None), int):
        out["num_classes"] = module.num_classes
    conv = next((m for m in module.modules() if isinstance(m, nn.Conv2d)), None)
    if conv is not None and conv.in_channels != 3:
        out["in_chans"] = conv.in_channels
    img = getattr(getattr(module, "patch_embed", None), "img_size", None)
    if isinstance(img, tuple | list) and len(img) == 2 and all(isinstance(i, int) for i in img):
        size: Any = img[0] if img[0] == img[1] else list(img)
        default = defaults.get("img_size")
        if size != default and [size, size] != default:
            out["img_size"] = size
    return out


def _timm_candidates(module: nn.Module) -> Iterator[dict[str, Any]]:
    """Richest first: attributes named like constructor arguments (``drop_rate``,
    ``embed_dim``) that differ from their defaults, then only the plain ones."""
    known = _timm_known(module)
    extra = {}
    for k, default in _defaults(type(module)).items():
        if k in known or not hasattr(module, k):
            continue
        value = _plain(getattr(module, k))
        if value is not None and value != _plain(default):
            extra[k] = value
    if extra:
        yield {**known, **extra}
    yield known


def _timm_recipe(module: nn.Module) -> dict | None:
    name = _timm_name(module)
    if name is None:
        return None
    import timm

    for kwargs in _timm_candidates(module):
        built = _on_meta(timm.create_model, name, pretrained=False, **kwargs)
        if built is not None and _same_structure(built, module):
            return {
                "kind": "import",
                "target": "timm:create_model",
                "args": [name],
                "kwargs": kwargs,
            }
    return None


# -- torchvision ------------------------------------------------------------------------
def _torchvision_builders(cls: type) -> list[str]:
    import torchvision.models as tvm  # type: ignore[import-untyped]

    out = []
    for n in tvm.list_models():
        ret = inspect.signature(tvm.get_model_builder(n)).return_annotation
        if ret is cls or ret == cls.__name__:
            out.append(n)
    return out


def _published_size(name: str) -> int | None:
    import torchvision.models as tvm  # type: ignore[import-untyped]

    try:
        weights = list(tvm.get_model_weights(name))
    except (ValueError, KeyError):
        return None
    n = weights[0].meta.get("num_params") if weights else None
    return n if isinstance(n, int) else None


def _torchvision_recipe(module: nn.Module) -> dict | None:
    cls = type(module)
    if not cls.__module__.startswith("torchvision.models."):
        return None
    import torchvision.models as tvm  # type: ignore[import-untyped]

    names = _torchvision_builders(cls)
    heads = [m for m in module.modules() if isinstance(m, nn.Linear)]
    options: list[dict[str, Any]] = [{}]
    size = sum(p.numel() for p in module.parameters())
    if heads:
        head = heads[-1]
        options.append({"num_classes": head.out_features})
        # the size it would have with ImageNet's 1000 classes (what torchvision publishes)
        size += (head.in_features + 1) * 1000 - sum(p.numel() for p in head.parameters())
    # most likely first: the builder whose published size is nearest
    names.sort(key=lambda n: abs((_published_size(n) or 0) - size))
    for name in names:
        # detection and segmentation builders download backbone weights unless told not to
        no_weights: dict[str, Any] = {"weights": None}
        if "weights_backbone" in inspect.signature(tvm.get_model_builder(name)).parameters:
            no_weights["weights_backbone"] = None
        for kwargs in options:
            built = _on_meta(tvm.get_model, name, **no_weights, **kwargs)
            if built is not None and _same_structure(built, module):
                return {
                    "kind": "import",
                    "target": "torchvision.models:get_model",
                    "args": [name],
                    "kwargs": {**no_weights, **kwargs},
                }
    return None


# -- public -----------------------------------------------------------------------------
def recipe_for(module: nn.Module) -> dict | None:
    """An import recipe that rebuilds ``module`` exactly (timm or torchvision), or None.

    >>> import timm
    >>> recipe_for(timm.create_model("resnet10t", num_classes=4))["kwargs"]
    {'num_classes': 4}
    """
    return _timm_recipe(module) or _torchvision_recipe(module)


def rebuild_call(module: nn.Module) -> str:
    """The Python call that builds a module like ``module``, as a user would write it.

    >>> import timm
    >>> rebuild_call(timm.create_model("resnet10t", num_classes=4, drop_rate=0.5))
    "timm.create_model('resnet10t', num_classes=4, ...)"
    """
    name = _timm_name(module)
    if name is not None:
        known = "".join(f", {k}={v!r}" for k, v in _timm_known(module).items())
        return f"timm.create_model({name!r}{known}, ...)"
    cls = type(module)
    if cls.__module__.startswith("torchvision.models."):
        names = _torchvision_builders(cls)
        if len(names) == 1:
            return f"torchvision.models.{names[0]}(...)"
    return f"{cls.__module__}.{cls.__qualname__}(...)"
