"""``model.export``: ONNX (checked with onnxruntime) and torch.export programs, LoRA merged,
frozen BatchNorm folded, inference mode; the model itself is left as it was."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import frostline as fl
from frostline.api.export import ExportError, inference_module


def _cnn() -> fl.Model:
    """conv -> frozen BN -> ReLU -> LoRA conv -> BN -> pool -> dropout -> LoRA head."""
    torch.manual_seed(0)
    model = fl.Sequential(
        [
            nn.Conv2d(3, 8, 3, padding=1),
            nn.BatchNorm2d(8),
            nn.ReLU(),
            nn.Conv2d(8, 8, 3, bias=False),
            nn.BatchNorm2d(8),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
            nn.Dropout(0.5),
            nn.Linear(8, 4),
        ]
    )
    for bn in (model.module.batch_norm2d, model.module.batch_norm2d_1):
        with torch.no_grad():  # statistics and affine values far from the identity
            bn.running_mean.normal_()
            bn.running_var.uniform_(0.5, 2.0)
            bn.weight.uniform_(0.5, 1.5)
            bn.bias.normal_()
    model.layers[0].trainable = False
    model.layers[1].trainable = False
    model.enable_lora(2, ["conv2d_1", "linear"], b_initializer="he_uniform")
    model.module.train()
    return model


def _expected(model: fl.Model, x: torch.Tensor) -> np.ndarray:
    model.module.eval()
    with torch.no_grad():
        y = model(x).numpy()
    model.module.train()
    return y


def test_inference_module_merges_lora_and_folds_batchnorm_on_a_copy():
    model = _cnn()
    copy_, folded = inference_module(model.module)
    assert folded == [("conv2d", "batch_norm2d"), ("conv2d_1", "batch_norm2d_1")]
    assert not any(isinstance(m, nn.BatchNorm2d) for m in copy_.modules())
    assert not any(fl.wrap(m).lora_enabled for m in copy_.modules())
    assert not copy_.training and not any(p.requires_grad for p in copy_.parameters())
    # the model is as it was
    assert model.layers[3].lora_enabled and model.module.training
    x = torch.randn(3, 3, 10, 10)
    with torch.no_grad():
        np.testing.assert_allclose(copy_(x).numpy(), _expected(model, x), atol=1e-5, rtol=1e-5)


def test_onnx_export_matches_the_model_with_onnxruntime(tmp_path):
    ort = pytest.importorskip("onnxruntime")
    onnx = pytest.importorskip("onnx")
    pytest.importorskip("onnxscript")
    model = _cnn()
    x = torch.randn(2, 3, 10, 10)
    before = {k: v.clone() for k, v in model.module.state_dict().items()}
    path = model.export(tmp_path / "m.onnx", input_shape=(3, 10, 10))
    assert path == tmp_path / "m.onnx"
    graph = onnx.load(str(path)).graph
    assert "BatchNormalization" not in {n.op_type for n in graph.node}  # folded
    assert "Dropout" not in {n.op_type for n in graph.node}  # inference mode
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    for batch in (1, 5):  # the batch size is free
        x = torch.randn(batch, 3, 10, 10)
        (y,) = session.run(None, {name: x.numpy()})
        np.testing.assert_allclose(y, _expected(model, x), atol=1e-5, rtol=1e-5)
    # the model itself: unchanged weights, LoRA still on, still training
    after = model.module.state_dict()
    assert list(after) == list(before) and all(torch.equal(after[k], before[k]) for k in before)
    assert model.layers[8].lora_enabled and model.module.training
    assert [p.name for p in tmp_path.iterdir()] == ["m.onnx"]  # no temp file left


def test_torch_export_program_matches_the_model(tmp_path):
    model = _cnn()
    path = model.export(
        tmp_path / "m.pt2", format="torch", example=np.zeros((2, 3, 10, 10), "float32")
    )
    program = torch.export.load(path)
    targets = {str(n.target) for n in program.graph.nodes if n.op == "call_function"}
    assert not any("batch_norm" in t for t in targets), targets
    x = torch.randn(4, 3, 10, 10)
    with torch.no_grad():
        y = program.module()(x)
    np.testing.assert_allclose(y.numpy(), _expected(model, x), atol=1e-5, rtol=1e-5)


def test_export_takes_keyword_inputs(tmp_path):
    class TwoInputs(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(20, 4)
            self.head = nn.Linear(4, 2)

        def forward(self, input_ids, weights):
            return self.head((self.emb(input_ids) * weights.unsqueeze(-1)).sum(1))

    torch.manual_seed(0)
    model = fl.wrap(TwoInputs())
    model.enable_lora(2, "emb", b_initializer="he_uniform")
    example = {"input_ids": torch.randint(0, 20, (3, 5)), "weights": torch.rand(3, 5)}
    program = torch.export.load(model.export(tmp_path / "k.pt2", format="torch", example=example))
    with torch.no_grad():
        torch.testing.assert_close(
            program.module()(**example), model(**example), atol=1e-5, rtol=1e-5
        )


def test_bad_calls_say_what_was_given_and_expected(tmp_path):
    model = fl.Sequential([nn.Linear(4, 2)])
    with pytest.raises(ValueError, match="format must be one of 'onnx', 'torch', got 'tflite'"):
        model.export(tmp_path / "m.tflite", format="tflite", input_shape=(4,))
    with pytest.raises(ValueError, match=r'format="torch" files end in .pt2'):
        model.export(tmp_path / "m.onnx", format="torch", input_shape=(4,))
    with pytest.raises(ValueError, match="exactly one of example= .* or input_shape="):
        model.export(tmp_path / "m.pt2", format="torch")
    with pytest.raises(ValueError, match="input_shape must be a sequence of positive ints"):
        model.export(tmp_path / "m.pt2", format="torch", input_shape=(0,))
    with pytest.raises(ValueError, match="does not exist"):
        model.export(tmp_path / "no" / "m.pt2", format="torch", input_shape=(4,))
    with pytest.raises(
        ExportError, match=r"could not run on the example \(inputs of shapes \[\(2, 5\)\]"
    ):
        model.export(tmp_path / "m.pt2", format="torch", input_shape=(5,))  # wrong width
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow
def test_onnx_export_of_timm_and_hugging_face_models_with_lora(tmp_path):
    """A timm ResNet-18 (frozen, LoRA on layer4's convs, BatchNorm folded) and a tiny HF BERT
    (LoRA on query/value, keyword inputs): onnxruntime equals the model within 1e-5."""
    ort = pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    timm = pytest.importorskip("timm")
    transformers = pytest.importorskip("transformers")

    torch.manual_seed(0)
    resnet = fl.wrap(timm.create_model("resnet18", pretrained=False, num_classes=3))
    resnet.trainable = False
    resnet.enable_lora(
        4, fl.select.of_type("Conv2d") & fl.select.name("layer4*"), b_initializer="he_uniform"
    )
    session = ort.InferenceSession(str(resnet.export(tmp_path / "r.onnx", input_shape=(3, 64, 64))))
    x = torch.randn(3, 3, 64, 64)
    (y,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    np.testing.assert_allclose(y, _expected(resnet, x), atol=1e-5, rtol=1e-5)

    cfg = transformers.BertConfig(
        vocab_size=50,
        hidden_size=16,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=16,
        num_labels=2,
    )
    bert = fl.wrap(transformers.BertForSequenceClassification(cfg))
    bert.enable_lora(
        2,
        fl.select.of_type("Linear") & fl.select.name("*query", "*value"),
        b_initializer="he_uniform",
    )
    example = {
        "input_ids": torch.randint(0, 50, (2, 8)),
        "attention_mask": torch.ones(2, 8, dtype=torch.long),
    }
    session = ort.InferenceSession(str(bert.export(tmp_path / "b.onnx", example=example)))
    assert [i.name for i in session.get_inputs()] == ["input_ids", "attention_mask"]
    batch = {
        "input_ids": torch.randint(0, 50, (3, 8)),
        "attention_mask": torch.ones(3, 8, dtype=torch.long),
    }
    (logits,) = session.run(None, {k: v.numpy() for k, v in batch.items()})
    bert.module.eval()
    with torch.no_grad():
        want = bert(**batch).logits.numpy()
    np.testing.assert_allclose(logits, want, atol=1e-5, rtol=1e-5)
