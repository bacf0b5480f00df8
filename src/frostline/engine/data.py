"""Data: NumPy arrays, tensors, Datasets and DataLoaders into batches.

Random-access data (arrays, tensors, map-style Datasets) becomes an
:class:`IndexedData`: batches are drawn by index, which is what lets ``fit`` feed
the trainable part from the activation cache. A ``DataLoader`` (or an iterable
dataset) is iterated as given.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, IterableDataset, TensorDataset
from torch.utils.data._utils.collate import default_collate


class DataError(ValueError):
    """Input data that cannot be used (says which input and what was expected)."""


Target = torch.Tensor | dict | tuple | None


def to_tensor(a, what: str, *, check_finite: bool = True) -> torch.Tensor:
    """NumPy array / tensor / nested list -> tensor (float64 becomes float32).

    >>> to_tensor(np.zeros((2, 3)), "x").dtype
    torch.float32
    """
    if isinstance(a, torch.Tensor):
        t = a
    elif isinstance(a, np.ndarray):
        if a.dtype == object:
            raise DataError(f"{what} is a NumPy array of Python objects; expected a numeric array")
        t = torch.from_numpy(np.ascontiguousarray(a))
    elif isinstance(a, list | tuple):
        try:
            t = torch.as_tensor(np.asarray(a))
        except (ValueError, TypeError) as e:
            raise DataError(f"{what} could not be turned into an array: {e}") from None
    else:
        raise DataError(
            f"{what} must be a NumPy array, a torch tensor, a Dataset or a DataLoader; got {type(a).__name__}"
        )
    if t.dtype == torch.float64:
        t = t.float()
    if t.dtype == torch.bool:
        t = t.float()
    if t.dim() == 0:
        raise DataError(f"{what} is a scalar; expected one entry per sample along the first axis")
    if check_finite and t.is_floating_point() and t.numel():
        check_finite_values(t, what)
    return t


def check_finite_values(t: torch.Tensor, what: str, *, chunk: int = 1 << 16) -> None:
    """Raise naming the first sample with NaN/inf, without a temporary the size of ``t``.

    One sum over ``t`` (no temporary: a NaN or inf in ``t`` makes it NaN or inf) clears
    the usual, finite data; only when the sum is not finite (a bad value, or finite
    values overflowing it) are the samples scanned, ``chunk`` elements at a time, so the
    scan's temporaries stay that small whatever the size of ``t``. A non-contiguous ``t``
    is never copied.

    >>> check_finite_values(torch.tensor([[1.0], [float("nan")]]), "x")
    Traceback (most recent call last):
    ...
    frostline.engine.data.DataError: x contains NaN values (1 in all; first in sample 1)
    """
    if bool(torch.isfinite(t.sum())):
        return
    rows = max(chunk // max(t[0].numel(), 1), 1)
    bad_count, first, kind = 0, None, "inf"
    for start, c in zip(range(0, len(t), rows), t.split(rows), strict=True):
        bad = ~torch.isfinite(c)
        n = int(bad.sum())
        if not n:
            continue
        bad_count += n
        if first is None:
            first = start + int(bad.reshape(len(c), -1).any(1).nonzero()[0, 0])
        if bool(torch.isnan(c).any()):
            kind = "NaN"
    if bad_count:
        raise DataError(
            f"{what} contains {kind} values ({bad_count} in all; first in sample {first})"
        )


def _key(k):
    return int(k) if isinstance(k, int | np.integer) and not isinstance(k, bool) else str(k)


def is_several(y) -> bool:
    """A list or tuple of arrays/tensors is one target per output (as in Keras).

    >>> is_several([np.zeros(3), np.ones(3)]), is_several([0, 1, 2])
    (True, False)
    """
    return (
        isinstance(y, list | tuple)
        and len(y) > 0
        and all(isinstance(v, np.ndarray | torch.Tensor) and v.ndim > 0 for v in y)
    )


def _targets(y, what: str = "y") -> Target:
    """Targets as a tensor, a dict (by output name, or ``{0: ya, 1: yb}``) or a tuple (by position)."""
    if y is None:
        return None
    if isinstance(y, Mapping):
        if not y:
            raise DataError(f"{what} is an empty dict; expected one array per output")
        return {_key(k): to_tensor(v, f"{what}[{k!r}]") for k, v in y.items()}
    if is_several(y):
        return tuple(to_tensor(v, f"{what}[{i}]") for i, v in enumerate(y))
    return to_tensor(y, what)


def inputs_tensor(x, what: str = "x"):
    """Model inputs: an array/tensor, a dict of them (keyword inputs such as ``input_ids`` and
    ``attention_mask``) or a tuple of them (several positional inputs), as tensors.

    >>> inputs_tensor({"ids": np.zeros((2, 3), "int64")})["ids"].dtype
    torch.int64
    """
    out: dict[str, torch.Tensor] | tuple[torch.Tensor, ...]
    if isinstance(x, Mapping):
        if not x:
            raise DataError(f"{what} is an empty dict; expected one array per model input")
        out = {str(k): to_tensor(v, f"{what}[{k!r}]") for k, v in x.items()}
    elif isinstance(x, tuple) and x and all(isinstance(v, np.ndarray | torch.Tensor) for v in x):
        out = tuple(to_tensor(v, f"{what}[{i}]") for i, v in enumerate(x))
    else:
        return to_tensor(x, what)
    parts = list(out.items()) if isinstance(out, dict) else list(enumerate(out))
    n = len(parts[0][1])
    for k, v in parts:
        if len(v) != n:
            raise DataError(
                f"{what}[{parts[0][0]!r}] has {n} samples but {what}[{k!r}] has {len(v)}; "
                "every model input needs one entry per sample"
            )
    return out


def _parts(y: Target) -> list[tuple[str, torch.Tensor]]:
    if isinstance(y, dict):
        return [(f"[{k!r}]", v) for k, v in y.items()]
    if isinstance(y, tuple):
        return [(f"[{i}]", v) for i, v in enumerate(y)]
    return [("", y)] if y is not None else []


def _length(y: Target) -> int:
    parts = _parts(y)
    return len(parts[0][1]) if parts else 0


def _index(y, idx):
    if y is None:
        return None
    if isinstance(y, dict):
        return {k: v[idx] for k, v in y.items()}
    if isinstance(y, tuple):
        return tuple(v[idx] for v in y)
    return y[idx]


def split_sample(batch) -> tuple:
    """A Dataset/DataLoader item -> ``(x, y)``: ``(x, y)``, ``(x, ya, yb)`` (several targets,
    by position), ``{"x": ..., "y": ...}`` or a bare ``x``.

    >>> x, y = split_sample((torch.zeros(2), torch.ones(2), torch.ones(2))); type(y).__name__
    'tuple'
    """
    if isinstance(batch, list | tuple):
        if len(batch) > 2:
            return batch[0], tuple(batch[1:])
        y = batch[1] if len(batch) > 1 else None
        if isinstance(y, list):  # default_collate turns a sample's (ya, yb) into a list
            y = tuple(y)
        return batch[0], y
    if isinstance(batch, dict) and "x" in batch:
        return batch["x"], batch.get("y")
    return batch, None


def _leaves(x) -> list:
    if isinstance(x, dict):
        return list(x.values())
    if isinstance(x, tuple):
        return list(x)
    return [x]


class ArrayDataset(Dataset):
    """In-memory ``(x, y)`` samples; deterministic (no random transforms), so cacheable.

    >>> ds = ArrayDataset(np.zeros((4, 2)), np.arange(4)); len(ds), ds.deterministic
    (4, True)
    """

    deterministic = True

    def __init__(self, x, y=None) -> None:
        self.x = inputs_tensor(x, "x")
        n = len(_leaves(self.x)[0])
        self.y = _targets(y)
        for where, v in _parts(self.y):
            if len(v) != n:
                hint = (
                    " (a list or tuple of arrays is one target per output; for one target pass "
                    "a single array)"
                    if isinstance(self.y, tuple)
                    else ""
                )
                raise DataError(
                    f"x has {n} samples but y{where} has {len(v)}; they must match{hint}"
                )

    def __len__(self) -> int:
        return len(_leaves(self.x)[0])

    def __getitem__(self, i):
        return _index(self.x, i), _index(self.y, i)

    def gather(self, idx: torch.Tensor):
        return _index(self.x, idx), _index(self.y, idx)


@dataclass
class IndexedData:
    """Random-access samples: ``gather(indices) -> (x, y)``; ``deterministic`` allows caching."""

    dataset: Dataset
    n: int
    deterministic: bool

    def gather(self, idx: torch.Tensor):
        ds = self.dataset
        if isinstance(ds, ArrayDataset):
            return ds.gather(idx)
        if isinstance(ds, TensorDataset):
            return split_sample([t[idx] for t in ds.tensors])
        items = [ds[int(i)] for i in idx]
        return split_sample(default_collate(items))

    def targets(self, idx: torch.Tensor):
        """Only the targets of these samples (no input loading when the dataset allows)."""
        ds = self.dataset
        if isinstance(ds, ArrayDataset):
            return _index(ds.y, idx)
        if isinstance(ds, TensorDataset):
            return split_sample([None, *(t[idx] for t in ds.tensors[1:])])[1]
        return self.gather(idx)[1]

    def inputs(self) -> tuple:
        """The raw arrays, for fingerprinting (None when not in memory)."""
        ds = self.dataset
        if isinstance(ds, ArrayDataset):
            return (*_leaves(ds.x), *(v for _, v in _parts(ds.y)))
        if isinstance(ds, TensorDataset):
            return tuple(ds.tensors)
        return ()

    def index_batches(
        self,
        batch_size: int,
        *,
        shuffle: bool,
        seed: int,
        epoch: int,
        rank: int = 0,
        world: int = 1,
    ) -> list[torch.Tensor]:
        """This rank's index batches for one epoch (reproducible from seed and epoch)."""
        idx = torch.arange(self.n)
        if world > 1:  # a fixed shard per rank (padded to equal length), shuffled within
            per = math.ceil(self.n / world)
            padded = torch.cat([idx, idx[: per * world - self.n]])
            idx = padded[rank::world]
        if shuffle:
            g = torch.Generator().manual_seed(int(seed) * 1_000_003 + epoch)
            idx = idx[torch.randperm(len(idx), generator=g)]
        return list(idx.split(batch_size))


@dataclass
class LoaderData:
    """Batches from a user's DataLoader or iterable dataset, as given."""

    loader: DataLoader | IterableDataset
    deterministic: bool = False

    @property
    def n(self) -> int | None:
        try:
            return len(self.loader.dataset) if isinstance(self.loader, DataLoader) else None  # type: ignore[arg-type]
        except TypeError:
            return None

    def batches(self) -> Iterator[tuple[torch.Tensor, Target]]:
        for batch in self.loader:
            yield split_sample(batch)


Data = IndexedData | LoaderData


def check_batch_size(batch_size, default: int = 32) -> int:
    if batch_size is None:
        return default
    if (
        isinstance(batch_size, bool)
        or not isinstance(batch_size, int | np.integer)
        or batch_size <= 0
    ):
        raise DataError(f"batch_size must be a positive int, got {batch_size!r}")
    return int(batch_size)


def prepare(x, y=None, *, what: str = "x") -> Data:
    """Turn ``fit``'s ``x``/``y`` into indexed or loader data, validating as it goes.

    >>> prepare(np.zeros((3, 2), "float32"), np.array([0, 1, 0])).n
    3
    """
    if isinstance(x, DataLoader):
        if y is not None:
            raise DataError(
                f"{what} is a DataLoader, so y must be None (the loader yields (x, y) batches)"
            )
        return LoaderData(x)
    if isinstance(x, IterableDataset):
        if y is not None:
            raise DataError(f"{what} is an IterableDataset, so y must be None")
        return LoaderData(x)
    if isinstance(x, Dataset):
        if y is not None:
            raise DataError(
                f"{what} is a Dataset, so y must be None (the dataset yields (x, y) samples)"
            )
        n = len(x)  # type: ignore[arg-type]
        if n == 0:
            raise DataError(f"{what} is an empty Dataset; expected at least one sample")
        deterministic = bool(
            getattr(x, "deterministic", isinstance(x, TensorDataset | ArrayDataset))
        )
        return IndexedData(x, n, deterministic)
    if x is None:
        raise DataError(f"{what} is None; expected arrays, tensors, a Dataset or a DataLoader")
    ds = ArrayDataset(x, y)
    if len(ds) == 0:
        raise DataError(f"{what} is empty (0 samples); expected at least one sample")
    return IndexedData(ds, len(ds), True)


def split_validation(x, y, fraction: float):
    """Keras' ``validation_split``: the last ``fraction`` of the samples, taken before shuffling."""
    if isinstance(fraction, bool) or not isinstance(fraction, int | float) or not 0 <= fraction < 1:
        raise DataError(f"validation_split must be a float in [0, 1), got {fraction!r}")
    if isinstance(x, Dataset | DataLoader):
        raise DataError(
            "validation_split works with arrays and tensors; for a Dataset or DataLoader pass validation_data"
        )
    xt = inputs_tensor(x, "x")
    yt = _targets(y)
    n = len(_leaves(xt)[0])
    n_val = int(math.floor(n * fraction))
    if fraction and n_val == 0:
        raise DataError(f"validation_split={fraction} of {n} samples leaves no validation sample")
    if n_val >= n:
        raise DataError(f"validation_split={fraction} of {n} samples leaves no training sample")
    cut = n - n_val
    train, val = slice(0, cut), slice(cut, n)
    return (_index(xt, train), _index(yt, train)), (_index(xt, val), _index(yt, val))


def unpack_validation(validation_data):
    """``(x_val, y_val)`` tuple, a Dataset or a DataLoader -> prepared data."""
    if validation_data is None:
        return None
    if isinstance(validation_data, Dataset | DataLoader):
        return prepare(validation_data, what="validation_data")
    if isinstance(validation_data, tuple | list) and len(validation_data) == 2:
        return prepare(validation_data[0], validation_data[1], what="validation_data x")
    raise DataError(
        f"validation_data must be (x_val, y_val), a Dataset or a DataLoader; got {type(validation_data).__name__}"
    )


def length_of(y: Target) -> int:
    return _length(y)
