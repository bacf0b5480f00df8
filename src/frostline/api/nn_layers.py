"""The layer classes a model file may name: found by name, never imported from a path.

They are the layer classes of ``torch.nn`` and frostline's own (``fl.layers``). A file
records a layer by its full class path (``torch.nn.modules.linear.Linear``). The class is
looked up by its last name in those two namespaces and kept only when its own full path
is exactly the recorded one, so ``"subprocess.Popen"`` or
``"torch.nn.modules.module.Module.register_forward_hook"`` never resolve. Containers and
the ``Module`` base class are not layers (a container's arguments are modules, which a
file cannot hold).

>>> layer_class("torch.nn.modules.linear.Linear").__name__
'Linear'
>>> layer_class("subprocess.Popen") is None
True
"""

from __future__ import annotations

import inspect

import torch
from torch import nn

from frostline.api import augment

__all__ = ["constructor_params", "layer_by_name", "layer_class"]

_NOT_LAYERS = frozenset(
    {
        "Module",
        "Container",
        "Sequential",
        "ModuleList",
        "ModuleDict",
        "ParameterList",
        "ParameterDict",
    }
)
_NOT_ARGUMENTS = frozenset({"self", "device", "dtype", "generator"})


def layer_by_name(name: object) -> type[nn.Module] | None:
    """The layer class ``torch.nn.<name>`` (defined under ``torch.nn.modules``) or
    ``fl.layers.<name>``, or None.

    >>> layer_by_name("Conv2d").__name__, layer_by_name("Module"), layer_by_name("functional")
    ('Conv2d', None, None)
    >>> layer_by_name("RandomFlip").__module__
    'frostline.api.augment'
    """
    if not isinstance(name, str) or not name.isidentifier() or name.startswith("_"):
        return None
    if name in _NOT_LAYERS:
        return None
    if name in augment.__all__:
        return getattr(augment, name)
    cls = vars(torch.nn).get(name)
    if (
        isinstance(cls, type)
        and issubclass(cls, nn.Module)
        and cls.__module__.startswith("torch.nn.modules.")
    ):
        return cls
    return None


def layer_class(path: object) -> type[nn.Module] | None:
    """The layer class whose full path (``module.QualName``) is exactly ``path``, or None.

    >>> layer_class("torch.nn.modules.module.Module.register_forward_hook") is None
    True
    >>> layer_class("torch.nn.Linear") is None  # the path a saved file records is the full one
    True
    """
    if not isinstance(path, str):
        return None
    cls = layer_by_name(path.rpartition(".")[2])
    if cls is None or f"{cls.__module__}.{cls.__qualname__}" != path:
        return None
    return cls


def constructor_params(cls: type) -> dict[str, inspect.Parameter]:
    """The named arguments ``cls(...)`` takes, less ``self``, ``device``, ``dtype``,
    ``generator`` (objects, never in a file) and ``_private`` ones.

    >>> list(constructor_params(nn.Linear))
    ['in_features', 'out_features', 'bias']
    """
    try:
        params = inspect.signature(cls).parameters
    except (TypeError, ValueError):
        return {}
    return {
        k: p
        for k, p in params.items()
        if k not in _NOT_ARGUMENTS
        and not k.startswith("_")
        and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)
    }
