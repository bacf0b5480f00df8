"""Public face of :mod:`frostline.workflows.schedules` (``fl.schedules``)."""

from frostline.workflows.schedules import *  # noqa: F403
from frostline.workflows.schedules import __all__ as __all__  # noqa: F401
