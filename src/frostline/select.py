"""Public face of :mod:`frostline.api.select` (``fl.select``)."""

from frostline.api.select import *  # noqa: F403
from frostline.api.select import __all__ as __all__  # noqa: F401
