"""``fl.optimizers``: Keras-named optimizers with Keras 3's update formulas and defaults
(decoupled weight decay on trainable weights only), ``TorchOptimizer`` for any
``torch.optim`` class, ``get`` by name, the learning-rate ``schedules``, and
``KerasOptimizer``, the base class to write another Keras optimizer on.

>>> import frostline as fl
>>> fl.optimizers.Adam(1e-3).learning_rate
0.001
"""

from frostline.api.optimizers import (
    SGD,
    Adagrad,
    Adam,
    Adamax,
    AdamW,
    KerasOptimizer,
    Lion,
    Nadam,
    Optimizer,
    RMSprop,
    TorchOptimizer,
    get,
)
from frostline.optimizers import schedules

__all__ = [
    "Adagrad",
    "Adam",
    "Adamax",
    "AdamW",
    "get",
    "KerasOptimizer",
    "Lion",
    "Nadam",
    "Optimizer",
    "RMSprop",
    "schedules",
    "SGD",
    "TorchOptimizer",
]
