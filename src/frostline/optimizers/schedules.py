"""``fl.optimizers.schedules``: Keras learning-rate schedules (pass one as an optimizer's
``learning_rate``). Freezing schedules are ``fl.freezing``.

>>> import frostline as fl
>>> float(fl.optimizers.schedules.ExponentialDecay(0.1, 10, 0.5)(10))
0.05
"""

from frostline.api.lr_schedules import (
    CosineDecay,
    ExponentialDecay,
    InverseTimeDecay,
    LearningRateSchedule,
    PiecewiseConstantDecay,
    PolynomialDecay,
)

__all__ = [
    "CosineDecay",
    "ExponentialDecay",
    "InverseTimeDecay",
    "LearningRateSchedule",
    "PiecewiseConstantDecay",
    "PolynomialDecay",
]
