"""The freezing-strategy table (small/large data, similar/dissimilar task) applied to a base, with its rationale."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from torch import nn

from frostline.api import select
from frostline.api.layer import Layer
from frostline.api.select import Change, Plan
from frostline.core.leaves import leaf_state

__all__ = ["STRATEGY_TABLE", "StrategyPlan", "apply_strategy"]


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
