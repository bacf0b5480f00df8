"""Property tests on random module trees (hypothesis).

Trees are random nests of ``nn.Sequential``/``nn.ModuleDict`` over ``Linear``,
``BatchNorm1d``, ``ReLU`` and ``Embedding`` leaves, with some leaf modules placed
twice (shared modules) and some ``Linear`` weights tied to another layer's weight
(shared parameters). The blueprint is plain data so hypothesis can shrink it.
"""

from __future__ import annotations

import re

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

import frostline as fl

SETTINGS = settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# ----------------------------------------------------------------------- blueprints

small = st.integers(1, 4)
leaf_spec = st.one_of(
    st.tuples(st.just("linear"), small, small, st.booleans()),
    st.tuples(st.just("bn"), small, st.booleans()),
    st.just(("relu",)),
    st.tuples(st.just("emb"), st.integers(1, 5), small),
    st.tuples(st.just("shared"), st.integers(0, 20)),
    st.tuples(st.just("tied"), st.integers(0, 20)),
)
tree_spec = st.recursive(
    leaf_spec,
    lambda kids: st.tuples(st.sampled_from(["seq", "dict"]), st.lists(kids, max_size=4)),
    max_leaves=14,
)
root_spec = st.tuples(st.sampled_from(["seq", "dict"]), st.lists(tree_spec, min_size=1, max_size=4))
ops_spec = st.lists(st.tuples(st.integers(0, 10_000), st.booleans()), max_size=10)


def build(spec) -> nn.Module:
    """Turn a blueprint into modules (deterministic weights)."""
    torch.manual_seed(0)
    leaves: list[nn.Module] = []
    linears: list[nn.Linear] = []

    def make(node) -> nn.Module:
        kind = node[0]
        if kind == "linear":
            m: nn.Module = nn.Linear(node[1], node[2], bias=node[3])
            linears.append(m)  # type: ignore[arg-type]
        elif kind == "bn":
            m = nn.BatchNorm1d(node[1], affine=node[2])
        elif kind == "relu":
            return nn.ReLU()
        elif kind == "emb":
            m = nn.Embedding(node[1], node[2])
        elif kind == "shared":
            return leaves[node[1] % len(leaves)] if leaves else nn.ReLU()
        elif kind == "tied":
            if not linears:
                return nn.Identity()
            src = linears[node[1] % len(linears)]
            m = nn.Linear(src.in_features, src.out_features, bias=False)
            m.weight = src.weight
        elif kind == "seq":
            return nn.Sequential(*[make(c) for c in node[1]])
        else:
            return nn.ModuleDict({f"k{i}": make(c) for i, c in enumerate(node[1])})
        leaves.append(m)
        return m

    return make(spec)


# ------------------------------------------------------------------------ reference


def weights_of(m: nn.Module) -> list[torch.Tensor]:
    ts = [*m.parameters(recurse=False), *m.buffers(recurse=False)]
    return [t for t in ts if t is not None and t.is_floating_point()]


def unique_weights(root: nn.Module) -> list[torch.Tensor]:
    out, seen = [], set()
    for m in root.modules():
        for t in [*m.parameters(recurse=False), *m.buffers(recurse=False)]:
            if t is not None and t.is_floating_point() and id(t) not in seen:
                seen.add(id(t))
                out.append(t)
    return out


def numel(ts) -> int:
    return sum(t.numel() for t in ts)


class Reference:
    """SPEC 2 as a tiny model: explicit flags per module, requires_grad per parameter."""

    def __init__(self, root: nn.Module) -> None:
        self.root = root
        self.flags: dict[int, bool] = {}
        self.grad = {id(p): True for p in root.parameters()}

    def set(self, module: nn.Module, value: bool) -> None:
        for m in module.modules():
            self.flags[id(m)] = value
            for p in m.parameters(recurse=False):
                self.grad[id(p)] = value

    def flag(self, module: nn.Module) -> bool:
        own = list(module.parameters(recurse=False))
        below = [t for m in module.modules() if m is not module for t in weights_of(m)]
        if own and not below:  # SPEC 10: a leaf reads its parameters (one tensor, one state)
            return any(self.grad[id(p)] for p in own)
        if id(module) in self.flags:
            return self.flags[id(module)]
        params = list(module.parameters())
        return not params or any(self.grad[id(p)] for p in params)


def paths_of(root: nn.Module) -> list[str]:
    return [p for p, _ in root.named_modules()]


def layer_at(model: fl.Model, path: str) -> fl.Layer:
    return model if path == "" else model.get_layer(path)


def summary_counts(model: fl.Model) -> tuple[int, int, int]:
    lines: list[str] = []
    model.summary(print_fn=lines.append)
    text = "\n".join(lines)
    got = []
    for label in ("Total", "Trainable", "Non-trainable"):
        m = re.search(rf"^{label} params: ([\d,]+)", text, re.MULTILINE)
        assert m, text
        got.append(int(m.group(1).replace(",", "")))
    return tuple(got)  # type: ignore[return-value]


def check_against(model: fl.Model, ref: Reference) -> None:
    root = model.module
    for p in root.parameters():
        assert p.requires_grad is ref.grad[id(p)]
    for path, m in root.named_modules():
        assert layer_at(model, path).trainable is ref.flag(m), f"getter of {path or '(root)'!r}"


# ------------------------------------------------------------------------ properties


@SETTINGS
@given(spec=root_spec, ops=ops_spec)
def test_counts_add_up_and_shared_tensors_count_once(spec, ops):
    root = build(spec)
    model = fl.wrap(root)
    paths = paths_of(root)
    for i, v in ops:
        layer_at(model, paths[i % len(paths)]).trainable = v
    weights = unique_weights(root)
    trainable = [p for p in root.parameters() if p.requires_grad]  # parameters() dedups
    total, n_trainable = numel(weights), numel(trainable)
    assert model.count_params() == total
    assert numel(model.weights) == total and len(model.weights) == len(weights)
    assert numel(model.trainable_weights) == n_trainable
    assert numel(model.non_trainable_weights) == total - n_trainable
    assert summary_counts(model) == (total, n_trainable, total - n_trainable)
    # every sub-layer's counts add up as well
    for path in paths:
        layer = layer_at(model, path)
        assert (
            numel(layer.trainable_weights) + numel(layer.non_trainable_weights)
            == layer.count_params()
        )


@SETTINGS
@given(spec=root_spec, ops=ops_spec)
def test_trainable_weights_are_exactly_the_params_that_require_grad(spec, ops):
    root = build(spec)
    model = fl.wrap(root)
    paths = paths_of(root)
    for i, v in ops:
        layer_at(model, paths[i % len(paths)]).trainable = v
    for path, m in root.named_modules():
        layer = layer_at(model, path)
        tw = [id(t) for t in layer.trainable_weights]
        assert len(tw) == len(set(tw)), "each tensor once"
        assert set(tw) == {id(p) for p in m.parameters() if p.requires_grad}
        nt = {id(t) for t in layer.non_trainable_weights}
        assert not nt & set(tw)
        assert nt | set(tw) == {id(t) for t in unique_weights(m)}
        assert not any(t.dtype in (torch.long, torch.int32) for t in layer.weights)


@SETTINGS
@given(spec=root_spec, ops=ops_spec)
def test_setter_recursion_rules(spec, ops):
    root = build(spec)
    model = fl.wrap(root)
    ref = Reference(root)
    paths = paths_of(root)
    modules = dict(root.named_modules())
    for i, v in ops:
        path = paths[i % len(paths)]
        target = modules[path]
        before_grad = {id(p): p.requires_grad for p in root.parameters()}
        before_flags = {p: layer_at(model, p).trainable for p in paths}
        layer_at(model, path).trainable = v
        ref.set(target, v)
        # the whole subtree took the value ...
        sub_params = {id(p) for p in target.parameters()}
        assert all(p.requires_grad is v for p in target.parameters())
        for sub in target.modules():
            assert fl.Layer(sub).trainable is v
        # ... and nothing outside it changed (parameters shared into it excepted)
        for p in root.parameters():
            if id(p) not in sub_params:
                assert p.requires_grad is before_grad[id(p)]
        inside = {id(m) for m in target.modules()}
        for p, m in modules.items():
            if id(m) not in inside and not (set(map(id, m.parameters())) & sub_params):
                assert layer_at(model, p).trainable is before_flags[p], f"{p!r} changed"
        check_against(model, ref)


@SETTINGS
@given(spec=root_spec, ops=ops_spec)
def test_wrapping_twice_gives_one_truth(spec, ops):
    root = build(spec)
    a, b = fl.wrap(root), fl.wrap(root)
    paths = paths_of(root)
    for n, (i, v) in enumerate(ops):
        which = a if n % 2 else b
        layer_at(which, paths[i % len(paths)]).trainable = v
    for path in paths:
        assert layer_at(a, path).trainable is layer_at(b, path).trainable
        assert [id(t) for t in layer_at(a, path).trainable_weights] == [
            id(t) for t in layer_at(b, path).trainable_weights
        ]
    assert a.count_params() == b.count_params()
    # a bare Layer view (no Model) agrees too
    for path, m in root.named_modules():
        assert fl.Layer(m).trainable is layer_at(a, path).trainable


@SETTINGS
@given(spec=root_spec, picks=st.lists(st.integers(0, 10_000), max_size=8), order=st.randoms())
def test_freezing_then_unfreezing_restores_requires_grad(spec, picks, order):
    root = build(spec)
    model = fl.wrap(root)
    paths = paths_of(root)
    chosen = [paths[i % len(paths)] for i in picks]
    for path in chosen:
        layer_at(model, path).trainable = False
    frozen = {id(p) for path in chosen for p in dict(root.named_modules())[path].parameters()}
    assert {id(p) for p in root.parameters() if not p.requires_grad} == frozen
    order.shuffle(chosen)
    for path in chosen:
        layer_at(model, path).trainable = True
    assert all(p.requires_grad for p in root.parameters())
    assert numel(model.trainable_weights) == numel(list(root.parameters()))
    for path in chosen:
        assert layer_at(model, path).trainable is True


@SETTINGS
@given(spec=root_spec)
def test_model_freeze_all_then_unfreeze_all(spec):
    root = build(spec)
    model = fl.wrap(root)
    model.trainable = False
    assert model.trainable_weights == []
    assert summary_counts(model)[1] == 0
    for path in paths_of(root):
        assert layer_at(model, path).trainable is False
    model.trainable = True
    assert all(p.requires_grad for p in root.parameters())
    for path in paths_of(root):
        assert layer_at(model, path).trainable is True


@pytest.mark.parametrize("value", ["False", 0, None])
def test_setter_rejects_non_bools_on_any_node(value):
    root = build(("seq", [("linear", 2, 2, True), ("dict", [("bn", 2, True)])]))
    model = fl.wrap(root)
    for path in paths_of(root):
        with pytest.raises(TypeError):
            layer_at(model, path).trainable = value
    assert all(p.requires_grad for p in root.parameters())
