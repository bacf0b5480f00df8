"""Saving and loading models: safetensors weights plus JSON metadata, never pickle.

The metadata says how to rebuild the architecture (a zoo name, a
``package.module:factory`` import path with its arguments, or an ``fl.Sequential``
of standard torch layers), the trainable state of every layer, the BatchNorm
policy and the frostline version. Nothing in a frostline file can execute code on
load: an import path is followed only for modules you trust (``frostline``,
``torch``, ``torchvision``, ``timm`` and what you pass as ``trusted_modules``).
"""

from __future__ import annotations

import importlib
import inspect
import json
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from frostline import batchnorm
from frostline.atomic import CheckpointError, load_safetensors, save_safetensors
from frostline.layer import module_flag

META_KEY = "frostline_model"
FORMAT = "frostline.model"
TRUSTED = ("frostline", "torch", "torchvision", "timm")
_SKIP_ARGS = {"self", "device", "dtype", "args", "kwargs"}


# -- trainable state ------------------------------------------------------------------
def trainable_state(module: nn.Module) -> dict[str, Any]:
    """JSON-able record of flags, frozen parameters, BatchNorm modes and per-parameter rates."""
    flags = {
        p: m.__dict__["_frostline_trainable"]
        for p, m in module.named_modules()
        if "_frostline_trainable" in m.__dict__
    }
    frozen = [n for n, p in module.named_parameters() if not p.requires_grad]
    lrs = {
        n: p.__dict__["_frostline_lr"]
        for n, p in module.named_parameters()
        if "_frostline_lr" in p.__dict__
    }
    return {
        "flags": flags,
        "frozen": frozen,
        "batchnorm_modes": batchnorm.batchnorm_modes(module),
        "learning_rates": lrs,
    }


def apply_trainable_state(module: nn.Module, state: dict[str, Any]) -> None:
    """Restore what :func:`trainable_state` recorded (names that no longer exist are errors)."""
    modules = dict(module.named_modules())
    params = dict(module.named_parameters())
    unknown = [p for p in state.get("flags", {}) if p not in modules] + [
        n for n in state.get("frozen", []) if n not in params
    ]
    if unknown:
        raise CheckpointError(
            f"the saved trainable state names layers this model does not have: {unknown[:10]}"
        )
    for path, flag in state.get("flags", {}).items():
        modules[path].__dict__["_frostline_trainable"] = bool(flag)
    frozen = set(state.get("frozen", []))
    for n, p in params.items():
        p.requires_grad_(n not in frozen)
        if n in frozen:
            p.grad = None
    for p in params.values():
        p.__dict__.pop("_frostline_lr", None)
    for n, lr in state.get("learning_rates", {}).items():
        if n in params:
            params[n].__dict__["_frostline_lr"] = float(lr)
    for m in module.modules():
        if batchnorm.is_batchnorm(m):
            m.__dict__.pop("_frostline_bn_mode", None)
            batchnorm.install(m)
    for path, mode in state.get("batchnorm_modes", {}).items():
        if path in modules:
            batchnorm.set_mode(modules[path], mode)


# -- architecture recipes -------------------------------------------------------------
def _jsonable(value):
    if isinstance(value, bool | int | float | str) or value is None:
        return value
    if isinstance(value, tuple | list):
        items = [_jsonable(v) for v in value]
        return None if any(i is _NOPE for i in items) else items
    return _NOPE


_NOPE = object()


def _layer_recipe(module: nn.Module) -> dict | None:
    """Constructor arguments of a standard torch layer, read back from its attributes."""
    from frostline.layer import _MODEL_OF

    ref = _MODEL_OF.get(module)
    model = ref() if ref is not None else None
    if model is not None and model.meta.get("architecture"):
        return model.meta["architecture"]
    cls = type(module)
    if isinstance(module, nn.Sequential) and cls.forward is nn.Sequential.forward:
        children = []
        for name, child in module.named_children():
            r = _layer_recipe(child)
            if r is None:
                return None
            children.append({"name": name, "layer": r})
        return {
            "kind": "sequential",
            "class": f"{cls.__module__}.{cls.__qualname__}",
            "layers": children,
        }
    if not cls.__module__.startswith("torch.nn"):
        return None
    kwargs = {}
    for pname, param in inspect.signature(cls.__init__).parameters.items():
        if pname in _SKIP_ARGS or param.kind in (param.VAR_POSITIONAL, param.VAR_KEYWORD):
            continue
        if not hasattr(module, pname):
            if param.default is inspect.Parameter.empty:
                return None
            continue
        value = getattr(module, pname)
        if pname in ("bias", "affine", "elementwise_affine") and (
            value is None or isinstance(value, torch.Tensor)
        ):
            value = value is not None
        v = _jsonable(value)
        if v is _NOPE:
            return None
        kwargs[pname] = v
    return {"kind": "layer", "class": f"{cls.__module__}.{cls.__qualname__}", "kwargs": kwargs}


def architecture_of(model) -> dict | None:
    """How to rebuild ``model`` (None when frostline cannot tell)."""
    if model.meta.get("architecture"):
        return model.meta["architecture"]
    return _layer_recipe(model.module)


def _import(target: str, trusted: tuple[str, ...]):
    if not isinstance(target, str) or target.count(":") != 1:
        raise CheckpointError(
            f"bad import path {target!r} in file metadata; expected 'package.module:factory'"
        )
    mod_name, attr = target.split(":")
    root = mod_name.split(".")[0]
    if root not in trusted:
        raise CheckpointError(
            f"the file asks to import {target!r}; frostline does not import code named by a file unless you trust "
            f"its package: fl.load(path, trusted_modules=[{root!r}]) (trusted now: {', '.join(trusted)})"
        )
    try:
        module = importlib.import_module(mod_name)
    except ImportError as e:
        raise CheckpointError(
            f"the file's architecture names {target!r}, but module {mod_name!r} cannot be imported ({e})"
        ) from None
    obj = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise CheckpointError(
                f"the file's architecture names {target!r}, but {mod_name!r} has no attribute {attr!r}"
            )
        obj = getattr(obj, part)
    if not callable(obj):
        raise CheckpointError(f"{target!r} is not callable")
    return obj


def _build(recipe: dict, trusted: tuple[str, ...]) -> nn.Module:
    kind = recipe.get("kind")
    if kind == "zoo":
        from frostline.models import create_module

        kwargs = {k: v for k, v in recipe.get("kwargs", {}).items()}
        return create_module(recipe["name"], pretrained=False, **kwargs)
    if kind == "import":
        return _import(recipe["target"], trusted)(
            *recipe.get("args", []), **recipe.get("kwargs", {})
        )
    if kind == "layer":
        cls_path = recipe["class"]
        mod_name, _, cls_name = cls_path.rpartition(".")
        cls = _import(f"{mod_name}:{cls_name}", trusted)
        return cls(**recipe.get("kwargs", {}))
    if kind == "sequential":
        from frostline.model import SequentialModule

        seq = SequentialModule()
        for entry in recipe["layers"]:
            seq.add_module(entry["name"], _build(entry["layer"], trusted))
        return seq
    raise CheckpointError(f"unknown architecture kind {kind!r} in file metadata")


def build(target: str, *args, name: str | None = None, **kwargs):
    """Build a Model from ``"package.module:factory"`` and remember how, so ``fl.load`` can rebuild it.

    >>> import frostline as fl
    >>> m = fl.saving.build("torch.nn:Linear", 4, 2)
    >>> m.meta["architecture"]["target"]
    'torch.nn:Linear'
    """
    from frostline.model import Model

    root = target.split(".")[0].split(":")[0]
    module = _import(target, (*TRUSTED, root))(*args, **kwargs)
    if not isinstance(module, nn.Module):
        raise TypeError(f"{target!r} returned {type(module).__name__}, not a torch.nn.Module")
    model = Model(module, name=name)
    model.meta["architecture"] = {
        "kind": "import",
        "target": target,
        "args": list(args),
        "kwargs": kwargs,
    }
    return model


# -- files --------------------------------------------------------------------------
def save_model(model, path: str | os.PathLike) -> Path:
    """Write ``model`` to one safetensors file (atomic), metadata in its header."""
    from frostline import __version__

    path = Path(path)
    if path.suffix != ".safetensors":
        raise ValueError(f"model files end in .safetensors, got {str(path)!r}")
    meta = {
        "format": FORMAT,
        "version": 1,
        "frostline_version": __version__,
        "name": model.name,
        "class": type(model).__name__,
        "architecture": architecture_of(model),
        "trainable": trainable_state(model.module),
        "root_trainable": module_flag(model.module),
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    return save_safetensors(model.module.state_dict(), path, {META_KEY: json.dumps(meta)})


def read(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict]:
    """Tensors and frostline metadata of a model file (errors name the file and the defect)."""
    tensors, header = load_safetensors(path)
    raw = header.get(META_KEY)
    if raw is None:
        return tensors, {}
    try:
        meta = json.loads(raw)
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: frostline metadata is not valid JSON ({e})") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise CheckpointError(
            f"{path}: not a frostline model file (metadata format {meta.get('format') if isinstance(meta, dict) else meta!r})"
        )
    return tensors, meta


def check_keys(module: nn.Module, tensors: dict[str, torch.Tensor], source: str) -> None:
    """Raise listing missing, unexpected and shape-mismatched keys."""
    own = module.state_dict()
    missing = [k for k in own if k not in tensors]
    unexpected = sorted(k for k in tensors if k not in own)
    mismatched = [
        f"{k}: file {tuple(tensors[k].shape)} vs model {tuple(own[k].shape)}"
        for k in own
        if k in tensors and tuple(tensors[k].shape) != tuple(own[k].shape)
    ]
    if missing or unexpected or mismatched:

        def show(xs):
            return (
                ", ".join(xs[:8]) + (f", ... ({len(xs)} in all)" if len(xs) > 8 else "")
                if xs
                else "none"
            )

        raise CheckpointError(
            f"{source} does not fit this architecture. Missing keys: {show(missing)}. "
            f"Unexpected keys: {show(unexpected)}. Shape mismatches: {show(mismatched)}."
        )


def load_weights(model, path: str | os.PathLike, *, strict: bool = True) -> None:
    """Load weights (and trainable state, when the file has it) into ``model``."""
    tensors, meta = read(path)
    if strict:
        check_keys(model.module, tensors, str(path))
    with torch.no_grad():
        model.module.load_state_dict(tensors, strict=strict)
    if meta.get("trainable"):
        apply_trainable_state(model.module, meta["trainable"])


def load_model(path: str | os.PathLike, *, trusted_modules=()):
    """Rebuild and load; see :func:`frostline.load`."""
    from frostline.model import Model, Sequential

    if isinstance(trusted_modules, str):
        trusted_modules = (trusted_modules,)
    trusted = (*TRUSTED, *trusted_modules)
    tensors, meta = read(path)
    recipe = meta.get("architecture")
    if not recipe:
        raise CheckpointError(
            f"{path} does not say how to rebuild its architecture (a custom module): build the model yourself, "
            "then call model.load_weights(path)"
        )
    module = _build(recipe, trusted)
    if recipe.get("kind") == "sequential" and meta.get("class") == "Sequential":
        model = Sequential(name=meta.get("name"))
        for name, child in module.named_children():
            model.module.add_module(name, child)
    else:
        model = Model(module, name=meta.get("name"))
    if recipe.get("kind") in ("zoo", "import"):
        model.meta["architecture"] = recipe
    check_keys(model.module, tensors, str(path))
    with torch.no_grad():
        model.module.load_state_dict(tensors)
    batchnorm.install_all(model.module)
    if meta.get("trainable"):
        apply_trainable_state(model.module, meta["trainable"])
    return model
