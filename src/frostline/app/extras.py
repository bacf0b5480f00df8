"""The command-line app's optional dependencies, and the one-line advice when one is missing.

``pip install frostline`` installs the library (torch, timm, safetensors, numpy);
the app's image reading, metrics, plots and YAML configs need the ``app`` extra:
``pip install "frostline[app]"`` (``[dev]`` includes it).

>>> require("json", "reading JSON").dumps([1])
'[1]'
"""

from __future__ import annotations

import importlib
from types import ModuleType

__all__ = ["EXTRA", "MissingExtra", "require"]

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


def require(module: str, purpose: str) -> ModuleType:
    """Import ``module``, or raise :class:`MissingExtra` naming the extra that installs it."""
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as e:  # the module, or one it needs (matplotlib needs Pillow)
        missing = (e.name or module).split(".")[0]
        dist = PROVIDERS.get(missing, missing)
        raise MissingExtra(
            f"{purpose} needs {dist}, which is not installed; install the app's extras with "
            f'pip install "frostline[{EXTRA}]" (or pip install {dist})'
        ) from None
