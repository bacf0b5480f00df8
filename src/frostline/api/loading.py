"""Rebuilding Models from files and import paths: ``fl.load`` and ``fl.saving.build``.

Import paths named by a file are followed only for trusted packages.
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from frostline.api.layer import SequentialModule
from frostline.api.model import Model, Sequential
from frostline.api.saving import TRUSTED, apply_trainable_state, prepare_lora, read
from frostline.api.zoo import create_module
from frostline.core import batchnorm
from frostline.io.checkpoint import check_keys
from frostline.io.errors import CheckpointError

__all__ = ["ImportPathError", "build", "import_path", "load_model"]


class ImportPathError(ValueError):
    """An import path that does not name an importable callable, or names an untrusted package."""


def import_path(target: str, trusted: Sequence[str] | None = None) -> Callable:
    """The callable that ``"package.module:attr"`` names: frostline's one import-path resolver.

    With ``trusted``, only a target whose top-level package is listed is imported.
    Errors (:class:`ImportPathError`) say which part failed.

    >>> import_path("torch.nn:Linear").__name__
    'Linear'
    >>> import_path("os.path:join", trusted=["torch"])
    Traceback (most recent call last):
    ...
    frostline.api.loading.ImportPathError: 'os.path:join' is in package 'os', which is not trusted (trusted: torch)
    """
    if not isinstance(target, str) or target.count(":") != 1 or "" in target.split(":"):
        raise ImportPathError(
            f"{target!r} is not an import path; expected 'package.module:factory'"
        )
    mod_name, attr = target.split(":")
    root = mod_name.split(".")[0]
    if trusted is not None and root not in trusted:
        raise ImportPathError(
            f"{target!r} is in package {root!r}, which is not trusted (trusted: {', '.join(trusted)})"
        )
    try:
        module = importlib.import_module(mod_name)
    except ImportError as e:
        raise ImportPathError(f"cannot import module {mod_name!r} ({e})") from None
    obj: Any = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise ImportPathError(f"module {mod_name!r} has no attribute {attr!r}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise ImportPathError(f"{target!r} is a {type(obj).__name__}, not a callable")
    return obj


def _import(target: str, trusted: tuple[str, ...]):
    """:func:`import_path` for a name read from a file: only trusted packages, file-worded errors."""
    if not isinstance(target, str) or target.count(":") != 1:
        raise CheckpointError(
            f"bad import path {target!r} in file metadata; expected 'package.module:factory'"
        )
    root = target.split(":")[0].split(".")[0]
    if root not in trusted:
        raise CheckpointError(
            f"the file asks to import {target!r}; frostline does not import code named by a file unless you trust "
            f"its package: fl.load(path, trusted_modules=[{root!r}]) (trusted now: {', '.join(trusted)})"
        )
    try:
        return import_path(target, trusted)
    except ImportPathError as e:
        raise CheckpointError(
            f"the file's architecture names {target!r}, but it {'cannot be imported' if 'cannot import' in str(e) else 'does not resolve'}: {e}"
        ) from None


def _build(recipe: dict, trusted: tuple[str, ...]) -> nn.Module:
    kind = recipe.get("kind")
    if kind == "zoo":
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


def load_model(path: str | os.PathLike, *, trusted_modules=()):
    """Rebuild and load; see :func:`frostline.load`."""
    if isinstance(trusted_modules, str):
        trusted_modules = (trusted_modules,)
    trusted = (*TRUSTED, *trusted_modules)
    tensors, meta = read(path)
    recipe = meta.get("architecture")
    if not recipe:
        call = meta.get("rebuild_call") or "YourModel(...)"
        raise CheckpointError(
            f"{path} does not record how to rebuild its architecture (it was saved from "
            f"{call.split('(')[0]}, whose arguments frostline could not read back). Build the "
            f"model the way you did, then load the weights: model = fl.wrap({call}); "
            f"model.load_weights({str(path)!r}). To have fl.load rebuild it, build it with "
            "fl.saving.build('package.module:factory', *args, **kwargs) before saving"
        )
    module = _build(recipe, trusted)
    model: Model
    if recipe.get("kind") == "sequential" and meta.get("class") == "Sequential":
        model = Sequential(name=meta.get("name"))
        for name, child in module.named_children():
            model.module.add_module(name, child)
    else:
        model = Model(module, name=meta.get("name"))
    if recipe.get("kind") in ("zoo", "import"):
        model.meta["architecture"] = recipe
    prepare_lora(model.module, meta, str(path))
    check_keys(model.module, tensors, str(path))
    with torch.no_grad():
        model.module.load_state_dict(tensors)
    batchnorm.install_all(model.module)
    if meta.get("trainable"):
        apply_trainable_state(model.module, meta["trainable"])
    return model
