"""``fl.verify``: fingerprints of frozen weights, and the check that they did not move.

>>> import frostline as fl
>>> from torch import nn
>>> net = nn.Linear(2, 2).requires_grad_(False)
>>> fl.verify.fingerprint(net).check(net).ok
True
"""

from frostline.engine.verify import (
    Fingerprint,
    FrozenWeightsChanged,
    Report,
    fingerprint,
)

__all__ = [
    "Fingerprint",
    "fingerprint",
    "FrozenWeightsChanged",
    "Report",
]
