"""Loading user data for ``frostline fit``: an image folder or an ``.npz`` file.

An image folder holds one subfolder per class (the subfolder's name is the class
name, classes are sorted by name); every non-hidden file in a class folder is read
with Pillow (PNG, JPEG, BMP, GIF, WebP, TIFF, ...) and made upright RGB
(:func:`as_rgb`). A few unreadable files among many are skipped, each one listed
(:class:`Skipped`); a class with no readable image, a single class,
or a folder where most files are unreadable is an error.

An ``.npz`` file holds ``x`` and ``y``: ``x`` uint8 images (``N,H,W``, ``N,H,W,C``
or ``N,C,H,W`` with C = 1 or 3) are resized and normalised like folder images;
float ``x`` is used as given (already preprocessed). ``y`` holds one integer (or
string) label per sample.

Images are kept as uint8 (a folder's in a file on disk when ``store_dir`` is given,
read back with ``pread`` a batch at a time: :class:`ImageFile`, as ``frostline fit``,
``predict`` and ``evaluate`` do) and normalised on the fly by :class:`ImageArrayDataset`,
which declares itself deterministic and fingerprints its contents, so ``fit`` caches
the frozen prefix's outputs for it.

>>> import numpy as np
>>> ds = ImageArrayDataset(np.zeros((4, 8, 8, 3), np.uint8), np.array([0, 1, 0, 1]))
>>> x, y = ds[0]
>>> tuple(x.shape), int(y)
((3, 8, 8), 0)
"""

from __future__ import annotations

import contextlib
import hashlib
import math
import mmap
import os
import stat
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from frostline.app import outputs

__all__ = [
    "AUGMENTATIONS",
    "BACKGROUND",
    "DataSet",
    "ImageArrayDataset",
    "ImageFile",
    "InputError",
    "Skipped",
    "as_rgb",
    "augmentation",
    "decode_image",
    "fit_square",
    "image_files",
    "load_data",
    "load_image_folder",
    "load_npz",
    "read_images",
    "resize_images",
    "scratch_dir",
    "skipped_lines",
    "stratified_split",
    "unreadable_errors",
]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# More than this fraction of unreadable files is an error, not a warning.
MAX_UNREADABLE_FRACTION = 0.25

#: how many bytes of images :meth:`ImageArrayDataset.fingerprint` reads at a time
FINGERPRINT_CHUNK_BYTES = 1 << 18

#: the file :func:`read_images` writes a store's decoded images into
STORE_FILE = "images.u8"


class InputError(ValueError):
    """User input (data, model name, flags) that cannot be used; the message is one line."""


class ImageFile:
    """uint8 images (``N x H x W x 3``) in a file, read with ``pread``, never mapped.

    Indexing reads only the rows asked for (an int: one image; a slice, list or integer
    array: those rows, in that order) into a new array: a process reading every image
    of a large store holds one batch of them, and the file's pages stay out of its
    resident memory (a memory map would count every page it touched). ``np.asarray``
    reads the whole file. Pickled (for worker processes), it travels as its file name.

    >>> import tempfile
    >>> path = Path(tempfile.mkdtemp()) / "images.u8"
    >>> _ = path.write_bytes(bytes(range(24)))
    >>> images = ImageFile(path, (2, 2, 2, 3))
    >>> len(images), images[1].shape, images[[1, 0]][:, 0, 0, 0].tolist()
    (2, (2, 2, 3), [12, 0])
    """

    dtype = np.dtype(np.uint8)
    ndim = 4

    def __init__(self, filename: str | os.PathLike, shape: tuple[int, int, int, int]) -> None:
        shape = tuple(int(d) for d in shape)  # type: ignore[assignment]
        if len(shape) != 4 or shape[3] != 3 or min(shape) < 0:
            raise InputError(f"ImageFile takes a shape (N, H, W, 3), got {shape}")
        self.filename = str(filename)
        self.shape = shape
        size = os.stat(self.filename).st_size
        if size != math.prod(shape):
            raise InputError(
                f"{self.filename!r} holds {size} bytes; expected {math.prod(shape)} for "
                f"images of shape {shape}"
            )
        self._fd: int | None = None
        self._pid = 0

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape)

    def __len__(self) -> int:
        return self.shape[0]

    def _descriptor(self) -> int:
        if self._fd is None or self._pid != os.getpid():  # a forked worker opens its own
            self._fd, self._pid = os.open(self.filename, os.O_RDONLY), os.getpid()
        return self._fd

    def __getitem__(self, key) -> np.ndarray:
        if isinstance(key, (int, np.integer)):
            row = int(key) + (len(self) if key < 0 else 0)
            return self._read(np.array([row]))[0]
        if isinstance(key, slice):
            return self._read(np.arange(len(self))[key])
        rows = np.asarray(key)
        if rows.size == 0 and rows.ndim == 1:
            rows = rows.astype(np.int64)
        if rows.dtype == np.bool_ or rows.ndim != 1 or rows.dtype.kind not in "iu":
            raise IndexError(f"ImageFile takes an int, a slice or 1-d row numbers, got {key!r}")
        return self._read(np.where(rows < 0, rows + len(self), rows))

    def _read(self, rows: np.ndarray) -> np.ndarray:
        if len(rows) and (rows.min() < 0 or rows.max() >= len(self)):
            raise IndexError(f"rows {rows.min()}..{rows.max()} out of range for {len(self)} images")
        out = np.empty((len(rows), *self.shape[1:]), np.uint8)
        per = math.prod(self.shape[1:])
        fd = self._descriptor()
        start = 0
        while start < len(rows):  # one read per run of consecutive rows
            stop = start + 1
            while stop < len(rows) and rows[stop] == rows[stop - 1] + 1:
                stop += 1
            view = memoryview(out[start:stop].reshape(-1).data)
            offset, done = int(rows[start]) * per, 0
            while done < len(view):
                got = os.preadv(fd, [view[done:]], offset + done)
                if got <= 0:
                    raise OSError(f"{self.filename!r} ended before row {int(rows[start])}")
                done += got
            start = stop
        return out

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        whole = self[:]
        return whole if dtype is None else whole.astype(dtype)

    def __getstate__(self) -> dict:
        return {"filename": self.filename, "shape": self.shape}

    def __setstate__(self, state: dict) -> None:
        self.filename, self.shape = state["filename"], tuple(state["shape"])
        self._fd, self._pid = None, 0

    def close(self) -> None:
        """Close the file (a later read opens it again)."""
        if self._fd is not None and self._pid == os.getpid():
            os.close(self._fd)
        self._fd = None

    def __del__(self) -> None:
        with contextlib.suppress(Exception):
            self.close()


@dataclass
class DataSet:
    """Images (uint8 NHWC, in memory or an :class:`ImageFile`) or ready-made float inputs,
    with integer labels."""

    x: np.ndarray | ImageFile
    y: np.ndarray
    class_names: list[str]
    source: str
    is_images: bool
    skipped: list[Skipped] = field(default_factory=list)  # unreadable files, not in x
    paths: list[str] = field(default_factory=list)  # one per sample, for image folders
    files: int = 0  # files looked at (read or skipped), for image folders

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def __len__(self) -> int:
        return len(self.y)

    def counts(self) -> dict[str, int]:
        return {name: int((self.y == i).sum()) for i, name in enumerate(self.class_names)}

    def subset(self, idx: np.ndarray) -> DataSet:
        return DataSet(self.x[idx], self.y[idx], self.class_names, self.source, self.is_images)


AUGMENTATIONS = ("flip", "rotate")


def augmentation(kinds: Sequence[str]) -> torch.nn.Module | None:
    """Keras's random augmentation layers for ``kinds`` (``flip``: RandomFlip("horizontal"),
    ``rotate``: RandomRotation(0.1)), in that order; None for none.

    >>> augmentation(["rotate", "flip"])
    Sequential(
      (0): RandomFlip('horizontal')
      (1): RandomRotation(factor=(-0.1, 0.1), fill_mode='reflect')
    )
    """
    from frostline.api.augment import RandomFlip, RandomRotation

    unknown = sorted(set(kinds) - set(AUGMENTATIONS))
    if unknown:
        raise InputError(
            f"unknown augmentation {', '.join(map(repr, unknown))}; choose from {', '.join(AUGMENTATIONS)}"
        )
    layers: list[torch.nn.Module] = []
    if "flip" in kinds:
        layers.append(RandomFlip("horizontal"))
    if "rotate" in kinds:
        layers.append(RandomRotation(0.1))
    return torch.nn.Sequential(*layers) if layers else None


class ImageArrayDataset(Dataset):
    """uint8 NHWC images normalised on the fly to float NCHW: ``(x - mean) / std``.

    ``images`` is used as given, never copied whole: an in-memory array, an ``np.memmap``
    or an :class:`ImageFile` (what :func:`read_images` writes), read one image per sample
    or one batch of rows per :meth:`__getitems__`. ``indices`` selects
    the samples (a training or validation split of one store: ``labels`` then holds
    every row's label, as ``images`` does). Without ``augment``, deterministic and
    fingerprinted (in chunks of :data:`FINGERPRINT_CHUNK_BYTES`), so ``fit`` caches what
    the frozen part of a model computes from it. ``augment`` (a module taking a batch of
    normalised images, e.g. :func:`augmentation`) runs on each sample as it is read: the
    dataset then declares itself not deterministic, nothing it yields is cached, and the
    frozen part runs on every batch (without autograd, folded). Pickled (for worker
    processes), an :class:`ImageFile` or a memmap travels as its file name, not its contents.

    >>> images = np.arange(4 * 2 * 2 * 3, dtype=np.uint8).reshape(4, 2, 2, 3)
    >>> ds = ImageArrayDataset(images, np.array([0, 1, 0, 1]), indices=np.array([3, 1]))
    >>> len(ds), ds.labels_at(torch.tensor([0, 1])).tolist()
    (2, [1, 1])
    """

    deterministic = True

    def __init__(
        self,
        images: np.ndarray | ImageFile,
        labels: np.ndarray,
        mean: Sequence[float] = (0.5, 0.5, 0.5),
        std: Sequence[float] = (0.5, 0.5, 0.5),
        augment: torch.nn.Module | None = None,
        indices: np.ndarray | None = None,
    ) -> None:
        if not isinstance(images, ImageFile) and (
            not isinstance(images, np.ndarray)
            or images.dtype != np.uint8
            or images.ndim != 4
            or images.shape[3] != 3
        ):
            got = (
                f"{images.dtype} {images.shape}"
                if isinstance(images, np.ndarray)
                else type(images).__name__
            )
            raise InputError(f"ImageArrayDataset takes uint8 NxHxWx3 images, got {got}")
        if len(labels) != len(images):
            raise InputError(
                f"ImageArrayDataset got {len(images)} images and {len(labels)} labels; expected one label per image"
            )
        rows = None
        if indices is not None:
            rows = np.asarray(indices, dtype=np.int64).reshape(-1)
            if len(rows) and (rows.min() < 0 or rows.max() >= len(images)):
                raise InputError(
                    f"ImageArrayDataset indices range over [{rows.min()}, {rows.max()}]; "
                    f"expected row numbers in [0, {len(images) - 1}]"
                )
        self.images = images
        self.rows = rows
        picked = np.asarray(labels, dtype=np.int64)
        self.labels = torch.from_numpy(picked[rows] if rows is not None else picked.copy())
        self.mean = torch.tensor(mean, dtype=torch.float32).view(3, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(3, 1, 1)
        self._fp: str | None = None
        self.augment = augment
        if augment is not None:
            self.deterministic = False  # a fresh draw at every read

    def __len__(self) -> int:
        return len(self.labels)

    def _row(self, i: int) -> int:
        return int(self.rows[i]) if self.rows is not None else int(i)

    def __getitem__(self, i):
        pixels = self.images[self._row(i)]
        if not isinstance(self.images, ImageFile):
            pixels = np.array(pixels)  # one image, copied (a file read is a copy already)
        x = self._normalised(pixels[None])[0]
        if self.augment is not None:
            with torch.no_grad():
                x = self.augment.train()(x[None])[0]
        return x, self.labels[i]

    def _normalised(self, pixels: np.ndarray) -> torch.Tensor:
        """uint8 ``N x H x W x 3`` pixels as float ``N x 3 x H x W``: ``(x / 255 - mean) / std``."""
        x = torch.from_numpy(pixels).permute(0, 3, 1, 2).float().div_(255.0)
        return (x - self.mean) / self.std

    def __getitems__(self, indices: Sequence[int]) -> list:
        """The samples ``indices``, read as one batch (what ``DataLoader`` and ``fit`` call):
        one read of their rows and one normalisation, equal to ``[self[i] for i in indices]``.

        >>> images = np.arange(2 * 2 * 2 * 3, dtype=np.uint8).reshape(2, 2, 2, 3)
        >>> ds = ImageArrayDataset(images, np.array([0, 1]))
        >>> [bool((a[0] == b[0]).all()) for a, b in zip(ds.__getitems__([1, 0]), [ds[1], ds[0]])]
        [True, True]
        """
        if self.augment is not None:  # one draw per sample, as a read of each gives
            return [self[int(i)] for i in indices]
        idx = np.asarray(indices, dtype=np.int64).reshape(-1)
        rows = self.rows[idx] if self.rows is not None else idx
        pixels = self.images[rows]  # fancy indexing and file reads copy: the batch's rows only
        x = self._normalised(pixels)
        labels = self.labels[torch.from_numpy(idx)]
        return list(zip(x.unbind(0), labels.unbind(0)))

    def labels_at(self, indices: torch.Tensor) -> torch.Tensor:
        """The labels of these samples, no image touched (``fit`` reads them this way)."""
        return self.labels[indices]

    def fingerprint(self) -> str:
        """A content hash of the samples' pixels, labels and normalisation, read in bounded chunks."""
        if self._fp is None:
            h = hashlib.blake2b(digest_size=16)
            shape = (len(self), *self.images.shape[1:])
            h.update(str((shape, self.mean.tolist(), self.std.tolist())).encode())
            per = max(1, FINGERPRINT_CHUNK_BYTES // max(1, math.prod(self.images.shape[1:])))
            for start in range(0, len(self), per):
                part = slice(start, start + per)
                chunk = self.images[part] if self.rows is None else self.images[self.rows[part]]
                h.update(np.ascontiguousarray(chunk).data)
                del chunk  # one chunk in memory at a time
            h.update(self.labels.numpy().tobytes())
            self._fp = h.hexdigest()
        return self._fp

    def arrays(self) -> tuple[torch.Tensor, torch.Tensor]:
        """All samples at once: normalised float NCHW inputs and int64 labels (in memory)."""
        picked = self.images if self.rows is None else self.images[self.rows]
        return self._normalised(np.array(picked)), self.labels

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        images = self.images
        if isinstance(images, np.memmap) and isinstance(images.base, mmap.mmap) and images.filename:
            state["images"] = ("memmap", images.filename, images.shape, int(images.offset))
        return state

    def __setstate__(self, state: dict) -> None:
        images = state["images"]
        if isinstance(images, tuple):
            _, filename, shape, offset = images
            state["images"] = np.memmap(filename, np.uint8, mode="r", shape=shape, offset=offset)
        self.__dict__.update(state)


def _pil():
    from frostline.app.extras import require

    return require("PIL.Image", "reading images")


#: what a transparent pixel is composited onto (a page's white, as an image viewer shows it)
BACKGROUND = (255, 255, 255)


def as_rgb(img):
    """A PIL image as 8-bit RGB, the way a photo viewer shows it.

    The EXIF orientation is applied (phone photos stand upright); 16- and 32-bit integer
    grey (modes ``I;16*``, ``I``) is scaled from 0..65535 to 0..255 (Pillow alone clips it
    to white); float grey (``F``) is read as 0..1 when it stays within it, else as 0..255;
    transparency (RGBA, LA, PA, a palette or grey image with a transparent colour) is
    composited onto white (:data:`BACKGROUND`); CMYK, palette, 1-bit and YCbCr images go
    through Pillow's conversion.

    >>> from PIL import Image
    >>> grey16 = Image.fromarray(np.full((2, 2), 65535, np.uint16))
    >>> np.asarray(as_rgb(grey16))[0, 0].tolist()
    [255, 255, 255]
    >>> np.asarray(as_rgb(Image.fromarray(np.full((2, 2), 32896, np.uint16))))[0, 0].tolist()
    [128, 128, 128]
    >>> clear = Image.new("RGBA", (2, 2), (0, 0, 0, 0))
    >>> np.asarray(as_rgb(clear))[0, 0].tolist()
    [255, 255, 255]
    """
    Image = _pil()
    from PIL import ImageOps

    # an unreadable orientation tag: the pixels as stored
    with contextlib.suppress(OSError, ValueError, SyntaxError, TypeError, KeyError, IndexError):
        img = ImageOps.exif_transpose(img)
    mode = img.mode
    if mode == "I" or mode.startswith("I;16"):
        grey = np.asarray(img, dtype=np.float64) / 257.0
        img = Image.fromarray(np.clip(np.rint(grey), 0, 255).astype(np.uint8), "L")
    elif mode == "F":
        grey = np.nan_to_num(np.asarray(img, dtype=np.float64), nan=0.0, posinf=255, neginf=0)
        if grey.size and grey.min() >= 0 and grey.max() <= 1:
            grey = grey * 255.0
        img = Image.fromarray(np.clip(np.rint(grey), 0, 255).astype(np.uint8), "L")
    if img.mode in ("RGBA", "LA", "La", "RGBa", "PA") or "transparency" in img.info:
        rgba = img.convert("RGBA")
        page = Image.new("RGBA", rgba.size, (*BACKGROUND, 255))
        return Image.alpha_composite(page, rgba).convert("RGB")
    return img.convert("RGB")


def fit_square(img, size: int):
    """Centre-crop a PIL image to a square and resize it to ``size`` (bicubic), as RGB.

    The one resizing of the app: ``fit``, ``demo``, ``predict`` and ``evaluate`` all use it
    (after :func:`as_rgb`, which :func:`decode_image` applies to files).
    """
    Image = _pil()
    from PIL import ImageOps

    img = img.convert("RGB")
    return ImageOps.fit(img, (size, size), method=Image.Resampling.BICUBIC)


def decode_image(path: str | os.PathLike, size: int) -> np.ndarray:
    """One image file as a ``size`` x ``size`` RGB uint8 array: :func:`as_rgb`, then :func:`fit_square`.

    Raises what Pillow raises for a file it cannot read (:func:`unreadable_errors`); a
    FIFO, socket or device is refused before it is opened (reading one could wait forever).
    """
    Image = _pil()
    if not stat.S_ISREG(os.stat(path).st_mode):
        raise OSError("not a regular file (a FIFO, socket or device)")
    with Image.open(path) as img:
        img.load()
        return np.asarray(fit_square(as_rgb(img), size), dtype=np.uint8)


def _is_hidden(name: str) -> bool:
    return name.startswith(".") or name.startswith("__")


def image_files(root: Path) -> list[Path]:
    """Every non-hidden entry below ``root`` that is not a folder (hidden folders skipped), sorted.

    FIFOs, devices and dangling links are included, so that reading them reports each
    one as skipped instead of leaving it out unseen.
    """
    return sorted(
        p
        for p in root.rglob("*")
        if not p.is_dir() and not any(_is_hidden(q) for q in p.relative_to(root).parts)
    )


@dataclass(frozen=True)
class Skipped:
    """A file that could not be read as an image: its path (as shown) and Pillow's reason."""

    path: str
    reason: str


def unreadable_errors() -> tuple[type[BaseException], ...]:
    """What Pillow raises for a file that is not a readable image."""
    Image = _pil()
    return (
        Image.UnidentifiedImageError,
        OSError,
        ValueError,
        SyntaxError,
        Image.DecompressionBombError,
    )


def skipped_lines(skipped: Sequence[Skipped], total: int, where: str) -> list[str]:
    """The log's lines for skipped files: a count, then every file with its reason.

    >>> skipped_lines([Skipped("a/x.png", "cannot identify image file")], 9, "skipped.csv")
    ['skipped 1 unreadable file(s) of 9 (listed below and in skipped.csv)', "skipped 'a/x.png': cannot identify image file"]
    """
    if not skipped:
        return []
    return [
        f"skipped {len(skipped)} unreadable file(s) of {total} (listed below and in {where})"
    ] + [f"skipped {s.path!r}: {s.reason}" for s in skipped]


class _Sink:
    """Where :func:`read_images` puts decoded images: appended to :data:`STORE_FILE` in
    ``store_dir`` (written as they come, never all in memory), or an array in memory."""

    def __init__(self, n: int, image_size: int, store_dir: str | os.PathLike | None) -> None:
        self.shape = (image_size, image_size, 3)
        self.count = 0
        self.path = Path(store_dir) / STORE_FILE if store_dir is not None else None
        self.file = open(self.path, "wb") if self.path is not None else None  # noqa: SIM115
        self.array = np.zeros((n, *self.shape), np.uint8) if self.path is None else None

    def append(self, image: np.ndarray) -> None:
        if self.file is not None:
            self.file.write(np.ascontiguousarray(image, np.uint8).data)
        else:
            assert self.array is not None
            self.array[self.count] = image
        self.count += 1

    def close(self) -> np.ndarray | ImageFile:
        """The images appended: an :class:`ImageFile` (an empty array when none) or the array."""
        if self.file is None:
            assert self.array is not None
            return self.array[: self.count]
        self.file.close()
        assert self.path is not None
        if self.count == 0:
            return np.zeros((0, *self.shape), np.uint8)
        return ImageFile(self.path, (self.count, *self.shape))  # type: ignore[arg-type]


@contextlib.contextmanager
def scratch_dir(near: str | os.PathLike):
    """A temporary folder for :func:`read_images`' store, removed when the block ends.

    It is made in the nearest existing folder above ``near`` (the disk the run is written
    to; the system's temporary folder where that cannot be written), named
    ``.frostline-images-*``, with an owner file, so a later run sweeps it when this
    process was killed before it could remove it (:func:`frostline.app.outputs.sweep`).

    >>> import tempfile
    >>> root = Path(tempfile.mkdtemp())
    >>> with scratch_dir(root / "runs" / "fit-1") as d:
    ...     d.parent == root, d.name.startswith(".frostline-images-")
    (True, True)
    >>> d.exists()
    False
    """
    here = Path(near).absolute().parent
    while not here.is_dir() and here != here.parent:
        here = here.parent
    try:
        folder = tempfile.TemporaryDirectory(prefix=".frostline-images-", dir=here)
    except OSError:
        folder = tempfile.TemporaryDirectory(prefix="frostline-images-")
    with folder as path:
        outputs.claim(path)
        yield Path(path)


def read_images(
    files: Sequence[Path],
    image_size: int,
    root: Path | None = None,
    *,
    max_unreadable: float = MAX_UNREADABLE_FRACTION,
    store_dir: str | os.PathLike | None = None,
) -> tuple[np.ndarray | ImageFile, list[Path], list[Skipped]]:
    """Read ``files`` as ``image_size`` square RGB uint8 images: ``(images, files read, skipped)``.

    Each image is written as it is decoded: appended to the file :data:`STORE_FILE` in
    ``store_dir`` when given (never all decoded images in memory at once; the images
    come back as an :class:`ImageFile` over it), else into an array in memory. Unreadable
    files are skipped and returned with their reason (paths relative to ``root`` when
    given); more than ``max_unreadable`` of them, or all, is an :class:`InputError`.
    """
    errors = unreadable_errors()
    store = _Sink(len(files), image_size, store_dir)
    kept: list[Path] = []
    skipped: list[Skipped] = []
    try:
        for p in files:
            try:
                arr = decode_image(p, image_size)
            except errors as e:
                text = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
                why = text.splitlines()[0] if text else type(e).__name__
                shown = p.relative_to(root) if root is not None else p
                skipped.append(Skipped(str(shown), why))
                continue
            store.append(arr)
            kept.append(p)
    finally:
        images = store.close()
    if skipped and (len(skipped) > max_unreadable * len(files) or not kept):
        first = skipped[0]
        where = f"in {str(root)!r} " if root is not None else ""
        raise InputError(
            f"{len(skipped)} of {len(files)} files {where}could not be read as images "
            f"(first: {first.path!r}: {first.reason}); expected PNG/JPEG (or another format Pillow reads)"
        )
    return images, kept, skipped


def load_image_folder(
    path: str | os.PathLike,
    image_size: int,
    *,
    min_classes: int = 2,
    store_dir: str | os.PathLike | None = None,
) -> DataSet:
    """Read ``path/<class>/<image>`` into a :class:`DataSet` of ``image_size`` square RGB images
    (decoded into a disk-backed store in ``store_dir`` when given, see :func:`read_images`).

    Raises :class:`InputError` (one line: what was found, what is needed) for a missing
    folder, no class subfolders, fewer than ``min_classes`` classes, a class without
    readable images, or too many unreadable files. A few unreadable files are skipped
    and listed in ``skipped``.
    """
    root = Path(path)
    need = "a folder with one subfolder of images per class (DATA/cat/1.png, DATA/dog/2.jpg, ...)"
    if not root.exists():
        raise InputError(
            f"data folder {str(root)!r} does not exist; expected {need} or an .npz file with arrays x and y"
        )
    if not root.is_dir():
        raise InputError(
            f"{str(root)!r} is a file, not a folder; expected {need} or an .npz file with arrays x and y"
        )
    classes = sorted(p for p in root.iterdir() if p.is_dir() and not _is_hidden(p.name))
    if not classes:
        loose = [p.name for p in root.iterdir() if p.is_file() and not _is_hidden(p.name)]
        found = f"{len(loose)} loose file(s) and no subfolders" if loose else "nothing"
        raise InputError(
            f"data folder {str(root)!r} has no class subfolders (found {found}); expected {need}"
        )
    if len(classes) < min_classes:
        raise InputError(
            f"data folder {str(root)!r} has a single class subfolder ({classes[0].name!r}); "
            "classification needs at least 2 classes, one subfolder each"
        )
    files: list[tuple[int, Path]] = []
    for label, cdir in enumerate(classes):
        entries = image_files(cdir)
        if not entries:
            raise InputError(
                f"class folder {str(cdir)!r} is empty (0 files); every class needs at least one image "
                "(remove the folder or add images)"
            )
        files += [(label, p) for p in entries]

    label_of = {p: label for label, p in files}
    x, kept, skipped = read_images([p for _, p in files], image_size, root, store_dir=store_dir)
    y = np.asarray([label_of[p] for p in kept], dtype=np.int64)
    for label, cdir in enumerate(classes):
        if not (y == label).any():
            raise InputError(
                f"class folder {str(cdir)!r} has no readable image "
                f"({sum(1 for lb, _ in files if lb == label)} file(s), none could be read as an image); "
                "every class needs at least one PNG/JPEG image"
            )
    names = [c.name for c in classes]
    return DataSet(x, y, names, str(root), True, skipped, [str(p) for p in kept], len(files))


def resize_images(x: np.ndarray, size: int) -> np.ndarray:
    """uint8 NHWC RGB images, each through :func:`fit_square` to ``size`` (as they are when already that size)."""
    Image = _pil()
    if x.shape[1] == size and x.shape[2] == size:
        return x
    return np.stack([np.asarray(fit_square(Image.fromarray(a), size)) for a in x])


def available_memory() -> int | None:
    """Bytes of memory available now (Linux ``MemAvailable``), or None where it cannot be read."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def _check_declared_size(npz, key: str, path: Path) -> None:
    """Refuse an array whose header declares more bytes than the memory available, before
    reading it (a compressed ``.npz`` of zeros can declare terabytes in a few kilobytes)."""
    name = f"{key}.npy"
    if name not in npz.zip.namelist():
        return
    with npz.zip.open(name) as f:
        version = np.lib.format.read_magic(f)
        if version == (1, 0):
            shape, _, dtype = np.lib.format.read_array_header_1_0(f)
        elif version == (2, 0):
            shape, _, dtype = np.lib.format.read_array_header_2_0(f)
        else:  # a newer header: numpy checks it when it reads the array
            return
    size = math.prod(shape) * dtype.itemsize
    free = available_memory()
    if free is not None and size > free:
        raise InputError(
            f"{key} in {str(path)!r} declares shape {tuple(shape)} of {dtype} ({size / 1e9:.1f} GB), "
            f"more than the {free / 1e9:.1f} GB of memory available; expected an array that fits in memory"
        )


def load_npz(
    path: str | os.PathLike, image_size: int, *, need_labels: bool = True, min_classes: int = 2
) -> DataSet:
    """Read ``x`` and ``y`` from an ``.npz`` file (see the module docstring for the layouts).

    ``need_labels=False`` reads ``x`` alone (``y`` is then all zeros, with no class names).
    """
    p = Path(path)
    if not p.exists():
        raise InputError(
            f"data file {str(p)!r} does not exist; expected an .npz file with arrays x and y"
        )
    try:
        with np.load(p, allow_pickle=False) as npz:
            keys = list(npz.keys())
            if "x" not in keys or (need_labels and "y" not in keys):
                raise InputError(
                    f"{str(p)!r} holds arrays {keys}; expected arrays named 'x' (inputs)"
                    + (" and 'y' (labels)" if need_labels else "")
                )
            for key in ("x", "y") if need_labels else ("x",):
                _check_declared_size(npz, key, p)
            x = npz["x"]
            y = npz["y"] if need_labels else np.zeros(len(x), np.int64)
    except InputError:
        raise
    except (OSError, ValueError, EOFError, MemoryError) as e:  # MemoryError: a header's huge shape
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise InputError(
            f"{str(p)!r} could not be read as an .npz file ({msg}); expected np.savez(path, x=..., y=...)"
        ) from None
    if y.ndim != 1:
        raise InputError(
            f"y in {str(p)!r} has shape {y.shape}; expected one label per sample, shape (N,)"
        )
    if len(x) != len(y):
        raise InputError(
            f"x in {str(p)!r} has {len(x)} samples but y has {len(y)}; they must match"
        )
    if len(y) == 0:
        raise InputError(f"{str(p)!r} holds 0 samples; expected at least one per class")
    if y.dtype.kind == "f":
        if not np.all(np.isfinite(y)) or not np.all(y == np.round(y)):
            raise InputError(
                f"y in {str(p)!r} holds non-integer floats; expected integer class labels"
            )
        y = y.astype(np.int64)
    if y.dtype.kind not in "iuUSb":
        raise InputError(
            f"y in {str(p)!r} has dtype {y.dtype}; expected integer or string class labels"
        )
    values, labels = np.unique(y, return_inverse=True)
    names = [v.decode() if isinstance(v, bytes) else str(v) for v in values.tolist()]
    if not need_labels:
        names = []
    elif len(values) < min_classes:
        raise InputError(
            f"y in {str(p)!r} holds a single class ({names[0]!r}); classification needs at least 2 classes"
        )
    labels = labels.astype(np.int64).reshape(-1)

    if x.dtype == np.uint8:
        if x.ndim == 3:
            x = x[..., None]
        if x.ndim != 4:
            raise InputError(
                f"x in {str(p)!r} is uint8 with shape {x.shape}; uint8 images must be NxHxW, NxHxWxC or NxCxHxW"
            )
        if x.shape[3] not in (1, 3) and x.shape[1] in (1, 3):
            x = x.transpose(0, 2, 3, 1)
        if x.shape[3] not in (1, 3):
            raise InputError(
                f"x in {str(p)!r} is uint8 with shape {x.shape}; images need 1 or 3 channels"
            )
        if x.shape[3] == 1:
            x = np.repeat(x, 3, axis=3)
        x = resize_images(np.ascontiguousarray(x), image_size)
        return DataSet(x, labels, names, str(p), True)
    if x.dtype.kind != "f":
        raise InputError(
            f"x in {str(p)!r} has dtype {x.dtype}; expected uint8 images or float32 inputs"
        )
    x = x.astype(np.float32, copy=False)
    if not np.all(np.isfinite(x)):
        raise InputError(f"x in {str(p)!r} contains NaN or inf values; expected finite inputs")
    return DataSet(x, labels, names, str(p), False)


def load_data(
    path: str | os.PathLike, image_size: int, *, store_dir: str | os.PathLike | None = None
) -> DataSet:
    """An image folder (decoded into a disk-backed store in ``store_dir`` when given) or an
    ``.npz`` file (in memory), by what ``path`` is."""
    p = Path(path)
    if p.suffix.lower() == ".npz" or (
        p.is_file() and p.suffix.lower() != ".npz" and _looks_like_npz(p)
    ):
        return load_npz(p, image_size)
    return load_image_folder(p, image_size, store_dir=store_dir)


def _looks_like_npz(p: Path) -> bool:
    try:
        with open(p, "rb") as f:
            return f.read(4) == b"PK\x03\x04"
    except OSError:
        return False


def stratified_split(y: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices (train, validation) with about ``fraction`` of every class in validation.

    Every class keeps at least one training sample; a class with one sample has none
    in validation.

    >>> tr, va = stratified_split(np.array([0, 0, 0, 0, 1, 1, 1, 1]), 0.25, seed=0)
    >>> len(tr), len(va), sorted(np.array([0, 0, 0, 0, 1, 1, 1, 1])[va].tolist())
    (6, 2, [0, 1])
    """
    if not 0 <= fraction < 1:
        raise InputError(f"validation split must be in [0, 1), got {fraction}")
    rng = np.random.default_rng(seed)
    train, val = [], []
    for c in np.unique(y):
        idx = np.flatnonzero(y == c)
        rng.shuffle(idx)
        n_val = int(round(len(idx) * fraction)) if fraction else 0
        n_val = min(n_val, len(idx) - 1)
        if fraction and n_val == 0 and len(idx) >= 2:
            n_val = 1
        val += idx[:n_val].tolist()
        train += idx[n_val:].tolist()
    return np.sort(np.asarray(train, dtype=np.int64)), np.sort(np.asarray(val, dtype=np.int64))
