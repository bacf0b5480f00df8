"""Pickle-free tensor files on the ``safetensors`` library, with a content digest.

* :func:`save_safetensors` serializes with ``safetensors.torch.save`` and writes the
  bytes through :func:`frostline.io.atomic.atomic_write_bytes`. The header metadata
  carries a SHA-256 digest of the tensor names, dtypes, shapes, bytes and the user
  metadata (stored twice, under ``frostline.digest`` and ``frostline.digest.check``).
* :func:`load_safetensors` opens the file with ``safetensors.safe_open`` (memory
  mapped, validated by the library) and checks the digest over the very tensors it
  returns, so a damaged file raises :class:`CheckpointError` naming the path and the
  defect instead of loading different data. Files from other tools (no digest) load
  as they are.
* :func:`safetensors_bytes` / :func:`tensors_from_checked_bytes` are the in-memory
  halves for container formats (checkpoint directories) that hash whole files
  themselves and so need no second validation pass.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Iterable, Mapping
from pathlib import Path

import safetensors
import safetensors.torch
import torch

from frostline.io.atomic import PathLike, atomic_write_bytes
from frostline.io.errors import CheckpointError
from frostline.io.regular import NotRegularFileError, open_regular

__all__ = [
    "load_safetensors",
    "safetensors_bytes",
    "save_safetensors",
    "tensors_from_checked_bytes",
]

# torch dtype -> safetensors dtype name (dtypes missing from an older torch are skipped)
_DTYPE_NAMES: dict[torch.dtype, str] = {
    getattr(torch, torch_name): st_name
    for st_name, torch_name in [
        ("F64", "float64"),
        ("F32", "float32"),
        ("F16", "float16"),
        ("BF16", "bfloat16"),
        ("I64", "int64"),
        ("I32", "int32"),
        ("I16", "int16"),
        ("I8", "int8"),
        ("U64", "uint64"),
        ("U32", "uint32"),
        ("U16", "uint16"),
        ("U8", "uint8"),
        ("BOOL", "bool"),
        ("C64", "complex64"),
        ("F8_E4M3", "float8_e4m3fn"),
        ("F8_E5M2", "float8_e5m2"),
    ]
    if hasattr(torch, torch_name)
}
_MAX_HEADER = 100_000_000  # same limit as the safetensors library
_DIGEST_KEYS = ("frostline.digest", "frostline.digest.check")
_DIGEST_PREFIX = "frostline-sha256-v1:"
_DIGEST_RE = re.compile(r"^frostline-sha256-v1:[0-9a-f]{64}$")
_RESERVED_PREFIX = "frostline."

# (name, safetensors dtype, shape, tensor) in name order: what the digest covers
_Described = Iterable[tuple[str, str, list[int], torch.Tensor]]


def _bad(path: PathLike, what: str) -> CheckpointError:
    return CheckpointError(f"{os.fspath(path)}: {what}")


def _library_reason(err: BaseException) -> str:
    """The safetensors library's message without its generic prefix."""
    return re.sub(r"^Error while deserializing( header)?: ", "", str(err)) or type(err).__name__


# ----------------------------------------------------------------------- writing


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
        if t.dtype not in _DTYPE_NAMES:
            raise TypeError(
                f"tensor {name!r} has dtype {t.dtype}, which safetensors cannot store here; "
                f"supported: {sorted(str(d) for d in _DTYPE_NAMES)}"
            )
        out[name] = t.detach().to("cpu").contiguous()
    # Tensors that alias the same storage (tied weights, views) must be cloned:
    # safetensors refuses to save shared memory.
    seen: set[int] = set()
    for name, t in out.items():
        if t.numel() == 0:
            continue
        ptr = t.untyped_storage().data_ptr()
        if ptr in seen:
            out[name] = t.clone()
        else:
            seen.add(ptr)
    return out


def _user_metadata(metadata: Mapping[str, str] | None) -> dict[str, str]:
    if metadata is None:
        return {}
    if not isinstance(metadata, Mapping):
        raise TypeError(f"metadata must be a dict[str, str], got {type(metadata).__name__}")
    for k, v in metadata.items():
        if not isinstance(k, str) or not isinstance(v, str):
            raise TypeError(
                f"metadata must be dict[str, str]; entry {k!r}: {type(v).__name__} is not str"
            )
        if k.startswith(_RESERVED_PREFIX):
            raise ValueError(f"metadata key {k!r} uses the reserved prefix {_RESERVED_PREFIX!r}")
    return dict(metadata)


def _digest(described: _Described, user_metadata: Mapping[str, str]) -> str:
    """Digest over tensor names, dtypes, shapes, bytes (in name order) and the user metadata.

    The byte layout of the hashed stream is the file format's (``frostline-sha256-v1``):
    files written by earlier versions verify unchanged.
    """
    entries = list(described)
    desc = json.dumps(
        {
            "tensors": [[name, dtype, list(shape)] for name, dtype, shape, _ in entries],
            "metadata": sorted(user_metadata.items()),
        },
        separators=(",", ":"),
        ensure_ascii=True,
    ).encode("ascii")
    h = hashlib.sha256(b"frostline-safetensors-digest-v1\n")
    h.update(len(desc).to_bytes(8, "little"))
    h.update(desc)
    for _, _, _, t in entries:
        if t.numel():  # the raw little-endian bytes, as stored in the file
            h.update(t.reshape(-1).view(torch.uint8).numpy().data)
    return _DIGEST_PREFIX + h.hexdigest()


def safetensors_bytes(
    tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None = None
) -> bytes:
    """Serialize ``tensors`` (and ``dict[str, str]`` metadata) to safetensors bytes with a digest.

    Tensors are detached, copied to CPU and made contiguous; tensors that share memory
    (tied weights, views) are cloned. Keys starting with ``"frostline."`` are reserved.

    Example:
        >>> import torch, safetensors.torch
        >>> blob = safetensors_bytes({"w": torch.ones(2)}, {"note": "x"})
        >>> safetensors.torch.load(blob)["w"].tolist()
        [1.0, 1.0]
    """
    user_md = _user_metadata(metadata)
    prepared = _prepare_tensors(tensors)
    digest = _digest(
        ((n, _DTYPE_NAMES[t.dtype], list(t.shape), t) for n, t in sorted(prepared.items())),
        user_md,
    )
    return safetensors.torch.save(
        prepared, metadata={**user_md, **dict.fromkeys(_DIGEST_KEYS, digest)}
    )


def save_safetensors(
    tensors: Mapping[str, torch.Tensor],
    path: PathLike,
    metadata: Mapping[str, str] | None = None,
) -> Path:
    """Atomically save ``tensors`` to a safetensors file (never pickle); return ``Path(path)``.

    See :func:`safetensors_bytes` for what is stored; :func:`load_safetensors` verifies
    the embedded digest. A failed write leaves a previous file at ``path`` untouched.

    Example:
        >>> import tempfile, pathlib, torch
        >>> p = pathlib.Path(tempfile.mkdtemp()) / "w.safetensors"
        >>> w = torch.ones(2, 2)
        >>> _ = save_safetensors({"w": w, "w_t": w.t()}, p, {"note": "tied"})
        >>> t, md = load_safetensors(p)
        >>> bool(torch.equal(t["w_t"], w)), md
        (True, {'note': 'tied'})
    """
    atomic_write_bytes(path, safetensors_bytes(tensors, metadata))
    return Path(path)


# ----------------------------------------------------------------------- reading


def _close(a: bytes, b: bytes) -> bool:
    """Same length and at most half of the bytes differ."""
    return len(a) == len(b) and sum(x != y for x, y in zip(a, b)) <= len(b) // 2


def _looks_like_digest(key: str, value: str) -> bool:
    """Whether a metadata entry is (or is a damaged copy of) one of the digest entries.

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


def _check_header_frame(path: PathLike) -> tuple[int, int]:
    """Size and header length, read from the first 9 bytes; plain words for the common defects.

    Only a regular file is read: it is opened without blocking (a FIFO would wait for a
    writer forever) and checked before a byte is read.
    """
    try:
        with open_regular(path) as f:
            size = os.fstat(f.fileno()).st_size
            head = f.read(9)
    except FileNotFoundError:
        raise _bad(path, "missing: no such file") from None
    except IsADirectoryError:
        raise _bad(path, "not a file (it is a directory)") from None
    except NotRegularFileError as e:
        raise _bad(path, f"not a file ({e})") from None
    except OSError as e:
        raise _bad(path, f"cannot be read: {e.strerror or e}") from None
    if size == 0:
        raise _bad(path, "truncated: file is empty (0 bytes)")
    if size < 8:
        raise _bad(path, f"truncated: file has {size} bytes, the 8-byte header length is missing")
    n = int.from_bytes(head[:8], "little")
    if size > 8 and head[8:9] != b"{":
        raise _bad(path, "not a safetensors file (no JSON header after the 8-byte length)")
    if n > _MAX_HEADER:
        raise _bad(path, f"not a safetensors file (header length field reads {n} bytes)")
    if n + 8 > size:
        raise _bad(
            path,
            f"truncated: header says {n} bytes, file has only {size - 8} bytes "
            "after the 8-byte length prefix",
        )
    return size, n


def _coverage_problem(path: PathLike, size: int, n: int) -> str | None:
    """Why the tensor data does not cover the file (only called once the library refused it)."""
    try:
        with open(path, "rb") as f:
            f.seek(8)
            header = json.loads(f.read(n))
        needed = max(
            (int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"),
            default=0,
        )
    except Exception:
        return None
    have = size - 8 - n
    if needed > have:
        return f"truncated: header describes {needed} bytes of tensor data, file has {have}"
    if needed < have:
        return f"corrupted: {have - needed} unexpected bytes after the tensor data"
    return None


def load_safetensors(path: PathLike) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Load a safetensors file into CPU tensors without pickle; return ``(tensors, metadata)``.

    The file is memory-mapped through ``safetensors.safe_open``. Every problem
    (missing file, truncation, corrupted header, digest mismatch, not a safetensors
    file) raises :class:`CheckpointError` naming the path and the defect, e.g.
    ``"<path>: truncated: header says 120 bytes, file has only 37 ..."``. Files
    written by :func:`save_safetensors` are verified against their embedded digest;
    plain safetensors files from other tools load without that check.

    Example:
        >>> import tempfile, pathlib, torch
        >>> p = pathlib.Path(tempfile.mkdtemp()) / "t.safetensors"
        >>> _ = save_safetensors({"x": torch.arange(3)}, p)
        >>> tensors, metadata = load_safetensors(p)
        >>> tensors["x"].tolist(), metadata
        ([0, 1, 2], {})
    """
    size, n = _check_header_frame(path)
    try:
        with safetensors.safe_open(os.fspath(path), framework="pt") as f:
            md = f.metadata() or {}
            described = []
            for name in sorted(f.keys()):
                info = f.get_slice(name)
                described.append((name, info.get_dtype(), info.get_shape(), f.get_tensor(name)))
    except (KeyboardInterrupt, SystemExit, GeneratorExit):
        raise
    except BaseException as e:  # the library's own validation (pyo3 panics are BaseException)
        what = _library_reason(e)
        if "not fully covered" in what:
            what = _coverage_problem(path, size, n) or f"corrupted: {what}"
        else:
            what = f"corrupted header: {what}"
        raise _bad(path, what) from None

    markers = {k for k, v in md.items() if _looks_like_digest(k, v)}
    user_md = {k: v for k, v in md.items() if k not in _DIGEST_KEYS}
    if markers:
        values = {md.get(k) for k in _DIGEST_KEYS}
        if markers != set(_DIGEST_KEYS) or len(values) != 1:
            raise _bad(path, "corrupted header: the integrity digest entries are damaged")
        if _digest(described, user_md) != values.pop():
            raise _bad(path, "corrupted: content does not match its digest")
    return {name: t for name, _, _, t in described}, user_md


def tensors_from_checked_bytes(data: bytes, path: PathLike) -> dict[str, torch.Tensor]:
    """Deserialize safetensors ``data`` whose integrity the caller has already checked.

    For containers that hash whole files (a checkpoint's ``COMPLETE`` lists the SHA-256
    of every file), so the embedded digest is not checked a second time. The
    library's structural validation still applies; a failure raises
    :class:`CheckpointError` naming ``path``.

    Example:
        >>> import torch
        >>> blob = safetensors_bytes({"w": torch.zeros(2)})
        >>> tensors_from_checked_bytes(blob, "model.safetensors")["w"].tolist()
        [0.0, 0.0]
        >>> tensors_from_checked_bytes(b"junk", "model.safetensors")
        Traceback (most recent call last):
        ...
        frostline.io.errors.CheckpointError: model.safetensors: corrupted: header too small
    """
    try:
        return safetensors.torch.load(data)
    except (KeyboardInterrupt, SystemExit, GeneratorExit):
        raise
    except BaseException as e:
        raise _bad(path, f"corrupted: {_library_reason(e)}") from None
