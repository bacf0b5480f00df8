"""Public face of :mod:`frostline.api.optimizers` (``fl.optimizers``)."""

from frostline.api.optimizers import *  # noqa: F403
from frostline.api.optimizers import __all__ as __all__  # noqa: F401
