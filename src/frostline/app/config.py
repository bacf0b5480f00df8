"""One schema per command: a dataclass whose fields make both the flags and the config-file keys.

Each field of an options dataclass carries a :class:`Flag` in its metadata (help text,
how to parse one value, how it is spelled on the command line). From that one
description :func:`add_flags` builds the argparse arguments and :func:`read_config`
checks a TOML/YAML file, so a key and its flag always take the same values and give
the same error for a bad one. :func:`resolve` merges defaults <- file <- flags.

>>> from dataclasses import dataclass
>>> @dataclass
... class Opts:
...     epochs: int = option(5, help="epochs", parse=count, metavar="N")
...     tags: list = option(list, help="tags", repeat=True, metavar="TAG")
>>> p = argparse.ArgumentParser(prog="x")
>>> add_flags(p, Opts)
>>> resolve(Opts, p.parse_args(["--epochs", "3", "--tags", "a"]))
Opts(epochs=3, tags=['a'])
>>> convert_value(Opts, "epochs", -1, "c.toml")
Traceback (most recent call last):
...
frostline.app.config.UsageError: config file 'c.toml', key 'epochs': expected an integer >= 0, got '-1'
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from frostline.app.runinfo import MAX_CLASSES, MAX_IMAGE_SIZE, MIN_IMAGE_SIZE

#: more compute threads than this is a typo, not a machine (torch would try to start them)
MAX_THREADS = 1024

__all__ = [
    "Flag",
    "UsageError",
    "add_flags",
    "checked",
    "convert_value",
    "option",
    "read_config",
    "resolve",
]


class UsageError(ValueError):
    """A bad flag, config value or argument (reported in one line, exit code 2)."""


def one_line(e: BaseException) -> str:
    """An exception's message on one line (its type name when it has none)."""
    text = " ".join(str(e).split())
    return text or type(e).__name__


# --------------------------------------------------------------------------- value parsers


def checked(
    convert: Callable[[str], Any], ok: Callable[[Any], bool], expected: str
) -> Callable[[str], Any]:
    """A parser: ``convert`` the text, then check it with ``ok``; one message for both failures.

    >>> checked(int, lambda v: v > 0, "a positive integer")("3")
    3
    """

    def parse(text: str) -> Any:
        try:
            v = convert(text)
        except (TypeError, ValueError):
            v = None
        if v is None or not ok(v):
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}")
        return v

    return parse


positive_int = checked(int, lambda v: v >= 1, "a positive integer")
count = checked(int, lambda v: v >= 0, "an integer >= 0")
integer = checked(int, lambda v: True, "an integer")
rate = checked(float, lambda v: 0 < v < math.inf, "a positive number such as 1e-3")
fraction = checked(float, lambda v: 0 <= v < 1, "a fraction in [0, 1)")
image_side = checked(
    int,
    lambda v: MIN_IMAGE_SIZE <= v <= MAX_IMAGE_SIZE,
    f"an image side in pixels from {MIN_IMAGE_SIZE} to {MAX_IMAGE_SIZE}",
)
thread_count = checked(
    int, lambda v: 1 <= v <= MAX_THREADS, f"a number of threads from 1 to {MAX_THREADS}"
)
class_count = checked(
    int, lambda v: 1 <= v <= MAX_CLASSES, f"a number of classes from 1 to {MAX_CLASSES:,}"
)


def text(value: str) -> str:
    if not value:
        raise argparse.ArgumentTypeError("expected a non-empty string, got ''")
    return value


# --------------------------------------------------------------------------- the schema


@dataclass(frozen=True)
class Flag:
    """How one option is spelled and parsed (the metadata of an options field)."""

    help: str
    parse: Callable[[str], Any] = text
    metavar: str | None = None
    choices: tuple[str, ...] | None = None
    positional: bool = False  # DATA rather than --data
    nargs: str | None = "?"  # of a positional: "?" optional, None required, "+" one or more
    repeat: bool = False  # a list of strings: the flag repeats, a file gives a list
    switch: bool = False  # a bool: --x (and --no-x when negatable)
    negatable: bool = False
    group: str | None = None
    default_help: str | None = None  # the "(default: ...)" text; None: the field's default
    in_config: bool = True  # may a config file set it?


def option(default: Any = dataclasses.MISSING, **flag: Any) -> Any:
    """A dataclass field with its :class:`Flag`; a callable ``default`` is a default factory."""
    meta = {"flag": Flag(**flag)}
    if callable(default):
        return dataclasses.field(default_factory=default, metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def flag_fields(cls: type) -> list[dataclasses.Field]:
    return [f for f in dataclasses.fields(cls) if "flag" in f.metadata]


def default_of(f: dataclasses.Field) -> Any:
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return f.default


def _default_text(f: dataclasses.Field, spec: Flag) -> str:
    if spec.default_help is not None:
        return spec.default_help
    d = default_of(f)
    if (
        d is dataclasses.MISSING or d is None or d == [] or d is False
    ):  # required, or nothing to say
        return ""
    return f"{d:g}" if isinstance(d, float) else str(d)


def add_flags(parser: argparse.ArgumentParser, cls: type) -> None:
    """Add one argument per field of ``cls``; a flag not given is absent from the namespace."""
    groups: dict[str, Any] = {}
    for f in flag_fields(cls):
        spec: Flag = f.metadata["flag"]
        target: Any = parser
        if spec.group:
            if spec.group not in groups:
                groups[spec.group] = parser.add_argument_group(spec.group)
            target = groups[spec.group]
        default = _default_text(f, spec)
        help_text = spec.help + (f" (default: {default})" if default else "")
        kw: dict[str, Any] = {"help": help_text, "default": argparse.SUPPRESS, "dest": f.name}
        if spec.positional:
            del kw["dest"]
            if spec.nargs is None:
                del kw["default"]
            target.add_argument(f.name, metavar=spec.metavar, nargs=spec.nargs, **kw)
            continue
        name = "--" + f.name.replace("_", "-")
        if spec.switch:
            action = argparse.BooleanOptionalAction if spec.negatable else "store_true"
            target.add_argument(name, action=action, **kw)
        elif spec.repeat:
            target.add_argument(name, metavar=spec.metavar, action="append", **kw)
        elif spec.choices:
            target.add_argument(name, choices=spec.choices, **kw)
        else:
            target.add_argument(name, metavar=spec.metavar, type=spec.parse, **kw)


def _field(cls: type, key: str) -> dataclasses.Field | None:
    for f in flag_fields(cls):
        if f.name == key and f.metadata["flag"].in_config:
            return f
    return None


def config_keys(cls: type) -> list[str]:
    return [f.name for f in flag_fields(cls) if f.metadata["flag"].in_config]


def convert_value(cls: type, key: str, value: Any, source: str) -> Any:
    """A config file's ``value`` for ``key``, checked exactly as the flag checks its text."""
    f = _field(cls, key)
    where = f"config file {source!r}, key {key!r}"
    if f is None:
        raise UsageError(
            f"config file {source!r} has unknown key {key!r}; known keys: {', '.join(config_keys(cls))}"
        )
    spec: Flag = f.metadata["flag"]
    if spec.switch:
        if isinstance(value, bool):
            return value
        raise UsageError(f"{where}: expected true or false, got {value!r}")
    if spec.repeat:
        if isinstance(value, str):
            value = [value]
        if isinstance(value, list) and all(isinstance(v, str) and v for v in value):
            return list(value)
        raise UsageError(f"{where}: expected a string or a list of strings, got {value!r}")
    if spec.choices:
        if value in spec.choices:
            return value
        raise UsageError(f"{where}: expected one of {', '.join(spec.choices)}, got {value!r}")
    if isinstance(value, bool) or not isinstance(value, int | float | str | os.PathLike):
        raise UsageError(f"{where}: expected a single value, got {value!r}")
    try:
        return spec.parse(str(value))
    except argparse.ArgumentTypeError as e:
        raise UsageError(f"{where}: {e}") from None


def _parse_file(p: Path) -> Any:
    suffix = p.suffix.lower()
    raw = p.read_bytes().decode("utf-8")
    if suffix == ".toml":
        try:
            import tomllib
        except ModuleNotFoundError:  # Python 3.10
            try:
                import tomli as tomllib  # type: ignore[no-redef,import-not-found,unused-ignore]
            except ModuleNotFoundError:
                raise UsageError(
                    "TOML config files need Python 3.11+ (tomllib) or the tomli package; use a .yaml file instead"
                ) from None
        return tomllib.loads(raw)
    if suffix in (".yaml", ".yml"):
        from frostline.app.extras import require

        yaml = require("yaml", "YAML config files")
        return yaml.safe_load(raw)
    raise UsageError(
        f"config file {str(p)!r} has suffix {suffix or '(none)'!r}; expected .toml, .yaml or .yml"
    )


def read_config(path: str | os.PathLike, cls: type, section: str | None = None) -> dict[str, Any]:
    """Checked option values from a TOML or YAML file (a top-level ``section`` table when present)."""
    p = Path(path)
    if not p.is_file():
        raise UsageError(f"config file {str(p)!r} does not exist; expected a .toml or .yaml file")
    try:
        data = _parse_file(p)
    except UsageError:
        raise
    except Exception as e:  # parse errors of either format, bad UTF-8
        raise UsageError(f"config file {str(p)!r} could not be parsed ({one_line(e)})") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise UsageError(
            f"config file {str(p)!r} holds a {type(data).__name__}; expected a table of option = value"
        )
    if section and isinstance(data.get(section), dict):
        data = data[section]
    return {
        str(k).replace("-", "_"): convert_value(cls, str(k).replace("-", "_"), v, str(p))
        for k, v in data.items()
    }


def resolve(
    cls: type,
    ns: argparse.Namespace,
    config: Mapping[str, Any] | None = None,
    **extra: Any,
) -> Any:
    """An instance of ``cls``: its defaults, then ``config``, then the flags given in ``ns``."""
    names = {f.name for f in dataclasses.fields(cls)}
    given = {k: v for k, v in vars(ns).items() if k in names}
    return cls(**{**(config or {}), **given, **extra})


def given_flags(cls: type, ns: argparse.Namespace) -> set[str]:
    """The options of ``cls`` set on the command line (not from a file or a default)."""
    return {f.name for f in flag_fields(cls) if f.name in vars(ns)}
