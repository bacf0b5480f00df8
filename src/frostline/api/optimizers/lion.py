"""Keras 3's Lion (``keras/src/optimizers/lion.py``)."""

from __future__ import annotations

from typing import Any

import torch

from frostline.api.optimizers.base import KerasOptimizer, Rate, check_number, f32

__all__ = ["Lion"]


class Lion(KerasOptimizer):
    """Keras Lion: ``w -= lr * sign(b1 * m + (1 - b1) * g)``; ``m = b2 * m + (1 - b2) * g``.

    >>> w = torch.nn.Parameter(torch.zeros(2)); opt = Lion(0.1).build([w])
    >>> w.grad = torch.tensor([3.0, -0.5]); opt.step(); w.detach().tolist()
    [-0.10000000149011612, 0.10000000149011612]
    """

    def __init__(
        self,
        learning_rate: Rate = 0.001,
        beta_1: float = 0.9,
        beta_2: float = 0.99,
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
        if self.beta_1 <= 0:
            raise ValueError(f"beta_1 must be in (0, 1] for Lion, got {beta_1!r}")

    def variables_per_weight(self) -> dict[str, float]:
        return {"momentum": 0.0}

    def update_step(self, params, grads, slots, lr, step, group: dict[str, Any]) -> None:
        b1, b2 = f32(self.beta_1), f32(self.beta_2)  # cast, as in Keras
        m = slots["momentum"]
        direction = torch._foreach_mul(m, b1)
        torch._foreach_add_(direction, grads, alpha=1 - b1)
        torch._foreach_sign_(direction)
        torch._foreach_add_(params, direction, alpha=-lr)
        torch._foreach_mul_(m, b2)
        torch._foreach_add_(m, grads, alpha=1 - b2)
