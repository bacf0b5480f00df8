"""What ``compile`` asks to minimise and report: losses (one per output) and metrics.

Single output: ``loss="sparse_categorical_crossentropy", metrics=["accuracy"]``.
Several outputs (a model returning a dict or tuple): ``loss={"a": ..., "b": ...}``,
``loss_weights={"a": 1.0, "b": 0.5}``, ``metrics={"a": ["accuracy"]}``; logs get
Keras names (``a_loss``, ``a_accuracy``).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch
from torch import nn

from frostline.api import losses as losses_mod
from frostline.api import metrics as metrics_mod


class Objective:
    def __init__(
        self, loss, metrics=None, loss_weights=None, module: nn.Module | None = None
    ) -> None:
        if loss is None:
            raise ValueError(
                "compile() needs a loss, e.g. loss='sparse_categorical_crossentropy' or a callable loss(y_pred, y_true)"
            )
        self.multi = isinstance(loss, Mapping | list | tuple)
        if isinstance(loss, Mapping):
            self.keys: list = list(loss)
            self.losses = {k: losses_mod.get(v) for k, v in loss.items()}
        elif isinstance(loss, list | tuple):
            self.keys = list(range(len(loss)))
            self.losses = {i: losses_mod.get(v) for i, v in enumerate(loss)}
        else:
            self.keys = [None]
            self.losses = {None: losses_mod.get(loss)}
        self.weights = self._weights(loss_weights)
        if module is not None:
            for fn in self.losses.values():
                fn.configure(module)
        self.metrics = self._metrics(metrics)
        self.reset()

    def _weights(self, lw) -> dict:
        if lw is None:
            return {k: 1.0 for k in self.keys}
        if not self.multi:
            raise ValueError(
                "loss_weights is for models with several outputs (loss given as a dict or list)"
            )
        if isinstance(lw, Mapping):
            unknown = set(lw) - set(self.keys)
            if unknown:
                raise ValueError(
                    f"loss_weights names outputs {sorted(map(str, unknown))} that have no loss; outputs: {self.keys}"
                )
            return {k: float(lw.get(k, 1.0)) for k in self.keys}
        if isinstance(lw, Sequence) and len(lw) == len(self.keys):
            return dict(zip(self.keys, map(float, lw)))
        raise ValueError(
            f"loss_weights must be a dict or a list with one weight per output ({len(self.keys)}), got {lw!r}"
        )

    def _metrics(self, metrics) -> dict:
        out: dict = {k: [] for k in self.keys}
        if metrics is None:
            return out
        if isinstance(metrics, Mapping):
            for k, ms in metrics.items():
                if k not in out:
                    raise ValueError(
                        f"metrics names output {k!r}, which has no loss; outputs: {self.keys}"
                    )
                out[k] = [metrics_mod.get(m) for m in ([ms] if isinstance(ms, str) else ms)]
            return out
        if isinstance(metrics, str):
            metrics = [metrics]
        for k in self.keys:
            out[k] = [metrics_mod.get(m) for m in metrics]
        return out

    # -- helpers -------------------------------------------------------------------
    def _name(self, key, base: str) -> str:
        return base if key is None else f"{key}_{base}"

    def _pick(self, outputs, key, what: str):
        if key is None:
            if isinstance(outputs, Mapping | list | tuple):
                raise ValueError(
                    f"the model returns several {what} ({type(outputs).__name__}); compile with one loss per output, "
                    "e.g. loss={'head_a': 'mse', 'head_b': 'sparse_categorical_crossentropy'}"
                )
            return outputs
        try:
            return outputs[key]
        except (KeyError, IndexError, TypeError):
            avail = (
                list(outputs.keys())
                if isinstance(outputs, Mapping)
                else (
                    f"{len(outputs)} outputs"
                    if isinstance(outputs, list | tuple)
                    else "a single tensor"
                )
            )
            raise ValueError(f"no {what} named {key!r}: the model gives {avail}") from None

    # -- loss ----------------------------------------------------------------------
    def __call__(self, outputs, targets) -> tuple[torch.Tensor, dict[str, float]]:
        total = None
        parts: dict[str, float] = {}
        for k in self.keys:
            pred = self._pick(outputs, k, "outputs")
            true = self._pick(targets, k, "targets") if targets is not None else None
            if true is None:
                raise ValueError("fit needs targets y for the loss (got y=None)")
            value = self.losses[k](
                pred.float() if pred.dtype in (torch.float16, torch.bfloat16) else pred, true
            )
            if self.multi:
                parts[self._name(k, "loss")] = float(value.detach())
            term = value * self.weights[k]
            total = term if total is None else total + term
        assert total is not None
        return total, parts

    # -- metrics -------------------------------------------------------------------
    def reset(self) -> None:
        self._loss_sum = 0.0
        self._parts_sum: dict[str, float] = {}
        self._count = 0
        for ms in self.metrics.values():
            for m in ms:
                m.reset()

    def update(self, outputs, targets, loss: float, parts: dict[str, float], n: int) -> None:
        self._loss_sum += loss * n
        for k, v in parts.items():
            self._parts_sum[k] = self._parts_sum.get(k, 0.0) + v * n
        self._count += n
        for k, ms in self.metrics.items():
            if not ms:
                continue
            pred = self._pick(outputs, k, "outputs")
            true = self._pick(targets, k, "targets")
            for m in ms:
                m.update(pred.float(), true)

    def results(self) -> dict[str, float]:
        n = self._count
        logs = {"loss": self._loss_sum / n if n else math.nan}
        for k, v in self._parts_sum.items():
            logs[k] = v / n
        for k, ms in self.metrics.items():
            for m in ms:
                logs[self._name(k, m.name)] = float(m.result())
        return logs

    def state(self) -> dict[str, tuple[float, int]]:
        """Sums and counts, for averaging across processes."""
        st = {"loss": (self._loss_sum, self._count)}
        for k, v in self._parts_sum.items():
            st[k] = (v, self._count)
        for k, ms in self.metrics.items():
            for m in ms:
                if hasattr(m, "merge_state") and not isinstance(m, metrics_mod.TorchMetric):
                    st[self._name(k, m.name)] = m.merge_state()
        return st
