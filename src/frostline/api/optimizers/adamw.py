"""Keras 3's AdamW (``keras/src/optimizers/adamw.py``): Adam with decoupled weight decay."""

from __future__ import annotations

from frostline.api.optimizers.adam import Adam
from frostline.api.optimizers.base import Rate

__all__ = ["AdamW"]


class AdamW(Adam):
    """Keras AdamW: Adam with decoupled weight decay, default ``weight_decay=0.004``.

    >>> import torch
    >>> w = torch.nn.Parameter(torch.ones(1)); opt = AdamW(0.1, weight_decay=0.5).build([w])
    >>> w.grad = torch.zeros(1); opt.step(); round(w.item(), 6)
    0.95
    """

    def __init__(
        self,
        learning_rate: Rate = 0.001,
        weight_decay: float = 0.004,
        beta_1: float = 0.9,
        beta_2: float = 0.999,
        epsilon: float = 1e-7,
        amsgrad: bool = False,
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
        if weight_decay is None:
            raise ValueError("AdamW needs a weight_decay number, got None")
        super().__init__(
            learning_rate,
            beta_1=beta_1,
            beta_2=beta_2,
            epsilon=epsilon,
            amsgrad=amsgrad,
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
