"""Keras 3's Adam (``keras/src/optimizers/adam.py``)."""

from __future__ import annotations

import math
from typing import Any

import torch

from frostline.api.optimizers.base import KerasOptimizer, Rate, check_number, f32

__all__ = ["Adam"]


class Adam(KerasOptimizer):
    """Keras Adam: ``w -= lr * sqrt(1 - b2^t) / (1 - b1^t) * m / (sqrt(v) + epsilon)``.

    ``epsilon`` is added to ``sqrt(v)`` before the bias-correction factor is applied
    (torch adds it after), default 1e-7 (torch: 1e-8).

    >>> w = torch.nn.Parameter(torch.zeros(1)); opt = Adam(0.1, amsgrad=True).build([w])
    >>> w.grad = torch.ones(1); opt.step(); round(w.item(), 4)
    -0.1
    >>> Adam(amsgrad=True).slots
    3
    """

    def __init__(
        self,
        learning_rate: Rate = 0.001,
        beta_1: float = 0.9,
        beta_2: float = 0.999,
        epsilon: float = 1e-7,
        amsgrad: bool = False,
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
        self.beta_1 = check_number(beta_1, "beta_1", high=1.0)
        self.beta_2 = check_number(beta_2, "beta_2", high=1.0)
        self.epsilon = check_number(epsilon, "epsilon")
        self.amsgrad = bool(amsgrad)

    def variables_per_weight(self) -> dict[str, float]:
        extra = {"velocity_hat": 0.0} if self.amsgrad else {}
        return {"momentum": 0.0, "velocity": 0.0, **extra}

    def update_step(self, params, grads, slots, lr, step, group: dict[str, Any]) -> None:
        b1, b2 = self.beta_1, self.beta_2
        alpha = lr * math.sqrt(1 - f32(b2) ** step) / (1 - f32(b1) ** step)
        m, v = slots["momentum"], slots["velocity"]
        torch._foreach_lerp_(m, grads, 1 - b1)
        torch._foreach_mul_(v, b2)
        torch._foreach_addcmul_(v, grads, grads, value=1 - b2)
        if self.amsgrad:
            v_hat = slots["velocity_hat"]
            torch._foreach_maximum_(v_hat, v)
            v = v_hat
        denom = torch._foreach_sqrt(v)
        torch._foreach_add_(denom, self.epsilon)
        torch._foreach_addcdiv_(params, m, denom, value=-alpha)
