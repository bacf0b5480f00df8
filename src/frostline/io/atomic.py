"""Crash-safe file and directory primitives.

Everything here follows one rule: a reader sees either the complete old content
or the complete new content, never a mix, and nothing that was saved before is
lost if the process dies (``SIGKILL``, power loss after ``fsync``) at any point.

* :func:`atomic_write_bytes`, :func:`atomic_write_text`, :func:`atomic_write_json`
  write a temp file in the destination directory, ``fsync`` it, ``os.replace`` it
  over the destination and ``fsync`` the directory.
* :func:`atomic_directory` builds a whole directory under a temp name and swaps it
  into place (``renameat2(RENAME_EXCHANGE)`` on Linux; elsewhere the old directory
  is renamed aside first and restored by :func:`cleanup_stale_temps` after a crash).
* :func:`fsync_dir` and :func:`remove_path` are the building blocks the other
  persistence modules share.

Temp entries are named ``.<final name>.tmp-<random>`` (files and directories) and
``.<final name>.old-<random>`` (a replaced directory moved aside); they are hidden
and never mistaken for real data.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import json
import os
import re
import secrets
import shutil
import stat
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

__all__ = [
    "PathLike",
    "atomic_directory",
    "atomic_write_bytes",
    "atomic_write_json",
    "atomic_write_text",
    "cleanup_stale_temps",
    "fsync_dir",
    "remove_path",
]

PathLike = str | os.PathLike[str]


# --------------------------------------------------------------------------- helpers


_TEMP_RE = re.compile(r"^\.(?P<name>.+)\.(?P<kind>tmp|old)-[A-Za-z0-9_]+$")


def fsync_dir(path: PathLike) -> None:
    """fsync a directory so that renames/creations inside it are durable (POSIX only).

    Example:
        >>> import tempfile
        >>> fsync_dir(tempfile.mkdtemp())
    """
    if os.name != "posix":  # pragma: no cover - Windows cannot open directories
        return
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_file(path: PathLike) -> None:
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_BINARY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(root: Path) -> None:
    """fsync every regular file and directory below ``root`` (symlinks are not followed)."""
    for dirpath, _dirnames, filenames in os.walk(root, topdown=False):
        for fn in filenames:
            p = os.path.join(dirpath, fn)
            if stat.S_ISREG(os.lstat(p).st_mode):
                _fsync_file(p)
        fsync_dir(dirpath)


def remove_path(path: PathLike) -> None:
    """Remove a file, symlink or directory tree; missing paths are ignored.

    Example:
        >>> import tempfile, pathlib
        >>> d = pathlib.Path(tempfile.mkdtemp()) / "tree"
        >>> (d / "sub").mkdir(parents=True)
        >>> remove_path(d); remove_path(d)
        >>> d.exists()
        False
    """
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if stat.S_ISDIR(st.st_mode):
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)


def _create_temp_file(parent: Path, prefix: str) -> tuple[int, str]:
    """A new file with a random name, opened O_EXCL with mode 0o666 less the umask.

    Unlike ``tempfile.mkstemp`` (always 0o600), the kernel applies the process umask,
    so nothing here needs to read (and so briefly change) it.
    """
    for _ in range(100):
        name = os.path.join(parent, prefix + secrets.token_hex(6))
        try:
            return os.open(
                name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666
            ), name
        except FileExistsError:
            continue
    raise FileExistsError(f"could not create a unique temp file in {parent}")


def _create_temp_dir(parent: Path, prefix: str) -> Path:
    """A new directory with a random name, mode 0o777 less the umask (see :func:`_create_temp_file`)."""
    for _ in range(100):
        path = parent / (prefix + secrets.token_hex(6))
        try:
            os.mkdir(path, 0o777)
            return path
        except FileExistsError:
            continue
    raise FileExistsError(f"could not create a unique temp directory in {parent}")


def _write_atomic(path: PathLike, data: bytes | bytearray | memoryview) -> None:
    """Shared implementation of the atomic file writers."""
    path = Path(path)
    parent = path.parent
    try:
        mode: int | None = stat.S_IMODE(os.stat(path).st_mode)
    except FileNotFoundError:
        mode = None  # a new file: created 0o666 and the kernel applies the process umask
    fd, tmp = _create_temp_file(parent, f".{path.name}.tmp-")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        if mode is not None:
            os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    fsync_dir(parent)


# ------------------------------------------------------------------- atomic writers


def atomic_write_bytes(path: PathLike, data: bytes | bytearray | memoryview) -> None:
    """Atomically replace ``path`` with ``data`` (temp file, fsync, rename, fsync dir).

    On any exception the temp file is removed and a previous ``path`` is untouched.
    The file keeps the mode of the file it replaces (new files follow the umask).

    Example:
        >>> import tempfile, pathlib
        >>> p = pathlib.Path(tempfile.mkdtemp()) / "blob.bin"
        >>> atomic_write_bytes(p, b"hello")
        >>> p.read_bytes()
        b'hello'
    """
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise TypeError(f"atomic_write_bytes expects bytes-like data, got {type(data).__name__}")
    _write_atomic(path, data)


def atomic_write_text(path: PathLike, text: str, *, encoding: str = "utf-8") -> None:
    """Atomically replace ``path`` with ``text`` encoded as ``encoding``.

    Example:
        >>> import tempfile, pathlib
        >>> p = pathlib.Path(tempfile.mkdtemp()) / "notes.txt"
        >>> atomic_write_text(p, "frozen: 3 layers\\n")
        >>> p.read_text()
        'frozen: 3 layers\\n'
    """
    if not isinstance(text, str):
        raise TypeError(f"atomic_write_text expects str, got {type(text).__name__}")
    atomic_write_bytes(path, text.encode(encoding))


def atomic_write_json(path: PathLike, obj: Any, *, indent: int | None = 2) -> None:
    """Atomically write ``obj`` as JSON (UTF-8, trailing newline).

    The object is serialized before anything touches the disk, so a
    non-serializable object raises ``TypeError``/``ValueError`` and leaves no trace.
    NaN/Infinity are written as Python's ``json`` module does (and read back by it).

    Example:
        >>> import json, tempfile, pathlib
        >>> p = pathlib.Path(tempfile.mkdtemp()) / "metrics.json"
        >>> atomic_write_json(p, {"val_loss": 0.25})
        >>> json.loads(p.read_text())
        {'val_loss': 0.25}
    """
    text = json.dumps(obj, indent=indent, ensure_ascii=False) + "\n"
    atomic_write_text(path, text)


# ------------------------------------------------------------------ directory swap

_RENAME_EXCHANGE = 2
_AT_FDCWD = -100
_renameat2: Any = None
_renameat2_loaded = False


def _load_renameat2() -> Any:
    global _renameat2, _renameat2_loaded
    if not _renameat2_loaded:
        _renameat2_loaded = True
        if sys.platform.startswith("linux"):
            try:
                fn = ctypes.CDLL(None, use_errno=True).renameat2
            except (OSError, AttributeError):
                fn = None
            if fn is not None:
                fn.argtypes = [
                    ctypes.c_int,
                    ctypes.c_char_p,
                    ctypes.c_int,
                    ctypes.c_char_p,
                    ctypes.c_uint,
                ]
                fn.restype = ctypes.c_int
            _renameat2 = fn
    return _renameat2


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap two existing paths. Returns False where unsupported."""
    fn = _load_renameat2()
    if fn is None:
        return False
    rc = fn(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE)
    if rc == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP, errno.ENOTSUP, errno.EPERM):
        return False
    raise OSError(err, os.strerror(err), str(a), None, str(b))


def _move_into_place(tmp: Path, final: Path) -> None:
    """Rename directory ``tmp`` to ``final``, atomically replacing an existing ``final``."""
    parent = final.parent
    if not os.path.lexists(final):
        try:
            os.rename(tmp, final)
            return
        except OSError as e:  # someone created `final` meanwhile: fall through to replace
            if e.errno not in (errno.EEXIST, errno.ENOTEMPTY) or not os.path.lexists(final):
                raise
    if _exchange(tmp, final):
        # `tmp` now holds the old content; make the swap durable before deleting it.
        fsync_dir(parent)
        remove_path(tmp)
        return
    # Portable fallback: old aside, new in, old deleted. A crash between the two renames
    # leaves `.<name>.old-*` which cleanup_stale_temps() restores (and readers accept).
    aside = parent / f".{final.name}.old-{secrets.token_hex(4)}"
    os.rename(final, aside)
    try:
        os.rename(tmp, final)
    except BaseException:
        os.rename(aside, final)
        raise
    fsync_dir(parent)
    remove_path(aside)


@contextlib.contextmanager
def atomic_directory(final_path: PathLike) -> Iterator[Path]:
    """Build a directory under a temp name and move it to ``final_path`` on success.

    Yields the temp directory (a hidden sibling of ``final_path``). When the ``with``
    block succeeds every file and directory inside is fsynced, the temp directory is
    renamed to ``final_path`` (an existing ``final_path`` is replaced atomically on
    Linux, and via rename-aside elsewhere) and the parent is fsynced. When the block
    raises, the temp directory is removed and ``final_path`` is untouched.

    Example:
        >>> import tempfile, pathlib
        >>> run = pathlib.Path(tempfile.mkdtemp())
        >>> with atomic_directory(run / "epoch-00001") as tmp:
        ...     _ = (tmp / "a.txt").write_text("x")
        >>> sorted(p.name for p in (run / "epoch-00001").iterdir())
        ['a.txt']
    """
    final = Path(final_path)
    if final.name in ("", ".", ".."):
        raise ValueError(f"atomic_directory needs a path with a final name, got {final_path!r}")
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = _create_temp_dir(final.parent, f".{final.name}.tmp-")
    try:
        yield tmp
        _fsync_tree(tmp)
        _move_into_place(tmp, final)
    except BaseException:
        remove_path(tmp)
        raise
    fsync_dir(final.parent)


def cleanup_stale_temps(
    directory: PathLike, match: Callable[[str], bool] | None = None
) -> list[Path]:
    """Remove temp files/directories left in ``directory`` by crashed atomic writes.

    ``.<name>.tmp-*`` entries are deleted. A ``.<name>.old-*`` directory (an old
    version moved aside by a replace that crashed halfway) is renamed back to
    ``<name>`` when ``<name>`` does not exist, and deleted otherwise. Only names for
    which ``match(name)`` is true are touched (all when ``match`` is None). Call this
    only while no other process is writing into ``directory``. Returns the paths that
    were removed or restored.

    Example:
        >>> import tempfile, pathlib
        >>> d = pathlib.Path(tempfile.mkdtemp())
        >>> _ = (d / ".data.json.tmp-abc123").write_text("partial")
        >>> [p.name for p in cleanup_stale_temps(d)]
        ['.data.json.tmp-abc123']
    """
    directory = Path(directory)
    touched: list[Path] = []
    try:
        entries = sorted(os.listdir(directory))
    except FileNotFoundError:
        return touched
    olds: list[tuple[str, str]] = []
    for entry in entries:
        m = _TEMP_RE.match(entry)
        if m is None or (match is not None and not match(m.group("name"))):
            continue
        if m.group("kind") == "tmp":
            remove_path(directory / entry)
            touched.append(directory / entry)
        else:
            olds.append((entry, m.group("name")))
    for entry, name in olds:
        if not os.path.lexists(directory / name):
            os.rename(directory / entry, directory / name)
        else:
            remove_path(directory / entry)
        touched.append(directory / entry)
    if touched:
        fsync_dir(directory)
    return touched
