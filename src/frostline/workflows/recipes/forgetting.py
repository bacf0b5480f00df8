"""Catastrophic forgetting measured: source-task accuracy before and after fine-tuning, per strategy."""

from __future__ import annotations

import copy
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from frostline.api.metrics import Accuracy
from frostline.api.model import Model
from frostline.workflows.recipes.common import as_model

__all__ = ["ForgettingReport", "ForgettingRow", "forgetting_report"]


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
    src = as_model(model)
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
