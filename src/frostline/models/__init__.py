"""The model zoo: ``fl.models.pretrained("efficientnet_lite0")`` works offline.

>>> import frostline as fl
>>> base = fl.models.pretrained("efficientnet_lite0", headless=True)
>>> base.trainable = False
>>> len(base.trainable_weights)
0
"""

from frostline.api.zoo import ZooError, available, data_config, preprocess, pretrained

__all__ = ["ZooError", "available", "data_config", "preprocess", "pretrained"]
