"""SPEC 11: weights a module owns beside its children are named, selectable entries;
every summary table adds up to its Total line."""

from __future__ import annotations

import pytest
import torch
from tiny_models import bert_config, convnext, rows, summary_text, total_of, vit
from torch import nn

import frostline as fl
from frostline import select


def test_vit_own_parameters_are_named_leaves():
    model = fl.wrap(vit())
    leaves = model.leaf_layers()
    assert [leaf.path for leaf in leaves[:3]] == ["cls_token", "pos_embed", "patch_embed.proj"]
    assert leaves[0].name == "cls_token" and leaves[0].class_name == "Parameter"
    assert leaves[0].module is model.module
    assert leaves[0].count_params() == model.module.cls_token.numel()
    assert all(leaf.path for leaf in leaves)
    # every weight is in exactly one leaf
    listed = [id(t) for leaf in leaves for t in leaf.weights]
    assert sorted(listed) == sorted(id(t) for t in model.weights)


def test_selecting_own_weights_never_flips_the_model_flag():
    model = fl.wrap(vit())
    model.trainable = False
    plan = model.unfreeze(select.first(1))
    assert plan.paths == ["cls_token"]
    assert [c.path for c in plan.changes] == ["cls_token"]
    assert "cls_token" in str(plan)
    assert model.trainable is False
    assert model.module.cls_token.requires_grad and not model.module.pos_embed.requires_grad
    assert model.leaf_layers()[0].trainable is True
    assert [id(t) for t in model.trainable_weights] == [id(model.module.cls_token)]
    model.freeze(select.name("cls_token"))
    assert not model.module.cls_token.requires_grad and model.trainable is False


def test_get_layer_reaches_own_weights_by_their_leaf_path():
    model = fl.wrap(convnext())
    gamma = model.get_layer("stages.0.blocks.0.gamma")
    assert gamma.class_name == "Parameter" and gamma.path == "stages.0.blocks.0.gamma"
    assert gamma.weights[0] is model.module.stages[0].blocks[0].gamma
    assert [leaf.path for leaf in model.leaf_layers()] == [
        model.get_layer(leaf.path).path for leaf in model.leaf_layers()
    ]
    with pytest.raises(ValueError, match="stages.0.blocks.0.gamma"):
        model.get_layer("stages.0.blocks.0.gama")


def test_own_entry_setter_touches_only_its_tensor():
    model = fl.wrap(vit())
    entry = model.leaf_layers()[1]
    entry.trainable = False
    assert not model.module.pos_embed.requires_grad
    assert model.module.cls_token.requires_grad and model.trainable is True
    with pytest.raises(TypeError, match="bool"):
        entry.trainable = 1


def test_convnext_layer_scale_is_selectable_and_keeps_the_block_flag():
    model = fl.wrap(convnext())
    paths = [leaf.path for leaf in model.leaf_layers()]
    assert "stages.0.blocks.0.gamma" in paths
    block = model.get_layer("stages.0.blocks.0")
    plan = model.freeze(select.name("stages.0.blocks.0.gamma"))
    assert [c.path for c in plan.changes] == ["stages.0.blocks.0.gamma"]
    assert block.trainable is True and not model.module.stages[0].blocks[0].gamma.requires_grad
    # a module path still selects everything under it, own weights included
    plan = model.freeze(select.name("stages.1.blocks.0"), dry_run=True)
    assert "stages.1.blocks.0.gamma" in plan.paths and "stages.1.blocks.0.conv_dw" in plan.paths


@pytest.mark.parametrize("factory", [vit, convnext], ids=["vit", "convnext"])
def test_leaf_table_adds_up_to_total(factory):
    model = fl.wrap(factory())
    model.freeze(select.first(3))
    text = summary_text(model, leaves=True)
    table = rows(text)
    assert len(table) == len(model.leaf_layers())
    assert sum(r[2] for r in table) == total_of(text)
    assert all(r[1].split()[1] for r in table)  # index then a non-blank name


@pytest.mark.parametrize("factory", [vit, convnext], ids=["vit", "convnext"])
@pytest.mark.parametrize("depth", [1, 2, 3, None])
def test_every_level_adds_up(factory, depth):
    model = fl.wrap(factory())
    text = summary_text(model, depth=depth)
    table = rows(text)
    assert sum(r[2] for r in table if r[0] == 0) == total_of(text)
    # an expanded row's children add up to the row
    for i, (level, label, n, _) in enumerate(table):
        kids = []
        for row in table[i + 1 :]:
            if row[0] <= level:
                break
            if row[0] == level + 1:
                kids.append(row[2])
        if kids:
            assert sum(kids) == n, (label, kids, n)


def test_vit_summary_has_a_named_row_for_the_model_own_weights():
    model = fl.wrap(vit())
    text = summary_text(model)
    table = rows(text)
    assert table[0][1] == "cls_token (Parameter)" and table[0][2] == model.module.cls_token.numel()
    assert table[1][1] == "pos_embed (Parameter)" and table[1][2] == model.module.pos_embed.numel()


class Scaled(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.ones(3))
        self.lin = nn.Linear(3, 3)

    def forward(self, x):
        return self.lin(x) * self.scale


def test_hand_written_mixed_module():
    model = fl.wrap(nn.Sequential(Scaled(), nn.Linear(3, 2)))
    assert [leaf.path for leaf in model.leaf_layers()] == ["0.scale", "0.lin", "1"]
    model.trainable = False
    model.unfreeze(select.name("0.scale"))
    assert model.get_layer("0").trainable is False
    assert model.leaf_layers()[0].trainable is True
    # a whole-module selection still covers the container
    model.unfreeze(select.name("0"))
    assert model.get_layer("0").trainable is True


def test_embedding_first_model_gets_integer_inputs():
    from transformers import BertForSequenceClassification

    model = fl.wrap(BertForSequenceClassification(bert_config(num_labels=3)))
    text = summary_text(model, input_shape=(12,))
    assert "Output Shape" in text
    model2 = fl.wrap(nn.Sequential(nn.Embedding(20, 4), nn.Flatten(), nn.Linear(48, 2)))
    text = summary_text(model2, input_shape=(12,), depth=1)
    assert "(None, 2)" in text


class LongInputsLateEmbedding(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.head = nn.Linear(4, 2)
        self.emb = nn.Embedding(10, 4)

    def forward(self, tokens):
        return self.head(self.emb(tokens).mean(1))


def test_summary_input_dtype():
    model = fl.wrap(LongInputsLateEmbedding())
    with pytest.raises(ValueError, match=r"input_dtype=torch\.long"):
        model.summary(input_shape=(5,), print_fn=lambda s: None)
    text = summary_text(model, input_shape=(5,), input_dtype=torch.long)
    assert "(None, 2)" in text
    with pytest.raises(TypeError, match="input_dtype"):
        model.summary(input_shape=(5,), input_dtype="long", print_fn=lambda s: None)


def test_a_one_layer_model_has_its_row():
    text = summary_text(fl.wrap(nn.Linear(4, 2)))
    table = rows(text)
    assert [r[1] for r in table] == ["linear (Linear)"] and table[0][2] == total_of(text) == 10
