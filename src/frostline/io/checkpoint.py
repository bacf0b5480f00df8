"""Crash-safe, pickle-free checkpoint directories: :class:`CheckpointManager` and loading.

A checkpoint is a directory ``<run>/epoch-00012/`` holding one safetensors file per
tensor group (``model.safetensors``, ``optimizer.safetensors``, ``rng.safetensors``,
...), ``state.json``, ``metrics.json`` and, written last, ``COMPLETE``: a JSON file
with the size and SHA-256 of every other file. The directory is built under a
temp name and renamed into place (:func:`frostline.io.atomic.atomic_directory`), and
a checkpoint only counts when ``COMPLETE`` is valid and every hash matches, so a
crash at any moment leaves the previous checkpoints loadable.

Nothing here uses pickle: tensors go through safetensors, everything else through
JSON (:mod:`frostline.io.optimizer_state` and :mod:`frostline.io.rng_state` turn
optimizer and RNG state into ``(tensors, json_meta)`` pairs for that purpose).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import numbers
import os
import re
import secrets
import time
import warnings
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from frostline.core.checks import require_int
from frostline.io.atomic import (
    PathLike,
    atomic_directory,
    cleanup_stale_temps,
    fsync_dir,
    remove_path,
)
from frostline.io.errors import CheckpointError, CheckpointWarning
from frostline.io.jsondata import json_bytes, to_json_data
from frostline.io.regular import open_regular
from frostline.io.safetensors_io import safetensors_bytes, tensors_from_checked_bytes

try:  # POSIX advisory lock serializing writers of one checkpoint directory
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]

__all__ = [
    "Checkpoint",
    "CheckpointManager",
    "check_keys",
    "load_checkpoint",
    "resolve_checkpoint",
]

COMPLETE = "COMPLETE"
STATE_FILE = "state.json"
METRICS_FILE = "metrics.json"
_FORMAT = "frostline.checkpoint"
_VERSION = 1
_CKPT_RE = re.compile(r"^epoch-(\d+)$")
_OLD_RE = re.compile(r"^\.(epoch-\d+)\.old-[A-Za-z0-9_]+$")
_ENTRY_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]*$")
_SHA_RE = re.compile(r"^[0-9a-f]{64}$")
_LOCK_NAME = ".frostline-checkpoints.lock"
_MAX_COMPLETE_BYTES = 16 << 20


# ---------------------------------------------------------------------- checkpoints


@dataclass
class Checkpoint:
    """A loaded checkpoint: ``tensors[group][name]``, JSON ``state`` and ``metrics``."""

    epoch: int
    tensors: dict[str, dict[str, torch.Tensor]]
    state: dict[str, Any]
    metrics: dict[str, float]
    path: Path


def _bad(path: PathLike, what: str) -> CheckpointError:
    return CheckpointError(f"{os.fspath(path)}: {what}")


def _epoch_of(path: Path) -> int | None:
    """Epoch encoded in ``epoch-N`` or ``.epoch-N.old-*`` names, else None."""
    old = _OLD_RE.match(path.name)
    m = _CKPT_RE.match(old.group(1) if old else path.name)
    return int(m.group(1)) if m else None


def _scan(directory: Path) -> list[Path]:
    """Checkpoint directories in ``directory``, oldest first (by epoch, then mtime).

    A ``.epoch-N.old-*`` directory (left by an interrupted non-atomic replace) stands
    in for ``epoch-N`` when that is absent, so its data is never overlooked.
    """
    try:
        names = os.listdir(directory)
    except (FileNotFoundError, NotADirectoryError):
        return []
    found: list[tuple[int, float, Path]] = []
    present = {n for n in names if _CKPT_RE.match(n)}
    rescued: set[str] = set()
    for name in names:
        m = _OLD_RE.match(name)
        if _CKPT_RE.match(name) is None and (
            m is None or m.group(1) in present or m.group(1) in rescued
        ):
            continue
        if m is not None:
            rescued.add(m.group(1))
        path = directory / name
        try:
            st = path.stat()
        except OSError:
            continue
        if not path.is_dir():
            continue
        epoch = _epoch_of(path)
        assert epoch is not None
        found.append((epoch, st.st_mtime, path))
    found.sort(key=lambda t: (t[0], t[1]))
    return [p for _, _, p in found]


def _read_complete(ckpt: Path) -> dict[str, Any]:
    """Parse and validate ``COMPLETE``; raise CheckpointError saying what is wrong."""
    marker = ckpt / COMPLETE
    try:
        with open_regular(marker) as f:
            raw = f.read(_MAX_COMPLETE_BYTES + 1)
    except FileNotFoundError:
        if not ckpt.is_dir():
            raise _bad(ckpt, "missing: no such checkpoint directory") from None
        raise _bad(ckpt, "incomplete: no COMPLETE marker (the save did not finish)") from None
    except OSError as e:
        raise _bad(ckpt, f"COMPLETE cannot be read: {e.strerror or e}") from None
    try:
        complete = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as e:
        raise _bad(ckpt, f"corrupted COMPLETE marker (invalid JSON: {e})") from None
    if not isinstance(complete, dict) or complete.get("format") != _FORMAT:
        raise _bad(ckpt, "corrupted COMPLETE marker (not a frostline checkpoint marker)")
    if complete.get("version") != _VERSION:
        raise _bad(ckpt, f"unsupported checkpoint version {complete.get('version')!r}")
    epoch = complete.get("epoch")
    if not isinstance(epoch, int) or isinstance(epoch, bool) or epoch < 0:
        raise _bad(ckpt, f"corrupted COMPLETE marker (epoch {epoch!r})")
    dir_epoch = _epoch_of(ckpt)
    if dir_epoch is not None and dir_epoch != epoch:
        raise _bad(ckpt, f"COMPLETE says epoch {epoch}, the directory name says {dir_epoch}")
    files = complete.get("files")
    if not isinstance(files, dict) or not {STATE_FILE, METRICS_FILE} <= files.keys():
        raise _bad(ckpt, "corrupted COMPLETE marker (file list missing or incomplete)")
    for name, info in files.items():
        if not _ENTRY_RE.match(name) or name == COMPLETE:
            raise _bad(ckpt, f"corrupted COMPLETE marker (bad file name {name!r})")
        if (
            not isinstance(info, dict)
            or not isinstance(info.get("sha256"), str)
            or not _SHA_RE.match(info["sha256"])
            or not isinstance(info.get("bytes"), int)
            or isinstance(info.get("bytes"), bool)
        ):
            raise _bad(ckpt, f"corrupted COMPLETE marker (bad entry for {name!r})")
    return complete


def _check_file(ckpt: Path, name: str, info: Mapping[str, Any], *, keep: bool) -> bytes:
    """Verify one listed file's size and SHA-256; return its bytes when ``keep`` (else b"")."""
    path = ckpt / name
    try:
        with open_regular(path) as f:
            size = os.fstat(f.fileno()).st_size
            if size != info["bytes"]:
                raise _bad(
                    ckpt,
                    f"{name}: size mismatch (COMPLETE says {info['bytes']} bytes, file has {size})",
                )
            if keep:
                data = f.read()
                digest = hashlib.sha256(data).hexdigest()
            else:
                data = b""
                h = hashlib.sha256()
                while chunk := f.read(1 << 20):
                    h.update(chunk)
                digest = h.hexdigest()
    except FileNotFoundError:
        raise _bad(ckpt, f"{name}: missing (listed in COMPLETE)") from None
    except IsADirectoryError:
        raise _bad(ckpt, f"{name}: is a directory, expected a file") from None
    except OSError as e:
        raise _bad(ckpt, f"{name}: cannot be read: {e.strerror or e}") from None
    if digest != info["sha256"]:
        raise _bad(ckpt, f"{name}: sha256 mismatch (the file was modified or is corrupted)")
    return data


def _verify(ckpt: Path) -> dict[str, Any]:
    """Fully verify a checkpoint directory; return its COMPLETE data."""
    complete = _read_complete(ckpt)
    for name, info in complete["files"].items():
        _check_file(ckpt, name, info, keep=False)
    return complete


def _load_one(ckpt: Path) -> Checkpoint:
    """Verify (hashes) and load one checkpoint directory."""
    complete = _read_complete(ckpt)
    blobs = {
        name: _check_file(ckpt, name, info, keep=True) for name, info in complete["files"].items()
    }
    tensors: dict[str, dict[str, torch.Tensor]] = {}
    for name in [n for n in blobs if n.endswith(".safetensors")]:
        data = blobs.pop(name)  # drop the raw bytes as soon as they are parsed
        # The SHA-256 in COMPLETE already vouches for these bytes.
        tensors[name[: -len(".safetensors")]] = tensors_from_checked_bytes(data, ckpt / name)
        del data
    try:
        state = json.loads(blobs[STATE_FILE])
        metrics = json.loads(blobs[METRICS_FILE])
    except ValueError as e:
        raise _bad(ckpt, f"state.json/metrics.json is not valid JSON: {e}") from None
    if not isinstance(state, dict) or not isinstance(metrics, dict):
        raise _bad(ckpt, "state.json and metrics.json must hold JSON objects")
    return Checkpoint(
        epoch=complete["epoch"], tensors=tensors, state=state, metrics=metrics, path=ckpt
    )


def _is_checkpoint_dir(path: Path) -> bool:
    return _epoch_of(path) is not None or (path / COMPLETE).exists()


def _run_dir(path: Path) -> Path:
    """The directory holding ``epoch-*`` checkpoints: ``path`` or ``path/checkpoints``."""
    if _scan(path):
        return path
    sub = path / "checkpoints"
    if _scan(sub):
        return sub
    raise _bad(path, f"no checkpoints found (expected epoch-NNNNN/ directories here or in {sub})")


def _warn_skip(path: Path, err: Exception) -> None:
    warnings.warn(f"skipping checkpoint {path}: {err}", CheckpointWarning, stacklevel=3)


def _classify(path: PathLike) -> tuple[Path, bool]:
    p = Path(path)
    if not p.exists():
        raise _bad(p, "missing: no such file or directory")
    if not p.is_dir():
        raise _bad(p, "expected a run directory or a checkpoint directory, got a file")
    return p, _is_checkpoint_dir(p)


def resolve_checkpoint(path: PathLike) -> Path:
    """Return the checkpoint directory meant by ``path`` (verified, hashes included).

    ``path`` is a checkpoint directory (``.../epoch-00012``) or a run directory holding
    ``epoch-*`` checkpoints (directly or under ``checkpoints/``), which resolves to its
    newest complete checkpoint; incomplete/corrupted ones are skipped with a
    :class:`CheckpointWarning`. Raises :class:`CheckpointError` when nothing valid is found.

    Example:
        >>> import tempfile, torch
        >>> run = tempfile.mkdtemp()
        >>> mgr = CheckpointManager(run)
        >>> _ = mgr.save(3, {"model": {"w": torch.zeros(2)}}, {}, {"val_loss": 1.0})
        >>> resolve_checkpoint(run).name
        'epoch-00003'
    """
    p, is_ckpt = _classify(path)
    if is_ckpt:
        _verify(p)
        return p
    run = _run_dir(p)
    errors = []
    for cand in reversed(_scan(run)):
        try:
            _verify(cand)
            return cand
        except CheckpointError as e:
            _warn_skip(cand, e)
            errors.append(str(e))
    raise _bad(p, "no complete checkpoint:\n  - " + "\n  - ".join(errors))


def load_checkpoint(path: PathLike) -> Checkpoint:
    """Load a checkpoint directory, or the newest complete checkpoint of a run directory.

    Hashes are verified while loading; a damaged checkpoint raises
    :class:`CheckpointError` (given directly) or is skipped with a
    :class:`CheckpointWarning` in favour of the next newest (given a run directory).

    Example:
        >>> import tempfile, torch
        >>> run = tempfile.mkdtemp()
        >>> _ = CheckpointManager(run).save(1, {"model": {"w": torch.ones(2)}}, {"a": 1}, {})
        >>> ckpt = load_checkpoint(run)
        >>> ckpt.epoch, ckpt.state, ckpt.tensors["model"]["w"].tolist()
        (1, {'a': 1}, [1.0, 1.0])
    """
    p, is_ckpt = _classify(path)
    if is_ckpt:
        return _load_one(p)
    run = _run_dir(p)
    errors = []
    for cand in reversed(_scan(run)):
        try:
            return _load_one(cand)
        except CheckpointError as e:
            _warn_skip(cand, e)
            errors.append(str(e))
    raise _bad(p, "no complete checkpoint:\n  - " + "\n  - ".join(errors))


def _metric_value(metrics: Any, monitor: str) -> float | None:
    if not isinstance(metrics, dict):
        return None
    v = metrics.get(monitor)
    if not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v):
        return None
    return float(v)


class CheckpointManager:
    """Write, prune, find and load checkpoints of one run directory.

    ``save`` writes ``<directory>/epoch-NNNNN/`` atomically and then keeps the newest
    ``keep_last`` complete checkpoints plus (``keep_best``) the best one by
    ``metrics[monitor]`` (``mode`` "min" or "max"; NaN/inf never count as best,
    ties go to the earlier epoch). Pruning re-verifies the hashes of the checkpoints
    it keeps, so a damaged checkpoint never stands in for a good one that gets
    deleted. Writers of one directory are serialized by an advisory lock file
    (``.frostline-checkpoints.lock``, POSIX), so leftovers of a crashed writer are
    safe to clean up; readers need no lock.

    Example:
        >>> import tempfile, torch
        >>> mgr = CheckpointManager(tempfile.mkdtemp(), keep_last=2)
        >>> for epoch, loss in enumerate([0.9, 0.5, 0.7, 0.8]):
        ...     _ = mgr.save(epoch, {"model": {"w": torch.full((2,), epoch)}}, {}, {"val_loss": loss})
        >>> [p.name for p in mgr.list()], mgr.best().name
        (['epoch-00001', 'epoch-00002', 'epoch-00003'], 'epoch-00001')
    """

    def __init__(
        self,
        directory: PathLike,
        *,
        keep_last: int = 3,
        keep_best: bool = True,
        monitor: str = "val_loss",
        mode: str = "min",
    ) -> None:
        require_int("keep_last", keep_last, minimum=1)
        if not isinstance(keep_best, bool):
            raise TypeError(f"keep_best must be a bool, got {keep_best!r}")
        if not isinstance(monitor, str) or not monitor:
            raise ValueError(f"monitor must be a non-empty metric name (str), got {monitor!r}")
        if mode not in ("min", "max"):
            raise ValueError(f"mode must be 'min' or 'max', got {mode!r}")
        self.directory = Path(directory)
        self.keep_last = keep_last
        self.keep_best = keep_best
        self.monitor = monitor
        self.mode = mode

    def __repr__(self) -> str:
        return (
            f"CheckpointManager({str(self.directory)!r}, keep_last={self.keep_last}, "
            f"keep_best={self.keep_best}, monitor={self.monitor!r}, mode={self.mode!r})"
        )

    # -------------------------------------------------------------------- writing

    @contextlib.contextmanager
    def _lock(self) -> Iterator[None]:
        if fcntl is None:  # pragma: no cover
            yield
            return
        fd = os.open(self.directory / _LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    def save(
        self,
        epoch: int,
        tensors: Mapping[str, Mapping[str, torch.Tensor]],
        state: Mapping[str, Any],
        metrics: Mapping[str, float],
    ) -> Path:
        """Atomically write checkpoint ``epoch-NNNNN`` and prune old ones; return its path.

        ``tensors`` maps a group name (``"model"``, ``"optimizer"``, ``"rng"``, ...;
        letters, digits, ``_.-``) to a dict of tensors, each group becoming
        ``<group>.safetensors``. ``state`` must be JSON data (tuples are stored as
        lists) and ``metrics`` maps names to real numbers. Everything is serialized
        and validated before the disk is touched. Saving an existing epoch replaces
        it atomically.

        Example:
            >>> import tempfile, torch
            >>> mgr = CheckpointManager(tempfile.mkdtemp())
            >>> path = mgr.save(7, {"model": {"w": torch.zeros(3)}}, {"lr": 0.1}, {"val_loss": 0.3})
            >>> sorted(p.name for p in path.iterdir())
            ['COMPLETE', 'metrics.json', 'model.safetensors', 'state.json']
        """
        require_int("epoch", epoch)
        if not isinstance(tensors, Mapping):
            raise TypeError(
                f"tensors must be a dict of dicts of tensors, got {type(tensors).__name__}"
            )
        files: dict[str, bytes] = {}
        for group, group_tensors in tensors.items():
            if not isinstance(group, str) or not _ENTRY_RE.match(group):
                raise ValueError(
                    f"tensor group name {group!r} must be a str of letters, digits, '_', '.', '-'"
                    " not starting with '.' or '-'"
                )
            try:
                files[f"{group}.safetensors"] = safetensors_bytes(group_tensors)
            except (TypeError, ValueError) as e:
                raise type(e)(f"tensors[{group!r}]: {e}") from None
        if not isinstance(state, Mapping):
            raise TypeError(f"state must be a dict, got {type(state).__name__}")
        files[STATE_FILE] = json_bytes(to_json_data(state, "state"))
        if not isinstance(metrics, Mapping):
            raise TypeError(f"metrics must be a dict, got {type(metrics).__name__}")
        clean_metrics: dict[str, float] = {}
        for k, v in metrics.items():
            if not isinstance(k, str):
                raise TypeError(f"metric names must be str, got {k!r}")
            if isinstance(v, torch.Tensor) and v.numel() == 1:
                v = v.item()
            if not isinstance(v, numbers.Real):
                raise TypeError(f"metric {k!r} must be a real number, got {type(v).__name__}")
            clean_metrics[k] = float(v)
        files[METRICS_FILE] = json_bytes(clean_metrics)

        self.directory.mkdir(parents=True, exist_ok=True)
        final = self.directory / f"epoch-{epoch:05d}"
        with self._lock():
            cleanup_stale_temps(self.directory, match=lambda n: _CKPT_RE.match(n) is not None)
            with atomic_directory(final) as tmp:
                listing: dict[str, dict[str, Any]] = {}
                for name, data in files.items():
                    (tmp / name).write_bytes(data)
                    listing[name] = {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}
                complete = {
                    "format": _FORMAT,
                    "version": _VERSION,
                    "epoch": epoch,
                    "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                    "files": listing,
                }
                (tmp / COMPLETE).write_bytes(json_bytes(complete))
            try:
                self._prune(final)
            except OSError as e:  # the checkpoint itself is safely saved: do not fail
                warnings.warn(
                    f"checkpoint {final} saved, but removing old checkpoints failed: {e}",
                    CheckpointWarning,
                    stacklevel=2,
                )
        return final

    def _prune(self, just_saved: Path) -> None:
        """Delete all but the newest ``keep_last`` valid checkpoints, the best and ``just_saved``."""
        candidates = _scan(self.directory)
        keep = {just_saved}
        invalid: dict[Path, str] = {}
        valid: set[Path] = {just_saved}

        def is_valid(path: Path) -> bool:
            if path in valid:
                return True
            if path in invalid:
                return False
            try:
                _verify(path)
            except CheckpointError as e:
                invalid[path] = str(e)
                return False
            valid.add(path)
            return True

        count = 0
        for path in reversed(candidates):
            if count >= self.keep_last:
                break
            if is_valid(path):
                keep.add(path)
                count += 1
        if self.keep_best:
            best = self._best_of(candidates, is_valid)
            if best is not None:
                keep.add(best)
        saved_epoch = _epoch_of(just_saved)
        assert saved_epoch is not None
        removed = False
        for path in candidates:
            if path in keep:
                continue
            epoch = _epoch_of(path)
            if path in invalid and epoch is not None and epoch > saved_epoch:
                continue  # damaged but newer than what we just wrote: leave it for inspection
            if path in invalid:
                warnings.warn(
                    f"removing corrupted checkpoint {path}: {invalid[path]}",
                    CheckpointWarning,
                    stacklevel=3,
                )
            # Rename first (atomic), then delete: a crash mid-delete leaves a temp
            # entry that the next save cleans up, never a half-deleted checkpoint.
            trash = path.with_name(f".{path.name}.tmp-{secrets.token_hex(4)}")
            try:
                os.rename(path, trash)
            except FileNotFoundError:
                continue
            remove_path(trash)
            removed = True
        if removed:
            fsync_dir(self.directory)

    def _best_of(self, candidates: list[Path], is_valid: Any) -> Path | None:
        scored = []
        for path in candidates:
            try:
                with open_regular(path / METRICS_FILE) as f:
                    metrics = json.loads(f.read())
            except (OSError, ValueError):
                continue
            value = _metric_value(metrics, self.monitor)
            if value is not None:
                scored.append((value if self.mode == "min" else -value, path))
        # Stable sort: equal values keep epoch order, so the earliest epoch wins ties.
        scored.sort(key=lambda t: t[0])
        for _, path in scored:
            if is_valid(path):
                return path
        return None

    # -------------------------------------------------------------------- reading

    def _valid_newest_first(self) -> Iterator[Path]:
        for path in reversed(_scan(self.directory)):
            try:
                _verify(path)
            except CheckpointError as e:
                _warn_skip(path, e)
                continue
            yield path

    def latest(self) -> Path | None:
        """Newest complete checkpoint (by epoch, then mtime), or None if there is none.

        Every candidate's hashes are verified; incomplete or corrupted checkpoints are
        skipped with a :class:`CheckpointWarning` naming each and saying why.

        Example:
            >>> import tempfile, torch
            >>> mgr = CheckpointManager(tempfile.mkdtemp())
            >>> mgr.latest() is None
            True
            >>> _ = mgr.save(4, {"model": {"w": torch.zeros(1)}}, {}, {})
            >>> mgr.latest().name
            'epoch-00004'
        """
        return next(self._valid_newest_first(), None)

    def best(self) -> Path | None:
        """Complete checkpoint with the best ``metrics[monitor]``, or None.

        Checkpoints without a finite value for ``monitor`` never count; ties go to the
        earlier epoch; corrupted checkpoints are skipped with a warning.

        Example:
            >>> import tempfile, torch
            >>> mgr = CheckpointManager(tempfile.mkdtemp(), monitor="acc", mode="max")
            >>> for e, acc in enumerate([0.5, 0.9, float("nan")]):
            ...     _ = mgr.save(e, {"m": {"w": torch.zeros(1)}}, {}, {"acc": acc})
            >>> mgr.best().name
            'epoch-00001'
        """

        def is_valid(path: Path) -> bool:
            try:
                _verify(path)
                return True
            except CheckpointError as e:
                _warn_skip(path, e)
                return False

        return self._best_of(_scan(self.directory), is_valid)

    def list(self) -> list[Path]:
        """All complete checkpoints, oldest first (corrupted ones skipped with a warning).

        Example:
            >>> import tempfile, torch
            >>> mgr = CheckpointManager(tempfile.mkdtemp(), keep_last=2, keep_best=False)
            >>> for e in range(4):
            ...     _ = mgr.save(e, {"m": {"w": torch.zeros(1)}}, {}, {})
            >>> [p.name for p in mgr.list()]
            ['epoch-00002', 'epoch-00003']
        """
        return list(reversed(list(self._valid_newest_first())))

    def load(self, path_or_dir: PathLike | None = None) -> Checkpoint:
        """Load a checkpoint: a checkpoint directory, or the latest complete one of a run.

        Defaults to this manager's directory. See :func:`load_checkpoint`.

        Example:
            >>> import tempfile, torch
            >>> mgr = CheckpointManager(tempfile.mkdtemp())
            >>> p = mgr.save(2, {"model": {"w": torch.ones(2)}}, {"step": 10}, {"val_loss": 0.1})
            >>> ckpt = mgr.load()
            >>> ckpt.epoch, ckpt.state["step"], ckpt.metrics, ckpt.path == p
            (2, 10, {'val_loss': 0.1}, True)
        """
        return load_checkpoint(self.directory if path_or_dir is None else path_or_dir)


def check_keys(module: nn.Module, tensors: dict[str, torch.Tensor], source: str) -> None:
    """Raise listing missing, unexpected and shape-mismatched keys of ``tensors`` against ``module``.

    >>> from torch import nn
    >>> check_keys(nn.Linear(1, 1), {"weight": torch.zeros(1, 1), "bias": torch.zeros(1)}, "f")
    """
    own = module.state_dict()
    missing = [k for k in own if k not in tensors]
    unexpected = sorted(k for k in tensors if k not in own)
    mismatched = [
        f"{k}: file {tuple(tensors[k].shape)} vs model {tuple(own[k].shape)}"
        for k in own
        if k in tensors and tuple(tensors[k].shape) != tuple(own[k].shape)
    ]
    if missing or unexpected or mismatched:

        def show(xs):
            return (
                ", ".join(xs[:8]) + (f", ... ({len(xs)} in all)" if len(xs) > 8 else "")
                if xs
                else "none"
            )

        raise CheckpointError(
            f"{source} does not fit this architecture. Missing keys: {show(missing)}. "
            f"Unexpected keys: {show(unexpected)}. Shape mismatches: {show(mismatched)}."
        )
