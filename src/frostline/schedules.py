"""Deprecated: ``fl.schedules`` is now :mod:`frostline.freezing` (``fl.freezing``).

The freezing schedules (``UnfreezeAt``, ``GradualUnfreezing``, ``ProgressiveFreezing``,
``DiscriminativeLR``, ...) moved to ``fl.freezing`` so that they are not confused with the
learning-rate schedules of ``fl.optimizers.schedules``. Every name still works here, with a
``DeprecationWarning``, and is the same object as in ``fl.freezing``.

>>> import warnings, frostline as fl
>>> with warnings.catch_warnings():
...     warnings.simplefilter("ignore")
...     fl.schedules.UnfreezeAt is fl.freezing.UnfreezeAt
True
"""

import warnings as _warnings

from frostline import freezing as _freezing

__all__ = list(_freezing.__all__)


def __getattr__(name: str):
    if name in _freezing.__all__:
        _warnings.warn(
            f"fl.schedules.{name} is deprecated: use fl.freezing.{name} (freezing schedules; "
            "learning-rate schedules are fl.optimizers.schedules)",
            DeprecationWarning,
            stacklevel=2,
        )
        return getattr(_freezing, name)
    raise AttributeError(f"module 'frostline.schedules' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)
