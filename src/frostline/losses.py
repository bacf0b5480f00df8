"""``fl.losses``: losses by Keras name and class.

>>> import frostline as fl
>>> fl.losses.get("mse")
MeanSquaredError(from_logits=None)
"""

from frostline.api.losses import (
    BinaryCrossentropy,
    CategoricalCrossentropy,
    Huber,
    LabelError,
    Loss,
    MeanAbsoluteError,
    MeanSquaredError,
    SparseCategoricalCrossentropy,
    get,
)

__all__ = [
    "BinaryCrossentropy",
    "CategoricalCrossentropy",
    "get",
    "Huber",
    "LabelError",
    "Loss",
    "MeanAbsoluteError",
    "MeanSquaredError",
    "SparseCategoricalCrossentropy",
]
