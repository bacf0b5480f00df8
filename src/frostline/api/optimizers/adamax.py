"""Keras 3's Adamax (``keras/src/optimizers/adamax.py``)."""

from __future__ import annotations

from typing import Any

import torch

from frostline.api.optimizers.base import KerasOptimizer, Rate, check_number, f32

__all__ = ["Adamax"]


class Adamax(KerasOptimizer):
    """Keras Adamax: ``u = max(b2 * u, |g|)``; ``w -= lr * m / ((1 - b1^t) * (u + epsilon))``.

    >>> w = torch.nn.Parameter(torch.zeros(1)); opt = Adamax(0.1).build([w])
    >>> w.grad = torch.ones(1); opt.step(); round(w.item(), 6)
    -0.1
    """

    def __init__(
        self,
        learning_rate: Rate = 0.001,
        beta_1: float = 0.9,
        beta_2: float = 0.999,
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
        self.beta_1 = check_number(beta_1, "beta_1", high=1.0)
        self.beta_2 = check_number(beta_2, "beta_2", high=1.0)
        self.epsilon = check_number(epsilon, "epsilon")

    def variables_per_weight(self) -> dict[str, float]:
        return {"momentum": 0.0, "norm": 0.0}

    def update_step(self, params, grads, slots, lr, step, group: dict[str, Any]) -> None:
        b1, b2 = self.beta_1, self.beta_2
        m, u = slots["momentum"], slots["norm"]
        torch._foreach_lerp_(m, grads, 1 - b1)
        torch._foreach_mul_(u, b2)
        torch._foreach_maximum_(u, torch._foreach_abs(grads))
        denom = torch._foreach_add(u, self.epsilon)
        torch._foreach_addcdiv_(params, m, denom, value=-lr / (1 - f32(b1) ** step))
