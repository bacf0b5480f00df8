"""Transfer-learning workflows in one call each (one module per workflow).

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

from frostline.workflows.distill import DistillationLoss, distill
from frostline.workflows.recipes.forgetting import (
    ForgettingReport,
    ForgettingRow,
    forgetting_report,
)
from frostline.workflows.recipes.multitask import MultiTaskModule, multitask_model
from frostline.workflows.recipes.strategy import STRATEGY_TABLE, StrategyPlan, apply_strategy
from frostline.workflows.recipes.two_phase import RecipePhase, TwoPhaseResult, two_phase
from frostline.workflows.recipes.verification import FrozenCheck, VerifyFrozen, verify_frozen

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
