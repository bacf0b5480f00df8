"""The model zoo: ``fl.models.pretrained("efficientnet_lite0")`` works offline.

>>> import frostline as fl
>>> base = fl.models.pretrained("efficientnet_lite0", headless=True)
>>> base.trainable = False
>>> len(base.trainable_weights)
0
"""

from frostline.api.zoo import *  # noqa: F403
from frostline.api.zoo import __all__ as __all__  # noqa: F401
