"""Tests for frostline.api.zoo (CPU, offline)."""

from __future__ import annotations

import time
from collections import OrderedDict

import numpy as np
import pytest
import torch
from PIL import Image
from sklearn.datasets import load_sample_image

from frostline.api import zoo
from frostline.api.zoo import ZooError, available, create_module, data_config, preprocess

LITE0 = "efficientnet_lite0"
CHINA_CLASSES = {497, 698, 442, 663}  # church, palace, bell cote, monastery
DAISY = 985


@pytest.fixture(scope="module")
def file_state() -> OrderedDict[str, torch.Tensor]:
    return zoo._load_lite0_file()


@pytest.fixture(scope="module")
def lite0() -> torch.nn.Module:
    return create_module(LITE0).eval()


@pytest.fixture(scope="module")
def china() -> np.ndarray:
    return load_sample_image("china.jpg")


def _top5(model: torch.nn.Module, x: torch.Tensor) -> list[int]:
    with torch.no_grad():
        return model.eval()(x).topk(5, dim=-1).indices[0].tolist()


# ----------------------------------------------------------------- weight mapping


def test_mapping_covers_every_key_in_order(lite0, file_state):
    loaded = lite0.state_dict()
    assert len(loaded) == len(file_state) == 296
    for (fk, fv), (mk, mv) in zip(file_state.items(), loaded.items(), strict=True):
        assert fk.rsplit(".", 1)[-1] == mk.rsplit(".", 1)[-1], (fk, mk)
        assert fv.shape == mv.shape and fv.dtype == mv.dtype, (fk, mk)
        assert torch.equal(fv, mv), (fk, mk)
    # spot-check that structurally corresponding modules were paired
    pairs = dict(zip(file_state, loaded, strict=True))
    assert pairs["_conv_stem.weight"] == "conv_stem.weight"
    assert pairs["_bn0.running_var"] == "bn1.running_var"
    assert pairs["_blocks.0._project_conv.weight"] == "blocks.0.0.conv_pw.weight"
    assert pairs["_blocks.1._expand_conv.weight"] == "blocks.1.0.conv_pw.weight"
    assert pairs["_blocks.15._project_conv.weight"] == "blocks.6.0.conv_pwl.weight"
    assert pairs["_bn1.running_mean"] == "bn2.running_mean"
    assert pairs["_fc.weight"] == "classifier.weight"


def test_mapping_errors_name_both_keys(file_state, lite0):
    target = lite0.state_dict()
    items = list(file_state.items())
    # swap BN weight and bias: same shapes, different roles
    i = next(j for j, (k, _) in enumerate(items) if k == "_bn0.weight")
    items[i], items[i + 1] = items[i + 1], items[i]
    with pytest.raises(ZooError, match=r"_bn0\.bias.*bn1\.weight"):
        zoo._pair_state_dicts(OrderedDict(items), target)
    # a shape mismatch names both keys and shapes
    bad = OrderedDict(file_state)
    bad["_conv_stem.weight"] = torch.zeros(16, 3, 3, 3)
    expected = r"_conv_stem\.weight.*\(16, 3, 3, 3\).*conv_stem\.weight.*\(32, 3, 3, 3\)"
    with pytest.raises(ZooError, match=expected):
        zoo._pair_state_dicts(bad, target)
    # a count mismatch is reported
    short = OrderedDict(list(file_state.items())[:-1])
    with pytest.raises(ZooError, match="float tensors"):
        zoo._pair_state_dicts(short, target)


def test_lite0_architecture_matches_tf_training(lite0):
    bns = [m for m in lite0.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert len(bns) == 49 and all(m.eps == 1e-3 for m in bns)
    assert type(lite0.conv_stem).__name__ == "Conv2dSame"


# ----------------------------------------------------------------- ImageNet sanity


def test_imagenet_sanity_china(lite0, china):
    x = preprocess(china, LITE0)
    assert x.shape == (1, 3, 224, 224)
    assert CHINA_CLASSES & set(_top5(lite0, x))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_random_weights_fail_the_sanity_check(china, seed):
    torch.manual_seed(seed)
    random_model = create_module(LITE0, pretrained=False)
    assert not CHINA_CLASSES & set(_top5(random_model, preprocess(china, LITE0)))


def test_imagenet_sanity_flower(lite0):
    x = preprocess(load_sample_image("flower.jpg"), LITE0)
    assert _top5(lite0, x)[0] == DAISY


def test_normalisation_matches_stem_batchnorm_statistics(lite0, china):
    """The stem BN's running means are what 0.5/0.5 inputs produce, not ImageNet-normalised ones."""
    images = [china, load_sample_image("flower.jpg")]
    x = torch.cat([preprocess(im, LITE0, crop_pct=1.0) for im in images])
    raw = x * 0.5 + 0.5  # back to [0, 1]
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    imagenet = (raw - mean) / std
    half = (raw - 0.5) / 0.5
    running = lite0.bn1.running_mean

    def corr(x: torch.Tensor) -> float:
        with torch.no_grad():
            mu = lite0.conv_stem(x).mean(dim=(0, 2, 3))
        return float(torch.corrcoef(torch.stack([mu, running]))[0, 1])

    assert corr(half) > 0.98
    assert corr(imagenet) < 0.9
    assert data_config(LITE0)["mean"] == (0.5, 0.5, 0.5)
    assert data_config(LITE0)["std"] == (0.5, 0.5, 0.5)
    assert lite0.pretrained_cfg["mean"] == (0.5, 0.5, 0.5)  # timm.data.resolve_data_config agrees


# ----------------------------------------------------------------- heads


def test_num_classes_keeps_backbone(lite0):
    model = create_module(LITE0, num_classes=10).eval()
    with torch.no_grad():
        assert model(torch.zeros(2, 3, 224, 224)).shape == (2, 10)
    ref = lite0.state_dict()
    got = model.state_dict()
    assert got["classifier.weight"].shape == (10, 1280)
    backbone = [k for k in ref if not k.startswith("classifier.")]
    assert backbone and all(torch.equal(ref[k], got[k]) for k in backbone)


def test_headless_gives_pooled_features(lite0):
    model = create_module(LITE0, headless=True).eval()
    x = preprocess(np.full((2, 100, 120, 3), 128, np.uint8), LITE0)
    with torch.no_grad():
        feats = model(x)
        assert feats.shape == (2, 1280)
        assert torch.allclose(feats, lite0.forward_head(lite0.forward_features(x), pre_logits=True))
    assert not any(k.startswith("classifier.") for k in model.state_dict())


def test_headless_with_num_classes_is_an_error():
    with pytest.raises(ZooError, match="headless"):
        create_module(LITE0, headless=True, num_classes=3)


# ----------------------------------------------------------------- other names


def test_unknown_name_suggests_close_match():
    with pytest.raises(ZooError) as info:
        create_module("efficientnet_lite")
    msg = str(info.value)
    assert "'efficientnet_lite'" in msg and "efficientnet_lite0" in msg
    assert isinstance(info.value, ValueError)
    with pytest.raises(ZooError, match="mobilenetv2_100"):
        data_config("mobilenetv2_10O")


@pytest.mark.timeout(30)
def test_pretrained_timm_name_fails_fast_when_offline(monkeypatch, tmp_path):
    """Deterministic: forced offline mode and empty caches."""
    import huggingface_hub.constants as hf_constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(tmp_path / "hf"))
    start = time.perf_counter()
    with pytest.raises(ZooError, match=r"'mobilenetv2_100' could not be fetched") as info:
        create_module("mobilenetv2_100")
    assert time.perf_counter() - start < 5
    assert "efficientnet_lite0" in str(info.value) and "pretrained=False" in str(info.value)


@pytest.mark.timeout(30)
def test_pretrained_timm_name_fails_fast_on_this_machine():
    """No patching: on a machine without network the probe must fail in seconds."""
    name = "resnet18"
    cfg = zoo._pretrained_cfg(name)
    if zoo._cached_weights(cfg) is not None:
        pytest.skip("resnet18 weights are cached locally")
    if zoo._host_reachable(zoo._hf_endpoint(), timeout=2.0):
        pytest.skip("the weight host is reachable; a download would start")
    start = time.perf_counter()
    with pytest.raises(ZooError, match="could not be fetched"):
        create_module(name)
    assert time.perf_counter() - start < 10


def test_pretrained_false_builds_timm_models():
    torch.manual_seed(0)
    x = torch.zeros(1, 3, 96, 96)
    cases = [({}, 1000), ({"num_classes": 5}, 5), ({"headless": True}, 1280)]
    for kwargs, width in cases:
        model = create_module("mobilenetv2_100", pretrained=False, **kwargs).eval()
        with torch.no_grad():
            assert model(x).shape == (1, width)


def test_available_and_data_config():
    assert available() == [LITE0]
    cfg = data_config(LITE0)
    assert cfg["input_size"] == (3, 224, 224) and cfg["interpolation"] == "bicubic"
    other = data_config("resnet18")
    assert other["mean"] == (0.485, 0.456, 0.406) and len(other["input_size"]) == 3


# ----------------------------------------------------------------- preprocess


def test_preprocess_inputs_and_values(china):
    gray = np.full((50, 80, 3), 255, np.uint8)
    x = preprocess(gray, LITE0, size=32)
    assert x.shape == (1, 3, 32, 32) and x.dtype == torch.float32
    assert torch.allclose(x, torch.ones_like(x))  # (1 - 0.5) / 0.5
    batch = np.stack([china, china[:, ::-1]])
    xb = preprocess(batch, LITE0)
    assert xb.shape == (2, 3, 224, 224)
    assert torch.allclose(xb[0], preprocess(china, LITE0)[0])
    pil = preprocess(Image.fromarray(china), LITE0)
    assert torch.allclose(pil, xb[:1])
    mixed = preprocess([china, np.zeros((40, 30), np.uint8)], LITE0, size=(64, 48))
    assert mixed.shape == (2, 3, 64, 48)
    assert torch.allclose(mixed[1], torch.full_like(mixed[1], -1.0))
    with pytest.raises(ZooError, match="uint8"):
        preprocess(np.zeros((8, 8, 3), np.float32), LITE0)


def test_pretrained_timm_name_loads_from_local_cache(monkeypatch, tmp_path):
    """Weights already in the Hugging Face cache load with no network access at all."""
    import huggingface_hub.constants as hf_constants
    from safetensors.torch import save_file

    name = "mobilenetv2_100"
    repo = zoo._pretrained_cfg(name).hf_hub_id
    torch.manual_seed(0)
    reference = create_module(name, pretrained=False).state_dict()
    commit = "0" * 40
    repo_dir = tmp_path / ("models--" + repo.replace("/", "--"))
    (repo_dir / "refs").mkdir(parents=True)
    (repo_dir / "refs" / "main").write_text(commit)
    snapshot = repo_dir / "snapshots" / commit
    snapshot.mkdir(parents=True)
    save_file(
        {k: v.contiguous() for k, v in reference.items()}, str(snapshot / "model.safetensors")
    )
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(tmp_path))

    loaded = create_module(name).state_dict()
    assert all(torch.equal(reference[k], loaded[k]) for k in reference)
    retargeted = create_module(name, num_classes=7).state_dict()
    assert retargeted["classifier.weight"].shape == (7, 1280)
    assert torch.equal(retargeted["conv_stem.weight"], reference["conv_stem.weight"])
