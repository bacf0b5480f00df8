"""Run directories for ``frostline demo`` and ``frostline fit``: metrics, plots, report.

A run directory is written into a hidden temporary folder next to its final
place and renamed there at the end (:class:`RunDirectory`), so a failed or
interrupted run never leaves a half-written directory behind.

What a run writes (``record`` is the dict both commands fill in):

* ``metrics.json`` -- the whole record (config, every phase's history, held-out
  results, verification, timings);
* ``metrics.csv`` -- one row per epoch and run (``transfer``/``scratch``);
* ``curves.png`` -- loss and accuracy per epoch, phase boundary marked;
* ``freeze_map.png`` -- every leaf layer's parameter count (log scale), coloured
  by its trainable state in each phase;
* ``model.safetensors`` -- the trained weights (written by the command);
* ``preprocessing.json`` -- image size, normalisation, class names and model, which
  ``frostline predict`` and ``frostline evaluate`` read;
* ``report.md`` -- a summary linking all of the above.
"""

from __future__ import annotations

import contextlib
import csv
import datetime as _dt
import json
import math
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from frostline.app import outputs
from frostline.app.outputs import OutputError
from frostline.io.atomic import atomic_directory

__all__ = [
    "FILES",
    "RunDirectory",
    "RunDirectoryError",
    "default_run_dir",
    "plot_curves",
    "plot_freeze_map",
    "pyplot",
    "warn",
    "write_metrics",
    "write_report",
    "write_skipped",
]

FILES = (
    "report.md",
    "metrics.json",
    "metrics.csv",
    "curves.png",
    "freeze_map.png",
    "model.safetensors",
    "preprocessing.json",
)

#: the unreadable files of a run's data, one row each (written only when there are any)
SKIPPED_FILE = "skipped.csv"

_COLORS = {
    "frozen": "#4c78a8",
    "unfrozen in phase 2": "#f58518",
    "frozen in phase 2": "#72b7b2",
    "trainable": "#e45756",
}
_LABELS = {"frozen": "frozen throughout", "trainable": "trainable throughout"}


class RunDirectoryError(OutputError):
    """The run directory cannot be used (exists and is not empty, not writable)."""


def timestamp() -> str:
    return _dt.datetime.now().strftime("%Y%m%d-%H%M%S")


def default_run_dir(kind: str, root: str | os.PathLike = "frostline-runs") -> Path:
    """``./frostline-runs/<kind>-<timestamp>`` (with ``-2``, ``-3``... if taken)."""
    base = Path(root) / f"{kind}-{timestamp()}"
    path, i = base, 2
    while path.exists():
        path = base.with_name(f"{base.name}-{i}")
        i += 1
    return path


def check_run_dir(path: str | os.PathLike) -> Path:
    """The final path, after checking it can be written (absent or an empty folder)."""
    p = Path(path)
    if p.exists():
        if not p.is_dir():
            raise RunDirectoryError(
                f"output path {str(p)!r} is a file; --out needs a folder path for the run directory"
            )
        if any(p.iterdir()):
            raise RunDirectoryError(
                f"output folder {str(p)!r} already exists and is not empty; pass a new --out path or remove it"
            )
    return p


#: room for a run directory's files besides the model's weights (plots, report, metrics)
RUN_FILES_BYTES = 8 << 20


def expected_bytes(module: Any) -> int:
    """About what a run directory of ``module`` takes on disk: its weights plus the other files."""
    tensors = [*module.parameters(), *module.buffers()]
    return RUN_FILES_BYTES + sum(t.numel() * t.element_size() for t in tensors)


def check_output(final: Path, *, flag: str = "--out", need_bytes: int = 0) -> None:
    """Before any work: ``final`` is absent or empty, and its disk takes ``need_bytes``.

    Sweeps abandoned temporary folders beside it first (:func:`frostline.app.outputs.sweep`),
    naming each on stderr, so that their space counts as free.
    """
    check_run_dir(final)
    for gone in outputs.sweep(final.parent):
        warn(
            f"removed {str(gone)!r}, the temporary folder of an interrupted run whose process is gone"
        )
    outputs.check_writable(final, flag=flag, need_bytes=need_bytes)


class RunDirectory:
    """A run directory written through :func:`frostline.io.atomic.atomic_directory`.

    Files go into ``.<name>.tmp-*`` beside ``final``; when the ``with`` block ends
    without an exception every file and the folder are fsynced and the folder is
    renamed into place. An exception (``SIGTERM`` and ``SIGINT`` included, which the
    command line turns into one) removes the temporary folder and the parent folders
    this run created, so nothing half-written stays behind; an ``OSError`` comes out as
    a :class:`~frostline.app.outputs.WriteError` naming ``final`` in plain words. The
    temporary folder holds an owner file until the rename, so that a run killed
    outright (``SIGKILL``) leaves a folder the next run can prove abandoned and sweep
    (:func:`frostline.app.outputs.sweep`, done on entry here). ``replace=True``
    atomically replaces an existing ``final`` (the caller checked it may).

    >>> import tempfile, pathlib
    >>> root = pathlib.Path(tempfile.mkdtemp())
    >>> with RunDirectory(root / "runs" / "a") as run:
    ...     _ = (run.path / "x.txt").write_text("hi")
    >>> sorted(p.name for p in (root / "runs").iterdir()), sorted(p.name for p in run.path.iterdir())
    (['a'], ['x.txt'])
    """

    def __init__(
        self, final: str | os.PathLike, *, replace: bool = False, what: str = "the run directory"
    ) -> None:
        self.final = Path(final) if replace else check_run_dir(final)
        self.replace = replace
        self.what = what
        self.path = self.final  # the temporary folder while the block runs
        self.swept: list[Path] = []
        self._created: list[Path] = []
        self._stack = contextlib.ExitStack()

    def __enter__(self) -> RunDirectory:
        parent = self.final.parent
        while not parent.exists():
            self._created.append(parent)
            parent = parent.parent
        self.swept = outputs.sweep(self.final.parent)
        try:
            with outputs.plain_errors(self.final, self.what):
                self.path = self._stack.enter_context(atomic_directory(self.final))
                outputs.claim(self.path)
        except BaseException:
            self._stack.close()
            self._remove_created()
            raise
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            with outputs.plain_errors(self.final, self.what):
                if exc_type is None:
                    if not self.replace:
                        check_run_dir(self.final)  # nobody filled it meanwhile
                    outputs.release(self.path)
                self._stack.__exit__(exc_type, exc, tb)
        except BaseException:
            self._remove_created()
            raise
        if exc_type is not None:
            self._remove_created()
            if issubclass(exc_type, OSError) and not issubclass(exc_type, outputs.WriteError):
                raise outputs.WriteError(
                    f"could not write {self.what} {str(self.final)!r}: {outputs.reason(exc)}; "
                    "nothing was left behind"
                ) from None
        else:
            self.path = self.final

    def _remove_created(self) -> None:
        for d in self._created:  # innermost first
            with contextlib.suppress(OSError):
                d.rmdir()


# --------------------------------------------------------------------------- metrics


def _clean(obj: Any) -> Any:
    """JSON-safe: numpy scalars to Python, NaN/inf to None."""
    if isinstance(obj, dict):
        return {str(k): _clean(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_clean(v) for v in obj]
    if hasattr(obj, "item") and callable(obj.item) and getattr(obj, "ndim", 1) == 0:
        obj = obj.item()
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, str | int | float | bool) or obj is None:
        return obj
    return str(obj)


CSV_COLUMNS = [
    "run",
    "phase",
    "epoch",
    "epoch_in_phase",
    "loss",
    "accuracy",
    "val_loss",
    "val_accuracy",
    "epoch_time",
    "learning_rate",
    "trainable_params",
]


def csv_rows(record: dict) -> list[dict]:
    rows = []
    epoch = 0
    for phase in record.get("phases", []):
        h = phase.get("history", {})
        for i in range(len(h.get("loss", []))):
            epoch += 1
            rows.append(_row("transfer", phase, epoch, i, h))
    base = record.get("baseline")
    if base:
        h = base.get("history", {})
        for i in range(len(h.get("loss", []))):
            rows.append(_row("scratch", base, i + 1, i, h))
    return rows


def _row(run: str, phase: dict, epoch: int, i: int, h: dict) -> dict:
    def at(key):
        values = h.get(key) or []
        return values[i] if i < len(values) else ""

    return {
        "run": run,
        "phase": phase.get("name", ""),
        "epoch": epoch,
        "epoch_in_phase": i + 1,
        "loss": at("loss"),
        "accuracy": at("accuracy"),
        "val_loss": at("val_loss"),
        "val_accuracy": at("val_accuracy"),
        "epoch_time": at("epoch_time"),
        "learning_rate": phase.get("learning_rate", ""),
        "trainable_params": phase.get("trainable_params", ""),
    }


def write_metrics(directory: str | os.PathLike, record: dict) -> None:
    """``metrics.json`` (the whole record) and ``metrics.csv`` (one row per epoch)."""
    d = Path(directory)
    (d / "metrics.json").write_text(json.dumps(_clean(record), indent=2) + "\n", encoding="utf-8")
    with open(d / "metrics.csv", "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=CSV_COLUMNS)
        w.writeheader()
        for row in csv_rows(record):
            w.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in row.items()})


def write_skipped(directory: str | os.PathLike, skipped: Sequence[dict]) -> bool:
    """``skipped.csv`` (``file,reason``) when ``skipped`` lists unreadable files; True if written.

    >>> import tempfile, pathlib
    >>> d = pathlib.Path(tempfile.mkdtemp())
    >>> write_skipped(d, [{"file": "cat/x.png", "reason": "truncated"}])
    True
    >>> (d / "skipped.csv").read_text().splitlines()
    ['file,reason', 'cat/x.png,truncated']
    """
    from frostline.app.text import csv_text

    if not skipped:
        return False
    text = csv_text(["file", "reason"], [[r["file"], r["reason"]] for r in skipped])
    (Path(directory) / SKIPPED_FILE).write_text(text, encoding="utf-8")
    return True


# --------------------------------------------------------------------------- plots


def warn(message: str) -> None:
    """``frostline: warning: ...`` on stderr."""
    print(f"frostline: warning: {message}", file=sys.stderr, flush=True)


def pyplot():
    """matplotlib's pyplot on the Agg backend (files only, no display)."""
    from frostline.app.extras import require

    matplotlib = require("matplotlib", "the run directory's plots")

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def plot_curves(path: str | os.PathLike, record: dict) -> None:
    """Loss and accuracy per epoch for every phase (boundaries marked) and the baseline."""
    plt = pyplot()
    from matplotlib.ticker import MaxNLocator

    phases = record.get("phases", [])
    val_name = record.get("val_name", "validation")
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.6), dpi=110)
    starts = []
    xs: dict[str, list] = {"loss": [], "accuracy": [], "val_loss": [], "val_accuracy": []}
    ep = []
    n = 0
    for phase in phases:
        h = phase.get("history", {})
        k = len(h.get("loss", []))
        starts.append(n)
        ep += list(range(n + 1, n + k + 1))
        for key in xs:
            vals = list(h.get(key, []))
            xs[key] += vals + [math.nan] * (k - len(vals))
        n += k
    base = record.get("baseline")
    for ax, metric in zip(axes, ("loss", "accuracy")):
        if ep:
            ax.plot(ep, xs[metric], "-o", color="#4c78a8", ms=3, label=f"transfer: train {metric}")
            if any(not math.isnan(v) for v in xs[f"val_{metric}"] if v is not None):
                ax.plot(
                    ep,
                    [math.nan if v is None else v for v in xs[f"val_{metric}"]],
                    "-s",
                    color="#e45756",
                    ms=3,
                    label=f"transfer: {val_name} {metric}",
                )
        if base:
            h = base.get("history", {})
            bx = list(range(1, len(h.get(metric, [])) + 1))
            if bx:
                ax.plot(bx, h[metric], ":", color="#7f7f7f", label=f"from scratch: train {metric}")
            final = (base.get("val") or {}).get(metric)
            if final is not None and bx:
                ax.plot(
                    [bx[-1]],
                    [final],
                    "D",
                    color="#7f7f7f",
                    ms=6,
                    label=f"from scratch: {val_name} {metric}",
                )
        for i, s in enumerate(starts[1:], start=2):
            ax.axvline(s + 0.5, color="black", ls="--", lw=1)
            ax.text(
                s + 0.6,
                0.98,
                f"phase {i}",
                transform=ax.get_xaxis_transform(),
                va="top",
                fontsize=8,
            )
        if len(starts) > 1:
            ax.text(0.02, 0.98, "phase 1", transform=ax.transAxes, va="top", fontsize=8)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("epoch")
        ax.set_ylabel(metric)
        ax.grid(alpha=0.3)
        if metric == "accuracy":
            ax.set_ylim(-0.02, 1.05)
    handles, labels = axes[1].get_legend_handles_labels()
    labels = [lb.replace(" accuracy", "") for lb in labels]
    fig.legend(
        handles,
        labels,
        loc="lower center",
        ncol=min(4, max(1, len(labels))),
        fontsize=8,
        frameon=False,
    )
    title = record.get("title") or "training curves"
    fig.suptitle(title, fontsize=10)
    fig.tight_layout(rect=(0, 0.08, 1, 1))
    fig.savefig(path)
    plt.close(fig)


def leaf_category(states: Sequence[bool]) -> str:
    if all(states):
        return "trainable"
    if not any(states):
        return "frozen"
    return "unfrozen in phase 2" if states[-1] else "frozen in phase 2"


def plot_freeze_map(path: str | os.PathLike, leaves: list[dict], title: str = "") -> None:
    """Horizontal bars: every leaf layer's parameter count (log scale), colour = trainable state.

    ``leaves``: dicts with ``path``, ``class_name``, ``params`` and ``trainable`` (one
    bool per phase).
    """
    plt = pyplot()
    from matplotlib.patches import Patch

    n = len(leaves)
    height = max(3.0, 0.15 * n + 1.4)
    fig, ax = plt.subplots(figsize=(8.5, height), dpi=100)
    ys = list(range(n))
    cats = [leaf_category(leaf["trainable"]) for leaf in leaves]
    params = [max(int(leaf["params"]), 1) for leaf in leaves]
    ax.barh(ys, params, color=[_COLORS[c] for c in cats], height=0.8)
    ax.set_yticks(ys)
    ax.set_yticklabels(
        [f"{i:>3} {leaf['path']} ({leaf['class_name']})" for i, leaf in enumerate(leaves)],
        fontsize=6,
        family="monospace",
    )
    ax.invert_yaxis()
    ax.set_xscale("log")
    ax.set_xlabel("parameters (log scale)")
    ax.set_ylim(n - 0.5, -0.5)
    ax.grid(axis="x", alpha=0.3)
    totals: dict[str, int] = {}
    for c, leaf in zip(cats, leaves):
        totals[c] = totals.get(c, 0) + int(leaf["params"])
    order = [c for c in _COLORS if c in totals]
    ax.legend(
        handles=[
            Patch(
                color=_COLORS[c],
                label=f"{_LABELS.get(c, c)}: {sum(1 for x in cats if x == c)} layer(s), {totals[c]:,} params",
            )
            for c in order
        ],
        loc="upper right",
        fontsize=7,
    )
    ax.set_title(title or f"freeze map: {n} leaf layers", fontsize=9, wrap=True)
    ax.margins(y=0)
    # margins from the labels' length (monospace: 0.6 em a character) instead of
    # tight_layout, which measures every label by drawing the figure once more
    longest = max((len(t.get_text()) for t in ax.get_yticklabels()), default=0)
    left = min(0.7, (longest * 0.6 * 6 + 10) / 72 / 8.5)
    fig.subplots_adjust(left=left, right=0.98, top=1 - 0.5 / height, bottom=0.55 / height)
    fig.savefig(path)
    plt.close(fig)


# --------------------------------------------------------------------------- report


def _pct(v) -> str:
    return "n/a" if v is None else f"{100 * v:.1f}%"


def _num(v) -> str:
    return "n/a" if v is None else f"{v:.4f}"


def _secs(v) -> str:
    return "n/a" if v is None else f"{v:.2f} s"


def _cell(text: str) -> str:
    """Text safe inside a Markdown table cell (no pipe, newline or backtick breaks the row)."""
    return " ".join(str(text).split()).replace("|", "\\|").replace("`", "'")


def write_report(path: str | os.PathLike, record: dict) -> None:
    """``report.md``: the result table, the plots, the summaries, links to every file."""
    val_name = record.get("val_name", "validation")
    lines = [f"# {record.get('title', 'frostline run')}", ""]
    lines.append(f"Command: `{record.get('command', '')}`  ")
    timings = record.get("timings", {})
    cpu = f" ({_secs(timings['cpu_s'])} of CPU time)" if timings.get("cpu_s") is not None else ""
    lines.append(
        f"Created {record.get('created', '')} with frostline {record.get('frostline_version', '')}, torch {record.get('torch_version', '')}, "
        f"{record.get('threads', '?')} CPU thread(s); total wall time {_secs(timings.get('total_s'))}{cpu}."
    )
    resumed = record.get("resumed")
    if resumed:
        lines.append(
            f"Resumed from the checkpoint after epoch {resumed['after_epoch']} in `{resumed['from']}`: "
            "every epoch is reported, but the wall time and each phase's frozen-weight check cover "
            "this process only."
        )
    lines.append("")
    ds = record.get("dataset", {})
    lines.append("## Result")
    lines.append("")
    lines.append(
        f"| run | what trains | epochs | optimizer | trainable params | {val_name} accuracy | {val_name} loss | first epoch | later epochs (mean) |"
    )
    lines.append("| --- | --- | ---: | --- | ---: | ---: | ---: | ---: | ---: |")
    for ph in record.get("phases", []):
        v = ph.get("val") or {}
        lines.append(
            f"| {ph.get('name')} | {ph.get('title', '')} | {ph.get('epochs')} | {ph.get('optimizer', '')} | "
            f"{ph.get('trainable_params', 0):,} | {_pct(v.get('accuracy'))} | "
            f"{_num(v.get('loss'))} | {_secs(ph.get('epoch_time_first_s'))} | {_secs(ph.get('epoch_time_rest_mean_s'))} |"
        )
    base = record.get("baseline")
    if base:
        v = base.get("val") or {}
        lines.append(
            f"| {base.get('name')} | {base.get('title', '')} | {base.get('epochs')} | {base.get('optimizer', '')} | "
            f"{base.get('trainable_params', 0):,} | {_pct(v.get('accuracy'))} | "
            f"{_num(v.get('loss'))} | {_secs(base.get('epoch_time_first_s'))} | {_secs(base.get('epoch_time_rest_mean_s'))} |"
        )
    lines.append("")
    if record.get("conclusion"):
        lines += [record["conclusion"], ""]
    lines += ["![Loss and accuracy per epoch](curves.png)", ""]
    lines += [
        "The dashed vertical line marks the phase boundary (the recompile with the lower learning rate). "
        f"{val_name.capitalize()} numbers are measured after every epoch on samples never trained on.",
        "",
    ]
    lines += [
        "## Freeze map",
        "",
        "![Freeze map: every leaf layer, parameter count and trainable state](freeze_map.png)",
        "",
    ]
    if record.get("freeze_note"):
        lines += [record["freeze_note"], ""]

    lines += ["## Data", ""]
    for key, label in (
        ("description", "Data"),
        ("source", "Source"),
        ("num_classes", "Classes"),
        ("train", "Training samples"),
        ("val", f"{val_name.capitalize()} samples"),
        ("image_size", "Image size"),
        ("preprocessing", "Preprocessing"),
    ):
        if ds.get(key) not in (None, ""):
            lines.append(f"- {label}: {ds[key]}")
    for w in record.get("warnings", []):
        lines.append(f"- Warning: {w}")
    skipped = record.get("skipped") or []
    if skipped:
        lines.append(
            f"- Skipped: {len(skipped)} unreadable file(s) of {record.get('files_read', '?')}, "
            f"listed below and in [{SKIPPED_FILE}]({SKIPPED_FILE})"
        )
    lines.append("")
    if skipped:
        lines += ["## Skipped files", "", "| file | reason |", "| --- | --- |"]
        lines += [f"| `{_cell(r['file'])}` | {_cell(r['reason'])} |" for r in skipped]
        lines.append("")

    lines += ["## Frozen-weight verification", ""]
    for ph in record.get("phases", []):
        lines.append(f"- {ph.get('name')}: {ph.get('verification', 'n/a')}")
        if ph.get("cache"):
            lines.append(f"  (activation cache: {ph['cache']})")
    lines.append("")

    summaries = record.get("summaries", {})
    if summaries:
        lines += ["## Model", ""]
        model = record.get("model", {})
        if model.get("description"):
            lines += [model["description"], ""]
        for title, text in summaries.items():
            lines += [
                f"<details><summary>{title}</summary>",
                "",
                "```",
                text,
                "```",
                "",
                "</details>",
                "",
            ]
    for ph in record.get("phases", []):
        if ph.get("plan"):
            lines += [f"{ph.get('name')}: `{ph['plan']}`", ""]

    lines += ["## Files", ""]
    descriptions = {
        "metrics.csv": "one row per epoch (transfer phases and the from-scratch baseline)",
        "metrics.json": "configuration, per-epoch history, results, verification and timings",
        "curves.png": "loss and accuracy per epoch",
        "freeze_map.png": "trainable state of every leaf layer",
        "model.safetensors": "trained weights"
        + (f" ({record['weights_note']})" if record.get("weights_note") else ""),
        "preprocessing.json": "image size, normalisation, class names and model: what "
        "`frostline predict` and `frostline evaluate` read",
        SKIPPED_FILE: "the files of the data that could not be read as images, with the reason",
    }
    for name in record.get("files", list(descriptions)):
        if name in descriptions:
            lines.append(f"- [{name}]({name}): {descriptions[name]}")
    lines.append("")
    Path(path).write_text("\n".join(lines), encoding="utf-8")
