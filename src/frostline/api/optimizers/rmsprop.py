"""Keras 3's RMSprop (``keras/src/optimizers/rmsprop.py``)."""

from __future__ import annotations

from typing import Any

import torch

from frostline.api.optimizers.base import KerasOptimizer, Rate, check_number

__all__ = ["RMSprop"]


class RMSprop(KerasOptimizer):
    """Keras RMSprop: ``v = rho * v + (1 - rho) * g^2``; ``w -= lr * g / sqrt(v + epsilon)``.

    ``centered`` subtracts the squared mean gradient inside the root; ``momentum``
    accumulates the increments. Epsilon sits inside the square root (torch: outside).

    >>> w = torch.nn.Parameter(torch.zeros(1)); opt = RMSprop(0.01).build([w])
    >>> w.grad = torch.ones(1); opt.step(); round(w.item(), 5)
    -0.03162
    >>> RMSprop(momentum=0.5, centered=True).slots
    3
    """

    def __init__(
        self,
        learning_rate: Rate = 0.001,
        rho: float = 0.9,
        momentum: float = 0.0,
        epsilon: float = 1e-7,
        centered: bool = False,
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
        self.rho = check_number(rho, "rho", high=1.0)
        self.momentum = check_number(momentum, "momentum", high=1.0)
        self.epsilon = check_number(epsilon, "epsilon")
        self.centered = bool(centered)

    def variables_per_weight(self) -> dict[str, float]:
        out = {"velocity": 0.0}
        if self.momentum > 0:
            out["momentum"] = 0.0
        if self.centered:
            out["average_gradient"] = 0.0
        return out

    def update_step(self, params, grads, slots, lr, step, group: dict[str, Any]) -> None:
        rho = self.rho
        v = slots["velocity"]
        torch._foreach_mul_(v, rho)
        torch._foreach_addcmul_(v, grads, grads, value=1 - rho)
        if self.centered:
            a = slots["average_gradient"]
            torch._foreach_mul_(a, rho)
            torch._foreach_add_(a, grads, alpha=1 - rho)
            denom = torch._foreach_addcmul(v, a, a, value=-1)
            torch._foreach_add_(denom, self.epsilon)
        else:
            denom = torch._foreach_add(v, self.epsilon)
        torch._foreach_sqrt_(denom)
        if self.momentum > 0:
            mom = slots["momentum"]
            torch._foreach_mul_(mom, self.momentum)
            torch._foreach_addcdiv_(mom, grads, denom, value=lr)
            torch._foreach_sub_(params, mom)
        else:
            torch._foreach_addcdiv_(params, grads, denom, value=-lr)
