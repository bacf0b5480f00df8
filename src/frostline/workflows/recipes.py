"""Transfer-learning workflows in one call each.

* :func:`two_phase` — feature extraction (base frozen, head trains at 1e-3), then
  fine-tuning (the last layers of the base unfrozen, recompiled at 1e-5).
* :func:`apply_strategy` — the freezing table for small/large target data and
  similar/dissimilar tasks, applied to a base, with its rationale.
* :func:`multitask_model` — a shared trunk with one head per task, returning a dict
  (compile with ``loss={...}``, ``loss_weights``, per-head ``metrics``).
* :func:`distill` — a frozen teacher, a trained student (see :mod:`frostline.workflows.distill`).
* :func:`verify_frozen` / :class:`VerifyFrozen` — frozen weights checked bitwise around
  any code, or at every epoch of a fit.
* :func:`forgetting_report` — catastrophic forgetting measured: source-task accuracy
  before and after fine-tuning, for several fine-tuning strategies.

Freezing schedules during a fit (gradual unfreezing, discriminative rates, progressive
freezing) are callbacks in :mod:`frostline.workflows.schedules`.
"""

from __future__ import annotations

import contextlib
import copy
import math
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from frostline.api import optimizers as optimizers_mod
from frostline.api import select
from frostline.api.callbacks import Callback, EarlyStopping, History
from frostline.api.layer import Layer
from frostline.api.metrics import Accuracy
from frostline.api.model import Model
from frostline.api.select import Change, Plan
from frostline.core import batchnorm
from frostline.core.leaves import leaf_state
from frostline.engine.progress import resolve_verbose
from frostline.engine.stages import Stage, register_stages
from frostline.engine.training_state import callback_state
from frostline.engine.verify import Fingerprint, FrozenWeightsChanged, Report, fingerprint
from frostline.workflows.distill import DistillationLoss, distill

__all__ = [
    "STRATEGY_TABLE",
    "DistillationLoss",
    "ForgettingReport",
    "ForgettingRow",
    "FrozenCheck",
    "MultiTaskModule",
    "RecipePhase",
    "StrategyPlan",
    "TwoPhaseResult",
    "VerifyFrozen",
    "apply_strategy",
    "distill",
    "forgetting_report",
    "multitask_model",
    "two_phase",
    "verify_frozen",
]


# --------------------------------------------------------------------------- helpers


def _as_model(model: Any) -> Model:
    if isinstance(model, Model):
        return model
    if isinstance(model, nn.Module):
        return Model(model)
    raise TypeError(
        f"model must be a frostline Model or a torch.nn.Module, got {type(model).__name__}"
    )


def _resolve_base(model: Model, base: Any) -> Layer:
    """``base`` as a Layer of ``model``: a Layer/Model, a module inside it, or a layer name."""
    if isinstance(base, str):
        return model.get_layer(base)
    if isinstance(base, Layer):
        layer = base
    elif isinstance(base, nn.Module):
        layer = Layer(base, name="base")
    else:
        raise TypeError(
            f"base must be a layer of the model (a Layer, a torch module or a name), got {type(base).__name__}"
        )
    if not any(m is layer.module for m in model.module.modules()):
        raise ValueError(
            f"base {layer.name!r} is not part of model {model.name!r}; build the model around it "
            "(e.g. fl.Sequential([base, head])) or pass model.get_layer(...)"
        )
    return layer


def _params(module: nn.Module, trainable: bool | None = None) -> int:
    return sum(
        p.numel() for p in module.parameters() if trainable is None or p.requires_grad == trainable
    )


def _with_lr(optimizer: Any, lr: float, what: str) -> optimizers_mod.Optimizer:
    if isinstance(lr, bool) or not isinstance(lr, int | float) or not math.isfinite(lr) or lr <= 0:
        raise ValueError(f"{what} must be a positive number, got {lr!r}")
    spec = copy.copy(optimizers_mod.get(optimizer))
    spec.options = dict(spec.options)
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


def _check_epochs(n: Any, what: str) -> int:
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise ValueError(f"{what} must be an int >= 0, got {n!r}")
    return n


# --------------------------------------------------------------------------- two-phase


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
    bn_inference: bool = True,
    compile_options: Mapping[str, Any] | None = None,
    **fit_kwargs: Any,
) -> TwoPhaseResult:
    """Feature extraction, then fine-tuning: the seeds' two-phase transfer learning in one call.

    Phase 1 freezes ``base`` and trains the rest of ``model`` (the head) at
    ``phase1_lr``. Phase 2 unfreezes ``unfreeze`` of the base (an int: its last k leaf
    layers, as :func:`frostline.api.select.last`; or any selector / glob, relative to the
    base; None: all of it) and recompiles at ``phase2_lr`` (frostline picks up the
    unfrozen layers without a recompile; the recipe recompiles only to set the new rate,
    as the seeds do) and trains on, epochs numbered after phase 1's. With
    ``bn_inference`` (default) the base's BatchNorm layers stay in inference mode in
    phase 2 while their scale/shift train (the Keras guide's advice; undo with
    ``base.set_batchnorm_mode("auto")``). ``early_stopping=True`` (or a dict of
    :class:`~frostline.api.callbacks.EarlyStopping` options) adds early stopping with
    ``restore_best_weights`` to each phase, on ``val_loss`` when there is validation
    data. ``optimizer`` is a name or spec (its rate is replaced by each phase's);
    ``compile_options`` (``device``, ``precision``, ...) go to both compiles and
    ``fit_kwargs`` (``seed``, ``cache``, ``checkpoint_dir``, ...) to both fits.
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
    model = _as_model(model)
    layer = _resolve_base(model, base)
    if loss is None:
        raise ValueError("two_phase needs a loss, e.g. loss='sparse_categorical_crossentropy'")
    n1 = _check_epochs(phase1_epochs, "phase1_epochs")
    n2 = _check_epochs(phase2_epochs, "phase2_epochs")
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
    freeze_plan = layer.freeze()
    if not any(p.requires_grad for p in model.module.parameters()):
        raise ValueError(
            f"with base {layer.name!r} frozen nothing is left to train: the model needs a head outside the base"
        )
    model.compile(optimizer=spec1, loss=loss, metrics=metrics, loss_weights=loss_weights, **copts)
    if show:
        print(
            f"Phase 1/2: training the head, base {layer.name!r} frozen ({_params(layer.module):,} params), lr {spec1.learning_rate:g}"
        )
    if resumed_phase == 2:  # phase 1 had finished: its History travels in the checkpoint
        h1 = History()
        h1.set_state(phase.phase1_history)
        done = phase.boundary
        if show:
            print(f"Phase 1/2: finished before the checkpoint ({done} epoch(s)); resuming phase 2")
    else:
        phase.enter(1)
        h1 = model.fit(
            x,
            y,
            epochs=n1,
            callbacks=[phase, *user_cbs, *_early_stopping(early_stopping, has_val)],
            resume=resume,
            **fit_args,
        )
        done = len(h1.epoch)

    # phase 2: fine-tuning
    unfreeze_plan = layer.unfreeze(selector)
    if bn_inference and any(batchnorm.is_batchnorm(m) for m in layer.module.modules()):
        layer.set_batchnorm_mode("inference")
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


# --------------------------------------------------------------------------- strategy table

#: (dataset size, similarity) -> (strategy, rationale, default frozen fraction of the base's leaf layers)
STRATEGY_TABLE: dict[tuple[str, str], tuple[str, str, float]] = {
    ("small", "similar"): (
        "Freeze all base layers",
        "Prevents overfitting; pretrained features are already relevant",
        1.0,
    ),
    ("small", "dissimilar"): (
        "Freeze early layers, unfreeze later layers",
        "Early features are general; later features need adaptation",
        2 / 3,
    ),
    ("large", "similar"): (
        "Freeze early layers or none",
        "Enough data to fine-tune without overfitting",
        1 / 3,
    ),
    ("large", "dissimilar"): (
        "Freeze none (or only very early layers)",
        "The model needs substantial adaptation",
        0.0,
    ),
}


@dataclass
class StrategyPlan(Plan):
    """A :class:`~frostline.api.select.Plan` for :func:`apply_strategy`, with the table's reasoning."""

    scenario: str = ""
    strategy: str = ""
    rationale: str = ""
    fraction: float = 0.0
    frozen: list[str] = field(default_factory=list)
    trainable: list[str] = field(default_factory=list)
    frozen_params: int = 0
    trainable_params: int = 0

    def __str__(self) -> str:
        def span(paths: list[str]) -> str:
            if not paths:
                return "none"
            return paths[0] if len(paths) == 1 else f"{paths[0]} .. {paths[-1]}"

        n = len(self.frozen) + len(self.trainable)
        head = [
            f"{self.scenario}: {self.strategy}",
            f'  rationale: "{self.rationale}"',
            f"  {'[dry run] ' if not self.applied else ''}frozen: {len(self.frozen)} of {n} leaf layers "
            f"({span(self.frozen)}; {self.frozen_params:,} params), trainable: {len(self.trainable)} "
            f"({span(self.trainable)}; {self.trainable_params:,} params)",
        ]
        return "\n".join(head + ["  " + line for line in Plan.__str__(self).splitlines()])

    def __repr__(self) -> str:
        return f"<StrategyPlan {self.selector}: {len(self.frozen)} frozen, {len(self.trainable)} trainable>"


def apply_strategy(
    base: Layer | nn.Module,
    dataset_size: str,
    similarity: str,
    *,
    fraction: float | None = None,
    dry_run: bool = False,
) -> StrategyPlan:
    """Freeze ``base`` by the seeds' table (target data size x similarity to the source task).

    ===========================  ===========================================  ==========
    scenario                     strategy                                     frozen
    ===========================  ===========================================  ==========
    small, similar               freeze all base layers                       all
    small, dissimilar            freeze early layers, unfreeze later layers   first 2/3
    large, similar               freeze early layers or none                  first 1/3
    large, dissimilar            freeze none (or only very early layers)      none
    ===========================  ===========================================  ==========

    ``fraction`` overrides the share of the base's leaf layers frozen from the bottom
    (not for small+similar, which freezes everything); small+dissimilar always keeps
    at least one layer frozen and one trainable. The base ends exactly as the row says
    (the rest trainable). ``str(plan)`` says what was done and why.

    >>> from torch import nn
    >>> net = nn.Sequential(*[nn.Linear(4, 4) for _ in range(6)])
    >>> plan = apply_strategy(net, "small", "dissimilar")
    >>> plan.frozen, plan.trainable
    (['0', '1', '2', '3'], ['4', '5'])
    >>> print(str(plan).splitlines()[1])
      rationale: "Early features are general; later features need adaptation"
    """
    size = str(dataset_size).lower()
    sim = str(similarity).lower()
    if size not in ("small", "large"):
        raise ValueError(f"dataset_size must be 'small' or 'large', got {dataset_size!r}")
    if sim not in ("similar", "dissimilar"):
        raise ValueError(f"similarity must be 'similar' or 'dissimilar', got {similarity!r}")
    strategy, rationale, default = STRATEGY_TABLE[(size, sim)]
    if fraction is not None:
        if (
            isinstance(fraction, bool)
            or not isinstance(fraction, int | float)
            or not 0.0 <= fraction <= 1.0
        ):
            raise ValueError(
                f"fraction (share of leaf layers frozen from the bottom) must be in [0, 1], got {fraction!r}"
            )
        if (size, sim) == ("small", "similar") and fraction != 1.0:
            raise ValueError(
                "small+similar freezes all base layers; fraction does not apply (use small+dissimilar to keep the top trainable)"
            )
    frac = float(default if fraction is None else fraction)
    layer = (
        base
        if isinstance(base, Layer)
        else Layer(base, name="base")
        if isinstance(base, nn.Module)
        else None
    )
    if layer is None:
        raise TypeError(
            f"base must be a frostline Layer/Model or a torch.nn.Module, got {type(base).__name__}"
        )
    leaves = select.leaves_of(layer.module)
    n = len(leaves)
    if n == 0:
        raise select.SelectionError(f"{layer.name!r} has no layer with weights: nothing to freeze")
    k = int(math.floor(frac * n + 0.5))
    if (size, sim) == ("small", "dissimilar") and n >= 2:
        k = min(max(k, 1), n - 1)
    plan = StrategyPlan(
        action="strategy",
        selector=f"{size}+{sim}",
        matched=[p for p, _ in leaves],
        scenario=f"{size} target dataset, {sim} tasks",
        strategy=strategy,
        rationale=rationale,
        fraction=frac,
        frozen=[p for p, _ in leaves[:k]],
        trainable=[p for p, _ in leaves[k:]],
    )
    for i, entry in enumerate(leaves):
        target = "frozen" if i < k else "trainable"
        state = leaf_state(entry)
        n_params = sum(p.numel() for p in entry.params())
        if target == "frozen":
            plan.frozen_params += n_params
        else:
            plan.trainable_params += n_params
        if state not in (target, "buffer"):
            numel = sum(t.numel() for t in entry.tensors())
            plan.changes.append(Change(entry.path, entry.class_name, numel, state, target))
    if not dry_run:
        if k < n:
            select.apply(layer, select.between(k, None), True)
        if k > 0:
            select.apply(layer, select.between(None, k), False)
        plan.applied = True
    return plan


# --------------------------------------------------------------------------- multi-task


class MultiTaskModule(nn.Module):
    """``x -> {name: head(trunk(x))}``: a shared trunk and one head per task."""

    def __init__(self, trunk: nn.Module, heads: Mapping[str, nn.Module]) -> None:
        super().__init__()
        self.trunk = trunk
        self.heads = nn.ModuleDict(dict(heads))

    def forward(self, x: Any) -> dict[str, torch.Tensor]:
        z = self.trunk(x)
        return {name: head(z) for name, head in self.heads.items()}


@register_stages(MultiTaskModule)
def _multitask_stages(m: MultiTaskModule) -> list[Stage]:
    """Trunk stages, then one stage for all heads: a frozen trunk is a cacheable prefix."""

    def heads(z: torch.Tensor) -> dict[str, torch.Tensor]:
        return {name: head(z) for name, head in m.heads.items()}

    return [Stage("trunk", m.trunk, m.trunk), Stage("heads", m.heads, heads)]


def multitask_model(
    trunk: nn.Module | Layer,
    heads: Mapping[str, nn.Module | Layer],
    *,
    name: str = "multitask",
    freeze_trunk: bool = False,
) -> Model:
    """A Model with a shared ``trunk`` and one head per task; it returns ``{task: output}``.

    Compile with one loss per head; logs get Keras names (``<task>_loss``,
    ``<task>_accuracy``). ``model.get_layer("trunk")`` and ``model.get_layer("heads.<task>")``
    reach the parts (``freeze_trunk=True`` freezes the trunk right away).

    >>> import numpy as np
    >>> from torch import nn
    >>> m = multitask_model(nn.Sequential(nn.Linear(4, 8), nn.ReLU()),
    ...                     {"kind": nn.Linear(8, 3), "size": nn.Linear(8, 1)}, freeze_trunk=True)
    >>> m.compile("adam", loss={"kind": "sparse_categorical_crossentropy", "size": "mse"},
    ...           loss_weights={"kind": 1.0, "size": 0.5}, metrics={"kind": ["accuracy"]})
    >>> x = np.random.rand(32, 4).astype("float32")
    >>> h = m.fit(x, {"kind": np.random.randint(0, 3, 32), "size": np.random.rand(32, 1).astype("float32")}, verbose=0)
    >>> sorted(h.history)
    ['epoch_time', 'kind_accuracy', 'kind_loss', 'loss', 'size_loss']
    """
    if not isinstance(heads, Mapping) or not heads:
        raise ValueError("heads must be a non-empty dict {task name: head module}")
    mods: dict[str, nn.Module] = {}
    for key, head in heads.items():
        if not isinstance(key, str) or not key or "." in key:
            raise ValueError(f"head names must be non-empty strings without dots, got {key!r}")
        mods[key] = head.module if isinstance(head, Layer) else head
        if not isinstance(mods[key], nn.Module):
            raise TypeError(f"head {key!r} must be a torch.nn.Module, got {type(head).__name__}")
    trunk_mod = trunk.module if isinstance(trunk, Layer) else trunk
    if not isinstance(trunk_mod, nn.Module):
        raise TypeError(
            f"trunk must be a torch.nn.Module or a frostline Layer, got {type(trunk).__name__}"
        )
    model = Model(MultiTaskModule(trunk_mod, mods), name=name)
    if freeze_trunk:
        model.get_layer("trunk").trainable = False
    return model


# --------------------------------------------------------------------------- verification


@dataclass
class FrozenCheck:
    """What :func:`verify_frozen` yields: the fingerprint, and the report once the block ends."""

    fingerprint: Fingerprint
    report: Report | None = None


@contextlib.contextmanager
def verify_frozen(model: Layer | nn.Module, *, raise_error: bool = True) -> Iterator[FrozenCheck]:
    """Check that the weights frozen on entry are bitwise unchanged on exit (any training code).

    Weights trainable on exit are exempt (they may have been unfrozen on purpose).
    Raises :class:`~frostline.engine.verify.FrozenWeightsChanged` naming each weight that moved.

    >>> import torch
    >>> from torch import nn
    >>> net = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 1))
    >>> _ = net[0].requires_grad_(False)
    >>> with verify_frozen(net) as check:
    ...     with torch.no_grad():
    ...         _ = net[1].weight.add_(1.0)  # trainable: fine
    >>> check.report.ok
    True
    >>> with verify_frozen(net):
    ...     with torch.no_grad():
    ...         _ = net[0].weight.add_(1.0)
    Traceback (most recent call last):
    ...
    frostline.engine.verify.FrozenWeightsChanged: 1 frozen weight(s) changed: 0.weight
    """
    check = FrozenCheck(fingerprint(model))
    yield check
    module = model.module if isinstance(model, Layer) else model
    exempt = {id(p) for p in module.parameters() if p.requires_grad}
    check.report = check.fingerprint.check(module, exempt=exempt)
    if raise_error and not check.report.ok:
        raise FrozenWeightsChanged(str(check.report))


class VerifyFrozen(Callback):
    """Check frozen weights bitwise after every epoch (or batch) of a fit, not only at its end.

    Names the weights that moved and when; weights unfrozen meanwhile are exempt, weights
    frozen meanwhile are covered from then on. ``raise_error=False`` only records
    ``self.reports`` (one per check).

    >>> import numpy as np, torch, frostline as fl
    >>> from torch import nn
    >>> model = fl.wrap(nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2)))
    >>> model.layers[0].trainable = False
    >>> class Tamper(fl.Callback):
    ...     def on_epoch_end(self, epoch, logs=None):
    ...         if epoch == 1:
    ...             with torch.no_grad():
    ...                 self.model.module[0].bias.add_(1.0)
    >>> model.compile("adam", loss="sparse_categorical_crossentropy")
    >>> model.fit(np.random.rand(8, 4).astype("float32"), np.random.randint(0, 2, 8), epochs=3, verbose=0,
    ...           callbacks=[Tamper(), VerifyFrozen()])
    Traceback (most recent call last):
    ...
    frostline.engine.verify.FrozenWeightsChanged: 1 frozen weight(s) changed: 0.bias (found after epoch 2)
    """

    def __init__(self, every: str = "epoch", raise_error: bool = True) -> None:
        if every not in ("epoch", "batch"):
            raise ValueError(f"every must be 'epoch' or 'batch', got {every!r}")
        self.every = every
        self.raise_error = raise_error
        self.reports: list[dict[str, Any]] = []
        self._fp: Fingerprint | None = None
        self._seen: set[int] = set()
        self._epoch = 0

    def _trainable_ids(self) -> set[int]:
        return {id(p) for p in self.model.module.parameters() if p.requires_grad}

    def on_train_begin(self, logs: dict | None = None) -> None:
        self._fp = fingerprint(self.model)
        self._seen = self._trainable_ids()
        self._epoch = 0

    def on_epoch_begin(self, epoch: int, logs: dict | None = None) -> None:
        self._epoch = epoch
        self._seen |= self._trainable_ids()

    def on_train_batch_begin(self, batch: int, logs: dict | None = None) -> None:
        if self.every == "batch":
            self._seen |= self._trainable_ids()

    def _check(self, where: str) -> None:
        if self._fp is None:
            return
        report = self._fp.check(self.model, exempt=self._seen | self._trainable_ids())
        self.reports.append(
            {
                "where": where,
                "ok": report.ok,
                "checked": report.checked,
                "moved": list(report.moved),
            }
        )
        self._fp = fingerprint(self.model)  # weights frozen meanwhile are covered from now on
        self._seen = self._trainable_ids()
        if self.raise_error and not report.ok:
            raise FrozenWeightsChanged(f"{report} (found after {where})")

    def on_train_batch_end(self, batch: int, logs: dict | None = None) -> None:
        if self.every == "batch":
            self._check(f"batch {batch + 1} of epoch {self._epoch + 1}")

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        if self.every == "epoch":
            self._check(f"epoch {epoch + 1}")

    def get_state(self) -> dict:
        return {"reports": [dict(r) for r in self.reports]}

    def set_state(self, state: dict) -> None:
        self.reports = [dict(r) for r in state.get("reports", [])]


# --------------------------------------------------------------------------- forgetting


@dataclass
class ForgettingRow:
    """One fine-tuning strategy's effect on the source task."""

    name: str
    source_after: float
    change: float
    weights_changed: int
    weights_total: int
    result: Any = None


@dataclass
class ForgettingReport:
    """Source-task score before fine-tuning and after each strategy (``report["frozen"].source_after``)."""

    metric: str
    source_before: float
    rows: dict[str, ForgettingRow]

    def __getitem__(self, name: str) -> ForgettingRow:
        return self.rows[name]

    def __str__(self) -> str:
        w = max([len(n) for n in self.rows] + [8])
        lines = [
            f"source-task {self.metric} before fine-tuning: {self.source_before:.4f}",
            f"{'strategy':<{w}}  {'after':>8}  {'change':>8}  {'source-model weights changed':>30}  result",
        ]
        for r in self.rows.values():
            pct = 100.0 * r.weights_changed / r.weights_total if r.weights_total else 0.0
            res = (
                ""
                if r.result is None
                else (f"{r.result:.4f}" if isinstance(r.result, float) else str(r.result))
            )
            changed = f"{r.weights_changed:,} ({pct:.0f}%)"
            lines.append(
                f"{r.name:<{w}}  {r.source_after:>8.4f}  {r.change:>+8.4f}  {changed:>30}  {res}"
            )
        return "\n".join(lines)


def _accuracy(y_pred: np.ndarray, y_true: np.ndarray) -> float:
    """Keras' ``"accuracy"`` (:class:`~frostline.api.metrics.Accuracy`) over whole arrays."""
    metric = Accuracy()
    metric.update(torch.as_tensor(np.asarray(y_pred)), torch.as_tensor(np.asarray(y_true)))
    return metric.result()


def _score(module: nn.Module, x: Any, y: Any, metric: Callable, batch_size: int) -> float:
    pred = Model(module).predict(x, batch_size=batch_size)
    if isinstance(y, torch.Tensor):
        y = y.cpu().numpy()
    return float(metric(pred, np.asarray(y)))


def _changed_scalars(before: dict[str, torch.Tensor], module: nn.Module) -> tuple[int, int]:
    now = module.state_dict()
    changed = total = 0
    for k, v in before.items():
        if not v.is_floating_point():
            continue
        total += v.numel()
        w = now.get(k)
        changed += (
            v.numel() if w is None or w.shape != v.shape else int((w.detach().cpu() != v).sum())
        )
    return changed, total


def forgetting_report(
    model: Model | nn.Module,
    source_eval: tuple[Any, Any],
    fine_tune: Callable[[Model], Any] | Mapping[str, Callable[[Model], Any]],
    *,
    metric: str | Callable[[np.ndarray, np.ndarray], float] = "accuracy",
    batch_size: int = 256,
) -> ForgettingReport:
    """Measure catastrophic forgetting: the source-task score before and after fine-tuning.

    ``model`` is trained on the source task and ends in the source head. ``fine_tune``
    (one callable, or ``{name: callable}`` to compare strategies) gets a private deep
    copy of it, trains on the target task however it likes (typically: a new head on
    ``copy.layers[0]``, the trunk frozen or not) and may return anything (its target
    score), shown as ``result``. Afterwards the copy, source head included, is scored
    on ``source_eval = (x, y)``. ``model`` itself is never changed. The report also
    counts the copy's weights (scalars) that fine-tuning changed.

    See docs/recipes.md ("Catastrophic forgetting, shown") for the full experiment.

    >>> import numpy as np, torch, frostline as fl
    >>> from torch import nn
    >>> src = fl.Sequential([nn.Sequential(nn.Linear(4, 8), nn.ReLU()), nn.Linear(8, 2)])
    >>> x, y = np.random.rand(32, 4).astype("float32"), np.random.randint(0, 2, 32)
    >>> def frozen(m):
    ...     m.layers[0].trainable = False
    ...     target = fl.Sequential([m.layers[0], nn.Linear(8, 3)])
    ...     target.compile("adam", loss="sparse_categorical_crossentropy")
    ...     target.fit(x, np.random.randint(0, 3, 32), verbose=0)
    >>> report = forgetting_report(src, (x, y), {"frozen": frozen})
    >>> report["frozen"].change, report["frozen"].weights_changed
    (0.0, 0)
    """
    src = _as_model(model)
    fn: Callable[[np.ndarray, np.ndarray], float]
    if metric == "accuracy":
        fn, metric_name = _accuracy, "accuracy"
    elif callable(metric):
        fn, metric_name = metric, getattr(metric, "__name__", "metric")
    else:
        raise ValueError(
            f"metric must be 'accuracy' or a callable(y_pred, y_true) -> float, got {metric!r}"
        )
    if not isinstance(source_eval, tuple | list) or len(source_eval) != 2:
        raise ValueError("source_eval must be (x, y) of the source task")
    strategies = (
        dict(fine_tune)
        if isinstance(fine_tune, Mapping)
        else {getattr(fine_tune, "__name__", "fine_tune"): fine_tune}
    )
    if not strategies or not all(callable(f) for f in strategies.values()):
        raise TypeError("fine_tune must be a callable(model) or a dict {name: callable(model)}")
    xs, ys = source_eval
    reference = {k: v.detach().cpu().clone() for k, v in src.module.state_dict().items()}
    before = _score(copy.deepcopy(src.module), xs, ys, fn, batch_size)
    rows = {}
    for name, strategy in strategies.items():
        module = copy.deepcopy(src.module)
        result = strategy(Model(module, name=src.name))
        after = _score(module, xs, ys, fn, batch_size)
        changed, total = _changed_scalars(reference, module)
        rows[name] = ForgettingRow(name, after, after - before, changed, total, result)
    return ForgettingReport(metric_name, before, rows)
