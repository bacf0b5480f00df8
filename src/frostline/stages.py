"""Public face of :mod:`frostline.engine.stages` (``fl.stages``)."""

from frostline.engine.stages import *  # noqa: F403
from frostline.engine.stages import __all__ as __all__  # noqa: F401
