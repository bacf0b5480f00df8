"""Keras 3's Adagrad (``keras/src/optimizers/adagrad.py``)."""

from __future__ import annotations

from typing import Any

import torch

from frostline.api.optimizers.base import KerasOptimizer, Rate, check_number

__all__ = ["Adagrad"]


class Adagrad(KerasOptimizer):
    """Keras Adagrad: ``acc += g^2``; ``w -= lr * g / sqrt(acc + epsilon)``; ``acc`` starts at 0.1.

    >>> w = torch.nn.Parameter(torch.zeros(1))
    >>> opt = Adagrad(0.1, initial_accumulator_value=0.0).build([w])
    >>> w.grad = torch.ones(1); opt.step(); round(w.item(), 6)
    -0.1
    """

    def __init__(
        self,
        learning_rate: Rate = 0.001,
        initial_accumulator_value: float = 0.1,
        epsilon: float = 1e-7,
        weight_decay: float | None = None,
        clipnorm: float | None = None,
        clipvalue: float | None = None,
        global_clipnorm: float | None = None,
        use_ema: bool = False,
        ema_momentum: float = 0.99,
        ema_overwrite_frequency: int | None = None,
        loss_scale_factor: float | None = None,
        gradient_accumulation_steps: int | None = None,
        name: str | None = None,
    ) -> None:
        super().__init__(
            learning_rate,
            weight_decay=weight_decay,
            clipnorm=clipnorm,
            clipvalue=clipvalue,
            global_clipnorm=global_clipnorm,
            use_ema=use_ema,
            ema_momentum=ema_momentum,
            ema_overwrite_frequency=ema_overwrite_frequency,
            loss_scale_factor=loss_scale_factor,
            gradient_accumulation_steps=gradient_accumulation_steps,
            name=name,
        )
        self.initial_accumulator_value = check_number(
            initial_accumulator_value, "initial_accumulator_value"
        )
        self.epsilon = check_number(epsilon, "epsilon")

    def variables_per_weight(self) -> dict[str, float]:
        return {"accumulator": self.initial_accumulator_value}

    def update_step(self, params, grads, slots, lr, step, group: dict[str, Any]) -> None:
        acc = slots["accumulator"]
        torch._foreach_addcmul_(acc, grads, grads)
        denom = torch._foreach_add(acc, self.epsilon)
        torch._foreach_sqrt_(denom)
        torch._foreach_addcdiv_(params, grads, denom, value=-lr)
