"""Saving and loading models: safetensors weights plus JSON metadata, never pickle.

The metadata says how to rebuild the architecture (a zoo name, a timm or torchvision
registry name with its arguments, an ``fl.Sequential`` of standard torch layers, or a
``package.module:factory`` import path with its arguments), the trainable state of every
layer, the BatchNorm policy and the frostline version. A file is data: loading calls
only the allow-listed constructors of :mod:`frostline.api.allowlist`, and an import
path only in a package you pass as ``trusted_modules``.
"""

from __future__ import annotations

import inspect
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from frostline._version import __version__
from frostline.api import nn_layers, rebuild
from frostline.core import freezing
from frostline.core.freezing import trainable_state
from frostline.core.lora import apply_lora_state, suspended
from frostline.core.state import module_flag, view_of
from frostline.io.checkpoint import check_keys
from frostline.io.errors import CheckpointError
from frostline.io.safetensors_io import load_safetensors, save_safetensors

META_KEY = "frostline_model"
FORMAT = "frostline.model"


# -- trainable state ------------------------------------------------------------------
def _check_trainable(state: Any) -> str | None:
    """What is wrong with a trainable-state record read from a file, or None."""
    if not isinstance(state, dict):
        return f"is a {type(state).__name__}; expected an object"
    shapes: dict[str, tuple[type, type | tuple[type, ...]]] = {
        "flags": (dict, bool),
        "frozen": (list, str),
        "learning_rates": (dict, (int, float)),
        "batchnorm_modes": (dict, str),
    }
    for key, (container, item) in shapes.items():
        if key not in state:
            continue
        value: Any = state[key]
        if not isinstance(value, container):
            return f"{key} is a {type(value).__name__}; expected a {container.__name__}"
        items: Any = state[key].values() if isinstance(state[key], dict) else state[key]
        if not all(isinstance(v, item) for v in items):
            return f"{key} holds a value that is not a {getattr(item, '__name__', 'number')}"
    return None


def apply_trainable_state(module: nn.Module, state: dict[str, Any], source: str = "") -> None:
    """:func:`frostline.core.freezing.apply_trainable_state`, checked; any defect is a CheckpointError.

    >>> apply_trainable_state(nn.Linear(1, 1), {"frozen": "weight"}, "m.safetensors")
    Traceback (most recent call last):
    ...
    frostline.io.errors.CheckpointError: m.safetensors: the saved trainable state is not valid: frozen is a str; expected a list
    """
    where = f"{source}: " if source else ""
    problem = _check_trainable(state)
    if problem is not None:
        raise CheckpointError(f"{where}the saved trainable state is not valid: {problem}")
    try:
        freezing.apply_trainable_state(module, state)
    except KeyError as e:
        raise CheckpointError(f"{where}{e.args[0]}") from None
    except ValueError as e:  # a BatchNorm mode that does not exist
        raise CheckpointError(f"{where}the saved trainable state is not valid: {e}") from None


def _lora_problem(state: Any, tensors: Mapping[str, torch.Tensor] | None) -> str | None:
    """What is wrong with a LoRA record read from a file, or None. With the file's
    ``tensors``, each layer's rank must be the rank of an adapter the file holds, so a rank
    read from a file never allocates more than the file itself."""
    if not isinstance(state, dict):
        return f"is a {type(state).__name__}; expected an object"
    for path, record in state.items():
        rank = record.get("rank") if isinstance(record, dict) else None
        alpha = record.get("alpha") if isinstance(record, dict) else None
        if not (isinstance(rank, int) and not isinstance(rank, bool) and rank > 0) or not (
            isinstance(alpha, int | float) and not isinstance(alpha, bool)
        ):
            return f"{path!r} has {record!r}; expected a positive integer rank and a number alpha"
        if tensors is not None:
            prefix = f"{path}." if path else ""
            b = tensors.get(f"{prefix}lora_kernel_b", tensors.get(f"{prefix}lora_embeddings_b"))
            if b is None or b.dim() != 2 or b.shape[0] != rank:
                return f"{path!r} has rank {rank}, but the file holds no adapter of that rank"
    return None


def prepare_lora(
    module: nn.Module,
    meta: dict[str, Any],
    source: str,
    tensors: Mapping[str, torch.Tensor] | None = None,
) -> None:
    """Enable LoRA where a file's trainable state records it, before its weights load.

    A record of the wrong shape, or (given the file's ``tensors``) a rank no adapter in the
    file has, is a :class:`CheckpointError`.

    >>> prepare_lora(nn.Linear(2, 2), {"trainable": {"lora": {"": {"rank": 10**9, "alpha": 1}}}}, "f", {})
    Traceback (most recent call last):
    ...
    frostline.io.errors.CheckpointError: f: the saved LoRA state is not valid: '' has rank 1000000000, but the file holds no adapter of that rank
    """
    trainable = meta.get("trainable") or {}
    state = trainable.get("lora") if isinstance(trainable, dict) else None
    if not state:
        return
    problem = _lora_problem(state, tensors)
    if problem is not None:
        raise CheckpointError(f"{source}: the saved LoRA state is not valid: {problem}")
    try:
        apply_lora_state(module, state)
    except KeyError as e:
        raise CheckpointError(f"{source}: {e.args[0]}") from None
    except (TypeError, ValueError) as e:  # a layer LoRA does not fit, or another rank
        raise CheckpointError(f"{source}: the saved LoRA state does not fit: {e}") from None


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
    model = view_of(module)
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
    path = f"{cls.__module__}.{cls.__qualname__}"
    if nn_layers.layer_class(path) is not cls:  # not a layer fl.load builds from a file
        if cls.__module__.startswith("torch.nn"):
            return None
        return rebuild.recipe_for(module)  # timm / torchvision: registry name and arguments
    kwargs = {}
    for pname, param in nn_layers.constructor_params(cls).items():
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
    return {"kind": "layer", "class": path, "kwargs": kwargs}


def architecture_of(model) -> dict | None:
    """How to rebuild ``model`` (None when frostline cannot tell).

    Zoo models and ``fl.saving.build`` record it when built; an ``fl.Sequential`` of
    standard layers, a timm model (``timm.create_model(name, **kwargs)``) and a torchvision
    model (builder name and arguments) have it read back from the module and verified
    against its structure. What was read back is remembered for the module's current
    structure (a changed head is read again).
    """
    if model.meta.get("architecture"):
        return model.meta["architecture"]
    digest = rebuild.structure_digest(model.module)
    cached = model.meta.get("inferred_architecture")
    if isinstance(cached, dict) and cached.get("structure") == digest:
        return cached.get("recipe")
    recipe = _layer_recipe(model.module)
    model.meta["inferred_architecture"] = {"structure": digest, "recipe": recipe}
    return recipe


# -- files --------------------------------------------------------------------------
def save_model(model, path: str | os.PathLike) -> Path:
    """Write ``model`` to one safetensors file (atomic), metadata in its header."""

    path = Path(path)
    if path.suffix != ".safetensors":
        raise ValueError(f"model files end in .safetensors, got {str(path)!r}")
    with suspended(model.module):  # the architecture is the plain one; LoRA is state
        architecture = architecture_of(model)
        rebuild_call = None if architecture else rebuild.rebuild_call(model.module)
    meta = {
        "format": FORMAT,
        "version": 1,
        "frostline_version": __version__,
        "name": model.name,
        "class": type(model).__name__,
        "architecture": architecture,
        "rebuild_call": rebuild_call,
        "trainable": trainable_state(model.module),
        "root_trainable": module_flag(model.module),
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    return save_safetensors(model.module.state_dict(), path, {META_KEY: json.dumps(meta)})


def save_weights(model, path: str | os.PathLike) -> Path:
    """Write ``model``'s weights alone (Keras's ``save_weights``) to one safetensors file,
    atomically: no architecture or trainable state; :func:`load_weights` reads it back.

    >>> import tempfile, frostline as fl
    >>> m = fl.wrap(nn.Linear(2, 2)); p = Path(tempfile.mkdtemp()) / "m.weights.safetensors"
    >>> save_weights(m, p).name, sorted(read(p)[0]), read(p)[1]
    ('m.weights.safetensors', ['bias', 'weight'], {})
    """
    path = Path(path)
    if path.suffix != ".safetensors":
        raise ValueError(f"weight files end in .safetensors, got {str(path)!r}")
    path.parent.mkdir(parents=True, exist_ok=True)
    return save_safetensors(model.module.state_dict(), path)


def read(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict]:
    """Tensors and frostline metadata of a model file (errors name the file and the defect)."""
    tensors, header = load_safetensors(path)
    raw = header.get(META_KEY)
    if raw is None:
        return tensors, {}
    try:
        meta = json.loads(raw)
    except (ValueError, RecursionError) as e:  # JSONDecodeError, too many digits, too deep
        reason = "nested too deeply" if isinstance(e, RecursionError) else str(e)
        raise CheckpointError(f"{path}: frostline metadata is not valid JSON ({reason})") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise CheckpointError(
            f"{path}: not a frostline model file (metadata format {meta.get('format') if isinstance(meta, dict) else meta!r})"
        )
    return tensors, meta


def load_weights(model, path: str | os.PathLike, *, strict: bool = True) -> None:
    """Load weights (and trainable state, when the file has it) into ``model``."""
    tensors, meta = read(path)
    prepare_lora(model.module, meta, str(path), tensors)
    if strict:
        check_keys(model.module, tensors, str(path))
    with torch.no_grad():
        model.module.load_state_dict(tensors, strict=strict)
    if meta.get("trainable"):
        apply_trainable_state(model.module, meta["trainable"])


__all__ = [
    "FORMAT",
    "META_KEY",
    "apply_trainable_state",
    "architecture_of",
    "load_weights",
    "prepare_lora",
    "read",
    "save_model",
    "save_weights",
    "trainable_state",
]
