"""Data: NumPy arrays, tensors, Datasets and DataLoaders into batches.

Random-access data (arrays, tensors, map-style Datasets) becomes an
:class:`IndexedData`: batches are drawn by index, which is what lets ``fit`` feed
the trainable part from the activation cache. A ``DataLoader`` (or an iterable
dataset) is iterated as given.
"""

from __future__ import annotations

import functools
import math
import warnings
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


def split_sample(batch, outputs: int | None = None) -> tuple:
    """A Dataset/DataLoader item -> ``(x, y, sample_weight)``, as Keras unpacks one.

    ``(x,)``/bare ``x``; ``(x, y)``; ``(x, y, sample_weight)``; ``(x, ya, yb)`` (several
    targets, by position); ``{"x": ..., "y": ..., "sample_weight": ...}``. A 3-element
    item is ``(x, y, sample_weight)`` when the model has one loss (``outputs=1``) or its
    second element is itself a list, tuple or dict of targets; otherwise (several losses,
    or ``outputs=None``: not known) its elements after ``x`` are the targets, and
    ``outputs + 2`` elements are several targets followed by the sample weights.

    >>> x, y, sw = split_sample((torch.zeros(2), torch.ones(2), torch.ones(2))); type(y).__name__
    'tuple'
    >>> x, y, sw = split_sample((torch.zeros(2), torch.ones(2), torch.ones(2)), outputs=1); sw
    tensor([1., 1.])
    """
    if isinstance(batch, list | tuple):
        n = len(batch)
        if n > 2:
            keras_style = n == 3 and (outputs == 1 or isinstance(batch[1], list | tuple | Mapping))
            if keras_style:
                y = tuple(batch[1]) if isinstance(batch[1], list) else batch[1]
                return batch[0], y, batch[2]
            if outputs is None or n == outputs + 1:
                return batch[0], tuple(batch[1:]), None
            if n == outputs + 2:
                return batch[0], tuple(batch[1:-1]), batch[-1]
            raise DataError(
                f"a data item of {n} elements for a model with {outputs} loss"
                f"{'es' if outputs != 1 else ''}: expected (x, y), (x, y, sample_weight) or "
                "(x, y_1, ..., y_k[, sample_weight]) with one target per loss"
            )
        y = batch[1] if n > 1 else None
        if isinstance(y, list):  # default_collate turns a sample's (ya, yb) into a list
            y = tuple(y)
        return batch[0], y, None
    if isinstance(batch, dict) and "x" in batch:
        return batch["x"], batch.get("y"), batch.get("sample_weight")
    return batch, None, None


def _leaves(x) -> list:
    if isinstance(x, dict):
        return list(x.values())
    if isinstance(x, tuple):
        return list(x)
    return [x]


class ArrayDataset(Dataset):
    """In-memory ``(x, y)`` samples (and optional per-sample weights); deterministic (no
    random transforms), so cacheable.

    >>> ds = ArrayDataset(np.zeros((4, 2)), np.arange(4)); len(ds), ds.deterministic
    (4, True)
    """

    deterministic = True

    def __init__(self, x, y=None, sample_weight=None) -> None:
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
        self.sample_weight = None
        if sample_weight is not None:
            if self.y is None:
                raise DataError("sample_weight was given without targets y; weights weigh losses")
            sw = to_tensor(sample_weight, "sample_weight").float()
            if len(sw) != n:
                raise DataError(
                    f"x has {n} samples but sample_weight has {len(sw)}; expected one weight "
                    "per sample (shape (n,))"
                )
            self.sample_weight = sw

    def __len__(self) -> int:
        return len(_leaves(self.x)[0])

    def __getitem__(self, i):
        return _index(self.x, i), _index(self.y, i)

    def gather(self, idx: torch.Tensor):
        return _index(self.x, idx), _index(self.y, idx)


@dataclass
class IndexedData:
    """Random-access samples: ``sample(indices) -> (x, y, sample_weight)``; ``deterministic``
    allows caching. ``outputs`` (the number of losses, when known) says how a Dataset's
    3-element items read (see :func:`split_sample`). A Dataset with a method
    ``labels_at(indices) -> y`` (the targets of those samples, no sample weights) gives
    its labels without loading its inputs: epochs served from the cache read no input.
    A Dataset with ``__getitems__(indices) -> [sample, ...]`` (the batch read
    ``DataLoader`` uses) is read a batch at a time through it."""

    dataset: Dataset
    n: int
    deterministic: bool
    outputs: int | None = None

    def sample(self, idx: torch.Tensor):
        """``(x, y, sample_weight)`` of these samples."""
        ds = self.dataset
        if isinstance(ds, ArrayDataset):
            return (*ds.gather(idx), _index(ds.sample_weight, idx))
        if isinstance(ds, TensorDataset):
            return split_sample([t[idx] for t in ds.tensors], self.outputs)
        many = getattr(ds, "__getitems__", None)  # a batch read, as DataLoader calls it
        items = many(idx.tolist()) if many is not None else [ds[int(i)] for i in idx]
        return split_sample(default_collate(items), self.outputs)

    def gather(self, idx: torch.Tensor):
        """``(x, y)`` of these samples."""
        return self.sample(idx)[:2]

    def labels(self, idx: torch.Tensor):
        """``(y, sample_weight)`` of these samples (no input loading when the dataset allows)."""
        ds = self.dataset
        if isinstance(ds, ArrayDataset):
            return _index(ds.y, idx), _index(ds.sample_weight, idx)
        if isinstance(ds, TensorDataset):
            return split_sample([None, *(t[idx] for t in ds.tensors[1:])], self.outputs)[1:]
        read = getattr(ds, "labels_at", None)
        if callable(read):  # a Dataset that reads its labels without its inputs
            return read(idx), None
        return self.sample(idx)[1:]

    def targets(self, idx: torch.Tensor):
        """Only the targets of these samples (no input loading when the dataset allows)."""
        return self.labels(idx)[0]

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
        """This rank's index batches for one pass (reproducible from seed and pass number)."""
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
    outputs: int | None = None

    @property
    def n(self) -> int | None:
        try:
            return len(self.loader.dataset) if isinstance(self.loader, DataLoader) else None  # type: ignore[arg-type]
        except TypeError:
            return None

    def batches(self) -> Iterator[tuple]:
        """``(x, y, sample_weight)`` per batch."""
        for batch in self.loader:
            yield split_sample(batch, self.outputs)


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


def prepare(x, y=None, sample_weight=None, *, outputs: int | None = None, what: str = "x") -> Data:
    """Turn ``fit``'s ``x``/``y``/``sample_weight`` into indexed or loader data, validating
    as it goes. ``outputs``: the number of losses, which says how a Dataset's items read.

    >>> prepare(np.zeros((3, 2), "float32"), np.array([0, 1, 0])).n
    3
    """
    kind = next(
        (k for t, k in ((DataLoader, "a DataLoader"), (Dataset, "a Dataset")) if isinstance(x, t)),
        None,
    )
    if kind is not None and (y is not None or sample_weight is not None):
        given = "y" if y is not None else "sample_weight"
        raise DataError(
            f"{what} is {kind}, so {given} must be None (its items are (x, y) or "
            "(x, y, sample_weight))"
        )
    if isinstance(x, DataLoader | IterableDataset):
        return LoaderData(x, outputs=outputs)
    if isinstance(x, Dataset):
        n = len(x)  # type: ignore[arg-type]
        if n == 0:
            raise DataError(f"{what} is an empty Dataset; expected at least one sample")
        deterministic = bool(
            getattr(x, "deterministic", isinstance(x, TensorDataset | ArrayDataset))
        )
        return IndexedData(x, n, deterministic, outputs)
    if x is None:
        raise DataError(f"{what} is None; expected arrays, tensors, a Dataset or a DataLoader")
    ds = ArrayDataset(x, y, sample_weight)
    if len(ds) == 0:
        raise DataError(f"{what} is empty (0 samples); expected at least one sample")
    return IndexedData(ds, len(ds), True, outputs)


def split_validation(x, y, fraction: float, sample_weight=None):
    """Keras' ``validation_split``: the last ``fraction`` of the samples (and of their
    weights), taken before shuffling; returns ``(x, y, sw), (x_val, y_val, sw_val)``."""
    if isinstance(fraction, bool) or not isinstance(fraction, int | float) or not 0 <= fraction < 1:
        raise DataError(f"validation_split must be a float in [0, 1), got {fraction!r}")
    if isinstance(x, Dataset | DataLoader):
        raise DataError(
            "validation_split works with arrays and tensors; for a Dataset or DataLoader pass validation_data"
        )
    xt = inputs_tensor(x, "x")
    yt = _targets(y)
    sw = None if sample_weight is None else to_tensor(sample_weight, "sample_weight")
    n = len(_leaves(xt)[0])
    n_val = int(math.floor(n * fraction))
    if fraction and n_val == 0:
        raise DataError(f"validation_split={fraction} of {n} samples leaves no validation sample")
    if n_val >= n:
        raise DataError(f"validation_split={fraction} of {n} samples leaves no training sample")
    cut = n - n_val
    parts = [(_index(v, slice(0, cut)), _index(v, slice(cut, n))) for v in (xt, yt, sw)]
    return tuple(p[0] for p in parts), tuple(p[1] for p in parts)


def unpack_validation(validation_data, outputs: int | None = None):
    """``(x_val, y_val)``, ``(x_val, y_val, val_sample_weight)``, a Dataset or a
    DataLoader -> prepared data."""
    if validation_data is None:
        return None
    if isinstance(validation_data, Dataset | DataLoader):
        return prepare(validation_data, outputs=outputs, what="validation_data")
    if isinstance(validation_data, tuple | list) and len(validation_data) in (2, 3):
        return prepare(*validation_data, outputs=outputs, what="validation_data x")
    raise DataError(
        "validation_data must be (x_val, y_val), (x_val, y_val, val_sample_weight), a Dataset "
        f"or a DataLoader; got {type(validation_data).__name__}"
        + (f" of {len(validation_data)}" if isinstance(validation_data, tuple | list) else "")
    )


def check_class_weight(class_weight) -> dict[int, float] | None:
    """Keras' ``class_weight``: a dict from class index to weight (validated).

    >>> check_class_weight({0: 1, 1: 2.5})
    {0: 1.0, 1: 2.5}
    """
    if class_weight is None:
        return None
    if not isinstance(class_weight, Mapping) or not class_weight:
        raise DataError(
            "class_weight must be a non-empty dict from class index to weight, e.g. "
            f"{{0: 1.0, 1: 5.0}}; got {class_weight!r}"
        )
    out: dict[int, float] = {}
    for k, v in class_weight.items():
        if isinstance(k, bool) or not isinstance(k, int | np.integer) or k < 0:
            raise DataError(f"class_weight keys must be class indices (ints >= 0), got {k!r}")
        if isinstance(v, bool) or not isinstance(v, int | float | np.number):
            raise DataError(f"class_weight[{k}] must be a number, got {v!r}")
        out[int(k)] = float(v)
    return out


def class_sample_weights(y: torch.Tensor, class_weight: dict[int, float]) -> torch.Tensor:
    """Per-sample weights from ``class_weight`` as Keras computes them: the class is the
    label (or the argmax of a one-hot row); a class missing from the dict weighs 1.

    >>> class_sample_weights(torch.tensor([0, 2, 1]), {1: 3.0, 2: 0.5})
    tensor([1.0000, 0.5000, 3.0000])
    """
    if not isinstance(y, torch.Tensor):
        raise DataError(
            f"class_weight needs one target tensor of class labels, got {type(y).__name__} "
            "(class_weight is only supported for models with a single output)"
        )
    labels = y.reshape(len(y), -1)
    labels = labels[:, 0] if labels.shape[1] == 1 else labels.argmax(dim=1)
    labels = labels.double().round().long() if labels.is_floating_point() else labels.long()
    table = torch.ones(max(class_weight) + 1)
    for k, v in class_weight.items():
        table[k] = v
    inside = (labels >= 0) & (labels < len(table))
    out = torch.ones(len(labels))
    out[inside] = table[labels[inside].cpu()]
    return out


class Batch:
    """One batch of an epoch: sample indices into random-access data (the inputs are read
    only when asked for, so the activation cache may serve them instead) or the
    ``(x, y, sample_weight)`` a loader gave. ``labels()`` applies ``class_weight``.

    >>> b = Batch(prepare(np.zeros((3, 2)), np.array([0, 1, 1])), idx=torch.tensor([1, 2]))
    >>> b.labels(), len(b)
    ((tensor([1, 1]), None), 2)
    """

    def __init__(self, data: Data, idx=None, item=None, class_weight=None) -> None:
        self.data, self.idx, self._item, self.class_weight = data, idx, item, class_weight

    def _load(self) -> tuple:
        if self._item is None:
            assert isinstance(self.data, IndexedData)
            self._item = self.data.sample(self.idx)
        return self._item

    @property
    def x(self):
        """The raw inputs (read from the data on first use)."""
        return self._load()[0]

    def labels(self) -> tuple:
        """``(y, sample_weight)``, ``class_weight`` turned into sample weights."""
        if self._item is None and isinstance(self.data, IndexedData):
            y, sw = self.data.labels(self.idx)
        else:
            y, sw = self._load()[1:]
        if self.class_weight is not None:
            if sw is not None:
                raise DataError(
                    "class_weight and sample_weight cannot both be given (as in Keras): "
                    "multiply the class weights into the sample weights instead"
                )
            sw = class_sample_weights(y, self.class_weight)
        return y, sw

    def __len__(self) -> int:
        return len(self.idx) if self.idx is not None else batch_len(self._load()[0])


def batch_len(x) -> int:
    """Samples in a batch of inputs (a tensor, or a dict/tuple of them).

    >>> batch_len({"ids": torch.zeros(5, 3)}), batch_len((torch.zeros(2), torch.zeros(2)))
    (5, 2)
    """
    if isinstance(x, dict):
        return batch_len(next(iter(x.values())))
    if isinstance(x, tuple | list) and x and not isinstance(x[0], int | float):
        return batch_len(x[0])
    return len(x)


class EpochIterator:
    """One iterator over every data kind (Keras' ``trainers/epoch_iterator.py``): the
    :class:`Batch` es of each epoch.

    Without ``steps_per_epoch`` an epoch is one pass over the data (reshuffled per epoch
    from ``seed``). With it, an epoch is that many batches and the next epoch goes on
    where the last one stopped; as in Keras, an epoch that reaches the end of the data
    stops there (with a warning when it had fewer batches than asked) and the next one
    starts a new pass. Random-access data is sharded by ``rank``/``world``; a loader
    calls ``on_pass(pass_number)`` before each pass (a distributed sampler's epoch).
    With ``workers`` > 0, a map-style ``Dataset``'s batches are read ahead by that many
    worker processes (a ``DataLoader`` over the epoch's index batches, its workers seeded
    from ``seed`` and the pass: the caller's generators draw nothing) while ``prefetch``
    is true; the trainer turns it off for epochs the activation cache serves, whose inputs
    are never read.

    >>> it = EpochIterator(prepare(np.zeros((4, 1)), np.zeros(4)), 1, steps_per_epoch=2)
    >>> [[b.idx.tolist() for b in it.epoch(e)] for e in range(3)]
    [[[0], [1]], [[2], [3]], [[0], [1]]]
    """

    def __init__(
        self,
        data: Data,
        batch_size: int,
        *,
        shuffle: bool = False,
        seed: int = 0,
        steps_per_epoch: int | None = None,
        class_weight: dict[int, float] | None = None,
        rank: int = 0,
        world: int = 1,
        on_pass=None,
        workers: int = 0,
    ) -> None:
        self.data, self.batch_size, self.shuffle, self.seed = data, batch_size, shuffle, seed
        self.workers, self.prefetch = workers, True
        self.steps_per_epoch, self.class_weight = steps_per_epoch, class_weight
        self.rank, self.world, self.on_pass = rank, world, on_pass
        self._passes: dict[int, list[torch.Tensor]] = {}
        self._live: Iterator | None = None  # a loader's iterator, kept across epochs
        self._seen = 0
        self._pass = 0

    @property
    def indexed(self) -> bool:
        """Whether batches come by sample index (the activation cache can serve them)."""
        return isinstance(self.data, IndexedData)

    def _batches(self, n: int) -> list[torch.Tensor]:
        """The index batches of pass ``n``."""
        assert isinstance(self.data, IndexedData)
        if n not in self._passes:
            self._passes = {
                n: self.data.index_batches(
                    self.batch_size,
                    shuffle=self.shuffle,
                    seed=self.seed,
                    epoch=n,
                    rank=self.rank,
                    world=self.world,
                )
            }
        return self._passes[n]

    @property
    def batches_per_pass(self) -> int | None:
        if self.indexed:
            return len(self._batches(0))
        loader = self.data.loader  # type: ignore[union-attr]
        return len(loader) if isinstance(loader, DataLoader) and _has_len(loader) else None

    @property
    def num_batches(self) -> int | None:
        """Batches per epoch (None: not known before the loader runs out)."""
        return self.steps_per_epoch or self.batches_per_pass

    def shard(self) -> torch.Tensor | None:
        """This rank's sample indices when sharded (None: all of them)."""
        return torch.cat(self._batches(0)).unique() if self.world > 1 else None

    def example(self, epoch: int = 0, n: int = 4):
        """The raw inputs of the first ``n`` samples of ``epoch`` (random-access data)."""
        pass_number, offset = self._start(epoch)
        return self.data.sample(self._batches(pass_number)[offset][:n])[0]  # type: ignore[union-attr]

    def reset(self) -> None:
        """Forget where a loader stopped: the next epoch starts a new pass (evaluation)."""
        self._live, self._seen, self._pass = None, 0, 0

    def _start(self, epoch: int) -> tuple[int, int]:
        """(pass, batch offset) at the start of ``epoch``: the same after a resume."""
        steps, per = self.steps_per_epoch, self.batches_per_pass
        if steps is None or per is None:
            return epoch, 0
        n, offset = 0, 0
        for _ in range(epoch):
            offset += min(steps, per - offset)
            if offset >= per:
                n, offset = n + 1, 0
        return n, offset

    def _ran_out(self, got: int) -> None:
        warnings.warn(
            f"the data ran out after {got} of steps_per_epoch={self.steps_per_epoch} batches: "
            "this epoch ends there and the next starts a new pass (as in Keras); make sure "
            "your data has at least steps_per_epoch * epochs batches",
            stacklevel=3,
        )

    def epoch(self, epoch: int) -> Iterator[Batch]:
        """The batches of ``epoch``."""
        cw = self.class_weight
        if self.indexed:
            n, offset = self._start(epoch)
            batches = self._batches(n)
            take = len(batches) - offset
            if self.steps_per_epoch is not None:
                if self.steps_per_epoch > take:
                    self._ran_out(take)
                take = min(take, self.steps_per_epoch)
            chosen = batches[offset : offset + take]
            items = self._read_ahead(chosen, n)
            for idx in chosen:
                item = next(items) if items is not None else None
                yield Batch(self.data, idx=idx, item=item, class_weight=cw)
            return
        loader = self.data
        assert isinstance(loader, LoaderData)
        steps, per = self.steps_per_epoch, self.batches_per_pass
        if steps is None or self._live is None:
            if self.on_pass is not None:
                self.on_pass(epoch if steps is None else self._pass)
            self._live, self._seen = loader.batches(), 0
        step = 0
        while steps is None or step < steps:
            if steps is not None and per is not None and self._seen >= per:
                self._ran_out(step)
                break
            try:
                item = next(self._live)
            except StopIteration:
                if steps is not None:
                    self._ran_out(step)
                self._seen = per or self._seen
                per = self._seen
                break
            self._seen += 1
            step += 1
            yield Batch(loader, item=item, class_weight=cw)
        if steps is None or (per is not None and self._seen >= per):
            self._live, self._pass = None, self._pass + 1

    def _read_ahead(self, batches: list[torch.Tensor], n: int) -> Iterator | None:
        """The items of ``batches`` read by worker processes (None: read on demand)."""
        data = self.data
        assert isinstance(data, IndexedData)
        if not self.workers or not self.prefetch or not batches:
            return None
        if isinstance(data.dataset, ArrayDataset | TensorDataset):
            return None  # in memory: indexing whole batches beats any worker
        loader = DataLoader(
            data.dataset,
            batch_sampler=[b.tolist() for b in batches],
            num_workers=self.workers,
            collate_fn=functools.partial(_collate, outputs=data.outputs),
            generator=torch.Generator().manual_seed(int(self.seed) * 1_000_003 + n),
        )
        return iter(loader)


def _collate(items: list, outputs: int | None = None) -> tuple:
    """What :meth:`IndexedData.sample` makes of these items (for worker processes)."""
    return split_sample(default_collate(items), outputs)


def _has_len(obj) -> bool:
    try:
        len(obj)
    except TypeError:
        return False
    return True


def length_of(y: Target) -> int:
    return _length(y)
