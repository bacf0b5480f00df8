"""SPEC 10: a tensor shared by several layers (tied embeddings and LM heads) has one state."""

from __future__ import annotations

import numpy as np
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from tiny_models import TiedLM, bert_config, gpt2, rows, summary_text, total_of

import frostline as fl
from frostline import select


def own_params(layer) -> list[torch.Tensor]:
    return [w for w in layer.weights if isinstance(w, torch.nn.Parameter)]


def assert_consistent(model: fl.Model) -> None:
    """No leaf's flag, trainable_weights or summary row contradicts requires_grad (what fit trains)."""
    leaves = model.leaf_layers()
    table = rows(summary_text(model, leaves=True))
    assert len(table) == len(leaves)
    for leaf, (_, label, _, flag) in zip(leaves, table):
        params = own_params(leaf)
        if not params:
            continue
        trains = [p.requires_grad for p in params]
        assert leaf.trainable == any(trains), (leaf.path, trains)
        assert [id(t) for t in leaf.trainable_weights] == [id(p) for p in params if p.requires_grad]
        want = "Y" if all(trains) else "N" if not any(trains) else f"{sum(trains)}/{len(trains)}"
        assert flag == want, (label, flag, want)


def test_freeze_through_one_owner_reports_every_owner():
    model = fl.wrap(TiedLM())
    plan = model.freeze(select.name("emb"))
    assert [c.path for c in plan.changes] == ["emb", "head"]
    head = plan.changes[1]
    assert head.shared_with == ["emb"] and plan.changes[0].shared_with == []
    assert "shared" in str(plan) and "emb" in str(plan).splitlines()[2]
    # the tensor is counted once in the plan's total
    assert "40 params" in plan.summary_line()
    assert model.get_layer("head").trainable is False
    assert model.get_layer("emb").trainable is False
    assert_consistent(model)


def test_dry_run_reports_the_same_owners_and_changes_nothing():
    model = fl.wrap(TiedLM())
    plan = model.freeze(select.name("head"), dry_run=True)
    assert [c.path for c in plan.changes] == ["head", "emb"]
    assert model.module.emb.weight.requires_grad


def test_unfreeze_one_owner_leaves_no_contradiction_and_fit_agrees():
    torch.manual_seed(0)
    model = fl.wrap(TiedLM())
    model.trainable = False
    plan = model.unfreeze(select.name("head"))
    assert [c.path for c in plan.changes] == ["head", "emb"]
    emb = model.get_layer("emb")
    assert emb.trainable is True
    assert [id(t) for t in emb.trainable_weights] == [id(model.module.emb.weight)]
    assert_consistent(model)
    before = {n: p.detach().clone() for n, p in model.module.named_parameters()}
    model.compile(optimizer=fl.optimizers.SGD(0.5), loss="sparse_categorical_crossentropy")
    x = np.random.randint(0, 10, (16, 5))
    y = np.random.randint(0, 10, 16)
    model.fit(x, y, epochs=1, batch_size=8, verbose=0)
    for n, p in model.module.named_parameters():
        moved = not torch.equal(before[n], p.detach())
        assert moved == p.requires_grad, n
    assert not torch.equal(before["emb.weight"], model.module.emb.weight.detach())
    assert_consistent(model)


def test_gpt2_tied_lm_head():
    model = fl.wrap(gpt2())
    plan = model.freeze(select.name("transformer.wte"))
    assert [c.path for c in plan.changes] == ["transformer.wte", "lm_head"]
    assert plan.changes[1].shared_with == ["transformer.wte"]
    assert model.get_layer("lm_head").trainable is False
    assert_consistent(model)
    text = summary_text(model, leaves=True)
    assert sum(r[2] for r in rows(text)) == total_of(text)
    assert "shared" in [ln for ln in text.splitlines() if "lm_head (Linear)" in ln][0]


def test_bert_masked_lm_decoder_follows_word_embeddings():
    from transformers import BertForMaskedLM

    model = fl.wrap(BertForMaskedLM(bert_config()))
    model.trainable = False
    plan = model.unfreeze(select.name("cls.predictions.decoder"))
    paths = [c.path for c in plan.changes]
    assert paths[0] == "cls.predictions.decoder"
    assert "bert.embeddings.word_embeddings" in paths
    assert model.get_layer("bert.embeddings.word_embeddings").trainable is True
    assert model.trainable is False
    assert_consistent(model)
    for depth in (1, 2, None):
        text = summary_text(model, depth=depth)
        top = [r for r in rows(text) if r[0] == 0]
        assert sum(r[2] for r in top) == total_of(text), depth


SELECTORS = [
    select.name("emb"),
    select.name("head"),
    select.name("body"),
    select.first(1),
    select.last(1),
    select.of_type("Linear"),
]


@settings(max_examples=40, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(range(len(SELECTORS))), st.booleans()), max_size=6))
def test_plans_report_exactly_what_changed(ops):
    """Property: after any freeze/unfreeze sequence the plan lists exactly the leaves whose
    state changed, and no flag or summary row contradicts requires_grad."""
    model = fl.wrap(TiedLM())
    for i, on in ops:
        before = {leaf.path: leaf.trainable for leaf in model.leaf_layers()}
        dry = (model.unfreeze if on else model.freeze)(SELECTORS[i], dry_run=True)
        plan = (model.unfreeze if on else model.freeze)(SELECTORS[i])
        after = {leaf.path: leaf.trainable for leaf in model.leaf_layers()}
        changed = sorted(p for p in before if before[p] != after[p])
        assert sorted(c.path for c in plan.changes) == changed
        assert [c.path for c in dry.changes] == [c.path for c in plan.changes]
        assert_consistent(model)
