"""Two-phase transfer learning in one call: feature extraction, then fine-tuning."""

from __future__ import annotations

import copy
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from torch import nn

from frostline.api import optimizers as optimizers_mod
from frostline.api import select
from frostline.api.callbacks import Callback, EarlyStopping, History
from frostline.api.layer import Layer
from frostline.api.model import Model
from frostline.api.select import Plan
from frostline.core import batchnorm
from frostline.core.checks import require_int
from frostline.engine.progress import resolve_verbose
from frostline.engine.runner import CacheOptions
from frostline.engine.training_state import callback_state
from frostline.workflows.recipes.common import as_model, count_params, resolve_base

__all__ = ["RecipePhase", "TwoPhaseResult", "two_phase"]


def _with_lr(optimizer: Any, lr: float, what: str) -> optimizers_mod.Optimizer:
    if isinstance(lr, bool) or not isinstance(lr, int | float) or not math.isfinite(lr) or lr <= 0:
        raise ValueError(f"{what} must be a positive number, got {lr!r}")
    spec = copy.copy(optimizers_mod.get(optimizer))
    spec.learning_rate = float(lr)
    return spec


def _early_stopping(spec: bool | Mapping, has_val: bool) -> list[Callback]:
    if spec is False or spec is None:
        return []
    opts: dict[str, Any] = {
        "monitor": "val_loss" if has_val else "loss",
        "patience": 3,
        "restore_best_weights": True,
    }
    if isinstance(spec, Mapping):
        opts.update(spec)
    elif spec is not True:
        raise TypeError(
            f"early_stopping must be a bool or a dict of EarlyStopping options, got {spec!r}"
        )
    return [EarlyStopping(**opts)]


@dataclass
class TwoPhaseResult:
    """What :func:`two_phase` did: one History per phase and both joined.

    ``history`` maps each log key to its per-epoch values over both phases (NaN where
    a phase lacks a key), plus ``"phase"`` (1 or 2 per epoch); ``phase_boundary`` is
    the index of the first phase-2 epoch (= epochs run in phase 1).
    """

    phase1: History
    phase2: History
    history: dict[str, list]
    phase_boundary: int
    freeze_plan: Plan
    unfreeze_plan: Plan
    phase1_lr: float
    phase2_lr: float

    @property
    def epoch(self) -> list[int]:
        return list(self.phase1.epoch) + list(self.phase2.epoch)

    def summary(self) -> str:
        """Two lines: what each phase trained, at which rate, and where it ended."""

        def last(h: History) -> str:
            keys = [k for k in h.history if k != "epoch_time"]
            return ", ".join(f"{k} {h.history[k][-1]:.4f}" for k in keys) if h.epoch else "not run"

        n1, n2 = len(self.phase1.epoch), len(self.phase2.epoch)
        return (
            f"phase 1 (base frozen, lr {self.phase1_lr:g}): {n1} epoch(s): {last(self.phase1)}\n"
            f"phase 2 ({self.unfreeze_plan.selector} unfrozen, lr {self.phase2_lr:g}): {n2} epoch(s): {last(self.phase2)}"
        )

    def __repr__(self) -> str:
        return f"<TwoPhaseResult {len(self.phase1.epoch)} + {len(self.phase2.epoch)} epochs, boundary {self.phase_boundary}>"


def _join(h1: History, h2: History) -> dict[str, list]:
    n1, n2 = len(h1.epoch), len(h2.epoch)
    keys = list(h1.history) + [k for k in h2.history if k not in h1.history]
    out: dict[str, list] = {}
    for k in keys:
        a = list(h1.history.get(k, [math.nan] * n1))
        b = list(h2.history.get(k, [math.nan] * n2))
        out[k] = a + b
    out["phase"] = [1] * n1 + [2] * n2
    return out


class RecipePhase(Callback):
    """Where a two-phase run is: its phase, the epoch phase 2 starts at, phase 1's History.

    Its state goes into every checkpoint, so ``two_phase(..., resume=DIR)`` resumes in
    the phase the run stopped in.

    >>> p = RecipePhase(); p.enter(2, boundary=3, phase1_history={"epoch": [0, 1, 2]})
    >>> RecipePhase().set_state(p.get_state()) is None, p.get_state()["phase"]
    (True, 2)
    """

    writes_weights = False

    def __init__(self) -> None:
        self.phase = 1
        self.boundary = 0
        self.phase1_history: dict = {}

    def enter(self, phase: int, *, boundary: int = 0, phase1_history: dict | None = None) -> None:
        """Mark the start of ``phase`` (2: after ``boundary`` epochs of phase 1)."""
        self.phase, self.boundary = phase, boundary
        self.phase1_history = dict(phase1_history or {})

    def get_state(self) -> dict:
        return {
            "phase": self.phase,
            "phase_boundary": self.boundary,
            "phase1_history": self.phase1_history,
        }

    def set_state(self, state: dict) -> None:
        self.phase = int(state.get("phase", 1))
        self.phase1_history = dict(state.get("phase1_history") or {})
        self.boundary = int(state.get("phase_boundary", len(self.phase1_history.get("epoch", []))))


def two_phase(
    model: Model | nn.Module,
    base: Layer | nn.Module | str,
    x: Any,
    y: Any = None,
    *,
    unfreeze: int | Any = 10,
    freeze: Any = None,
    phase1_epochs: int = 10,
    phase2_epochs: int = 10,
    phase1_lr: float = 1e-3,
    phase2_lr: float = 1e-5,
    optimizer: Any = "adam",
    loss: Any = None,
    metrics: Any = None,
    loss_weights: Any = None,
    batch_size: int | None = None,
    validation_data: Any = None,
    validation_split: float = 0.0,
    early_stopping: bool | Mapping = False,
    callbacks: Iterable[Callback] | None = None,
    verbose: Any = "auto",
    bn_inference: bool | str = True,
    compile_options: Mapping[str, Any] | None = None,
    **fit_kwargs: Any,
) -> TwoPhaseResult:
    """Feature extraction, then fine-tuning: the seeds' two-phase transfer learning in one call.

    Phase 1 freezes ``base`` (or the part of it that the selector ``freeze`` picks;
    ``freeze=[]`` freezes nothing) and trains the rest of ``model`` (the head) at
    ``phase1_lr``. Phase 2 unfreezes ``unfreeze`` of the base (an int: its last k leaf
    layers, as :func:`frostline.api.select.last`; or any selector / glob, relative to the
    base; None: all of it) and recompiles at ``phase2_lr`` (frostline picks up the
    unfrozen layers without a recompile; the recipe recompiles only to set the new rate,
    as the seeds do) and trains on, epochs numbered after phase 1's;
    ``phase2_epochs=0`` stops after phase 1 (nothing is unfrozen). With
    ``bn_inference`` (default) the base's BatchNorm layers stay in inference mode in
    phase 2 while their scale/shift train (the Keras guide's advice; undo with
    ``base.set_batchnorm_mode("auto")``); a mode name (``"inference"``,
    ``"batch_stats"``, ``"auto"``) sets that mode instead, ``False`` leaves it as it is. ``early_stopping=True`` (or a dict of
    :class:`~frostline.api.callbacks.EarlyStopping` options) adds early stopping with
    ``restore_best_weights`` to each phase, on ``val_loss`` when there is validation
    data. ``optimizer`` is a name or spec (its rate is replaced by each phase's);
    ``compile_options`` (``device``, ``precision``, ...) go to both compiles and
    ``fit_kwargs`` (``seed``, ``cache``, ``checkpoint_dir``, ...) to both fits; the cache
    options among them (``cache``, ``cache_memory_bytes``, ... or ``cache_options``) become
    one :class:`~frostline.engine.runner.CacheOptions` that both fits get unchanged.
    Checkpoints record the phase: ``resume=DIR`` continues in the phase the run stopped
    in (phase 1 is skipped when it had finished), with the same result as a run that
    never stopped.

    >>> import numpy as np, frostline as fl
    >>> from torch import nn
    >>> base = fl.wrap(nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU()), name="base")
    >>> model = fl.Sequential([base, nn.Linear(16, 3)])
    >>> x, y = np.random.rand(64, 8).astype("float32"), np.random.randint(0, 3, 64)
    >>> r = two_phase(model, base, x, y, unfreeze=1, phase1_epochs=2, phase2_epochs=2,
    ...               loss="sparse_categorical_crossentropy", metrics=["accuracy"], verbose=0)
    >>> r.history["phase"], r.phase_boundary, model.learning_rate
    ([1, 1, 2, 2], 2, 1e-05)
    >>> r.unfreeze_plan.paths
    ['2']
    """
    clash = sorted({"epochs", "initial_epoch"} & set(fit_kwargs))
    if clash:
        raise TypeError(
            f"two_phase numbers the epochs itself (phase1_epochs, phase2_epochs); do not pass {', '.join(clash)}"
        )
    cache_keywords = {n: fit_kwargs.pop(n) for n in CacheOptions.names() if n in fit_kwargs}
    fit_kwargs["cache_options"] = CacheOptions.of(
        fit_kwargs.pop("cache_options", None), **cache_keywords
    )
    model = as_model(model)
    layer = resolve_base(model, base)
    if loss is None:
        raise ValueError("two_phase needs a loss, e.g. loss='sparse_categorical_crossentropy'")
    n1 = require_int("phase1_epochs", phase1_epochs)
    n2 = require_int("phase2_epochs", phase2_epochs)
    spec1 = _with_lr(optimizer, phase1_lr, "phase1_lr")
    spec2 = _with_lr(optimizer, phase2_lr, "phase2_lr")
    if isinstance(unfreeze, bool):
        raise TypeError(
            "unfreeze must be an int (last k leaf layers of the base), a selector or None"
        )
    if isinstance(unfreeze, int):
        if unfreeze < 1:
            raise ValueError(
                f"unfreeze={unfreeze}: unfreeze at least one leaf layer of the base (or pass a selector)"
            )
        selector = select.last(unfreeze)
    else:
        selector = select.as_selector(unfreeze)
    select.resolve(layer, selector)  # a selector that matches nothing fails before any training
    freeze_nothing = isinstance(freeze, list | tuple) and not freeze
    if not freeze_nothing and freeze is not None:
        select.resolve(layer, freeze)
    bn_mode = "inference" if bn_inference is True else bn_inference or None
    if bn_mode is not None and bn_mode not in batchnorm.MODES:
        raise ValueError(
            f"bn_inference must be True, False or a BatchNorm mode ({', '.join(batchnorm.MODES)}), got {bn_inference!r}"
        )
    user_cbs = list(callbacks or [])
    has_val = validation_data is not None or bool(validation_split)
    copts = dict(compile_options or {})
    show = resolve_verbose(verbose)
    fit_args = dict(
        batch_size=batch_size,
        verbose=verbose,
        validation_split=validation_split,
        validation_data=validation_data,
        **fit_kwargs,
    )

    resume = fit_args.pop("resume", None)
    phase = RecipePhase()
    resumed_phase = None
    if resume is not None:
        phase.set_state(callback_state(resume, RecipePhase.__name__) or {})
        resumed_phase = phase.phase

    # phase 1: feature extraction
    if freeze_nothing:
        freeze_plan = Plan(action="freeze", selector="nothing", matched=[], applied=True)
    else:
        freeze_plan = layer.freeze(freeze)
    if not any(p.requires_grad for p in model.module.parameters()):
        raise ValueError(
            f"with base {layer.name!r} frozen nothing is left to train: the model needs a head outside the base"
        )
    model.compile(optimizer=spec1, loss=loss, metrics=metrics, loss_weights=loss_weights, **copts)
    if show:
        if freeze is None:
            what = f"training the head, base {layer.name!r} frozen ({count_params(layer.module):,} params)"
        else:
            frozen = count_params(layer.module, trainable=False)
            what = f"training with {freeze_plan.selector} of base {layer.name!r} frozen ({frozen:,} params)"
        print(f"Phase 1/2: {what}, lr {spec1.learning_rate:g}")
    if resumed_phase == 2:  # phase 1 had finished: its History travels in the checkpoint
        h1 = History()
        h1.set_state(phase.phase1_history)
        done = phase.boundary
        if show:
            print(f"Phase 1/2: finished before the checkpoint ({done} epoch(s)); resuming phase 2")
    else:
        phase.enter(1)
        # phase 1's cache build also keeps the frozen values phase 2 starts from
        plan = layer.unfreeze(selector, dry_run=True) if n2 else None
        after: dict[str, Any] = (
            {}
            if plan is None or "unfreeze_next" in fit_args
            else {"unfreeze_next": [layer.module.get_submodule(path) for path in plan.paths]}
        )
        h1 = model.fit(
            x,
            y,
            epochs=n1,
            callbacks=[phase, *user_cbs, *_early_stopping(early_stopping, has_val)],
            resume=resume,
            **fit_args,
            **after,
        )
        done = len(h1.epoch)

    # phase 2: fine-tuning
    if n2 == 0 and resumed_phase != 2:
        if show:
            print("Phase 2/2: skipped (phase2_epochs=0)")
        return TwoPhaseResult(
            h1,
            History(),
            _join(h1, History()),
            done,
            freeze_plan,
            layer.unfreeze(selector, dry_run=True),
            spec1.learning_rate,
            spec2.learning_rate,
        )
    unfreeze_plan = layer.unfreeze(selector)
    if bn_mode and any(batchnorm.is_batchnorm(m) for m in layer.module.modules()):
        layer.set_batchnorm_mode(bn_mode)
    model.compile(optimizer=spec2, loss=loss, metrics=metrics, loss_weights=loss_weights, **copts)
    if show:
        n = sum(c.params for c in unfreeze_plan.changes)
        print(
            f"Phase 2/2: fine-tuning {unfreeze_plan.selector} of {layer.name!r} ({len(unfreeze_plan.matched)} leaf layers, {n:,} params unfrozen), lr {spec2.learning_rate:g}"
        )
    model.stop_training = False
    phase.enter(2, boundary=done, phase1_history=h1.get_state())
    h2 = model.fit(
        x,
        y,
        epochs=done + n2,
        initial_epoch=done,
        callbacks=[phase, *user_cbs, *_early_stopping(early_stopping, has_val)],
        resume=resume if resumed_phase == 2 else None,
        **fit_args,
    )
    return TwoPhaseResult(
        h1,
        h2,
        _join(h1, h2),
        done,
        freeze_plan,
        unfreeze_plan,
        spec1.learning_rate,
        spec2.learning_rate,
    )
