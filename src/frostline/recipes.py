"""Public face of :mod:`frostline.workflows.recipes` (``fl.recipes``)."""

from frostline.workflows.recipes import *  # noqa: F403
from frostline.workflows.recipes import __all__ as __all__  # noqa: F401
