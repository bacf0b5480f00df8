"""The ``frostline`` command: the parser, the dispatch and the exit codes.

Each subcommand lives in :mod:`frostline.app.commands` (``demo``, ``fit``, ``summary``,
``predict``, ``evaluate``, ``export``); its flags come from its ``Options`` dataclass. ``main(argv)``
returns the exit code: 0 success, 1 training or writing failed, 2 bad input or usage
(one line on stderr, no traceback, no half-written run directory), 3 ``predict`` done but
some inputs unreadable (each named on stderr), 128 + the signal's number when interrupted
(130 Ctrl-C/SIGINT, 143 SIGTERM, 129 SIGHUP), temporary folders removed on the way out.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shlex
import signal
import sys
import threading
from collections.abc import Iterator, Sequence
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
    from frostline.app import imagefolder, outputs, report
    from frostline.app.extras import MissingExtra
    from frostline.app.runinfo import RunInfoError
    from frostline.engine.data import DataError
    from frostline.io.errors import CheckpointError

    return (
        UsageError,
        MissingExtra,
        imagefolder.InputError,
        ZooError,
        SelectionError,
        report.RunDirectoryError,
        outputs.OutputError,
        RunInfoError,
        DataError,
        CheckpointError,
    )


class Terminated(KeyboardInterrupt):
    """A signal (SIGTERM, SIGINT, SIGHUP) raised as an exception, so that cleanup runs as for Ctrl-C."""

    def __init__(self, signum: int) -> None:
        self.signum = signum
        super().__init__(signal.Signals(signum).name)


#: the signals a command turns into :class:`Terminated` while it runs
SIGNALS = tuple(
    getattr(signal, name) for name in ("SIGTERM", "SIGINT", "SIGHUP") if hasattr(signal, name)
)


@contextlib.contextmanager
def signals_raise() -> Iterator[None]:
    """While a command runs, SIGTERM/SIGINT/SIGHUP raise :class:`Terminated` (temporary folders
    are removed on the way out); a second signal during that cleanup is ignored. The previous
    handlers are restored afterwards. Outside the main thread (where Python cannot set
    handlers) nothing changes.

    >>> before = signal.getsignal(signal.SIGTERM)
    >>> with signals_raise():
    ...     signal.getsignal(signal.SIGTERM) is not before
    True
    >>> signal.getsignal(signal.SIGTERM) is before
    True
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, frame: object) -> None:
        for sig in SIGNALS:  # cleanup runs once, to the end
            signal.signal(sig, signal.SIG_IGN)
        raise Terminated(signum)

    previous = {sig: signal.getsignal(sig) for sig in SIGNALS}
    try:
        for sig in SIGNALS:
            if previous[sig] is not signal.SIG_IGN:  # nohup and friends: leave ignored alone
                signal.signal(sig, handler)
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old if old is not None else signal.SIG_DFL)


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
        with signals_raise():
            return int(command.run(command.options(ns), command_line(argv)) or 0)
    except bad_input as e:
        _err(one_line(e))
        return 2
    except TrainingError as e:
        _err(f"training failed: {one_line(e)}")
        return 1
    except KeyboardInterrupt as e:
        signum = e.signum if isinstance(e, Terminated) else signal.SIGINT
        name = signal.Signals(signum).name
        _err(f"interrupted by {name}; nothing half-written was left behind")
        return 128 + int(signum)
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
