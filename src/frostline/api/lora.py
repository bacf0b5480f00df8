"""LoRA on layers picked by a selector: what ``layer.enable_lora`` and ``merge_lora`` do.

The mechanics (the LoRA layer classes, the pinned-frozen kernel, the state as data) are
:mod:`frostline.core.lora`; this module resolves which leaf layers they apply to.

>>> import frostline as fl
>>> from torch import nn
>>> model = fl.wrap(nn.Sequential(nn.Linear(6, 3), nn.ReLU(), nn.Linear(3, 2)))
>>> enable(model, 2, fl.select.first(1))
['0']
>>> model.count_params(), len(model.trainable_weights)
(47, 5)
"""

from __future__ import annotations

from frostline.api.select import LayerView, as_selector, leaves_of, resolve
from frostline.core import lora as core_lora
from frostline.core.lora import Initializer

__all__ = ["enable", "merge"]


def enable(
    layer: LayerView,
    rank: int,
    selector=None,
    *,
    lora_alpha: float | None = None,
    a_initializer: Initializer = "he_uniform",
    b_initializer: Initializer = "zeros",
) -> list[str]:
    """Enable LoRA on the leaf layers ``selector`` picks under ``layer``; their paths.

    ``selector=None`` takes every Linear, Conv1d/2d/3d and Embedding below ``layer`` (the
    layer itself when it is one). A selector that picks any other kind of layer, or a layer
    LoRA is already enabled on, is refused before anything changes.

    >>> import frostline as fl
    >>> from torch import nn
    >>> m = fl.wrap(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)))
    >>> enable(m, 2)
    ['0']
    >>> enable(m, 2, "1")
    Traceback (most recent call last):
    ...
    TypeError: cannot enable LoRA on 1 of the 1 layer(s) selector name('1') picked: '1' (BatchNorm2d): not a Linear, Conv1d/2d/3d or Embedding but torch.nn.modules.batchnorm.BatchNorm2d
    """
    if not isinstance(rank, int) or isinstance(rank, bool):
        raise TypeError(f"rank must be an int, got {type(rank).__name__}: {rank!r}")
    if isinstance(selector, int | float) and not isinstance(selector, bool):
        raise TypeError(
            f"the second argument of enable_lora is a selector, got {selector!r}; "
            f"pass lora_alpha by keyword: enable_lora({rank}, lora_alpha={selector!r})"
        )
    if selector is None:
        picked = [e for e in leaves_of(layer) if e.weight is None and core_lora.supported(e.module)]
        if not picked:
            raise TypeError(
                f"{layer.name!r} has no Linear, Conv1d/2d/3d or Embedding layer LoRA can be "
                "enabled on (built, without LoRA)"
            )
    else:
        picked = resolve(layer, selector)
        refused = [
            (
                e,
                "a single weight, not a layer"
                if e.weight is not None
                else core_lora.refusal(e.module),
            )
            for e in picked
        ]
        refused = [(e, why) for e, why in refused if why is not None]
        if refused:
            desc = as_selector(selector).description
            shown = "; ".join(
                f"{e.path or '(root)'!r} ({e.class_name}): {why}" for e, why in refused[:8]
            )
            error = (
                ValueError if all(core_lora.is_lora(e.module) for e, _ in refused) else TypeError
            )
            raise error(
                f"cannot enable LoRA on {len(refused)} of the {len(picked)} layer(s) selector "
                f"{desc} picked: {shown}"
            )
    seen: set[int] = set()
    done = []
    for e in picked:
        if id(e.module) in seen:
            continue
        seen.add(id(e.module))
        core_lora.enable(
            e.module, rank, lora_alpha, a_initializer, b_initializer, where=repr(e.path or "(root)")
        )
        done.append(e.path)
    return done


def merge(layer: LayerView) -> list[str]:
    """Fold every LoRA layer under ``layer`` into its kernel; their paths.

    >>> import frostline as fl
    >>> from torch import nn
    >>> m = fl.wrap(nn.Sequential(nn.Linear(2, 2))); _ = enable(m, 1); merge(m)
    ['0']
    """
    done = []
    for path, m in layer.module.named_modules():
        if core_lora.is_lora(m):
            core_lora.merge(m)
            done.append(path)
    if not done:
        raise ValueError(f"no layer under {layer.name!r} has LoRA enabled; nothing to merge")
    return done
