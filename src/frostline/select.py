"""``fl.select``: selectors over leaf layers, for ``freeze``/``unfreeze``/``enable_lora``.

>>> import frostline as fl
>>> (fl.select.first(2) | fl.select.of_type("Linear")).description
'first(2) | of_type(Linear)'
"""

from frostline.api.select import (
    Change,
    Plan,
    SelectionError,
    Selector,
    all_layers,
    as_selector,
    between,
    first,
    last,
    name,
    of_type,
    parse,
    regex,
)

__all__ = [
    "all_layers",
    "as_selector",
    "between",
    "Change",
    "first",
    "last",
    "name",
    "of_type",
    "parse",
    "Plan",
    "regex",
    "SelectionError",
    "Selector",
]
