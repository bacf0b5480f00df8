"""The command-line app's optional dependencies, and the one-line advice when one is missing.

``pip install frostline`` installs the library (torch, timm, safetensors, numpy);
the app's image reading, metrics, plots and YAML configs need the ``app`` extra:
``pip install "frostline[app]"`` (``[dev]`` includes it).

>>> require("json", "reading JSON").dumps([1])
'[1]'
"""

from __future__ import annotations

import importlib
import importlib.util
from types import ModuleType

__all__ = ["EXTRA", "MissingExtra", "check_installed", "require"]

EXTRA = "app"

#: import name -> the distribution that provides it
PROVIDERS = {
    "PIL": "pillow",
    "sklearn": "scikit-learn",
    "matplotlib": "matplotlib",
    "yaml": "pyyaml",
}


class MissingExtra(ImportError):
    """An optional dependency of the app is not installed (reported in one line, exit code 2)."""


def _missing(module: str, purpose: str) -> MissingExtra:
    dist = PROVIDERS.get(module, module)
    return MissingExtra(
        f"{purpose} needs {dist}, which is not installed; install the app's extras with "
        f'pip install "frostline[{EXTRA}]" (or pip install {dist})'
    )


def require(module: str, purpose: str) -> ModuleType:
    """Import ``module``, or raise :class:`MissingExtra` naming the extra that installs it."""
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as e:  # the module, or one it needs (matplotlib needs Pillow)
        raise _missing((e.name or module).split(".")[0], purpose) from None


def check_installed(module: str, purpose: str) -> None:
    """Raise :class:`MissingExtra` now if ``module`` is not installed, without importing
    it (a command that needs it only at its end checks before its work; matplotlib's
    import costs 12 MB and 0.07 s). :func:`require` imports it when it is needed.

    >>> check_installed("json", "reading JSON")
    """
    try:
        found = importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):  # a parent package missing, or a module without a spec
        found = False
    if not found:
        raise _missing(module.split(".")[0], purpose)
