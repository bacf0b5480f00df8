"""The ``frostline`` command: the parser, the dispatch and the exit codes.

Each subcommand lives in :mod:`frostline.app.commands` (``demo``, ``fit``, ``summary``,
``predict``, ``evaluate``, ``export``); its flags come from its ``Options`` dataclass. ``main(argv)``
returns the exit code: 0 success, 1 training or writing failed, 2 bad input or usage
(one line on stderr, no traceback, no half-written run directory), 3 ``predict`` done but
some inputs unreadable (each named on stderr), 130 interrupted.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shlex
import sys
from collections.abc import Sequence
from types import ModuleType
from typing import NoReturn

from frostline.app.commands import demo, evaluate, export, fit, predict, summary
from frostline.app.config import UsageError, add_flags, one_line

__all__ = ["COMMANDS", "build_parser", "main"]

PROG = "frostline"
COMMANDS: tuple[ModuleType, ...] = (demo, fit, summary, predict, evaluate, export)


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors: ``frostline fit: error: ... (see --help)``."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see '{self.prog} --help')\n")


class _Formatter(argparse.RawDescriptionHelpFormatter):
    def __init__(self, prog: str) -> None:
        super().__init__(prog, max_help_position=32, width=100)


def _version() -> str:
    """The installed version, without importing torch (keeps --help instant)."""
    try:
        from importlib.metadata import version

        return version("frostline")
    except Exception:  # not installed (running from a source tree)
        return "unknown"


def build_parser() -> argparse.ArgumentParser:
    """The parser of every command, its flags made from each command's ``Options``."""
    parser = _Parser(
        prog=PROG,
        description="frostline: Keras/TF.js layer freezing for PyTorch models, from the command line.",
        epilog="Run 'frostline COMMAND --help' for a command's options. Start with: frostline demo",
        formatter_class=_Formatter,
    )
    parser.add_argument("--version", action="version", version=f"frostline {_version()}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True
    for command in COMMANDS:
        p = sub.add_parser(
            command.NAME,
            help=command.HELP,
            description=command.DESCRIPTION,
            formatter_class=_Formatter,
        )
        add_flags(p, command.Options)
        p.set_defaults(command_module=command)
    return parser


def _err(message: str) -> None:
    print(f"{PROG}: error: {message}", file=sys.stderr, flush=True)


def command_line(argv: Sequence[str]) -> str:
    """The command as typed (quoted for a shell), for the run's report."""
    return " ".join([PROG, *(shlex.quote(a) for a in argv)])


def _bad_input() -> tuple[type[BaseException], ...]:
    from frostline.api.select import SelectionError
    from frostline.api.zoo import ZooError
    from frostline.app import imagefolder, report
    from frostline.app.extras import MissingExtra
    from frostline.app.runinfo import RunInfoError
    from frostline.engine.data import DataError

    return (
        UsageError,
        MissingExtra,
        imagefolder.InputError,
        ZooError,
        SelectionError,
        report.RunDirectoryError,
        RunInfoError,
        DataError,
    )


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit code (the console script exits with it)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    try:
        ns = parser.parse_args(argv)
    except SystemExit as e:  # --help, --version, usage errors
        return int(e.code) if isinstance(e.code, int) else (0 if e.code is None else 2)
    import torch

    from frostline.engine.trainer import TrainingError

    command = ns.command_module
    bad_input = _bad_input()
    threads = torch.get_num_threads()  # commands may lower it; in-process callers get it back
    try:
        return int(command.run(command.options(ns), command_line(argv)) or 0)
    except bad_input as e:
        _err(one_line(e))
        return 2
    except TrainingError as e:
        _err(f"training failed: {one_line(e)}")
        return 1
    except KeyboardInterrupt:
        _err("interrupted (no run directory was written)")
        return 130
    except BrokenPipeError:  # output piped into `head` and closed: not an error worth a message
        with contextlib.suppress(OSError):
            sys.stdout = open(os.devnull, "w")  # noqa: SIM115 - silence the flush at exit
        return 141
    except OSError as e:  # disk full, permissions: a run directory being written was removed
        _err(one_line(e))
        return 1
    finally:
        torch.set_num_threads(threads)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
