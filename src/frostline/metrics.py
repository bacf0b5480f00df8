"""``fl.metrics``: metrics by Keras name and class (a torchmetrics metric works too).

>>> import frostline as fl
>>> type(fl.metrics.get("accuracy")).__name__
'Accuracy'
"""

from frostline.api.metrics import (
    Accuracy,
    MeanAbsoluteError,
    MeanSquaredError,
    Metric,
    TopKAccuracy,
    TorchMetric,
    get,
)

__all__ = [
    "Accuracy",
    "get",
    "MeanAbsoluteError",
    "MeanSquaredError",
    "Metric",
    "TopKAccuracy",
    "TorchMetric",
]
