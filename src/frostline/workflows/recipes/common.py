"""Small helpers the recipes share: a Model from anything, a base named or given, parameter counts."""

from __future__ import annotations

from typing import Any

from torch import nn

from frostline.api.layer import Layer
from frostline.api.model import Model

__all__ = ["as_model", "count_params", "resolve_base"]


def as_model(model: Any) -> Model:
    if isinstance(model, Model):
        return model
    if isinstance(model, nn.Module):
        return Model(model)
    raise TypeError(
        f"model must be a frostline Model or a torch.nn.Module, got {type(model).__name__}"
    )


def resolve_base(model: Model, base: Any) -> Layer:
    """``base`` as a Layer of ``model``: a Layer/Model, a module inside it, or a layer name."""
    if isinstance(base, str):
        return model.get_layer(base)
    if isinstance(base, Layer):
        layer = base
    elif isinstance(base, nn.Module):
        layer = Layer(base, name="base")
    else:
        raise TypeError(
            f"base must be a layer of the model (a Layer, a torch module or a name), got {type(base).__name__}"
        )
    if not any(m is layer.module for m in model.module.modules()):
        raise ValueError(
            f"base {layer.name!r} is not part of model {model.name!r}; build the model around it "
            "(e.g. fl.Sequential([base, head])) or pass model.get_layer(...)"
        )
    return layer


def count_params(module: nn.Module, trainable: bool | None = None) -> int:
    return sum(
        p.numel() for p in module.parameters() if trainable is None or p.requires_grad == trainable
    )
