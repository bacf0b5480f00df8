"""Public face of :mod:`frostline.core.batchnorm` (``fl.batchnorm``)."""

from frostline.core.batchnorm import *  # noqa: F403
from frostline.core.batchnorm import __all__ as __all__  # noqa: F401
