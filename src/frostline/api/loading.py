"""Rebuilding Models from files and import paths: ``fl.load`` and ``fl.saving.build``.

A model file is data: its architecture recipe is checked against the allow-list of
:mod:`frostline.api.allowlist` before anything it names is called, and code is imported
only from packages the user trusts (``trusted_modules=``).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import torch

from frostline.api.allowlist import (
    BUILTIN_PACKAGES,
    ImportPathError,
    blueprint,
    check_trusted,
    import_path,
)
from frostline.api.model import Model, Sequential
from frostline.api.saving import apply_trainable_state, prepare_lora, read
from frostline.core import batchnorm
from frostline.io.checkpoint import check_keys
from frostline.io.errors import CheckpointError, UnsafeFileError

__all__ = [
    "CheckpointError",
    "ImportPathError",
    "UnsafeFileError",
    "build",
    "import_path",
    "load_model",
]

# A genuine model has at most a few modules per tensor; a recipe that makes far more is refused.
_MODULES_PER_TENSOR = 20
_MODULES_FLOOR = 10_000


def build(target: str, *args: Any, name: str | None = None, **kwargs: Any) -> Model:
    """Build a Model from ``"package.module:factory"`` and remember how, so ``fl.load`` can rebuild it.

    The recipe is checked as ``fl.load`` will check it: a torch.nn layer, a timm or
    torchvision registry builder, or an exact ``module:callable`` in your own package
    (which ``fl.load`` then follows with ``trusted_modules=[package]``), with JSON
    arguments. Anything ``fl.load`` would refuse is a ``ValueError`` here.

    >>> import frostline as fl
    >>> m = fl.saving.build("torch.nn:Linear", 4, 2)
    >>> m.meta["architecture"]["target"]
    'torch.nn:Linear'
    >>> fl.saving.build("torch.hub:load", "somewhere", "net")
    Traceback (most recent call last):
    ...
    ValueError: fl.saving.build('torch.hub:load'): fl.load would refuse to rebuild it: refused: the architecture asks to call 'torch.hub:load'; a file may name only torch.nn layers, timm and torchvision models by registry name, and zoo names, and frostline never trusts all of 'torch'
    """
    recipe = {"kind": "import", "target": target, "args": list(args), "kwargs": kwargs}
    root = target.partition(":")[0].split(".")[0] if isinstance(target, str) else ""
    try:
        trusted = () if root in BUILTIN_PACKAGES else check_trusted([root])
        plan = blueprint(recipe, trusted)
    except (CheckpointError, ValueError) as e:
        raise ValueError(
            f"fl.saving.build({target!r}): fl.load would refuse to rebuild it: {e}"
        ) from None
    module = plan.make()
    if not isinstance(module, torch.nn.Module):
        raise TypeError(f"{target!r} returned {type(module).__name__}, not a torch.nn.Module")
    model = Model(module, name=name)
    model.meta["architecture"] = recipe
    return model


def _in_file(path: str | os.PathLike, err: CheckpointError) -> CheckpointError:
    """The same error, its message prefixed with the file."""
    return type(err)(f"{os.fspath(path)}: {err}")


def load_model(path: str | os.PathLike, *, trusted_modules: str | Sequence[str] = ()) -> Model:
    """Rebuild and load; see :func:`frostline.load`.

    >>> import frostline as fl, tempfile, os
    >>> from torch import nn
    >>> p = os.path.join(tempfile.mkdtemp(), "m.safetensors")
    >>> fl.Sequential([nn.Linear(2, 2)]).save(p)
    >>> load_model(p).count_params()
    6
    """
    trusted = check_trusted(trusted_modules)
    tensors, meta = read(path)
    recipe = meta.get("architecture")
    if not recipe:
        call = meta.get("rebuild_call")
        call = call if isinstance(call, str) and len(call) < 1000 else "YourModel(...)"
        raise CheckpointError(
            f"{path} does not record how to rebuild its architecture (it was saved from "
            f"{call.split('(')[0]}, whose arguments frostline could not read back). Build the "
            f"model the way you did, then load the weights: model = fl.wrap({call}); "
            f"model.load_weights({str(path)!r}). To have fl.load rebuild it, build it with "
            "fl.saving.build('package.module:factory', *args, **kwargs) before saving"
        )
    try:
        plan = blueprint(recipe, trusted)
    except CheckpointError as e:
        raise _in_file(path, e) from None
    source = os.fspath(path)

    def fits(module: torch.nn.Module) -> None:
        prepare_lora(module, meta, source, tensors)  # LoRA adapters are part of the file's keys
        check_keys(module, tensors, source)

    module = plan.rebuild(
        fits,
        max_modules=_MODULES_FLOOR + _MODULES_PER_TENSOR * len(tensors),
        source=source,
    )
    name = meta.get("name")
    if name is not None and not isinstance(name, str):
        raise CheckpointError(f"{path}: the model name is {type(name).__name__}; expected a string")
    model: Model
    if recipe.get("kind") == "sequential" and meta.get("class") == "Sequential":
        model = Sequential(name=name)
        for child_name, child in module.named_children():
            model.module.add_module(child_name, child)
    else:
        model = Model(module, name=name)
    if recipe.get("kind") in ("zoo", "import"):
        model.meta["architecture"] = recipe
    prepare_lora(model.module, meta, source, tensors)  # no-op where the build applied it
    check_keys(model.module, tensors, source)
    with torch.no_grad():
        model.module.load_state_dict(tensors)
    batchnorm.install_all(model.module)
    if meta.get("trainable"):
        apply_trainable_state(model.module, meta["trainable"], source=str(path))
    return model
