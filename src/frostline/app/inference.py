"""A trained run directory put to use: its model rebuilt, new inputs prepared as ``fit`` prepared them.

Shared by ``frostline predict`` and ``frostline evaluate``. The preprocessing comes
from the run's ``preprocessing.json`` (:class:`~frostline.app.runinfo.Preprocessing`),
never from guesses about the model.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from frostline.app import imagefolder
from frostline.app.imagefolder import InputError
from frostline.app.models import cwd_importable
from frostline.app.runinfo import Preprocessing, RunInfoError

__all__ = ["Inputs", "ModelOutputError", "Run", "load_run", "read_inputs", "read_labelled"]


class ModelOutputError(RunInfoError):
    """A run's model gives outputs that cannot be scores (NaN or inf); one line, exit code 2."""


@dataclass
class Run:
    """A run directory's model and the preprocessing it was trained with."""

    path: Path
    info: Preprocessing
    model: Any  # frostline.Model

    def probabilities(self, x: Any, batch_size: int, names: Sequence[str]) -> np.ndarray:
        """Softmax of the model's outputs, one row per sample, one column per class.

        A sample whose outputs hold NaN or inf is a :class:`ModelOutputError` that names
        it (``names``: one per sample), never a row of ``nan`` or a class-0 guess.
        """
        import torch

        if self.info.input == "images":
            assert self.info.mean is not None and self.info.std is not None  # checked on read
            data = imagefolder.ImageArrayDataset(
                x, np.zeros(len(x), np.int64), self.info.mean, self.info.std
            )
            out = self.model.predict(data, batch_size=batch_size)
        else:
            out = self.model.predict(x, batch_size=batch_size)
        if (
            not isinstance(out, np.ndarray)
            or out.ndim != 2
            or out.shape[1] != self.info.num_classes
        ):
            shape = getattr(out, "shape", type(out).__name__)
            raise RunInfoError(
                f"the model in {str(self.path)!r} gives outputs of shape {shape}; its run records "
                f"{self.info.num_classes} classes, so one score per class was expected"
            )
        bad = np.flatnonzero(~np.isfinite(out).all(axis=1))
        if len(bad):
            first = names[bad[0]] if bad[0] < len(names) else f"sample {bad[0]}"
            more = (
                f" and {len(bad) - 1} more of {len(out)}" if len(bad) > 1 else f" (of {len(out)})"
            )
            raise ModelOutputError(
                f"the model in {str(self.path)!r} gives NaN or inf outputs for {first!r}{more}; "
                "expected finite scores (the weights or the input may be broken)"
            )
        return torch.softmax(torch.from_numpy(out).double(), dim=1).numpy()


def load_run(run_dir: str | os.PathLike, trust: Sequence[str] = ()) -> Run:
    """Read ``preprocessing.json`` and rebuild ``model.safetensors`` (with ``fl.load``)."""
    import frostline as fl
    from frostline.api.allowlist import check_trusted
    from frostline.io.errors import CheckpointError

    try:
        trust = check_trusted(trust)
    except ValueError as e:
        raise RunInfoError(f"--trust: {e}") from None
    path = Path(run_dir)
    info = Preprocessing.read(path)
    needed = info.trusted_modules()
    missing = [m for m in needed if m not in trust]
    if missing:
        raise RunInfoError(
            f"the model in {str(path)!r} is built by {info.model['spec']!r}; frostline imports code named "
            f"by a file only when you trust it: add --trust {missing[0]}"
        )
    weights = info.model_file(path)  # a regular file inside the run directory
    try:
        with cwd_importable():
            model = fl.load(weights, trusted_modules=tuple(trust))
    except CheckpointError as e:
        raise RunInfoError(f"cannot rebuild the model of {str(path)!r}: {e}") from None
    return Run(path, info, model)


@dataclass
class Inputs:
    """Samples ready for :meth:`Run.probabilities`, with their names (and labels, when known)."""

    x: np.ndarray | imagefolder.ImageFile
    names: list[str]
    source: str
    y: np.ndarray | None = None
    skipped: list[imagefolder.Skipped] = field(default_factory=list)
    files: int = 0  # files looked at (read or skipped)

    def __len__(self) -> int:
        return len(self.names)


def _npz_x(
    path: Path, info: Preprocessing, with_y: bool
) -> tuple[np.ndarray | imagefolder.ImageFile, Any]:
    if info.input == "images":
        ds = imagefolder.load_npz(path, info.image_size or 0, need_labels=with_y)
        if not ds.is_images:
            raise InputError(
                f"x in {str(path)!r} holds floats, but the run was trained on images; expected uint8 images"
            )
    else:
        ds = imagefolder.load_npz(path, 0, need_labels=with_y)
        if ds.is_images:
            raise InputError(
                f"x in {str(path)!r} holds uint8 images, but the run was trained on float arrays of shape "
                f"{tuple(info.input_shape or ())}; expected float32 inputs"
            )
        if list(ds.x.shape[1:]) != list(info.input_shape or []):
            raise InputError(
                f"x in {str(path)!r} has samples of shape {tuple(ds.x.shape[1:])}; the run was trained on "
                f"shape {tuple(info.input_shape or ())}"
            )
    return ds.x, ds


def read_inputs(
    paths: Sequence[str | os.PathLike],
    info: Preprocessing,
    *,
    store_dir: str | os.PathLike | None = None,
) -> Inputs:
    """Images (files, or folders searched recursively) or one ``.npz`` file with ``x``.

    Every readable image is kept; the others are in ``skipped`` (all unreadable: an
    :class:`InputError`). With ``store_dir``, images are decoded into a store there and
    read back a batch at a time (:func:`frostline.app.imagefolder.read_images`), as
    ``frostline fit`` reads its folder.
    """
    if len(paths) == 1 and Path(paths[0]).suffix.lower() == ".npz":
        p = Path(paths[0])
        x, _ = _npz_x(p, info, with_y=False)
        return Inputs(x, [f"{p.name}[{i}]" for i in range(len(x))], str(p))
    if info.input != "images":
        raise InputError(
            f"the run was trained on float arrays of shape {tuple(info.input_shape or ())}; "
            f"expected an .npz file with an array x, got {', '.join(map(str, paths))}"
        )
    files: list[Path] = []
    for raw in paths:
        p = Path(raw)
        if p.is_dir():
            found = imagefolder.image_files(p)
            if not found:
                raise InputError(
                    f"image folder {str(p)!r} is empty; expected image files (PNG, JPEG, ...) in it or below it"
                )
            files += found
        elif p.is_file():
            files.append(p)
        else:
            raise InputError(
                f"{str(p)!r} does not exist; expected image files, folders of images or an .npz file"
            )
    x, kept, skipped = imagefolder.read_images(
        files, info.image_size or 0, max_unreadable=1.0, store_dir=store_dir
    )
    source = ", ".join(map(str, paths))
    return Inputs(x, [str(f) for f in kept], source, skipped=skipped, files=len(files))


def read_labelled(
    path: str | os.PathLike, info: Preprocessing, *, store_dir: str | os.PathLike | None = None
) -> Inputs:
    """Held-out samples with labels in the run's class order: a class-folder tree (decoded
    into a store in ``store_dir`` when given, as :func:`read_inputs` does) or an ``.npz``."""
    p = Path(path)
    known = {name: i for i, name in enumerate(info.class_names)}
    if p.suffix.lower() == ".npz":
        x, ds = _npz_x(p, info, with_y=True)
        names = ds.class_names
        source = f"{str(p)!r}"
    else:
        if info.input != "images":
            raise InputError(
                f"the run was trained on float arrays; expected an .npz file with arrays x and y, got {str(p)!r}"
            )
        ds = imagefolder.load_image_folder(
            p, info.image_size or 0, min_classes=1, store_dir=store_dir
        )
        x, names = ds.x, ds.class_names
        source = f"held-out folder {str(p)!r}"
    unknown = [n for n in names if n not in known]
    if unknown:
        shown = ", ".join(repr(n) for n in unknown[:5]) + (" ..." if len(unknown) > 5 else "")
        raise InputError(
            f"{source} has {len(unknown)} class(es) the model was not trained on ({shown}); "
            f"the run's classes are {', '.join(info.class_names)}"
        )
    remap = np.asarray([known[n] for n in names], dtype=np.int64)
    y = remap[ds.y]
    labels = [f"{p.name}[{i}]" for i in range(len(y))] if p.suffix.lower() == ".npz" else ds.paths
    return Inputs(x, labels, str(p), y=y, skipped=list(ds.skipped), files=ds.files)
