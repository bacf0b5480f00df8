"""Crash-safe file primitives and a pickle-free safetensors reader/writer.

Everything here follows one rule: a reader sees either the complete old content
or the complete new content, never a mix, and nothing that was saved before is
lost if the process dies (``SIGKILL``, power loss after ``fsync``) at any point.

* :func:`atomic_write_bytes`, :func:`atomic_write_text`, :func:`atomic_write_json`
  write a temp file in the destination directory, ``fsync`` it, ``os.replace`` it
  over the destination and ``fsync`` the directory.
* :func:`atomic_directory` builds a whole directory under a temp name and swaps it
  into place (``renameat2(RENAME_EXCHANGE)`` on Linux; elsewhere the old directory
  is renamed aside first and restored by :func:`cleanup_stale_temps` after a crash).
* :func:`save_safetensors` / :func:`load_safetensors` never touch pickle. Files
  written by :func:`save_safetensors` carry a SHA-256 content digest (stored twice in
  the header metadata) that :func:`load_safetensors` verifies, so a damaged file
  raises :class:`CheckpointError` instead of silently loading different data.

Temp entries are named ``.<final name>.tmp-<random>`` (files and directories) and
``.<final name>.old-<random>`` (a replaced directory moved aside); they are hidden
and never mistaken for real data.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import hashlib
import json
import math
import os
import re
import secrets
import shutil
import stat
import sys
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import torch

__all__ = [
    "CheckpointError",
    "atomic_directory",
    "atomic_write_bytes",
    "atomic_write_json",
    "atomic_write_text",
    "cleanup_stale_temps",
    "load_safetensors",
    "save_safetensors",
]

PathLike = str | os.PathLike[str]


class CheckpointError(ValueError):
    """A checkpoint or tensor file is missing, incomplete, corrupted or incompatible.

    The message always names the offending path and what is wrong with it.

    Example:
        >>> from frostline.io.atomic import CheckpointError, load_safetensors
        >>> try:
        ...     load_safetensors("/nonexistent/model.safetensors")
        ... except CheckpointError as e:
        ...     print("missing" in str(e))
        True
    """


# --------------------------------------------------------------------------- helpers


_TEMP_RE = re.compile(r"^\.(?P<name>.+)\.(?P<kind>tmp|old)-[A-Za-z0-9_]+$")


def _fsync_dir(path: PathLike) -> None:
    """fsync a directory so that renames/creations inside it are durable (POSIX only)."""
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
        _fsync_dir(dirpath)


def _remove(path: PathLike) -> None:
    """Remove a file, symlink or directory tree; missing paths are ignored."""
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


def _write_chunks_atomic(path: PathLike, chunks: Iterable[bytes | bytearray | memoryview]) -> None:
    """Shared implementation of the atomic file writers (chunks avoid one big copy)."""
    path = Path(path)
    parent = path.parent
    try:
        mode: int | None = stat.S_IMODE(os.stat(path).st_mode)
    except FileNotFoundError:
        mode = None  # a new file: created 0o666 and the kernel applies the process umask
    fd, tmp = _create_temp_file(parent, f".{path.name}.tmp-")
    try:
        with os.fdopen(fd, "wb") as f:
            for chunk in chunks:
                f.write(chunk)
            f.flush()
            os.fsync(f.fileno())
        if mode is not None:
            os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    _fsync_dir(parent)


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
    _write_chunks_atomic(path, [data])


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
        _fsync_dir(parent)
        _remove(tmp)
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
    _fsync_dir(parent)
    _remove(aside)


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
        _remove(tmp)
        raise
    _fsync_dir(final.parent)


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
            _remove(directory / entry)
            touched.append(directory / entry)
        else:
            olds.append((entry, m.group("name")))
    for entry, name in olds:
        if not os.path.lexists(directory / name):
            os.rename(directory / entry, directory / name)
        else:
            _remove(directory / entry)
        touched.append(directory / entry)
    if touched:
        _fsync_dir(directory)
    return touched


# --------------------------------------------------------------------- safetensors

# safetensors dtype name -> (torch dtype, item size in bytes); dtypes missing from an
# older torch are simply not supported there.
_DTYPES: dict[str, tuple[torch.dtype, int]] = {
    st_name: (getattr(torch, torch_name), size)
    for st_name, torch_name, size in [
        ("F64", "float64", 8),
        ("F32", "float32", 4),
        ("F16", "float16", 2),
        ("BF16", "bfloat16", 2),
        ("I64", "int64", 8),
        ("I32", "int32", 4),
        ("I16", "int16", 2),
        ("I8", "int8", 1),
        ("U64", "uint64", 8),
        ("U32", "uint32", 4),
        ("U16", "uint16", 2),
        ("U8", "uint8", 1),
        ("BOOL", "bool", 1),
        ("C64", "complex64", 8),
        ("F8_E4M3", "float8_e4m3fn", 1),
        ("F8_E5M2", "float8_e5m2", 1),
    ]
    if hasattr(torch, torch_name)
}
_TORCH_TO_ST = {dt: name for name, (dt, _) in _DTYPES.items()}
_MAX_HEADER = 100_000_000  # same limit as the safetensors library
_DIGEST_KEYS = ("frostline.digest", "frostline.digest.check")
_DIGEST_PREFIX = "frostline-sha256-v1:"
_DIGEST_RE = re.compile(r"^frostline-sha256-v1:[0-9a-f]{64}$")
_RESERVED_PREFIX = "frostline."


def _prepare_tensors(tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Detach, move to CPU, make contiguous, and clone tensors that share storage."""
    if not isinstance(tensors, Mapping):
        raise TypeError(f"tensors must be a mapping of str -> Tensor, got {type(tensors).__name__}")
    out: dict[str, torch.Tensor] = {}
    for name, t in tensors.items():
        if not isinstance(name, str) or not name:
            raise TypeError(f"tensor names must be non-empty str, got {name!r}")
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"tensor {name!r} is a {type(t).__name__}, expected torch.Tensor")
        if t.layout != torch.strided:
            raise TypeError(
                f"tensor {name!r} has layout {t.layout}; only dense tensors can be saved"
            )
        if t.dtype not in _TORCH_TO_ST:
            raise TypeError(
                f"tensor {name!r} has dtype {t.dtype}, which safetensors cannot store here; "
                f"supported: {sorted(str(d) for d in _TORCH_TO_ST)}"
            )
        out[name] = t.detach().to("cpu").contiguous()
    # Tensors that alias the same storage (tied weights, views) must be cloned:
    # safetensors refuses to save shared memory.
    seen: dict[int, str] = {}
    for name, t in out.items():
        if t.numel() == 0:
            continue
        ptr = t.untyped_storage().data_ptr()
        if ptr in seen:
            out[name] = t.clone()
        else:
            seen[ptr] = name
    return out


def _digest(
    entries: Mapping[str, tuple[str, list[int], int, int]],
    user_metadata: Mapping[str, str],
    buffer: memoryview,
) -> str:
    """Digest over tensor names, dtypes, shapes, bytes and the user metadata."""
    names = sorted(entries)
    desc = json.dumps(
        {
            "tensors": [[n, entries[n][0], entries[n][1]] for n in names],
            "metadata": sorted(user_metadata.items()),
        },
        separators=(",", ":"),
        ensure_ascii=True,
    ).encode("ascii")
    h = hashlib.sha256(b"frostline-safetensors-digest-v1\n")
    h.update(len(desc).to_bytes(8, "little"))
    h.update(desc)
    for n in names:
        _, _, begin, end = entries[n]
        h.update(buffer[begin:end])
    return _DIGEST_PREFIX + h.hexdigest()


def _serialize_safetensors(
    tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None
) -> list[bytes | memoryview]:
    """Serialize to safetensors bytes (as [header, data] chunks) with an embedded digest."""
    import safetensors.torch

    user_md: dict[str, str] = {}
    if metadata is not None:
        if not isinstance(metadata, Mapping):
            raise TypeError(f"metadata must be a dict[str, str], got {type(metadata).__name__}")
        for k, v in metadata.items():
            if not isinstance(k, str) or not isinstance(v, str):
                raise TypeError(
                    f"metadata must be dict[str, str]; entry {k!r}: {type(v).__name__} is not str"
                )
            if k.startswith(_RESERVED_PREFIX):
                raise ValueError(
                    f"metadata key {k!r} uses the reserved prefix {_RESERVED_PREFIX!r}"
                )
            user_md[k] = v
    raw = safetensors.torch.save(_prepare_tensors(tensors))
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8 : 8 + n])
    header.pop("__metadata__", None)
    buffer = memoryview(raw)[8 + n :]
    entries = {
        name: (info["dtype"], info["shape"], *info["data_offsets"]) for name, info in header.items()
    }
    digest = _digest(entries, user_md, buffer)
    md = dict(user_md)
    for key in _DIGEST_KEYS:
        md[key] = digest
    new_header = json.dumps(
        {"__metadata__": md, **header}, separators=(",", ":"), ensure_ascii=True
    ).encode("ascii")
    new_header += b" " * (-len(new_header) % 8)  # keep tensor data 8-byte aligned
    return [len(new_header).to_bytes(8, "little") + new_header, buffer]


def save_safetensors(
    tensors: Mapping[str, torch.Tensor],
    path: PathLike,
    metadata: Mapping[str, str] | None = None,
) -> Path:
    """Atomically save ``tensors`` to a safetensors file (never pickle).

    Tensors are detached, copied to CPU and made contiguous; tensors that share
    memory (tied weights, views) are cloned. ``metadata`` is an optional
    ``dict[str, str]`` stored in the header (keys starting with ``"frostline."`` are
    reserved). A SHA-256 digest of names, dtypes, shapes, data and metadata is added
    so :func:`load_safetensors` detects corruption. Returns ``Path(path)``.

    Example:
        >>> import tempfile, pathlib, torch
        >>> p = pathlib.Path(tempfile.mkdtemp()) / "w.safetensors"
        >>> w = torch.ones(2, 2)
        >>> _ = save_safetensors({"w": w, "w_t": w.t()}, p, {"note": "tied"})
        >>> t, md = load_safetensors(p)
        >>> bool(torch.equal(t["w_t"], w)), md
        (True, {'note': 'tied'})
    """
    chunks = _serialize_safetensors(tensors, metadata)
    _write_chunks_atomic(path, chunks)
    return Path(path)


def _bad(path: PathLike, what: str) -> CheckpointError:
    return CheckpointError(f"{os.fspath(path)}: {what}")


def _is_int(x: object) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in pairs:
        if k in out:
            raise ValueError(f"duplicate key {k!r}")
        out[k] = v
    return out


def _close(a: bytes, b: bytes) -> bool:
    """Same length and at most half of the bytes differ."""
    return len(a) == len(b) and sum(x != y for x, y in zip(a, b)) <= len(b) // 2


def _looks_like_digest(key: str, value: str) -> bool:
    """Whether a metadata entry is (or is a damaged copy of) one of our digest entries.

    Byte flips keep lengths, so a key or value still "close" to ours betrays a damaged
    digest entry; this keeps a corrupted file from passing as a foreign file that
    simply has no digest.
    """
    if key in _DIGEST_KEYS or _DIGEST_RE.match(value):
        return True
    k = key.encode("utf-8", "surrogatepass")
    if any(_close(k, d.encode("ascii")) for d in _DIGEST_KEYS):
        return True
    v = value.encode("utf-8", "surrogatepass")
    prefix = _DIGEST_PREFIX.encode("ascii")
    return len(v) == len(prefix) + 64 and _close(v[: len(prefix)], prefix)


def _parse_safetensors(
    data: bytes, path: PathLike, *, verify: bool = True
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Validate a complete safetensors byte string and deserialize it."""
    size = len(data)
    if size == 0:
        raise _bad(path, "truncated: file is empty (0 bytes)")
    if size < 8:
        raise _bad(path, f"truncated: file has {size} bytes, the 8-byte header length is missing")
    n = int.from_bytes(data[:8], "little")
    if size > 8 and data[8:9] != b"{":
        raise _bad(path, "not a safetensors file (no JSON header after the 8-byte length)")
    if n > _MAX_HEADER:
        raise _bad(path, f"not a safetensors file (header length field reads {n} bytes)")
    if n + 8 > size:
        raise _bad(
            path,
            f"truncated: header says {n} bytes, file has only {size - 8} bytes "
            "after the 8-byte length prefix",
        )
    if n < 2:
        raise _bad(path, f"corrupted header: header length {n} is too small")
    try:
        header = json.loads(data[8 : 8 + n].decode("utf-8"), object_pairs_hook=_no_duplicates)
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise _bad(path, f"corrupted header: invalid JSON ({e})") from None
    if not isinstance(header, dict):
        raise _bad(path, f"corrupted header: expected a JSON object, got {type(header).__name__}")
    md = header.pop("__metadata__", None)
    if md is None:
        md = {}
    if not isinstance(md, dict) or not all(isinstance(v, str) for v in md.values()):
        raise _bad(path, "corrupted header: __metadata__ must map str to str")
    buf_len = size - 8 - n
    entries: dict[str, tuple[str, list[int], int, int]] = {}
    for name, info in header.items():
        if not isinstance(info, dict) or not {"dtype", "shape", "data_offsets"} <= info.keys():
            raise _bad(path, f"corrupted header: entry {name!r} is not a tensor description")
        dtype, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
        if dtype not in _DTYPES:
            raise _bad(path, f"corrupted header: tensor {name!r} has unknown dtype {dtype!r}")
        if not isinstance(shape, list) or not all(_is_int(s) and s >= 0 for s in shape):
            raise _bad(path, f"corrupted header: tensor {name!r} has invalid shape {shape!r}")
        if (
            not isinstance(offsets, list)
            or len(offsets) != 2
            or not all(_is_int(o) for o in offsets)
            or not 0 <= offsets[0] <= offsets[1]
        ):
            raise _bad(path, f"corrupted header: tensor {name!r} has invalid offsets {offsets!r}")
        nbytes = math.prod(shape) * _DTYPES[dtype][1]
        if offsets[1] - offsets[0] != nbytes:
            raise _bad(
                path,
                f"corrupted header: tensor {name!r} ({dtype} {shape}) needs {nbytes} bytes "
                f"but its offsets span {offsets[1] - offsets[0]}",
            )
        entries[name] = (dtype, shape, offsets[0], offsets[1])
    needed = max((e[3] for e in entries.values()), default=0)
    if needed > buf_len:
        raise _bad(
            path,
            f"truncated: header describes {needed} bytes of tensor data, file has {buf_len}",
        )
    pos = 0
    for _, _, begin, end in sorted(entries.values(), key=lambda e: (e[2], e[3])):
        if begin != pos:
            raise _bad(path, "corrupted header: tensor data offsets overlap or leave gaps")
        pos = end
    if pos != buf_len:
        raise _bad(path, f"corrupted: {buf_len - pos} unexpected bytes after the tensor data")

    markers = {k for k, v in md.items() if _looks_like_digest(k, v)}
    user_md = {k: v for k, v in md.items() if k not in _DIGEST_KEYS}
    if markers:
        values = {md.get(k) for k in _DIGEST_KEYS}
        if markers != set(_DIGEST_KEYS) or len(values) != 1:
            raise _bad(path, "corrupted header: the integrity digest entries are damaged")
        if verify:
            expected = values.pop()
            actual = _digest(entries, user_md, memoryview(data)[8 + n :])
            if actual != expected:
                raise _bad(path, "corrupted: content does not match its digest")
    import safetensors.torch

    try:
        tensors = safetensors.torch.load(data)
    except Exception as e:  # the library's own validation: wrap whatever it raises
        raise _bad(path, f"corrupted: {type(e).__name__}: {e}") from None
    return tensors, user_md


def _read_file(path: PathLike) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except FileNotFoundError:
        raise _bad(path, "missing: no such file") from None
    except IsADirectoryError:
        raise _bad(path, "not a file (it is a directory)") from None
    except OSError as e:
        raise _bad(path, f"cannot be read: {e.strerror or e}") from None


def load_safetensors(path: PathLike) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Load a safetensors file into CPU tensors without pickle; return ``(tensors, metadata)``.

    Every problem (missing file, truncation, corrupted header, digest mismatch, not
    a safetensors file) raises :class:`CheckpointError` naming the path and the
    defect, e.g. ``"<path>: truncated: header says 120 bytes, file has 37 ..."``.
    Files written by :func:`save_safetensors` are verified against their embedded
    digest; plain safetensors files from other tools load without that check.

    Example:
        >>> import tempfile, pathlib, torch
        >>> p = pathlib.Path(tempfile.mkdtemp()) / "t.safetensors"
        >>> _ = save_safetensors({"x": torch.arange(3)}, p)
        >>> tensors, metadata = load_safetensors(p)
        >>> tensors["x"].tolist(), metadata
        ([0, 1, 2], {})
    """
    return _parse_safetensors(_read_file(path), path)
