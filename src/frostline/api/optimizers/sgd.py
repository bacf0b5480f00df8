"""Keras 3's SGD (``keras/src/optimizers/sgd.py``)."""

from __future__ import annotations

from typing import Any

import torch

from frostline.api.optimizers.base import KerasOptimizer, Rate, check_number, f32

__all__ = ["SGD"]


class SGD(KerasOptimizer):
    """Keras SGD: ``m = momentum * m - lr * g``; ``w += m`` (Nesterov: ``w += momentum * m - lr * g``).

    ``SGD(learning_rate=0.01, momentum=0.0, nesterov=False, weight_decay=0.0, ...)`` and
    Keras's base options (see :class:`~frostline.api.optimizers.base.KerasOptimizer`).

    >>> w = torch.nn.Parameter(torch.zeros(1)); opt = SGD(0.1, momentum=0.9).build([w])
    >>> for _ in range(2):
    ...     w.grad = torch.ones(1); opt.step()
    >>> round(w.item(), 6)
    -0.29
    """

    def __init__(
        self,
        learning_rate: Rate = 0.01,
        momentum: float = 0.0,
        nesterov: bool = False,
        weight_decay: float | None = 0.0,
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
        self.momentum = check_number(momentum, "momentum", high=1.0)
        if nesterov and not self.momentum > 0:
            raise ValueError(f"nesterov=True needs momentum > 0, got momentum={momentum!r}")
        self.nesterov = bool(nesterov)

    def variables_per_weight(self) -> dict[str, float]:
        return {"momentum": 0.0} if self.momentum else {}

    def update_step(self, params, grads, slots, lr, step, group: dict[str, Any]) -> None:
        momentum = f32(self.momentum)  # Keras casts it to the variable dtype
        if not momentum:
            torch._foreach_add_(params, grads, alpha=-lr)
            return
        m = slots["momentum"]
        torch._foreach_mul_(m, momentum)
        torch._foreach_add_(m, grads, alpha=-lr)
        if self.nesterov:
            upd = torch._foreach_mul(m, momentum)
            torch._foreach_add_(upd, grads, alpha=-lr)
            torch._foreach_add_(params, upd)
        else:
            torch._foreach_add_(params, m)
