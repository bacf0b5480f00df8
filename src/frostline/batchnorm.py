"""``fl.batchnorm``: the BatchNorm policy (frozen BatchNorm runs in inference mode).

``set_mode`` sets one BatchNorm layer's policy (``Layer.set_batchnorm_mode`` sets every
BatchNorm below a layer): ``"auto"``, ``"batch_stats"`` or ``"inference"``.

>>> import frostline as fl
>>> from torch import nn
>>> bn = nn.BatchNorm1d(3); fl.batchnorm.set_mode(bn, "inference"); fl.batchnorm.mode_of(bn)
'inference'
"""

from frostline.core.batchnorm import (
    MODES,
    batchnorm_modes,
    is_batchnorm,
    mode_of,
    runs_inference,
    set_mode,
)

__all__ = [
    "batchnorm_modes",
    "is_batchnorm",
    "mode_of",
    "MODES",
    "runs_inference",
    "set_mode",
]
