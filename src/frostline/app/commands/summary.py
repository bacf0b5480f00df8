"""``frostline summary MODEL``: a model's Keras-style summary after a freezing selection."""

from __future__ import annotations

import argparse
from dataclasses import dataclass

from frostline.app.commands.fit import FREEZE_HELP, FREEZE_TYPE_HELP
from frostline.app.config import (
    UsageError,
    class_count,
    count,
    image_side,
    option,
    positive_int,
    resolve,
)

NAME = "summary"
HELP = "print a model's summary after freezing"
DESCRIPTION = """\
Print the Keras-style summary of a zoo model (or a 'package.module:factory' import path)
after applying a freezing selection: the layer table with a Trainable column, then the
Total / Trainable / Non-trainable parameter lines.

  frostline summary efficientnet_lite0 --freeze-all --unfreeze-last 5
  frostline summary efficientnet_lite0 --leaves --freeze-type BatchNorm2d

--leaves lists every leaf layer (module that owns weights) with the index that
first:K / last:K / range:A:B count. No weights are downloaded: the architecture is built
with random weights (parameter counts are the same).
"""

FREEZING = "freezing"
DISPLAY = "display"


def depth(text: str) -> int | None:
    """``all`` (or ``none``/``0``) for every level, else a positive number of levels.

    >>> depth("all"), depth("2")
    (None, 2)
    """
    if str(text).lower() in ("all", "none", "0"):
        return None
    return positive_int(text)


@dataclass
class Options:
    model: str = option(
        positional=True,
        nargs=None,
        metavar="MODEL",
        help="zoo name (e.g. efficientnet_lite0) or package.module:factory",
    )
    freeze_all: bool = option(
        False,
        switch=True,
        group=FREEZING,
        help="freeze every layer, the Keras 'model.trainable = False'",
    )
    freeze: list = option(list, repeat=True, metavar="PATTERN", group=FREEZING, help=FREEZE_HELP)
    freeze_type: list = option(
        list, repeat=True, metavar="TYPE", group=FREEZING, help=FREEZE_TYPE_HELP
    )
    unfreeze_last: int | None = option(
        None,
        parse=count,
        metavar="K",
        group=FREEZING,
        help="then unfreeze the last K leaf layers (what 'frostline summary --leaves' numbers)",
    )
    depth: int | None = option(
        1,
        parse=depth,
        metavar="N",
        group=DISPLAY,
        help="levels of nesting to show ('all' for every level)",
    )
    leaves: bool = option(
        False,
        switch=True,
        group=DISPLAY,
        help="list every leaf layer with its index instead of the nested table",
    )
    headless: bool = option(
        False, switch=True, group=DISPLAY, help="drop the classifier (the base that fit trains on)"
    )
    num_classes: int | None = option(
        None,
        parse=class_count,
        metavar="N",
        group=DISPLAY,
        help="replace the classifier with an N-way one (or pass num_classes=N to a factory)",
    )
    image_size: int | None = option(
        None,
        parse=image_side,
        metavar="S",
        group=DISPLAY,
        help="add an Output Shape column for an SxS RGB input",
    )


def options(ns: argparse.Namespace) -> Options:
    return resolve(Options, ns)


def run(opts: Options, command: str) -> int:
    import frostline as fl
    from frostline.app.models import apply_selection, build_import_model, is_import_path

    if is_import_path(opts.model):
        model = build_import_model(opts.model, opts.num_classes)
    else:
        if opts.headless and opts.num_classes:
            raise UsageError("--headless drops the classifier; it cannot take --num-classes")
        model = fl.models.pretrained(
            opts.model, pretrained=False, headless=opts.headless, num_classes=opts.num_classes
        )
    plans = apply_selection(
        model, freeze_all=opts.freeze_all, freeze=opts.freeze, freeze_type=opts.freeze_type
    )
    if opts.unfreeze_last:
        plans.append(model.unfreeze(fl.select.last(opts.unfreeze_last)))
    for plan in plans:
        print(plan.summary_line())
    if plans:
        print()
    shape = (3, opts.image_size, opts.image_size) if opts.image_size else None
    model.summary(depth=opts.depth, leaves=opts.leaves, input_shape=shape)
    return 0
