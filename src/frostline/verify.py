"""Public face of :mod:`frostline.engine.verify` (``fl.verify``)."""

from frostline.engine.verify import *  # noqa: F403
from frostline.engine.verify import __all__ as __all__  # noqa: F401
