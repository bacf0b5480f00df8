"""A shared trunk with one head per task, returning a dict of outputs."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from frostline.api.layer import Layer
from frostline.api.model import Model

__all__ = ["MultiTaskModule", "multitask_model"]


class MultiTaskModule(nn.Module):
    """``x -> {name: head(trunk(x))}``: a shared trunk and one head per task."""

    def __init__(self, trunk: nn.Module, heads: Mapping[str, nn.Module]) -> None:
        super().__init__()
        self.trunk = trunk
        self.heads = nn.ModuleDict(dict(heads))

    def forward(self, x: Any) -> dict[str, torch.Tensor]:
        z = self.trunk(x)
        return {name: head(z) for name, head in self.heads.items()}


def multitask_model(
    trunk: nn.Module | Layer,
    heads: Mapping[str, nn.Module | Layer],
    *,
    name: str = "multitask",
    freeze_trunk: bool = False,
) -> Model:
    """A Model with a shared ``trunk`` and one head per task; it returns ``{task: output}``.

    Compile with one loss per head; logs get Keras names (``<task>_loss``,
    ``<task>_accuracy``). ``model.get_layer("trunk")`` and ``model.get_layer("heads.<task>")``
    reach the parts (``freeze_trunk=True`` freezes the trunk right away).

    >>> import numpy as np
    >>> from torch import nn
    >>> m = multitask_model(nn.Sequential(nn.Linear(4, 8), nn.ReLU()),
    ...                     {"kind": nn.Linear(8, 3), "size": nn.Linear(8, 1)}, freeze_trunk=True)
    >>> m.compile("adam", loss={"kind": "sparse_categorical_crossentropy", "size": "mse"},
    ...           loss_weights={"kind": 1.0, "size": 0.5}, metrics={"kind": ["accuracy"]})
    >>> x = np.random.rand(32, 4).astype("float32")
    >>> h = m.fit(x, {"kind": np.random.randint(0, 3, 32), "size": np.random.rand(32, 1).astype("float32")}, verbose=0)
    >>> sorted(h.history)
    ['epoch_time', 'kind_accuracy', 'kind_loss', 'loss', 'size_loss']
    """
    if not isinstance(heads, Mapping) or not heads:
        raise ValueError("heads must be a non-empty dict {task name: head module}")
    mods: dict[str, nn.Module] = {}
    for key, head in heads.items():
        if not isinstance(key, str) or not key or "." in key:
            raise ValueError(f"head names must be non-empty strings without dots, got {key!r}")
        mods[key] = head.module if isinstance(head, Layer) else head
        if not isinstance(mods[key], nn.Module):
            raise TypeError(f"head {key!r} must be a torch.nn.Module, got {type(head).__name__}")
    trunk_mod = trunk.module if isinstance(trunk, Layer) else trunk
    if not isinstance(trunk_mod, nn.Module):
        raise TypeError(
            f"trunk must be a torch.nn.Module or a frostline Layer, got {type(trunk).__name__}"
        )
    model = Model(MultiTaskModule(trunk_mod, mods), name=name)
    if freeze_trunk:
        model.get_layer("trunk").trainable = False
    return model
