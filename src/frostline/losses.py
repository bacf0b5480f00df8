"""Public face of :mod:`frostline.api.losses` (``fl.losses``)."""

from frostline.api.losses import *  # noqa: F403
from frostline.api.losses import __all__ as __all__  # noqa: F401
