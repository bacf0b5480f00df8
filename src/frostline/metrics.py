"""Public face of :mod:`frostline.api.metrics` (``fl.metrics``)."""

from frostline.api.metrics import *  # noqa: F403
from frostline.api.metrics import __all__ as __all__  # noqa: F401
