"""Public face of :mod:`frostline.api.augment` (``fl.layers``): Keras-style augmentation layers.

>>> import frostline as fl
>>> fl.layers.RandomFlip("horizontal")
RandomFlip('horizontal')
"""

from frostline.api.augment import RandomFlip, RandomRotation

__all__ = ["RandomFlip", "RandomRotation"]
