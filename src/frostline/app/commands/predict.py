"""``frostline predict RUN_DIR IMAGES...``: the top-k classes of new images with a trained run."""

from __future__ import annotations

import contextlib
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from frostline.app.config import UsageError, option, positive_int, resolve
from frostline.app.run_options import (
    batch_size_option,
    run_dir_option,
    threads_option,
    trust_option,
)

#: the exit code when every readable image was predicted but some inputs could not be read
SKIPPED_EXIT = 3

NAME = "predict"
HELP = "classify new images with the model of a run directory"
DESCRIPTION = """\
Classify images with the model that 'frostline fit' or 'frostline demo' trained.

The inputs are prepared exactly as in training, from the run directory's
preprocessing.json (image size, centre crop and resize, normalisation mean and std,
class names); nothing is guessed from the model. IMAGES are image files, folders of
images (searched recursively, hidden files skipped) or one .npz file with an array x.

Prints the top-k classes and their probabilities (softmax of the model's outputs) for
every image: a table on a terminal, CSV when the output is piped. --csv FILE also
writes the CSV to FILE (atomically).

Every image that can be read is predicted; a file that cannot be read is named on
stderr with the reason, and the exit code is then 3 (0 when every input was predicted,
2 when none could be read).

  frostline predict runs/photos new_images/
  frostline predict runs/photos a.jpg b.png --top-k 3 --csv predictions.csv
"""


@dataclass
class Options:
    run_dir: str = run_dir_option()
    inputs: list = option(
        list,
        help="image files, folders of images, or one .npz file with an array x",
        positional=True,
        nargs="+",
        metavar="IMAGES",
    )
    top_k: int = option(5, parse=positive_int, metavar="K", help="classes shown per image")
    csv: str | None = option(
        None, metavar="FILE", help="also write the predictions to FILE as CSV (atomic)"
    )
    batch_size: int = batch_size_option()
    trust: list = trust_option()
    threads: int | None = threads_option()


def top_k(probs: np.ndarray, k: int) -> np.ndarray:
    """Column indices of the ``k`` largest probabilities per row, largest first (ties: lower index).

    >>> top_k(np.array([[0.1, 0.6, 0.3]]), 2).tolist()
    [[1, 2]]
    """
    return np.argsort(-probs, axis=1, kind="stable")[:, :k]


def rows(names: list[str], probs: np.ndarray, classes: list[str], k: int) -> list[list]:
    """One row per sample: name, then (class, probability) for the top ``k``."""
    out = []
    for name, p, idx in zip(names, probs, top_k(probs, k)):
        row: list = [name]
        for j in idx:
            row += [classes[j], f"{p[j]:.4f}"]
        out.append(row)
    return out


def headers(k: int) -> list[str]:
    """``image, class_1, prob_1, ..., class_k, prob_k``."""
    return ["image"] + [h for i in range(1, k + 1) for h in (f"class_{i}", f"prob_{i}")]


def options(ns) -> Options:
    return resolve(Options, ns)


def run(opts: Options, command: str) -> int:
    """Predict as ``opts`` say; images are decoded into a temporary store beside the
    run directory, read a batch at a time, and removed when the command ends (however it ends)."""
    with contextlib.ExitStack() as scratch:
        return _run(opts, command, scratch)


def _run(opts: Options, command: str, scratch: contextlib.ExitStack) -> int:
    import torch

    from frostline.app import imagefolder, inference, outputs, report, text
    from frostline.io.atomic import atomic_write_text

    if opts.csv:
        target = Path(opts.csv)
        if target.is_dir() or not target.parent.is_dir():
            what = "is a folder" if target.is_dir() else "is in a folder that does not exist"
            raise UsageError(
                f"--csv {opts.csv!r} {what}; expected a file path in an existing folder"
            )
        outputs.check_writable(target, flag="--csv")
    if opts.threads:
        torch.set_num_threads(opts.threads)
    loaded = inference.load_run(opts.run_dir, opts.trust)
    info = loaded.info
    store = (
        scratch.enter_context(imagefolder.scratch_dir(opts.run_dir))
        if info.input == "images"
        else None
    )
    data = inference.read_inputs(opts.inputs, info, store_dir=store)
    for line in imagefolder.skipped_lines(data.skipped, data.files, "the lines below"):
        report.warn(line)
    k = min(opts.top_k, info.num_classes)
    probs = loaded.probabilities(data.x, opts.batch_size, data.names)
    table_rows = rows(data.names, probs, info.class_names, k)
    hdr = headers(k)
    if opts.csv:
        with outputs.plain_errors(opts.csv, "the predictions"):
            atomic_write_text(Path(opts.csv), text.csv_text(hdr, table_rows))
    if sys.stdout.isatty():
        shown = [
            [r[0]] + [f"{c} ({float(p):.1%})" for c, p in zip(r[1::2], r[2::2])] for r in table_rows
        ]
        print(text.table(["image"] + [f"top {i}" for i in range(1, k + 1)], shown))
        if opts.csv:
            print(f"\n{len(table_rows)} prediction(s) written to {opts.csv}")
    elif not opts.csv:
        sys.stdout.write(text.csv_text(hdr, table_rows).replace("\r\n", "\n"))
    else:
        print(f"{len(table_rows)} prediction(s) written to {opts.csv}")
    return SKIPPED_EXIT if data.skipped else 0
