"""The model zoo: ``fl.models.pretrained("efficientnet_lite0")`` works offline.

>>> import frostline as fl
>>> base = fl.models.pretrained("efficientnet_lite0", headless=True)
>>> base.trainable = False
>>> len(base.trainable_weights)
0
"""

from __future__ import annotations

from frostline.models.zoo import ZooError, available, create_module, data_config, preprocess


def pretrained(
    name: str,
    *,
    num_classes: int | None = None,
    headless: bool = False,
    pretrained: bool = True,
    **timm_kwargs,
):
    """A zoo model as a frostline Model (ImageNet weights; EfficientNet-Lite0 works offline).

    ``num_classes=N`` replaces the classifier; ``headless=True`` returns the pooled
    feature extractor (for ``fl.Sequential([base, head])``).
    """
    from frostline.model import Model

    module = create_module(
        name, pretrained=pretrained, num_classes=num_classes, headless=headless, **timm_kwargs
    )
    model = Model(module, name=name)
    model.meta["architecture"] = {
        "kind": "zoo",
        "name": name,
        "kwargs": {"num_classes": num_classes, "headless": headless, **timm_kwargs},
    }
    return model


__all__ = ["ZooError", "available", "create_module", "data_config", "preprocess", "pretrained"]
