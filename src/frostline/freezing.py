"""``fl.freezing``: freezing schedules, callbacks that change what trains during ``fit``
(gradual unfreezing, progressive freezing, unfreeze at an epoch, discriminative rates per
layer group). Learning-rate schedules are ``fl.optimizers.schedules``; ``fl.schedules``
is the deprecated former name of this module.

>>> import frostline as fl
>>> fl.freezing.UnfreezeAt.__name__
'UnfreezeAt'
"""

from frostline.workflows.schedules import (
    DiscriminativeLR,
    GradualUnfreezing,
    Group,
    GroupRates,
    ProgressiveFreezing,
    UnfreezeAt,
    layer_groups,
)

__all__ = [
    "DiscriminativeLR",
    "GradualUnfreezing",
    "Group",
    "GroupRates",
    "layer_groups",
    "ProgressiveFreezing",
    "UnfreezeAt",
]
