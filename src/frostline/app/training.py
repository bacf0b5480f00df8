"""What ``frostline fit`` and ``frostline demo`` share: the classifier, the two-phase run, the run directory.

Both commands train through :func:`frostline.recipes.two_phase`; a
:class:`PhaseRecorder` callback records each phase (trainable counts and summary at
its start, history, timing and cache use at its end) for the report.
"""

from __future__ import annotations

import datetime as _dt
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

import frostline as fl
from frostline.api.callbacks import Callback
from frostline.api.summary import counts
from frostline.app import report
from frostline.app.runinfo import Preprocessing
from frostline.engine.runner import CacheOptions, CacheState

__all__ = [
    "PhaseRecorder",
    "base_record",
    "build_classifier",
    "choose_threads",
    "describe_phase",
    "format_rate",
    "leaf_states",
    "merge_leaf_states",
    "train_plain",
    "train_two_phase",
    "write_run",
]

PrintFn = Callable[[str], object]


# --------------------------------------------------------------------------- model


def feature_dim(base: nn.Module, image_size: int) -> int:
    """Width of ``base``'s output for one ``image_size`` RGB image (``num_features`` when it says)."""
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
    return [
        {**leaf, "trainable": [ph[i]["trainable"] for ph in phases]}
        for i, leaf in enumerate(phases[0])
    ]


# --------------------------------------------------------------------------- training


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


def cache_status(model: fl.Model) -> str:
    """The activation cache's last status for train and validation data, as one line."""
    return "; ".join(f"{k}: {v}" for k, v in model.cache_status.items())


class PhaseRecorder(Callback):
    """Records every ``fit`` of a run as one phase of the report.

    At a phase's start: trainable counts, the summary (under ``summary_titles[i]``) and
    the leaf layers' trainable state; at its end: the per-epoch history, timing and the
    cache status. The frozen-weight verification of a phase is read when the next
    phase starts or, for the last one, by :meth:`finish`.
    """

    writes_weights = False

    def __init__(
        self,
        summary_titles: list[str],
        headings: list[str | None] | None = None,
        print_fn: PrintFn = print,
    ) -> None:
        super().__init__()
        self.summary_titles = summary_titles
        self.headings = headings or []
        self.print_fn = print_fn
        self.phases: list[dict] = []
        self.summaries: dict[str, str] = {}
        self.states: list[list[dict]] = []
        self.resumed_at: int | None = None  # the epoch a resumed run went on from
        self._t0 = 0.0
        self._restored = False

    def get_state(self) -> dict:
        """What the report holds so far: it goes into every checkpoint, so a resumed run
        reports every phase and epoch as a run that never stopped."""
        return {"phases": self.phases, "summaries": self.summaries, "states": self.states}

    def set_state(self, state: dict) -> None:
        """Restored from a checkpoint: the fit that restores it goes on in the phase it records."""
        self.phases = list(state.get("phases") or [])
        self.summaries = dict(state.get("summaries") or {})
        self.states = list(state.get("states") or [])
        self._restored = bool(self.phases)
        self.resumed_at = sum(len(ph["history"].get("loss", [])) for ph in self.phases)

    def _verified(self) -> None:
        if self.phases and "verified" not in self.phases[-1]:
            v = self.model.last_verification
            self.phases[-1]["verification"] = str(v) if v is not None else "not checked"
            self.phases[-1]["verified"] = bool(v is not None and v.ok)

    def on_train_begin(self, logs=None) -> None:
        if self._restored:  # the phase the checkpoint was written in goes on
            self._restored = False
            self._t0 = time.perf_counter()
            return
        self._verified()
        i = len(self.phases)
        c = counts(self.model.module)
        self.phases.append(
            {
                "trainable_params": c.trainable,
                "non_trainable_params": c.non_trainable,
                "history": {},
            }
        )
        if i < len(self.summary_titles):
            text = self.model.summary_text()
            self.summaries[self.summary_titles[i]] = text
            if i < len(self.headings) and self.headings[i]:
                self.print_fn(f"\n{self.headings[i]}")
                self.print_fn(text)
        self.states.append(leaf_states(self.model))
        self._t0 = time.perf_counter()

    def on_epoch_end(self, epoch, logs=None) -> None:
        phase = self.phases[-1]
        h = phase["history"]
        if not h:  # the phase's first epoch: did it build the cache?
            train = self.model.cache_status.get("train")
            phase["cache_built"] = train is not None and train.state is CacheState.BUILT
        for k, v in (logs or {}).items():
            h.setdefault(k, []).append(float(v))

    def on_train_end(self, logs=None) -> None:
        phase = self.phases[-1]
        phase["time_s"] = time.perf_counter() - self._t0
        phase["cache"] = cache_status(self.model)
        times = phase["history"].get("epoch_time", [])
        phase["epoch_time_mean_s"] = float(np.mean(times)) if times else None
        phase["epoch_time_first_s"] = times[0] if times else None
        phase["epoch_time_rest_mean_s"] = float(np.mean(times[1:])) if len(times) > 1 else None
        h = phase["history"]
        phase["val"] = (
            {"loss": h["val_loss"][-1], "accuracy": h["val_accuracy"][-1]}
            if h.get("val_accuracy")
            else None
        )

    def finish(self) -> list[dict]:
        """The phases, the last one's verification included."""
        self._verified()
        return self.phases


def describe_phase(phase: dict, val_name: str) -> str:
    """``phase 1: validation accuracy 93.3% (loss 0.2) - 5 epoch(s), 0.40 s/epoch (...)``."""
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
        if rest is not None and phase.get("cache_built"):
            timing += f" (first {phase['epoch_time_first_s']:.2f} s incl. building the activation cache, then {rest:.2f} s)"
        elif rest is not None:
            timing += f" (first {phase['epoch_time_first_s']:.2f} s, then {rest:.2f} s)"
        parts.append("- " + timing)
    return " ".join(parts)


def train_two_phase(
    model: fl.Model,
    base: Any,
    x: Any,
    y: Any,
    *,
    validation_data: Any,
    freeze: Any,
    unfreeze: Any,
    epochs1: int,
    epochs2: int,
    lr1: float,
    lr2: float,
    batch_size: int,
    seed: int,
    batchnorm: str | bool,
    titles: tuple[str, str],
    summary_titles: list[str],
    headings: list[str | None] | None = None,
    verbose: Any = "auto",
    print_fn: PrintFn = print,
    cache_options: CacheOptions | None = None,
    **fit_kwargs: Any,
) -> tuple[list[dict], PhaseRecorder, Any]:
    """Run :func:`frostline.recipes.two_phase` and return the report's phase records.

    ``epochs2=0`` runs phase 1 only. ``cache_options`` (the defaults when None) and
    ``fit_kwargs`` (``checkpoint_dir``, ``resume``) go to both fits, the options object
    unchanged to the engine. Returns ``(phases, recorder, result)``.
    """
    recorder = PhaseRecorder(summary_titles, headings, print_fn)
    result = fl.recipes.two_phase(
        model,
        base,
        x,
        y,
        freeze=freeze,
        unfreeze=unfreeze,
        phase1_epochs=epochs1,
        phase2_epochs=epochs2,
        phase1_lr=lr1,
        phase2_lr=lr2,
        optimizer="adam",
        loss="sparse_categorical_crossentropy",
        metrics=["accuracy"],
        batch_size=batch_size,
        validation_data=validation_data,
        callbacks=[recorder],
        verbose=verbose,
        bn_inference=batchnorm,
        seed=seed,
        cache_options=cache_options if cache_options is not None else CacheOptions(),
        **fit_kwargs,
    )
    phases = recorder.finish()
    plans = [result.freeze_plan, result.unfreeze_plan]
    for i, (phase, title, lr, n) in enumerate(zip(phases, titles, (lr1, lr2), (epochs1, epochs2))):
        phase.update(
            name=f"phase {i + 1}",
            title=title,
            optimizer=f"Adam({format_rate(lr)})",
            learning_rate=lr,
            epochs=n,
            batch_size=batch_size,
            plan=plans[i].summary_line() if plans[i] is not None else "",
        )
    return phases, recorder, result


def train_plain(
    model: fl.Model,
    x: Any,
    y: Any = None,
    *,
    name: str,
    title: str,
    epochs: int,
    lr: float,
    batch_size: int,
    seed: int,
    verbose: Any = "auto",
) -> dict:
    """One ``compile(Adam(lr))`` + ``fit`` (the demo's from-scratch baseline), recorded as a phase."""
    recorder = PhaseRecorder([])
    model.compile(
        optimizer=fl.optimizers.Adam(lr),
        loss="sparse_categorical_crossentropy",
        metrics=["accuracy"],
    )
    model.fit(
        x,
        y,
        epochs=epochs,
        batch_size=batch_size,
        callbacks=[recorder],
        verbose=verbose,
        seed=seed,
    )
    phase = recorder.finish()[0]
    phase.update(
        name=name,
        title=title,
        optimizer=f"Adam({format_rate(lr)})",
        learning_rate=lr,
        epochs=epochs,
        batch_size=batch_size,
        plan="",
    )
    return phase


def base_record(kind: str, command: str, threads: int) -> dict:
    """The fields every run record starts with."""
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
    preprocessing: Preprocessing,
) -> None:
    """Every file of a run directory: weights, preprocessing, metrics, plots, report."""
    model.save(run_dir / "model.safetensors")
    preprocessing.write(run_dir)
    record["files"] = list(report.FILES)
    if report.write_skipped(run_dir, record.get("skipped") or []):
        record["files"].append(report.SKIPPED_FILE)
    report.write_metrics(run_dir, record)
    report.plot_curves(run_dir / "curves.png", record)
    report.plot_freeze_map(
        run_dir / "freeze_map.png",
        leaves,
        title=f"{record.get('model', {}).get('name', 'model')}: trainable state of its {len(leaves)} leaf layers",
    )
    report.write_report(run_dir / "report.md", record)


def choose_threads(requested: int | None) -> tuple[int, str]:
    """``requested``, or torch's default lowered to the cores left idle by other processes.

    On a busy machine, more compute threads than idle cores make every convolution wait
    on its slowest thread (OpenMP oversubscription): a 2-core machine at load 6 runs
    the demo several times faster with 1 thread than with 2.
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
