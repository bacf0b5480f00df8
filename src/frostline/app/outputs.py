"""Where the app writes: checked before any work, failures told in plain words, and
temporary folders that a later run can prove abandoned and sweep away.

* :func:`check_writable` runs before training: a path under a file, a folder that cannot
  be written (read-only disk, permissions) or a disk without room for the expected
  outputs is an :class:`OutputError` (one line, exit code 2) that names the path the user
  gave, never an internal temporary name.
* :func:`plain_errors` turns an ``OSError`` met while writing (the disk filled up
  meanwhile) into a :class:`WriteError` in the same plain words (exit code 1).
* A run directory being written is a hidden ``.NAME.tmp-*`` folder holding an owner
  file (:func:`claim`): the writing process's id, start time, boot and host. When that
  process is gone (killed with ``SIGKILL``, the machine rebooted), :func:`sweep` removes
  the folder on a later run; a folder whose owner may still be alive, or which has no
  owner file, is left alone.

>>> import tempfile, pathlib
>>> root = pathlib.Path(tempfile.mkdtemp())
>>> check_writable(root / "runs" / "a", flag="--out")
>>> (root / "f").write_text("x") and None
>>> check_writable(root / "f" / "a", flag="--out")  # doctest: +ELLIPSIS
Traceback (most recent call last):
...
frostline.app.outputs.OutputError: --out '...' is inside '...', which is a file, not a folder; expected a path in a folder
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import shutil
import socket
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from frostline.io.atomic import remove_path

__all__ = [
    "OWNER_FILE",
    "OutputError",
    "WriteError",
    "abandoned",
    "check_writable",
    "claim",
    "format_bytes",
    "plain_errors",
    "reason",
    "release",
    "sweep",
]

#: the owner file inside a temporary run directory (removed before the rename into place)
OWNER_FILE = ".frostline-owner.json"
#: the temporary folders a run makes beside its run directory: the run directory being
#: written (``.NAME.tmp-*``) and the image store (``.frostline-images-*``)
_TEMP_DIR = re.compile(r"^(\..+\.tmp-[A-Za-z0-9_]+|\.frostline-images-[A-Za-z0-9_]+)$")

_REASONS = {
    errno.EROFS: "the disk is read-only",
    errno.EACCES: "permission denied",
    errno.EPERM: "permission denied",
    errno.ENOSPC: "the disk is full",
    errno.EDQUOT: "the disk quota is used up",
    errno.ENOTDIR: "a part of the path is a file, not a folder",
    errno.ENOENT: "a folder on the way was removed",
    errno.ENAMETOOLONG: "the name is too long",
    errno.EIO: "an input/output error on the disk",
}


class OutputError(ValueError):
    """An output path that cannot be written, found before any work (one line, exit code 2)."""


class WriteError(OSError):
    """Writing the outputs failed midway, told in plain words (one line, exit code 1)."""


def reason(e: OSError) -> str:
    """An ``OSError`` in plain words, without the file name it carries.

    >>> reason(OSError(errno.ENOSPC, "No space left on device", "/x/.run.tmp-1a2b"))
    'the disk is full'
    """
    if e.errno in _REASONS:
        return _REASONS[e.errno]
    return (e.strerror or type(e).__name__).lower()


def format_bytes(n: float) -> str:
    """``1.5 GB``, ``320 KB``.

    >>> format_bytes(1536), format_bytes(3 * 10**9)
    ('1.5 KB', '3.0 GB')
    """
    for unit in ("bytes", "KB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1000
    raise AssertionError("unreachable")


def _existing_folder(path: Path, flag: str, into: bool) -> Path:
    """The nearest existing folder where writing starts: at or above ``path`` when files go
    ``into`` it, else at or above its parent."""
    here = Path(os.path.abspath(path))
    if not into:
        here = here.parent
    while not os.path.lexists(here):
        here = here.parent
    if not here.is_dir():
        raise OutputError(
            f"{flag} {str(path)!r} is inside {str(here)!r}, which is a file, not a folder; "
            "expected a path in a folder"
        )
    return here


def check_writable(
    path: str | os.PathLike, *, flag: str, need_bytes: int = 0, into: bool = False
) -> None:
    """Refuse, before any work, an output ``path`` that cannot be written.

    Tries what writing will do (a hidden folder made and removed where the output's
    temporary folder will go: beside ``path``, or inside it with ``into=True``, for a
    folder that receives files) and compares the disk's free space with ``need_bytes``.
    """
    target = Path(path)
    here = _existing_folder(target, flag, into)
    try:
        probe = tempfile.mkdtemp(prefix=".frostline-probe-", dir=here)
    except OSError as e:
        raise OutputError(
            f"{flag} {str(target)!r} cannot be written: {reason(e)} in {str(here)!r}; "
            "pass a path on a writable disk"
        ) from None
    os.rmdir(probe)
    if need_bytes:
        free = shutil.disk_usage(here).free
        if free < need_bytes:
            raise OutputError(
                f"{flag} {str(target)!r}: not enough free space on its disk ({format_bytes(free)} free "
                f"in {str(here)!r}, the outputs need about {format_bytes(need_bytes)}); "
                "free some space or pass a path on another disk"
            )


@contextlib.contextmanager
def plain_errors(target: str | os.PathLike, what: str) -> Iterator[None]:
    """Inside, an ``OSError`` becomes a :class:`WriteError` naming ``target``, in plain words."""
    try:
        yield
    except WriteError:
        raise
    except OSError as e:
        raise WriteError(
            f"could not write {what} {str(target)!r}: {reason(e)}; nothing was left behind"
        ) from None


# --------------------------------------------------------------------------- owners


def _boot_id() -> str | None:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return None


def _start_time(pid: int) -> str | None:
    """The process's start time in clock ticks since boot (Linux), to tell a reused pid."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat[stat.rindex(")") + 2 :].split()[19]


def _owner() -> dict[str, Any]:
    pid = os.getpid()
    return {
        "pid": pid,
        "start": _start_time(pid),
        "boot": _boot_id(),
        "host": socket.gethostname(),
    }


def claim(folder: str | os.PathLike) -> None:
    """Write the owner file into a temporary ``folder`` this process is filling."""
    (Path(folder) / OWNER_FILE).write_text(json.dumps(_owner()), encoding="utf-8")


def release(folder: str | os.PathLike) -> None:
    """Remove the owner file (before the folder is renamed into place)."""
    with contextlib.suppress(FileNotFoundError):
        (Path(folder) / OWNER_FILE).unlink()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def abandoned(folder: str | os.PathLike) -> bool:
    """Whether ``folder``'s owner file proves its writer is gone (no owner file: False).

    Gone means: the machine rebooted since, or no process has that id, or the process
    with that id started at another time (the id was reused). A writer on another host
    cannot be checked, so its folder is never called abandoned.
    """
    try:
        owner = json.loads((Path(folder) / OWNER_FILE).read_text(encoding="utf-8"))
        pid = int(owner["pid"])
    except (OSError, ValueError, KeyError, TypeError):
        return False
    if owner.get("host") != socket.gethostname() or pid <= 0:
        return False
    boot = _boot_id()
    if boot is not None and owner.get("boot") not in (None, boot):
        return True
    if not _alive(pid):
        return True
    start = _start_time(pid)
    return start is not None and owner.get("start") not in (None, start)


def sweep(parent: str | os.PathLike) -> list[Path]:
    """Remove the temporary run folders in ``parent`` whose writers are proven gone.

    Only hidden ``.NAME.tmp-*`` run folders and ``.frostline-images-*`` image stores
    with an owner file (:func:`abandoned`) are touched. Returns the folders removed.
    """
    root = Path(parent)
    removed: list[Path] = []
    try:
        entries = sorted(os.listdir(root))
    except OSError:
        return removed
    for name in entries:
        path = root / name
        if _TEMP_DIR.match(name) and path.is_dir() and not path.is_symlink() and abandoned(path):
            remove_path(path)
            removed.append(path)
    return removed
