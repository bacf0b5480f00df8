"""Models named on the command line: zoo names, ``package.module:factory`` paths, freezing flags."""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from frostline.app.config import UsageError, one_line

__all__ = [
    "apply_selection",
    "build_import_model",
    "cwd_importable",
    "freeze_selectors",
    "freeze_selector",
    "import_factory",
    "is_import_path",
]


def is_import_path(spec: str) -> bool:
    """``package.module:factory`` (and not a file that happens to hold a colon).

    >>> is_import_path("mypkg.models:build"), is_import_path("efficientnet_lite0")
    (True, False)
    """
    return ":" in spec and not os.path.exists(spec)


@contextlib.contextmanager
def cwd_importable() -> Iterator[None]:
    """While inside, modules in the current directory can be imported (as ``python -m`` allows)."""
    cwd = os.getcwd()
    added = cwd not in sys.path
    if added:
        sys.path.insert(0, cwd)
    try:
        yield
    finally:
        if added:
            with contextlib.suppress(ValueError):
                sys.path.remove(cwd)


def import_factory(spec: str) -> Callable:
    """``package.module:factory`` -> the callable, through the library's one import-path resolver."""
    from frostline.api.loading import ImportPathError, import_path

    mod_name, _, attr = spec.partition(":")
    if not mod_name or not attr:
        raise UsageError(
            f"--model {spec!r} is not a zoo name or an import path; expected 'package.module:factory'"
        )
    try:
        with cwd_importable():
            return import_path(spec)
    except ImportPathError as e:
        raise UsageError(f"--model {spec!r}: {one_line(e)}") from None


def build_import_model(spec: str, num_classes: int | None):
    """Call the factory (with ``num_classes=`` when given) and wrap the result as a Model."""
    from torch import nn

    import frostline as fl

    factory = import_factory(spec)
    kwargs = {} if num_classes is None else {"num_classes": num_classes}
    try:
        with cwd_importable():
            made = factory(**kwargs)
    except TypeError as e:
        raise UsageError(
            f"--model {spec!r}: calling it with {kwargs or 'no arguments'} failed ({one_line(e)}); the factory must accept num_classes="
        ) from None
    if isinstance(made, fl.Model):
        model = made
    elif isinstance(made, nn.Module):
        model = fl.wrap(made, name=spec.rpartition(":")[2])
    else:
        raise UsageError(
            f"--model {spec!r} returned a {type(made).__name__}; expected a torch.nn.Module"
        )
    model.meta.setdefault(
        "architecture", {"kind": "import", "target": spec, "args": [], "kwargs": kwargs}
    )
    return model


def split_types(values: Sequence[str]) -> list[str]:
    """``["Conv2d,BatchNorm2d", "Linear"]`` -> ``["Conv2d", "BatchNorm2d", "Linear"]``."""
    return [t.strip() for v in values for t in str(v).split(",") if t.strip()]


def resolve_types(target, names: Sequence[str]) -> list:
    """Class names -> the classes in ``target`` named so or subclassing one named so.

    ``BatchNorm2d`` then also matches timm's ``BatchNormAct2d``; a name no module
    carries is passed on as is (the selector's error lists what exists).
    """
    out: list = []
    for name in names:
        found = {
            type(m)
            for m in target.module.modules()
            if any(c.__name__ == name for c in type(m).__mro__)
        }
        out += sorted(found, key=lambda c: c.__name__) if found else [name]
    return out


def freeze_selectors(
    target,
    *,
    freeze_all: bool,
    freeze: Sequence[str] = (),
    freeze_type: Sequence[str] = (),
    head_excluded: bool = False,
) -> list:
    """The selectors the freezing flags name, in the order they apply.

    ``--freeze-all`` is ``None`` (everything), or every leaf but the last when
    ``head_excluded``; ``--freeze type:X`` and ``--freeze-type X`` match subclasses too.
    """
    import frostline as fl

    sels: list[Any] = []
    try:
        if freeze_all:
            sels.append(~fl.select.last(1) if head_excluded else None)
        for spec in freeze:
            if spec.startswith("type:"):
                sels.append(fl.select.of_type(*resolve_types(target, split_types([spec[5:]]))))
            else:
                sels.append(fl.select.parse(spec))
        types = split_types(freeze_type)
        if types:
            sels.append(fl.select.of_type(*resolve_types(target, types)))
    except fl.SelectionError:
        raise
    except (ValueError, TypeError) as e:
        raise UsageError(one_line(e)) from None
    return sels


def apply_selection(target, **flags: Any) -> list:
    """Freeze on ``target`` as the flags ask (see :func:`freeze_selectors`); returns the Plans."""
    return [target.freeze(sel) for sel in freeze_selectors(target, **flags)]


def freeze_selector(target, **flags: Any):
    """What ``two_phase(freeze=...)`` takes for the flags: None (all of ``target``), ``[]`` (nothing)
    or the union of the flags' selectors, each checked to match a layer of ``target`` by itself."""
    sels = freeze_selectors(target, **flags)
    if any(s is None for s in sels):
        return None
    for s in sels:
        target.freeze(s, dry_run=True)  # a selector that matches nothing fails here, by itself
    if not sels:
        return []
    union = sels[0]
    for s in sels[1:]:
        union = union | s
    return union
