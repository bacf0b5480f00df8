"""Opening a file someone else may have made: only a regular file, and never a blocking open.

A model file or a checkpoint directory may come from anywhere. ``open()`` on a FIFO waits
for a writer forever and ``/dev/zero`` never ends, so every frostline reader opens through
:func:`open_regular`: ``O_NONBLOCK`` (a FIFO opens at once), then ``fstat`` on the open
descriptor, so what is read is what was checked.

>>> import tempfile, os
>>> d = tempfile.mkdtemp(); os.mkfifo(os.path.join(d, "pipe"))
>>> open_regular(os.path.join(d, "pipe"))
Traceback (most recent call last):
...
frostline.io.regular.NotRegularFileError: it is a FIFO (named pipe), not a regular file
"""

from __future__ import annotations

import os
import stat
from typing import BinaryIO

__all__ = ["NotRegularFileError", "open_regular"]


class NotRegularFileError(OSError):
    """The path names a FIFO, device or socket; its message says which.

    >>> issubclass(NotRegularFileError, OSError)
    True
    """


def _kind(mode: int) -> str:
    for test, name in (
        (stat.S_ISFIFO, "a FIFO (named pipe)"),
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISBLK, "a block device"),
        (stat.S_ISSOCK, "a socket"),
    ):
        if test(mode):
            return name
    return "not a regular file"


def open_regular(path: str | os.PathLike) -> BinaryIO:
    """``path`` opened for binary reading, once checked to be a regular file.

    A directory raises :class:`IsADirectoryError`, a FIFO, device or socket
    :class:`NotRegularFileError`; a missing file :class:`FileNotFoundError`.

    >>> import tempfile, os
    >>> p = os.path.join(tempfile.mkdtemp(), "f"); _ = open(p, "wb").write(b"ok")
    >>> with open_regular(p) as f:
    ...     f.read()
    b'ok'
    """
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    try:
        mode = os.fstat(fd).st_mode
        if stat.S_ISDIR(mode):
            raise IsADirectoryError(f"{os.fspath(path)!r} is a directory")
        if not stat.S_ISREG(mode):
            raise NotRegularFileError(f"it is {_kind(mode)}, not a regular file")
        if hasattr(os, "set_blocking"):
            os.set_blocking(fd, True)
    except BaseException:
        os.close(fd)
        raise
    return os.fdopen(fd, "rb")
