"""Selectors: freezing as a pure selection over leaf layers.

A selector picks leaf layers (modules that own weights) from a model; ``freeze``
and ``unfreeze`` apply a selection and return a :class:`Plan` that says what changed
(or, with ``dry_run=True``, what would). Selectors compose with ``|``, ``&`` and ``~``.

>>> import frostline as fl
>>> from torch import nn

>>> model = fl.wrap(nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.Flatten(), nn.LazyLinear(2)))
>>> plan = model.freeze(fl.select.of_type("BatchNorm2d"), dry_run=True)
>>> plan.paths
['1']
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Protocol

from torch import nn

from frostline.core.freezing import set_module_trainable
from frostline.core.leaves import LeafEntry, is_module_leaf, leaf_entries, leaf_state
from frostline.core.state import set_learning_rate, set_own_flag


class LayerView(Protocol):
    """What selection needs from a layer: its module and its name."""

    @property
    def module(self) -> nn.Module: ...
    @property
    def name(self) -> str: ...


class SelectionError(ValueError):
    """A selector matched no layer (names what was asked and what exists)."""


class Selector:
    """Picks leaf layers out of an ordered list of ``(path, module)`` leaves.

    A weight a module owns beside its children is a leaf of its own: its path is the
    weight's (``"cls_token"``, ``"stages.0.blocks.0.gamma"``), its module the owner.
    """

    def __init__(self, description: str, pick: Callable[[list[tuple[str, nn.Module]]], list[int]]):
        self.description = description
        self._pick = pick

    def indices(self, leaves: list[tuple[str, nn.Module]]) -> list[int]:
        return sorted(set(self._pick(leaves)))

    def __or__(self, other: Selector) -> Selector:
        other = as_selector(other)
        return Selector(
            f"{self.description} | {other.description}",
            lambda ls: self.indices(ls) + other.indices(ls),
        )

    def __and__(self, other: Selector) -> Selector:
        other = as_selector(other)
        return Selector(
            f"({self.description}) & ({other.description})",
            lambda ls: sorted(set(self.indices(ls)) & set(other.indices(ls))),
        )

    def __invert__(self) -> Selector:
        return Selector(
            f"~({self.description})",
            lambda ls: sorted(set(range(len(ls))) - set(self.indices(ls))),
        )

    def __repr__(self) -> str:
        return f"Selector({self.description})"


def _check_count(k: object, what: str) -> int:
    if isinstance(k, bool) or not isinstance(k, int) or k < 0:
        raise ValueError(f"{what} takes a non-negative int, got {k!r}")
    return k


def all_layers() -> Selector:
    """Every leaf layer."""
    return Selector("all", lambda ls: list(range(len(ls))))


def first(k: int) -> Selector:
    """The first ``k`` leaf layers in order (the bottom of the network)."""
    _check_count(k, "first(k)")
    return Selector(f"first({k})", lambda ls: list(range(min(k, len(ls)))))


def last(k: int) -> Selector:
    """The last ``k`` leaf layers in order (the top of the network)."""
    _check_count(k, "last(k)")
    return Selector(f"last({k})", lambda ls: list(range(max(len(ls) - k, 0), len(ls))))


def between(start: int | None = None, stop: int | None = None) -> Selector:
    """Leaf layers ``start..stop-1`` (Python slice rules, negative indices allowed)."""
    return Selector(f"between({start}, {stop})", lambda ls: list(range(len(ls)))[start:stop])


def _ancestors(path: str) -> list[str]:
    parts = path.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts) + 1)]


def name(*patterns: str) -> Selector:
    """Leaves whose dotted path, or the path of a module above them, matches a glob.

    ``name("blocks.6")`` selects everything inside ``blocks.6``; ``name("*.bn*")`` the
    BatchNorms at any depth.
    """
    for p in patterns:
        if not isinstance(p, str):
            raise TypeError(f"name() takes glob strings, got {type(p).__name__}")

    def pick(ls):
        return [
            i
            for i, (path, _) in enumerate(ls)
            if any(fnmatch.fnmatchcase(a, p) for a in _ancestors(path) for p in patterns)
        ]

    return Selector("name(" + ", ".join(repr(p) for p in patterns) + ")", pick)


def regex(pattern: str) -> Selector:
    """Leaves whose dotted path (or an ancestor's) matches a regular expression (``re.fullmatch``)."""
    try:
        rx = re.compile(pattern)
    except re.error as e:
        raise ValueError(f"regex({pattern!r}) is not a valid regular expression: {e}") from None
    return Selector(
        f"regex({pattern!r})",
        lambda ls: [
            i for i, (path, _) in enumerate(ls) if any(rx.fullmatch(a) for a in _ancestors(path))
        ],
    )


def of_type(*types: str | type) -> Selector:
    """Leaves that are (or sit inside) modules of the given classes, by class or class name."""
    if not types:
        raise ValueError("of_type() needs at least one class or class name")
    for t in types:
        if not isinstance(t, str | type):
            raise TypeError(f"of_type() takes classes or class names, got {t!r}")

    def matches(module: nn.Module) -> bool:
        return any(
            (isinstance(t, str) and type(module).__name__ == t)
            or (isinstance(t, type) and isinstance(module, t))
            for t in types
        )

    def pick(ls):
        # a leaf inside a matching container counts too, so resolve containers by path
        containers = tuple(c + "." for c in _containers(ls, matches))
        return [
            i
            for i, (path, module) in enumerate(ls)
            if matches(module) or path.startswith(containers)
        ]

    names = ", ".join(t if isinstance(t, str) else t.__name__ for t in types)
    return Selector(f"of_type({names})", pick)


def _containers(ls, matches) -> list[str]:
    root = getattr(ls, "root", None)
    if root is None:
        return []
    return [p for p, m in root.named_modules() if p and matches(m)]


class _Leaves(list):
    """Leaf list that remembers its root (for container-type matching)."""

    root: nn.Module | None = None


def as_selector(spec: Selector | str | int | Iterable | None) -> Selector:
    """Turn ``None`` (all), a Selector, a glob string, or a list of those into a Selector."""
    if spec is None:
        return all_layers()
    if isinstance(spec, Selector):
        return spec
    if isinstance(spec, str):
        return name(spec)
    if isinstance(spec, list | tuple):
        sels = [as_selector(s) for s in spec]
        out = sels[0]
        for s in sels[1:]:
            out = out | s
        return out
    raise TypeError(
        f"expected a selector (fl.select.first/last/between/name/regex/of_type), a glob string "
        f"or a list of them, got {type(spec).__name__}: {spec!r}"
    )


def leaves_of(root: nn.Module | LayerView) -> _Leaves:
    """The leaves under ``root`` in order, as :class:`~frostline.core.leaves.LeafEntry`
    ``(path, module)`` pairs (see :func:`frostline.core.leaves.leaf_entries`).

    >>> [p for p, _ in leaves_of(nn.Sequential(nn.Linear(2, 2), nn.ReLU(), nn.Linear(2, 1)))]
    ['0', '2']
    """
    single = getattr(root, "leaf_entry", None)
    if single is not None:  # one weight viewed as a layer
        out = _Leaves([single()])
        out.root = getattr(root, "module", None)
        return out
    module = root if isinstance(root, nn.Module) else root.module
    out = _Leaves(leaf_entries(module))
    out.root = module
    return out


@dataclass
class Change:
    """One leaf whose state a plan changes.

    ``shared_with`` names the selected leaves it shares a tensor with when it changes
    only through them (tied weights: one tensor, one state); ``params`` counts its
    weights not already counted by an earlier change, so a plan's total counts each
    tensor once.
    """

    path: str
    class_name: str
    params: int
    before: str
    after: str
    shared_with: list[str] = field(default_factory=list)


@dataclass
class Plan:
    """What a freeze/unfreeze changes (or would change, for a dry run)."""

    action: str
    selector: str
    changes: list[Change] = field(default_factory=list)
    matched: list[str] = field(default_factory=list)
    applied: bool = False

    @property
    def paths(self) -> list[str]:
        """Paths of the matched leaf layers."""
        return list(self.matched)

    def summary_line(self) -> str:
        n = sum(c.params for c in self.changes)
        return f"{self.action} {self.selector}: {len(self.changes)} layer(s) change, {n:,} params"

    def __str__(self) -> str:
        lines = [("" if self.applied else "[dry run] ") + self.summary_line()]
        width = max([len(c.path or "(root)") for c in self.changes] + [5])
        for c in self.changes:
            via = (
                f"  (via a tensor shared with {', '.join(c.shared_with)})" if c.shared_with else ""
            )
            lines.append(
                f"  {c.path or '(root)':<{width}}  {c.class_name:<20} {c.params:>12,}  "
                f"{c.before} -> {c.after}{via}"
            )
        unchanged = len(self.matched) - len([c for c in self.changes if not c.shared_with])
        if unchanged:
            state = "frozen" if self.action == "freeze" else "trainable"
            lines.append(f"  ({unchanged} matched layer(s) already {state})")
        return "\n".join(lines)

    def __repr__(self) -> str:
        return f"<Plan {self.summary_line()}>"


def resolve(layer: LayerView, selector=None) -> list[LeafEntry]:
    """The leaves a selector picks under ``layer``; error when none."""
    sel = as_selector(selector)
    leaves = leaves_of(layer)
    picked = [leaves[i] for i in sel.indices(leaves)]
    if not picked:
        shown = ", ".join(p or "(root)" for p, _ in leaves[:12])
        more = f", ... ({len(leaves)} in all)" if len(leaves) > 12 else ""
        raise SelectionError(
            f"selector {sel.description} matched no layer of {layer.name!r}. "
            f"Leaf layers: {shown or '(none: the model has no weights)'}{more}"
        )
    return picked


def plan_changes(leaves: list[LeafEntry], picked: list[LeafEntry], trainable: bool) -> list[Change]:
    """What setting ``picked`` to ``trainable`` changes: the picked leaves, then every other
    leaf owning one of their parameters (one tensor, one state), in leaf order.

    >>> emb, head = nn.Embedding(10, 4), nn.Linear(4, 10, bias=False)
    >>> head.weight = emb.weight
    >>> ls = leaves_of(nn.ModuleDict({"emb": emb, "head": head}))
    >>> [(c.path, c.params, c.shared_with) for c in plan_changes(ls, ls[:1], False)]
    [('emb', 40, []), ('head', 0, ['emb'])]
    """
    target = "trainable" if trainable else "frozen"
    moved = {id(p): trainable for e in picked for p in e.params()}
    picked_keys = {e.key for e in picked}
    counted: set[int] = set()
    changes: list[Change] = []

    def add(entry: LeafEntry, before: str, after: str, via: list[str]) -> None:
        fresh = [t for t in entry.tensors() if id(t) not in counted]
        counted.update(id(t) for t in fresh)
        n = sum(t.numel() for t in fresh)
        changes.append(Change(entry.path, entry.class_name, n, before, after, via))

    for e in picked:
        before = leaf_state(e)
        if before not in (target, "buffer"):
            add(e, before, target, [])
    for e in leaves:
        mine = {id(p) for p in e.params()}
        if e.key in picked_keys or not mine & moved.keys():
            continue
        before, after = leaf_state(e), leaf_state(e, moved)
        if before != after:
            via = [p.path for p in picked if mine & {id(q) for q in p.params()}]
            add(e, before, after, via)
    return changes


def apply(
    layer: LayerView,
    selector,
    trainable: bool,
    *,
    dry_run: bool = False,
    learning_rate: float | None = None,
) -> Plan:
    """Set the selected leaves to ``trainable``; modules whose leaves all follow get the flag.

    A parameter shared with leaves outside the selection (tied embeddings) has one
    state: those leaves change too, and the plan lists them, saying through which.
    A weight a module owns beside its children changes alone: the owner's flag moves
    only when every leaf below it does.
    """
    sel = as_selector(selector)
    picked = resolve(layer, sel)
    leaves = leaves_of(layer)
    action = "unfreeze" if trainable else "freeze"
    plan = Plan(action=action, selector=sel.description, matched=[p for p, _ in picked])
    plan.changes = plan_changes(leaves, picked, trainable)
    if dry_run:
        return plan
    if learning_rate is not None and (
        not isinstance(learning_rate, int | float) or learning_rate <= 0
    ):
        raise ValueError(f"learning_rate must be a positive number, got {learning_rate!r}")
    for entry in picked:
        if entry.weight is None:
            set_module_trainable(entry.module, trainable, recurse=False)
        else:
            for p in entry.params():
                p.requires_grad_(trainable)
                if not trainable:
                    p.grad = None
        if learning_rate is not None and trainable:
            for p in entry.params():
                set_learning_rate(p, float(learning_rate))
    target = "trainable" if trainable else "frozen"
    changed = {c.path for c in plan.changes}
    done = {e.key for e in picked}
    done |= {e.key for e in leaves if e.path in changed and leaf_state(e) == target}
    _sync_containers(leaves, done, trainable)
    plan.applied = True
    return plan


def _sync_containers(leaves: _Leaves, done: set, trainable: bool) -> None:
    """Give a module that is not a leaf the new flag when every leaf below it (its own
    weights included) now has it; weightless modules below it follow."""
    root = leaves.root
    if root is None:
        return
    by_module: dict[int, list[tuple]] = {}
    for e in leaves:
        by_module.setdefault(id(e.module), []).append(e.key)
    for m in root.modules():
        if is_module_leaf(m):
            continue
        keys = [k for sub in m.modules() for k in by_module.get(id(sub), [])]
        if keys and all(k in done for k in keys):
            for sub in m.modules():
                if not is_module_leaf(sub):
                    set_own_flag(sub, trainable)


def parse(spec: str) -> Selector:
    """Parse the command-line form: ``first:K``, ``last:K``, ``range:A:B``, ``type:Conv2d``, ``re:...``, else a glob."""
    if not isinstance(spec, str) or not spec:
        raise ValueError(f"selector spec must be a non-empty string, got {spec!r}")
    kind, _, rest = spec.partition(":")
    try:
        if kind == "first":
            return first(int(rest))
        if kind == "last":
            return last(int(rest))
        if kind == "range":
            a, _, b = rest.partition(":")
            return between(int(a) if a else None, int(b) if b else None)
    except ValueError:
        raise ValueError(
            f"bad selector {spec!r}: expected e.g. first:3, last:5, range:2:8"
        ) from None
    if kind == "type":
        return of_type(*rest.split(","))
    if kind == "re":
        return regex(rest)
    return name(spec)


__all__ = [
    "Change",
    "LeafEntry",
    "Plan",
    "SelectionError",
    "Selector",
    "all_layers",
    "apply",
    "as_selector",
    "between",
    "first",
    "last",
    "leaves_of",
    "name",
    "of_type",
    "parse",
    "plan_changes",
    "regex",
    "resolve",
]
