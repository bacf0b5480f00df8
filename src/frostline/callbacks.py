"""Public face of :mod:`frostline.api.callbacks` (``fl.callbacks``)."""

from frostline.api.callbacks import *  # noqa: F403
from frostline.api.callbacks import __all__ as __all__  # noqa: F401
