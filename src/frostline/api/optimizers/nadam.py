"""Keras 3's Nadam (``keras/src/optimizers/nadam.py``)."""

from __future__ import annotations

from typing import Any

import torch

from frostline.api.optimizers.base import KerasOptimizer, Rate, check_number, f32

__all__ = ["Nadam"]


class Nadam(KerasOptimizer):
    """Keras Nadam (momentum schedule ``u_t = b1 * (1 - 0.5 * 0.96^t)``, running ``u_product``).

    ``u_product`` is one value per optimizer, multiplied once per update (as Keras's
    ``_backend_update_step`` does), kept in every param group beside ``iterations``.

    >>> w = torch.nn.Parameter(torch.zeros(1)); opt = Nadam(0.1).build([w])
    >>> w.grad = torch.ones(1); opt.step(); round(w.item(), 4)
    -0.1063
    """

    global_variables = {"u_product": 1.0}

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

    def _u(self, step: int) -> float:
        return f32(self.beta_1) * (1.0 - 0.5 * f32(0.96) ** step)

    def variables_per_weight(self) -> dict[str, float]:
        return {"momentum": 0.0, "velocity": 0.0}

    def update_step(self, params, grads, slots, lr, step, group: dict[str, Any]) -> None:
        b1, b2 = f32(self.beta_1), f32(self.beta_2)  # Keras casts them first
        u_t, u_t_1 = self._u(step), self._u(step + 1)
        u_product_t = group["u_product"] * u_t
        u_product_t_1 = u_product_t * u_t_1
        m, v = slots["momentum"], slots["velocity"]
        torch._foreach_lerp_(m, grads, 1 - b1)
        torch._foreach_mul_(v, b2)
        torch._foreach_addcmul_(v, grads, grads, value=1 - b2)
        m_hat = torch._foreach_mul(m, u_t_1 / (1 - u_product_t_1))
        torch._foreach_add_(m_hat, grads, alpha=(1 - u_t) / (1 - u_product_t))
        denom = torch._foreach_div(v, 1 - b2**step)
        torch._foreach_sqrt_(denom)
        torch._foreach_add_(denom, self.epsilon)
        torch._foreach_addcdiv_(params, m_hat, denom, value=-lr)

    def advance(self, group: dict[str, Any], step: int) -> None:
        # once per update, whether or not the group had gradients
        group["u_product"] = group["u_product"] * self._u(step)
