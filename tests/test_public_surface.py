"""The public surface: every public module lists its names explicitly, leaks nothing else,
and equals the checked-in snapshot (``public_surface.json``).

A change of the public surface is a decision: update the snapshot in the same commit
(``python tests/test_public_surface.py`` rewrites it from the package) and say why.
"""

from __future__ import annotations

import importlib
import json
import sys
import types
import warnings
from pathlib import Path

import pytest

SNAPSHOT = Path(__file__).with_name("public_surface.json")
MODULES = [
    "frostline",
    "frostline.batchnorm",
    "frostline.callbacks",
    "frostline.freezing",
    "frostline.layers",
    "frostline.losses",
    "frostline.metrics",
    "frostline.models",
    "frostline.optimizers",
    "frostline.optimizers.schedules",
    "frostline.recipes",
    "frostline.saving",
    "frostline.schedules",
    "frostline.select",
    "frostline.verify",
]
#: the package's internal layers: attributes of ``frostline`` (Python sets a subpackage on its
#: parent when it is imported), never listed in ``__all__``
INTERNAL = {"api", "app", "core", "engine", "integrations", "io", "workflows"}


def surface() -> dict[str, list[str]]:
    return {name: sorted(importlib.import_module(name).__all__) for name in MODULES}


def test_public_surface_equals_the_snapshot():
    want = json.loads(SNAPSHOT.read_text())
    got = surface()
    changes = []
    for module in sorted(set(want) | set(got)):
        added = sorted(set(got.get(module, [])) - set(want.get(module, [])))
        removed = sorted(set(want.get(module, [])) - set(got.get(module, [])))
        if added or removed:
            changes.append(f"{module}: added {added}, removed {removed}")
    assert not changes, (
        "the public surface changed; if that is intended, rewrite tests/public_surface.json "
        "(python tests/test_public_surface.py) in the same commit:\n" + "\n".join(changes)
    )


@pytest.mark.parametrize("name", MODULES)
def test_a_public_module_shows_exactly_its_names(name):
    module = importlib.import_module(name)
    listed = set(module.__all__)
    assert len(listed) == len(module.__all__), f"{name}.__all__ lists a name twice"
    # (pytest's assertion rewriting adds '@py_builtins' to a module it collected doctests from)
    shown = {n for n in dir(module) if not n.startswith("_") and n.isidentifier()}
    if name == "frostline":
        shown -= INTERNAL
    public = {n for n in listed if not n.startswith("_")}  # (__version__)
    assert shown == public, f"{name} shows {sorted(shown - public)} beyond __all__"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # fl.schedules: the alias
        for n in module.__all__:
            value = getattr(module, n)
            if isinstance(value, types.ModuleType):
                assert value.__name__.startswith("frostline."), f"{name}.{n} is {value.__name__}"


def test_the_deprecated_schedules_alias_warns_and_is_freezing():
    import frostline as fl

    for n in fl.freezing.__all__:
        with pytest.warns(
            DeprecationWarning, match=rf"fl.schedules.{n} is deprecated: use fl.freezing.{n}"
        ):
            assert getattr(fl.schedules, n) is getattr(fl.freezing, n)
    with pytest.raises(AttributeError, match="no attribute 'Nope'"):
        fl.schedules.Nope  # noqa: B018


def test_lr_schedules_and_freezing_schedules_do_not_share_a_name():
    import frostline as fl

    assert not set(fl.freezing.__all__) & set(fl.optimizers.schedules.__all__)


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
    SNAPSHOT.write_text(json.dumps(surface(), indent=2) + "\n")
    print(f"wrote {SNAPSHOT}")
