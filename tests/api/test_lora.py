"""LoRA as a freezing state: the pinned kernel, merging, selectors, saving, resume, the cache."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import frostline as fl
from frostline.core import lora as core_lora
from frostline.core.freezing import trainable_state


def _data(n=48, d=8, classes=3):
    rng = np.random.default_rng(0)
    return rng.normal(size=(n, d)).astype("float32"), rng.integers(0, classes, n)


def _mlp():
    torch.manual_seed(0)
    return fl.Sequential(
        [nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 3)]
    )


def test_enable_lora_counts_and_names_like_keras():
    dense = fl.wrap(nn.Linear(6, 3))
    assert dense.enable_lora(2) == [""]
    assert dense.lora_enabled and dense.lora_rank == 2 and dense.lora_alpha == 2
    assert dense.class_name == "Linear" and isinstance(dense.module, nn.Linear)
    assert (
        dense.count_params(),
        sum(t.numel() for t in dense.trainable_weights),
        sum(t.numel() for t in dense.non_trainable_weights),
    ) == (39, 21, 18)
    assert dense.trainable  # the layer trains (its adapters and bias)
    assert "lora_rank=2" in repr(dense.module)


def test_the_kernel_stays_frozen_through_the_setter_and_selectors():
    model = _mlp()
    model.enable_lora(2, "linear_1")
    kernel = model.module.linear_1.weight
    model.trainable = False
    assert not any(p.requires_grad for p in model.module.parameters())
    model.trainable = True
    assert not kernel.requires_grad
    assert all(
        p.requires_grad for n, p in model.module.named_parameters() if n != "linear_1.weight"
    )
    model.freeze()
    model.unfreeze(fl.select.name("linear_1"))
    assert not kernel.requires_grad and model.module.linear_1.lora_kernel_b.requires_grad
    # the saved state restores it the same way
    state = trainable_state(model.module)
    assert state["lora"] == {"linear_1": {"rank": 2, "alpha": 2}}
    model.trainable = True
    fl.saving.apply_trainable_state(model.module, state)
    assert not kernel.requires_grad


@pytest.mark.parametrize(
    "optimizer",
    [
        lambda: fl.optimizers.SGD(0.1, momentum=0.9, weight_decay=0.01),
        lambda: fl.optimizers.AdamW(0.01, weight_decay=0.1),
        lambda: fl.optimizers.Adam(
            0.01, use_ema=True, ema_overwrite_frequency=2, gradient_accumulation_steps=2
        ),
    ],
)
def test_kernel_bitwise_unchanged_under_fit_and_verified(optimizer):
    model = _mlp()
    model.enable_lora(2, fl.select.of_type("Linear") & fl.select.name("linear", "linear_1"))
    kernels = [
        model.module.linear.weight.detach().clone(),
        model.module.linear_1.weight.detach().clone(),
    ]
    b_before = model.module.linear_1.lora_kernel_b.detach().clone()
    model.compile(optimizer(), loss="sparse_categorical_crossentropy")
    x, y = _data()
    model.fit(x, y, epochs=2, batch_size=16, verbose=0, verify_frozen=True)
    assert torch.equal(model.module.linear.weight, kernels[0])
    assert torch.equal(model.module.linear_1.weight, kernels[1])
    assert not torch.equal(model.module.linear_1.lora_kernel_b, b_before)  # the adapters trained
    assert model.last_verification is not None and model.last_verification.ok


def test_merge_lora_folds_the_adapters_into_the_kernel():
    torch.manual_seed(0)
    model = fl.Sequential([nn.Conv2d(3, 4, 3, groups=1), nn.Flatten(), nn.Linear(4 * 6 * 6, 5)])
    assert model.enable_lora(2, lora_alpha=3, b_initializer="he_uniform") == ["conv2d", "linear"]
    x = torch.randn(2, 3, 8, 8)
    before = model(x).detach()
    kernel = model.module.linear.weight
    assert model.merge_lora() == ["conv2d", "linear"]
    assert type(model.module.linear) is nn.Linear and type(model.module.conv2d) is nn.Conv2d
    assert model.module.linear.weight is kernel and not kernel.requires_grad
    assert not core_lora.is_lora(model.module.linear)
    torch.testing.assert_close(model(x), before, atol=1e-5, rtol=1e-5)
    kernel.requires_grad_(True)  # released: plain torch can unfreeze it again
    model.trainable = True
    assert kernel.requires_grad
    with pytest.raises(ValueError, match="no layer under 'sequential' has LoRA enabled"):
        model.merge_lora()


def test_grouped_and_1d_convs_and_embedding_merge_exactly():
    torch.manual_seed(0)
    for module, x in (
        (nn.Conv2d(4, 6, 3, groups=2, padding=1), torch.randn(2, 4, 5, 5)),
        (nn.Conv1d(3, 5, 2, stride=2), torch.randn(2, 3, 8)),
        (nn.Embedding(7, 3, padding_idx=0), torch.randint(0, 7, (2, 4))),
    ):
        core_lora.enable(module, 2, None, "he_uniform", "he_uniform")
        before = module(x).detach()
        core_lora.merge(module)
        torch.testing.assert_close(module(x), before, atol=1e-5, rtol=1e-5)


def test_embedding_padding_row_stays_constant_under_training():
    torch.manual_seed(0)
    model = fl.Sequential([nn.Embedding(10, 4, padding_idx=0), nn.Flatten(), nn.Linear(12, 2)])
    model.enable_lora(2, "embedding", b_initializer="he_uniform")
    pad = model.layers[0].module(torch.zeros(1, 1, dtype=torch.long)).detach().clone()
    rng = np.random.default_rng(0)
    x = rng.integers(0, 10, (32, 3))
    x[:, 0] = 0
    model.compile(fl.optimizers.SGD(0.5), loss="sparse_categorical_crossentropy")
    model.fit(x, rng.integers(0, 2, 32), epochs=2, verbose=0)
    assert torch.equal(model.layers[0].module(torch.zeros(1, 1, dtype=torch.long)), pad)


def test_bad_calls_say_what_was_given_and_expected():
    model = fl.Sequential([nn.Linear(4, 4), nn.LayerNorm(4), nn.Linear(4, 2)])
    with pytest.raises(
        TypeError, match=r"1 of the 2 layer\(s\) .* picked: 'layer_norm' \(LayerNorm\): not a"
    ):
        model.enable_lora(2, fl.select.name("layer_norm", "linear"))
    assert not any(core_lora.is_lora(m) for m in model.module.modules())  # nothing changed
    with pytest.raises(
        TypeError, match=r"pass lora_alpha by keyword: enable_lora\(2, lora_alpha=8\)"
    ):
        model.enable_lora(2, 8)
    with pytest.raises(ValueError, match="rank must be a positive int, got 0"):
        model.enable_lora(0)
    with pytest.raises(ValueError, match="a_initializer must be one of"):
        model.enable_lora(2, a_initializer="uniformish")
    with pytest.raises(fl.select.SelectionError, match="matched no layer"):
        model.enable_lora(2, "nothing*")
    model.enable_lora(2, "linear")
    with pytest.raises(ValueError, match="'linear' \\(Linear\\): LoRA is already enabled"):
        model.enable_lora(2, "linear")
    mha = nn.MultiheadAttention(4, 2)
    with pytest.raises(TypeError, match="NonDynamicallyQuantizableLinear"):
        fl.wrap(mha).enable_lora(2, "out_proj")
    with pytest.raises(TypeError, match="'lazy_linear' \\(LazyLinear\\): not built yet"):
        fl.Sequential([nn.LazyLinear(3)]).enable_lora(2, "*")
    with pytest.raises(TypeError, match="max_norm"):
        fl.wrap(nn.Embedding(3, 2, max_norm=1.0)).enable_lora(1, "*")
    with pytest.raises(TypeError, match="has no Linear, Conv1d/2d/3d or Embedding layer"):
        fl.wrap(nn.Embedding(3, 2, max_norm=1.0)).enable_lora(1)


def test_bf16_kernel_gets_float32_adapters_and_runs():
    lin = nn.Linear(4, 3).to(torch.bfloat16)
    core_lora.enable(lin, 2, None, "he_uniform", "he_uniform")
    assert lin.lora_kernel_a.dtype == torch.float32
    y = lin(torch.randn(2, 4, dtype=torch.bfloat16))
    assert y.dtype == torch.bfloat16
    core_lora.merge(lin)
    assert lin.weight.dtype == torch.bfloat16


def test_hugging_face_attention_linears_by_selector():
    pytest.importorskip("transformers")
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    cfg = BertConfig(
        vocab_size=50,
        hidden_size=16,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=16,
        num_labels=2,
    )
    model = fl.wrap(BertForSequenceClassification(cfg))
    model.trainable = False
    picked = model.enable_lora(
        4,
        fl.select.of_type("Linear")
        & fl.select.name("*attention.self.query", "*attention.self.value"),
    )
    assert picked == [
        f"bert.encoder.layer.{i}.attention.self.{n}" for i in range(2) for n in ("query", "value")
    ]
    trainable = [n for n, p in model.module.named_parameters() if p.requires_grad]
    assert trainable == [f"{p}.{w}" for p in picked for w in ("lora_kernel_a", "lora_kernel_b")]
    rng = np.random.default_rng(0)
    x = {"input_ids": rng.integers(0, 50, (16, 8)), "attention_mask": np.ones((16, 8), "int64")}
    before = {n: p.detach().clone() for n, p in model.module.named_parameters()}
    model.compile(fl.optimizers.Adam(1e-2), loss="sparse_categorical_crossentropy")
    model.fit(x, rng.integers(0, 2, 16), epochs=1, batch_size=8, verbose=0)
    moved = {n for n, p in model.module.named_parameters() if not torch.equal(p, before[n])}
    assert moved == set(trainable)  # the adapters, and nothing frozen


def test_save_and_load_keep_lora(tmp_path):
    model = _mlp()
    model.enable_lora(2, "linear_1", lora_alpha=4, b_initializer="he_uniform")
    path = tmp_path / "m.safetensors"
    model.save(path)
    x = torch.randn(3, 8)
    loaded = fl.load(path)
    assert loaded.layers[2].lora_enabled and loaded.layers[2].lora_alpha == 4
    assert torch.equal(loaded(x), model(x))
    assert not loaded.module.linear_1.weight.requires_grad
    loaded.trainable = True
    assert not loaded.module.linear_1.weight.requires_grad  # pinned again after loading
    plain = _mlp()
    plain.load_weights(path)  # a plain model takes the file's LoRA state
    assert plain.layers[2].lora_enabled and torch.equal(plain(x), model(x))
    other = _mlp()
    other.enable_lora(3, "linear_1")
    with pytest.raises(
        ValueError, match="'linear_1' has LoRA rank 3, alpha 3; the saved state has rank 2"
    ):
        other.load_weights(path)


def test_save_and_load_timm_model_with_lora(tmp_path):
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    model = fl.wrap(timm.create_model("resnet10t", pretrained=False, num_classes=3))
    model.enable_lora(2, fl.select.of_type("Conv2d") & fl.select.name("layer4*"))
    model.save(tmp_path / "r.safetensors")
    loaded = fl.load(tmp_path / "r.safetensors")
    model.module.eval()
    loaded.module.eval()
    x = torch.randn(2, 3, 32, 32)
    assert torch.equal(loaded(x), model(x))
    assert loaded.count_params() == model.count_params()


def test_resume_with_lora_is_exact(tmp_path):
    x, y = _data()

    def build(lora=True):
        model = _mlp()
        model.layers[0].trainable = False
        if lora:
            model.enable_lora(2, "linear_1", b_initializer="he_uniform")
        model.compile(fl.optimizers.Adam(1e-2), loss="sparse_categorical_crossentropy")
        return model

    straight = build()
    h1 = straight.fit(x, y, epochs=3, batch_size=16, verbose=0, seed=1)
    build().fit(x, y, epochs=1, batch_size=16, verbose=0, seed=1, checkpoint_dir=tmp_path)
    resumed = build(lora=False)  # the checkpoint's LoRA state is applied on resume
    h2 = resumed.fit(x, y, epochs=3, batch_size=16, verbose=0, seed=1, resume=tmp_path)
    assert h1.history["loss"] == h2.history["loss"]
    for (n, a), b in zip(
        straight.module.state_dict().items(), resumed.module.state_dict().values()
    ):
        assert torch.equal(a, b), n


@pytest.mark.parametrize("when", ["before", "between"])
def test_lora_layer_in_a_frozen_base_is_not_cached(when):
    """The frozen part ends before the LoRA layer; losses equal cache=False."""
    x, y = _data(64)
    losses = {}
    for cache in (True, False):
        torch.manual_seed(0)
        base = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU())
        model = fl.wrap(nn.Sequential(base, nn.Linear(16, 3)))
        model.layers[0].trainable = False
        model.compile(fl.optimizers.Adam(1e-2), loss="sparse_categorical_crossentropy")
        history = []
        if when == "between":  # a first fit caches the whole base
            history += model.fit(x, y, epochs=2, verbose=0, cache=cache, shuffle=False).history[
                "loss"
            ]
            if cache:
                assert model.cache_status["train"].boundary == ("'0.3'",) or "0.3" in str(
                    model.cache_status["train"]
                )
        torch.manual_seed(1)
        model.enable_lora(2, "0.2", b_initializer="he_uniform")
        history += model.fit(x, y, epochs=2, verbose=0, cache=cache, shuffle=False).history["loss"]
        if cache:
            status = str(model.cache_status["train"])
            assert "after '0.1'" in status, status
        losses[cache] = history
    assert losses[True] == losses[False]
