"""The options of the commands that put a trained run directory to use (``predict``, ``evaluate``).

Each function returns a fresh options field (see :func:`frostline.app.config.option`),
so every command spells, parses, documents and defaults these flags the same way.

>>> import argparse
>>> from dataclasses import dataclass
>>> from frostline.app.config import add_flags, resolve
>>> @dataclass
... class Opts:
...     run_dir: str = run_dir_option()
...     batch_size: int = batch_size_option()
...     trust: list = trust_option()
...     threads: int | None = threads_option()
>>> p = argparse.ArgumentParser(prog="x")
>>> add_flags(p, Opts)
>>> resolve(Opts, p.parse_args(["runs/a", "--trust", "mypkg", "--threads", "2"]))
Opts(run_dir='runs/a', batch_size=64, trust=['mypkg'], threads=2)
"""

from __future__ import annotations

from typing import Any

from frostline.app.config import option, positive_int, thread_count

__all__ = ["batch_size_option", "run_dir_option", "threads_option", "trust_option"]


def run_dir_option() -> Any:
    """The required ``RUN_DIR`` positional: a run directory written by ``fit`` or ``demo``."""
    return option(
        help="run directory written by frostline fit or frostline demo",
        positional=True,
        nargs=None,
        metavar="RUN_DIR",
    )


def batch_size_option() -> Any:
    """``--batch-size N`` (default 64): samples per forward pass."""
    return option(64, parse=positive_int, metavar="N", help="batch size")


def trust_option() -> Any:
    """``--trust PACKAGE`` (repeatable): packages whose factory may be imported to rebuild the model."""
    return option(
        list,
        repeat=True,
        metavar="PACKAGE",
        help="allow importing PACKAGE to rebuild a model fit built from 'package.module:factory' (repeatable)",
    )


def threads_option() -> Any:
    """``--threads N``: CPU threads for torch (default: torch's choice)."""
    return option(
        None,
        parse=thread_count,
        metavar="N",
        help="CPU threads for torch (default: torch's choice)",
    )
