"""Losses by Keras name, on torch's own functional losses.

frostline calls a loss as ``loss(y_pred, y_true)`` (PyTorch order). Keras'
cross-entropies take probabilities by default; PyTorch models usually end in
logits. ``from_logits=None`` (the default for string losses) decides from the model:
outputs of a final ``Softmax``/``Sigmoid`` are probabilities, anything else is logits.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


class LabelError(ValueError):
    """Targets that do not fit the loss (range, shape, dtype)."""


class Loss:
    """Base class: ``__call__(y_pred, y_true) -> scalar tensor``."""

    name = "loss"

    def __init__(self, from_logits: bool | None = None) -> None:
        self.from_logits = from_logits

    def configure(self, model_module: nn.Module) -> None:
        """Decide ``from_logits`` from the model's final layer when left as None."""
        if self.from_logits is None:
            self.from_logits = not ends_in_probabilities(model_module)

    def __call__(self, y_pred: torch.Tensor, y_true: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def per_sample(self, y_pred: torch.Tensor, y_true: torch.Tensor) -> torch.Tensor:
        """The unreduced losses (Keras's: one per sample, reduced over the last axis)."""
        raise NotImplementedError(
            f"{type(self).__name__} defines no per-sample losses, so it cannot weigh samples "
            "(sample_weight / class_weight); define per_sample(y_pred, y_true)"
        )

    def weighted(
        self, y_pred: torch.Tensor, y_true: torch.Tensor, sample_weight: torch.Tensor
    ) -> torch.Tensor:
        """The loss with per-sample weights, reduced as Keras reduces it
        (``"sum_over_batch_size"``: the sum of the weighted losses over their number).

        >>> mse = MeanSquaredError()
        >>> mse.weighted(torch.tensor([[1.0], [2.0]]), torch.zeros(2, 1), torch.tensor([1.0, 0.0]))
        tensor(0.5000)
        """
        return reduce_weighted(self.per_sample(y_pred, y_true), sample_weight)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(from_logits={self.from_logits})"


def reduce_weighted(values: torch.Tensor, sample_weight: torch.Tensor) -> torch.Tensor:
    """``sum(values * sample_weight) / values.numel()``, the weights brought to the values'
    rank first (trailing axes added or size-1 ones dropped, as Keras's
    ``squeeze_or_expand_to_same_rank``).

    >>> reduce_weighted(torch.tensor([[1.0, 3.0], [2.0, 2.0]]), torch.tensor([2.0, 0.0]))
    tensor(2.)
    """
    sw = sample_weight.to(device=values.device, dtype=values.dtype)
    while sw.dim() > values.dim() and sw.shape[-1] == 1:
        sw = sw.squeeze(-1)
    sw = sw.reshape(*sw.shape, *([1] * (values.dim() - sw.dim())))
    try:
        weighted = values * sw
    except RuntimeError:
        raise ValueError(
            f"sample_weight of shape {tuple(sample_weight.shape)} does not fit the per-sample "
            f"losses of shape {tuple(values.shape)}; expected one weight per sample, shape "
            f"({values.shape[0] if values.dim() else 1},)"
        ) from None
    return weighted.sum() / max(values.numel(), 1)


def _last_axis_mean(values: torch.Tensor) -> torch.Tensor:
    return values.mean(dim=-1) if values.dim() >= 2 else values


def ends_in_probabilities(module: nn.Module) -> bool:
    """True when the last module (registration order) is a Softmax or Sigmoid."""
    last = None
    for m in module.modules():
        if not list(m.children()):
            last = m
    return isinstance(last, nn.Softmax | nn.Sigmoid)


def _check_class_targets(y_pred: torch.Tensor, y_true: torch.Tensor, loss: str) -> torch.Tensor:
    if y_pred.dim() < 2:
        raise LabelError(
            f"{loss}: predictions must be (batch, classes), got shape {tuple(y_pred.shape)}"
        )
    if y_true.is_floating_point():
        if not torch.all(y_true == y_true.round()):
            raise LabelError(
                f"{loss}: expected integer class labels, got non-integer values such as {y_true.flatten()[0].item()}"
            )
        y_true = y_true.long()
    y_true = y_true.reshape(y_true.shape[0], *y_true.shape[1:]).long()
    if y_true.dim() == 2 and y_true.shape[1] == 1:
        y_true = y_true[:, 0]
    n = y_pred.shape[1]
    if y_true.numel():
        lo, hi = int(y_true.min()), int(y_true.max())
        if lo < 0 or hi >= n:
            raise LabelError(
                f"{loss}: labels must be in [0, {n - 1}] for a model with {n} outputs, got labels in [{lo}, {hi}]"
            )
    return y_true


class SparseCategoricalCrossentropy(Loss):
    """Integer labels against class scores: ``SparseCategoricalCrossentropy(from_logits=True)``."""

    name = "sparse_categorical_crossentropy"

    def __call__(self, y_pred, y_true):
        y_true = _check_class_targets(y_pred, y_true, self.name)
        if self.from_logits is False:
            return F.nll_loss(torch.log(y_pred.clamp_min(1e-7)), y_true)
        return F.cross_entropy(y_pred, y_true)

    def per_sample(self, y_pred, y_true):
        y_true = _check_class_targets(y_pred, y_true, self.name)
        if self.from_logits is False:
            return F.nll_loss(torch.log(y_pred.clamp_min(1e-7)), y_true, reduction="none")
        return F.cross_entropy(y_pred, y_true, reduction="none")


class CategoricalCrossentropy(Loss):
    """One-hot (or soft) targets against class scores."""

    name = "categorical_crossentropy"

    def __call__(self, y_pred, y_true):
        y_true = self._checked(y_pred, y_true)
        if self.from_logits is False:
            return self.per_sample(y_pred, y_true).mean()
        return F.cross_entropy(y_pred, y_true)

    def _checked(self, y_pred, y_true):
        if y_true.shape != y_pred.shape:
            raise LabelError(
                f"{self.name}: targets must be one-hot with shape {tuple(y_pred.shape)}, got {tuple(y_true.shape)}; for integer labels use 'sparse_categorical_crossentropy'"
            )
        return y_true.to(y_pred.dtype)

    def per_sample(self, y_pred, y_true):
        y_true = self._checked(y_pred, y_true)
        if self.from_logits is False:
            p = y_pred / y_pred.sum(dim=-1, keepdim=True)
            return -(y_true * torch.log(p.clamp_min(1e-7))).sum(dim=-1)
        return F.cross_entropy(y_pred, y_true, reduction="none")


class BinaryCrossentropy(Loss):
    """0/1 targets against one score per output."""

    name = "binary_crossentropy"

    def __call__(self, y_pred, y_true):
        y_true = self._checked(y_pred, y_true)
        if self.from_logits is False:
            return F.binary_cross_entropy(y_pred.clamp(1e-7, 1 - 1e-7), y_true)
        return F.binary_cross_entropy_with_logits(y_pred, y_true)

    def per_sample(self, y_pred, y_true):
        y_true = self._checked(y_pred, y_true)
        if self.from_logits is False:
            values = F.binary_cross_entropy(y_pred.clamp(1e-7, 1 - 1e-7), y_true, reduction="none")
        else:
            values = F.binary_cross_entropy_with_logits(y_pred, y_true, reduction="none")
        return _last_axis_mean(values)

    def _checked(self, y_pred, y_true):
        y_true = (
            y_true.to(y_pred.dtype).reshape(y_pred.shape)
            if y_true.numel() == y_pred.numel()
            else y_true
        )
        if y_true.shape != y_pred.shape:
            raise LabelError(
                f"{self.name}: targets shape {tuple(y_true.shape)} does not match predictions {tuple(y_pred.shape)}"
            )
        if y_true.numel() and (y_true.min() < 0 or y_true.max() > 1):
            raise LabelError(
                f"{self.name}: targets must be in [0, 1], got values in [{y_true.min().item()}, {y_true.max().item()}]"
            )
        return y_true


class _Regression(Loss):
    fn: Callable = staticmethod(F.mse_loss)

    def configure(self, model_module):
        self.from_logits = None

    def __call__(self, y_pred, y_true):
        return type(self).fn(y_pred, self._checked(y_pred, y_true))

    def per_sample(self, y_pred, y_true):
        values = type(self).fn(y_pred, self._checked(y_pred, y_true), reduction="none")
        return _last_axis_mean(values)

    def _checked(self, y_pred, y_true):
        if y_true.numel() != y_pred.numel():
            raise LabelError(
                f"{self.name}: targets shape {tuple(y_true.shape)} does not match predictions {tuple(y_pred.shape)}"
            )
        return y_true.to(y_pred.dtype).reshape(y_pred.shape)


class MeanSquaredError(_Regression):
    name = "mse"
    fn = staticmethod(F.mse_loss)


class MeanAbsoluteError(_Regression):
    name = "mae"
    fn = staticmethod(F.l1_loss)


class Huber(_Regression):
    name = "huber"
    fn = staticmethod(F.huber_loss)


_STRINGS = {
    "sparse_categorical_crossentropy": SparseCategoricalCrossentropy,
    "categorical_crossentropy": CategoricalCrossentropy,
    "binary_crossentropy": BinaryCrossentropy,
    "mse": MeanSquaredError,
    "mean_squared_error": MeanSquaredError,
    "mae": MeanAbsoluteError,
    "mean_absolute_error": MeanAbsoluteError,
    "huber": Huber,
}


class _Callable(Loss):
    def __init__(self, fn: LossFn, name: str) -> None:
        super().__init__(None)
        self.fn = fn
        self.name = name

    def configure(self, model_module):
        pass

    def __call__(self, y_pred, y_true):
        out = self.fn(y_pred, y_true)
        if not isinstance(out, torch.Tensor) or out.dim() != 0:
            shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
            raise ValueError(f"loss {self.name} must return a scalar tensor, got {shape}")
        return out

    def per_sample(self, y_pred, y_true):
        out = self.fn(y_pred, y_true)
        if not isinstance(out, torch.Tensor) or out.dim() == 0 or len(out) != len(y_pred):
            shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
            raise ValueError(
                f"loss {self.name} returned {shape}, so it cannot weigh samples (sample_weight / "
                "class_weight): a weighted loss needs one loss per sample, shape "
                f"({len(y_pred)},); return the unreduced losses when weights are given, or use "
                "a frostline Loss"
            )
        return _last_axis_mean(out)


def get(identifier) -> Loss:
    """Resolve ``compile(loss=...)``: a Keras name, a :class:`Loss`, an ``nn.Module`` or a callable.

    >>> get("mse").name
    'mse'
    """
    if isinstance(identifier, Loss):
        return identifier
    if isinstance(identifier, str):
        cls = _STRINGS.get(identifier.lower())
        if cls is None:
            raise ValueError(
                f"unknown loss {identifier!r}; expected one of {sorted(_STRINGS)} or a callable loss(y_pred, y_true)"
            )
        return cls()
    if callable(identifier):
        name = getattr(identifier, "__name__", type(identifier).__name__)
        return _Callable(identifier, name)
    raise TypeError(
        f"loss must be a name, a frostline Loss or a callable loss(y_pred, y_true), got {type(identifier).__name__}: {identifier!r}"
    )


__all__ = [
    "BinaryCrossentropy",
    "CategoricalCrossentropy",
    "Huber",
    "LabelError",
    "Loss",
    "LossFn",
    "MeanAbsoluteError",
    "MeanSquaredError",
    "SparseCategoricalCrossentropy",
    "ends_in_probabilities",
    "get",
    "reduce_weighted",
]
