"""``frostline evaluate RUN_DIR HELD_OUT``: accuracy, a per-class table and a confusion matrix."""

from __future__ import annotations

import contextlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from frostline.app.config import UsageError, option, resolve
from frostline.app.run_options import (
    batch_size_option,
    run_dir_option,
    threads_option,
    trust_option,
)

NAME = "evaluate"
HELP = "accuracy, per-class table and confusion matrix of a run on held-out data"
DESCRIPTION = """\
Measure the model of a run directory on labelled data it never trained on.

HELD_OUT is a folder with one subfolder of images per class, named as in training
(a subset of the classes is fine; a class the model does not know is an error), or an
.npz file with arrays x and y. Inputs are prepared exactly as in training, from the run
directory's preprocessing.json.

Prints the accuracy and a per-class table (precision, recall, F1, support), and writes
confusion_matrix.png, per_class.csv and evaluation.json into --out (default: the run
directory's eval/ folder; an earlier evaluation there is replaced, atomically).

  frostline evaluate runs/photos held_out/
  frostline evaluate runs/photos held_out/ --out runs/photos/eval-2024
"""

MARKER = "frostline.evaluation"
FILES = ("confusion_matrix.png", "per_class.csv", "evaluation.json", "skipped.csv")


@dataclass
class Options:
    run_dir: str = run_dir_option()
    data: str = option(
        help="held-out folder (one subfolder of images per class) or .npz file with x and y",
        positional=True,
        nargs=None,
        metavar="HELD_OUT",
    )
    out: str | None = option(
        None,
        metavar="DIR",
        help="folder for the confusion matrix and the tables",
        default_help="RUN_DIR/eval",
    )
    batch_size: int = batch_size_option()
    trust: list = trust_option()
    threads: int | None = threads_option()


def check_out_dir(path: Path) -> None:
    """``path`` may be written: absent, empty, or an earlier evaluation (which is replaced)."""
    if not path.exists():
        return
    if not path.is_dir():
        raise UsageError(f"--out {str(path)!r} is a file; expected a folder for the evaluation")
    entries = list(path.iterdir())
    if not entries:
        return
    try:
        earlier = json.loads((path / "evaluation.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        earlier = None
    if not isinstance(earlier, dict) or earlier.get("format") != MARKER:
        raise UsageError(
            f"output folder {str(path)!r} already exists and holds other files; pass a new --out path or remove it"
        )
    strangers = sorted(p.name for p in entries if p.name not in FILES)
    if strangers:
        raise UsageError(
            f"output folder {str(path)!r} holds an earlier evaluation and other files ({', '.join(strangers[:3])}); "
            "pass a new --out path"
        )


def scores(y: np.ndarray, pred: np.ndarray, num_classes: int) -> dict[str, Any]:
    """Accuracy, per-class precision/recall/F1/support and the confusion matrix (rows: true class).

    >>> s = scores(np.array([0, 0, 1, 1]), np.array([0, 1, 1, 1]), 3)
    >>> s["accuracy"], s["recall"], s["support"]
    (0.75, [0.5, 1.0, 0.0], [2, 2, 0])
    """
    from frostline.app.extras import require

    metrics = require("sklearn.metrics", "frostline evaluate")
    labels = list(range(num_classes))
    precision, recall, f1, support = metrics.precision_recall_fscore_support(
        y, pred, labels=labels, zero_division=0
    )
    return {
        "accuracy": float(metrics.accuracy_score(y, pred)),
        "precision": [float(v) for v in precision],
        "recall": [float(v) for v in recall],
        "f1": [float(v) for v in f1],
        "support": [int(v) for v in support],
        "confusion_matrix": metrics.confusion_matrix(y, pred, labels=labels).tolist(),
    }


def plot_confusion(path: Path, matrix: list[list[int]], classes: list[str], title: str) -> None:
    """Counts per (true, predicted) class, shaded by the row's share (recall)."""
    from frostline.app.report import pyplot

    plt = pyplot()
    m = np.asarray(matrix)
    n = len(classes)
    side = min(18.0, max(4.5, 0.45 * n + 2.5))
    fig, ax = plt.subplots(figsize=(side, side * 0.9), dpi=110)
    share = m / np.maximum(m.sum(axis=1, keepdims=True), 1)
    im = ax.imshow(share, cmap="Blues", vmin=0, vmax=1)
    if n <= 30:
        for i in range(n):
            for j in range(n):
                if m[i, j]:
                    ax.text(
                        j,
                        i,
                        str(m[i, j]),
                        ha="center",
                        va="center",
                        fontsize=8,
                        color="white" if share[i, j] > 0.5 else "black",
                    )
    ax.set_xticks(range(n))
    ax.set_yticks(range(n))
    ax.set_xticklabels(
        classes, rotation=45 if n > 4 else 0, ha="right" if n > 4 else "center", fontsize=8
    )
    ax.set_yticklabels(classes, fontsize=8)
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class")
    ax.set_title(title, fontsize=9, wrap=True)
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04, label="share of the true class")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def options(ns) -> Options:
    return resolve(Options, ns)


def run(opts: Options, command: str) -> int:
    """Evaluate as ``opts`` say; images are decoded into a temporary store beside the
    run directory, read a batch at a time, and removed when the command ends (however it ends)."""
    with contextlib.ExitStack() as scratch:
        return _run(opts, command, scratch)


def _run(opts: Options, command: str, scratch: contextlib.ExitStack) -> int:
    import torch

    from frostline.app import imagefolder, inference, outputs, report, text
    from frostline.app.extras import require

    require("matplotlib", "the confusion matrix picture of frostline evaluate")
    require("sklearn", "frostline evaluate")
    if opts.threads:
        torch.set_num_threads(opts.threads)
    out = Path(opts.out) if opts.out else Path(opts.run_dir) / "eval"
    loaded = inference.load_run(opts.run_dir, opts.trust)
    if not opts.out and out.is_symlink():  # a run directory's eval/ is written by frostline only
        raise UsageError(
            f"{str(out)!r} is a symbolic link (to {os.readlink(out)!r}); frostline writes the evaluation "
            "into the run directory itself: remove the link or pass --out DIR"
        )
    check_out_dir(out)
    outputs.check_writable(out, flag="--out", need_bytes=report.RUN_FILES_BYTES)
    info = loaded.info
    store = (
        scratch.enter_context(imagefolder.scratch_dir(opts.run_dir))
        if info.input == "images"
        else None
    )
    data = inference.read_labelled(opts.data, info, store_dir=store)
    for line in imagefolder.skipped_lines(data.skipped, data.files, str(out / report.SKIPPED_FILE)):
        report.warn(line)
    assert data.y is not None
    probs = loaded.probabilities(data.x, opts.batch_size, data.names)
    pred = probs.argmax(axis=1)
    s = scores(data.y, pred, info.num_classes)
    classes = info.class_names
    present = [i for i in range(info.num_classes) if s["support"][i]]
    correct = int((pred == data.y).sum())
    print(
        f"{len(data)} samples of {len(present)} class(es) from {data.source}; "
        f"preprocessing from {Path(opts.run_dir) / 'preprocessing.json'}"
    )
    print(f"accuracy: {s['accuracy']:.1%} ({correct} of {len(data)})\n")
    hdr = ["class", "precision", "recall", "f1", "support"]
    per_class = [
        [
            classes[i],
            f"{s['precision'][i]:.3f}",
            f"{s['recall'][i]:.3f}",
            f"{s['f1'][i]:.3f}",
            s["support"][i],
        ]
        for i in range(info.num_classes)
    ]
    print(
        text.table(hdr, [r for i, r in enumerate(per_class) if s["support"][i]], right={1, 2, 3, 4})
    )
    absent = [classes[i] for i in range(info.num_classes) if not s["support"][i]]
    if absent:
        print(f"(no held-out samples of: {', '.join(absent)})")
    record = {
        "format": MARKER,
        "command": command,
        "run_dir": str(opts.run_dir),
        "data": str(opts.data),
        "samples": len(data),
        "class_names": classes,
        **s,
        "skipped": [{"file": k.path, "reason": k.reason} for k in data.skipped],
    }
    with report.RunDirectory(out, replace=True, what="the evaluation") as written:
        tmp = written.path
        plot_confusion(
            tmp / "confusion_matrix.png",
            s["confusion_matrix"],
            classes,
            f"{Path(opts.run_dir).name} on {Path(opts.data).name}: accuracy {s['accuracy']:.1%} ({len(data)} samples)",
        )
        (tmp / "per_class.csv").write_text(text.csv_text(hdr, per_class), encoding="utf-8")
        (tmp / "evaluation.json").write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
        report.write_skipped(tmp, record["skipped"])
    print(
        f"\nconfusion matrix: {out / 'confusion_matrix.png'} (and per_class.csv, evaluation.json)"
    )
    return 0
