"""Public face of :mod:`frostline.api.saving` and :mod:`frostline.api.loading` (``fl.saving``)."""

from frostline.api.loading import *  # noqa: F403
from frostline.api.loading import __all__ as _loading_all
from frostline.api.saving import *  # noqa: F403
from frostline.api.saving import __all__ as _saving_all

__all__ = [*_saving_all, *_loading_all]
