"""frostline: Keras/TF.js layer freezing for PyTorch models, correct by construction and fast.

>>> import frostline as fl
>>> from torch import nn
>>> model = fl.Sequential([nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2)])
>>> model.layers[0].trainable = False
>>> len(model.trainable_weights), model.count_params()
(2, 58)
"""

from frostline import (
    batchnorm,
    callbacks,
    freezing,
    layers,
    losses,
    metrics,
    models,
    optimizers,
    recipes,
    saving,
    schedules,
    select,
    verify,
)
from frostline._version import __version__
from frostline.api.callbacks import Callback, History
from frostline.api.features import FrozenFeatures
from frostline.api.layer import Layer, LayerList
from frostline.api.loading import load_model as _load_model
from frostline.api.model import Model, Sequential, wrap
from frostline.api.select import Plan, SelectionError
from frostline.engine.data import DataError
from frostline.engine.runner import CacheOptions
from frostline.engine.tracking import OptimizerTracker, track
from frostline.engine.trainer import TrainingError, seed_everything
from frostline.engine.verify import FrozenWeightsChanged
from frostline.io.errors import CheckpointError, UnsafeFileError


def load(path, *, trusted_modules=()):
    """Rebuild a Model saved by ``Model.save`` (zoo name, import path or Sequential) and load its weights.

    A file is data: it may name only torch.nn layers, timm and torchvision models by
    registry name, and zoo names (see :mod:`frostline.api.allowlist`); an import path is
    followed only into a package listed in ``trusted_modules``. A request outside that
    is an :class:`UnsafeFileError` saying what the file asked for; any other defect is a
    :class:`CheckpointError`.

    >>> import frostline as fl, tempfile, os
    >>> from torch import nn
    >>> m = fl.Sequential([nn.Linear(2, 2)]); p = os.path.join(tempfile.mkdtemp(), "m.safetensors")
    >>> m.save(p); fl.load(p).count_params()
    6
    """
    return _load_model(path, trusted_modules=trusted_modules)


__all__ = [
    "__version__",
    "CacheOptions",
    "Callback",
    "CheckpointError",
    "DataError",
    "FrozenFeatures",
    "FrozenWeightsChanged",
    "History",
    "Layer",
    "LayerList",
    "Model",
    "OptimizerTracker",
    "Plan",
    "SelectionError",
    "Sequential",
    "TrainingError",
    "UnsafeFileError",
    "batchnorm",
    "callbacks",
    "freezing",
    "layers",
    "load",
    "losses",
    "metrics",
    "models",
    "optimizers",
    "recipes",
    "saving",
    "seed_everything",
    "schedules",
    "select",
    "track",
    "verify",
    "wrap",
]
