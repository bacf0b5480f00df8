"""``fl.recipes``: the seeds' workflows composed from the model API (two-phase training,
the strategy table, distillation, multi-task models, forgetting reports, verification).

>>> import frostline as fl
>>> callable(fl.recipes.two_phase)
True
"""

from frostline.workflows.recipes import (
    STRATEGY_TABLE,
    DistillationLoss,
    ForgettingReport,
    ForgettingRow,
    FrozenCheck,
    MultiTaskModule,
    RecipePhase,
    StrategyPlan,
    TwoPhaseResult,
    VerifyFrozen,
    apply_strategy,
    distill,
    forgetting_report,
    multitask_model,
    two_phase,
    verify_frozen,
)

__all__ = [
    "apply_strategy",
    "distill",
    "DistillationLoss",
    "forgetting_report",
    "ForgettingReport",
    "ForgettingRow",
    "FrozenCheck",
    "multitask_model",
    "MultiTaskModule",
    "RecipePhase",
    "STRATEGY_TABLE",
    "StrategyPlan",
    "two_phase",
    "TwoPhaseResult",
    "verify_frozen",
    "VerifyFrozen",
]
