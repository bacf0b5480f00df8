"""Metrics by Keras name: sample-weighted running means over an epoch.

A torchmetrics ``Metric`` (anything with ``update``/``compute``/``reset``) can be
passed too.
"""

from __future__ import annotations

from collections.abc import Callable

import torch


class Metric:
    """Running mean of a per-sample value. Subclasses define :meth:`values`.

    ``direction`` says which way is better (``"up"``, ``"down"``, or None when unknown),
    as Keras metrics' ``_direction``: ``mode="auto"`` monitor callbacks read it.
    """

    name = "metric"
    direction: str | None = None

    def __init__(self, name: str | None = None) -> None:
        if name:
            self.name = name
        self.reset()

    def reset(self) -> None:
        self._total = 0.0
        self._count: float = 0

    def values(self, y_pred: torch.Tensor, y_true: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    @torch.no_grad()
    def update(
        self, y_pred: torch.Tensor, y_true: torch.Tensor, sample_weight: torch.Tensor | None = None
    ) -> None:
        """Add a batch; with ``sample_weight`` each value counts its weight (Keras's ``Mean``).

        >>> m = MeanAbsoluteError(); m.update(torch.tensor([[1.0], [3.0]]), torch.zeros(2, 1),
        ...                                     torch.tensor([3.0, 1.0])); m.result()
        1.5
        """
        v = self.values(y_pred.detach(), y_true)
        if sample_weight is None:
            self._total += float(v.double().sum())
            self._count += v.numel()
            return
        sw = sample_weight.to(device=v.device, dtype=torch.float64)
        while sw.dim() > v.dim() and sw.shape[-1] == 1:
            sw = sw.squeeze(-1)
        sw = sw.reshape(*sw.shape, *([1] * (v.dim() - sw.dim()))).expand(v.shape)
        self._total += float((v.double() * sw).sum())
        self._count += float(sw.sum())

    def result(self) -> float:
        return self._total / self._count if self._count else float("nan")

    def merge_state(self) -> tuple[float, float]:
        return self._total, self._count

    def set_state(self, total: float, count: float) -> None:
        self._total, self._count = total, count


def _labels(y_true: torch.Tensor) -> torch.Tensor:
    y = y_true.reshape(y_true.shape[0], -1)
    return y[:, 0].long() if y.shape[1] == 1 else y.argmax(dim=1)


class Accuracy(Metric):
    """Keras' ``"accuracy"``: sparse, categorical or binary, chosen from the shapes."""

    name = "accuracy"
    direction = "up"

    def __init__(self, name: str | None = None, *, from_logits: bool | None = None) -> None:
        super().__init__(name)
        self.from_logits = from_logits

    def values(self, y_pred, y_true):
        if y_pred.dim() >= 2 and y_pred.shape[1] > 1:
            return (y_pred.argmax(dim=1) == _labels(y_true)).float()
        threshold = 0.0 if self.from_logits else 0.5
        pred = (y_pred.reshape(-1) > threshold).float()
        return (pred == y_true.reshape(-1).to(pred.dtype)).float()


class TopKAccuracy(Metric):
    name = "top_k_categorical_accuracy"
    direction = "up"

    def __init__(self, k: int = 5, name: str | None = None) -> None:
        self.k = k
        super().__init__(name)

    def values(self, y_pred, y_true):
        k = min(self.k, y_pred.shape[1])
        top = y_pred.topk(k, dim=1).indices
        return (top == _labels(y_true)[:, None]).any(dim=1).float()


class MeanAbsoluteError(Metric):
    name = "mae"
    direction = "down"

    def values(self, y_pred, y_true):
        return (
            (
                y_pred.reshape(y_pred.shape[0], -1)
                - y_true.reshape(y_pred.shape[0], -1).to(y_pred.dtype)
            )
            .abs()
            .mean(dim=1)
        )


class MeanSquaredError(Metric):
    name = "mse"
    direction = "down"

    def values(self, y_pred, y_true):
        return (
            (
                y_pred.reshape(y_pred.shape[0], -1)
                - y_true.reshape(y_pred.shape[0], -1).to(y_pred.dtype)
            )
            .pow(2)
            .mean(dim=1)
        )


class TorchMetric(Metric):
    """Adapter for a torchmetrics ``Metric`` (``update(preds, target)``/``compute()``/``reset()``)."""

    def __init__(self, metric, name: str | None = None) -> None:
        self.metric = metric
        self.name = name or type(metric).__name__.lower()
        better = getattr(metric, "higher_is_better", None)  # torchmetrics says
        self.direction = None if better is None else ("up" if better else "down")
        self.reset()

    def reset(self) -> None:
        self.metric.reset()

    @torch.no_grad()
    def update(self, y_pred, y_true, sample_weight=None):
        if sample_weight is not None:
            raise TypeError(
                f"the torchmetrics metric {self.name!r} takes no sample weights: list it in "
                "metrics=, not weighted_metrics="
            )
        self.metric.update(y_pred.detach(), y_true)

    def result(self) -> float:
        return float(self.metric.compute())


_STRINGS: dict[str, Callable[[], Metric]] = {
    "accuracy": Accuracy,
    "acc": Accuracy,
    "sparse_categorical_accuracy": lambda: Accuracy("sparse_categorical_accuracy"),
    "categorical_accuracy": lambda: Accuracy("categorical_accuracy"),
    "binary_accuracy": lambda: Accuracy("binary_accuracy"),
    "top_k_categorical_accuracy": TopKAccuracy,
    "sparse_top_k_categorical_accuracy": lambda: TopKAccuracy(
        name="sparse_top_k_categorical_accuracy"
    ),
    "mae": MeanAbsoluteError,
    "mean_absolute_error": MeanAbsoluteError,
    "mse": MeanSquaredError,
    "mean_squared_error": MeanSquaredError,
}


def get(identifier) -> Metric:
    """Resolve one entry of ``compile(metrics=[...])``.

    >>> get("accuracy").name
    'accuracy'
    """
    if isinstance(identifier, Metric):
        return identifier
    if isinstance(identifier, str):
        factory = _STRINGS.get(identifier.lower())
        if factory is None:
            raise ValueError(
                f"unknown metric {identifier!r}; expected one of {sorted(_STRINGS)} or a Metric object"
            )
        return factory()
    if all(hasattr(identifier, a) for a in ("update", "compute", "reset")):
        return TorchMetric(identifier)
    if callable(identifier):
        fn = identifier
        name = getattr(fn, "__name__", "metric")

        class _Fn(Metric):
            def values(self, y_pred, y_true):
                out = fn(y_pred, y_true)
                return (
                    out.reshape(-1) if isinstance(out, torch.Tensor) else torch.tensor([float(out)])
                )

        return _Fn(name)
    raise TypeError(
        f"metric must be a name, a frostline Metric, a torchmetrics Metric or a callable, got {identifier!r}"
    )


__all__ = [
    "Accuracy",
    "MeanAbsoluteError",
    "MeanSquaredError",
    "Metric",
    "TopKAccuracy",
    "TorchMetric",
    "get",
]
