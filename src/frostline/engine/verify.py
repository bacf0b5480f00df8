"""Verification that frozen weights did not move.

``fit`` takes a fingerprint of every frozen weight when it starts and checks it when
it ends (an error by default, naming each weight that moved). Weights that became
trainable during the fit (gradual unfreezing) are exempt. The same check is
available as a callable for custom loops.

>>> import frostline as fl
>>> from torch import nn
>>> model = fl.wrap(nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 1)))
>>> model.layers[0].trainable = False
>>> fp = fl.verify.fingerprint(model)
>>> fp.check(model).ok
True
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from frostline.core import batchnorm
from frostline.core.digest import tensor_digest


class FrozenWeightsChanged(RuntimeError):
    """A weight that was frozen changed value."""


def _frozen_named(module: nn.Module) -> dict[str, torch.Tensor]:
    """Frozen parameters, and running statistics of BatchNorms that run in inference mode."""
    out: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    for mname, m in module.named_modules():
        for pname, p in m.named_parameters(recurse=False):
            if not p.requires_grad and id(p) not in seen:
                seen.add(id(p))
                out[f"{mname}.{pname}" if mname else pname] = p
        if batchnorm.is_batchnorm(m) and batchnorm.runs_inference(m):
            for bname, b in m.named_buffers(recurse=False):
                if b is not None and b.is_floating_point() and id(b) not in seen:
                    seen.add(id(b))
                    out[f"{mname}.{bname}" if mname else bname] = b
    return out


@dataclass
class Report:
    """Result of a check: ``ok``, the names that ``moved``, and how many were ``checked``."""

    checked: int
    moved: list[str] = field(default_factory=list)
    exempt: int = 0

    @property
    def ok(self) -> bool:
        return not self.moved

    def __str__(self) -> str:
        if self.ok:
            return f"frozen weights verified: {self.checked} tensors bitwise unchanged" + (
                f" ({self.exempt} unfrozen during training, not checked)" if self.exempt else ""
            )
        shown = ", ".join(self.moved[:10]) + (
            f", ... ({len(self.moved)} in all)" if len(self.moved) > 10 else ""
        )
        return f"{len(self.moved)} frozen weight(s) changed: {shown}"


@dataclass
class Fingerprint:
    """Digests of the frozen weights at one moment (see :func:`fingerprint`)."""

    digests: dict[str, str]
    tensors: dict[str, int]

    def check(self, model, *, exempt: set[int] | None = None, raise_error: bool = False) -> Report:
        """Compare against the model now; ``exempt`` holds ids of tensors allowed to move."""
        module = model.module if hasattr(model, "module") else model
        current = dict(module.named_parameters(remove_duplicate=False))
        current.update(dict(module.named_buffers(remove_duplicate=False)))
        exempt = exempt or set()
        report = Report(checked=0)
        for name, digest in self.digests.items():
            t = current.get(name)
            if t is None:
                report.moved.append(f"{name} (missing)")
                continue
            if id(t) in exempt or self.tensors.get(name) in exempt:
                report.exempt += 1
                continue
            report.checked += 1
            if tensor_digest(t) != digest:
                report.moved.append(name)
        if raise_error and not report.ok:
            raise FrozenWeightsChanged(str(report))
        return report


def fingerprint(model, *, digest: Callable[[torch.Tensor], str] | None = None) -> Fingerprint:
    """Digest every frozen weight of ``model`` (a Model, Layer or ``nn.Module``).

    ``digest`` reads one tensor; it must give :func:`frostline.core.digest.tensor_digest`'s
    value (its default; ``fit`` passes a memo of it that its cache key shares).
    :meth:`Fingerprint.check` always reads the tensors again.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> net = nn.Linear(2, 2).requires_grad_(False)
        >>> fp = fingerprint(net)
        >>> sorted(fp.digests)
        ['bias', 'weight']
        >>> with torch.no_grad():
        ...     _ = net.weight.add_(1.0)
        >>> fp.check(net).moved
        ['weight']
    """
    module = model.module if hasattr(model, "module") else model
    named = _frozen_named(module)
    read = tensor_digest if digest is None else digest
    return Fingerprint({n: read(t) for n, t in named.items()}, {n: id(t) for n, t in named.items()})


__all__ = [
    "Fingerprint",
    "FrozenWeightsChanged",
    "Report",
    "fingerprint",
]
