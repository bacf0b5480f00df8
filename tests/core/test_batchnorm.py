"""SPEC 4: frozen BatchNorm runs in inference mode, whatever ``model.train()`` says."""

from __future__ import annotations

import numpy as np
import pytest
import timm
import torch
from timm.layers import BatchNormAct2d
from torch import nn

import frostline as fl


def _prime(bn: nn.modules.batchnorm._BatchNorm, seed: int = 0) -> nn.modules.batchnorm._BatchNorm:
    """Give a BatchNorm non-trivial running statistics and affine parameters."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        bn.running_mean.copy_(torch.randn(bn.num_features, generator=g))
        bn.running_var.copy_(torch.rand(bn.num_features, generator=g) + 0.5)
        if bn.affine:
            bn.weight.copy_(torch.rand(bn.num_features, generator=g) + 0.5)
            bn.bias.copy_(torch.randn(bn.num_features, generator=g))
    return bn


def _stats(bn) -> list[torch.Tensor]:
    return [bn.running_mean.clone(), bn.running_var.clone(), bn.num_batches_tracked.clone()]


def _same(a, b) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a, b, strict=True))


KINDS = {
    "BatchNorm1d": (lambda: nn.BatchNorm1d(4), (16, 4)),
    "BatchNorm1d-seq": (lambda: nn.BatchNorm1d(4), (16, 4, 7)),
    "BatchNorm2d": (lambda: nn.BatchNorm2d(4), (16, 4, 5, 5)),
    "SyncBatchNorm": (lambda: nn.SyncBatchNorm(4), (16, 4, 5, 5)),
    "timm-BatchNormAct2d": (lambda: BatchNormAct2d(4, act_layer=nn.ReLU), (16, 4, 5, 5)),
}


@pytest.mark.parametrize("kind", list(KINDS))
def test_frozen_bn_runs_in_inference_mode_after_train(kind):
    factory, shape = KINDS[kind]
    bn = _prime(factory())
    model = fl.wrap(nn.Sequential(bn))
    model.trainable = False
    model.module.train()
    assert bn.training
    stats = _stats(bn)
    x = torch.randn(*shape) * 3 + 1
    out_train = model(x)
    model(torch.randn(*shape))
    assert _same(stats, _stats(bn)), "running statistics must not move"
    assert bn.training, "the module's own train() flag is left as the user set it"
    model.module.eval()
    out_eval = model(x)
    assert torch.equal(out_train, out_eval)


@pytest.mark.parametrize("kind", list(KINDS))
def test_naive_requires_grad_false_still_updates_running_stats(kind):
    # the approach frostline replaces: freezing parameters does not freeze the statistics
    factory, shape = KINDS[kind]
    bn = _prime(factory())
    bn.requires_grad_(False)
    bn.train()
    stats = _stats(bn)
    x = torch.randn(*shape) * 3 + 1
    out = bn(x)
    assert not _same(stats, _stats(bn)), "naive freezing moves running stats"
    bn.eval()
    assert not torch.allclose(out, bn(x)), "and normalises with batch statistics"


def test_trainable_bn_uses_batch_statistics_and_unfreezing_restores_it():
    bn = _prime(nn.BatchNorm1d(4))
    model = fl.wrap(nn.Sequential(bn))
    model.module.train()
    x = torch.randn(16, 4) * 3 + 1
    stats = _stats(bn)
    out = model(x)
    assert not _same(stats, _stats(bn))
    expected = (x - x.mean(0)) / torch.sqrt(x.var(0, unbiased=False) + bn.eps) * bn.weight + bn.bias
    assert torch.allclose(out, expected, atol=1e-5)
    model.trainable = False
    stats = _stats(bn)
    model(x)
    assert _same(stats, _stats(bn))
    model.trainable = True
    model(x)
    assert not _same(stats, _stats(bn)), "unfrozen again: back to batch statistics"


def test_frozen_bn_inside_trainable_model_passes_gradients():
    torch.manual_seed(0)
    lin, bn, head = nn.Linear(3, 4), _prime(nn.BatchNorm1d(4)), nn.Linear(4, 1)
    model = fl.wrap(nn.Sequential(lin, bn, head))
    model.get_layer("1").trainable = False
    model.module.train()
    stats = _stats(bn)
    model(torch.randn(8, 3)).sum().backward()
    assert lin.weight.grad is not None and lin.weight.grad.abs().sum() > 0
    assert bn.weight.grad is None
    assert _same(stats, _stats(bn))


def test_frozen_bn_is_frozen_during_fit_naive_loop_is_not():
    rng = np.random.default_rng(0)
    x = rng.normal(2.0, 3.0, (64, 3)).astype("float32")
    y = rng.integers(0, 2, 64)

    def net():
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(3, 4), _prime(nn.BatchNorm1d(4)), nn.ReLU(), nn.Linear(4, 2))

    model = fl.wrap(net())
    bn = model.module[1]
    model.get_layer("1").trainable = False
    stats = _stats(bn)
    gamma = bn.weight.detach().clone()
    model.compile(
        optimizer=fl.optimizers.SGD(0.1, momentum=0.9), loss="sparse_categorical_crossentropy"
    )
    model.fit(x, y, epochs=2, batch_size=16, verbose=0)
    assert _same(stats, _stats(bn))
    assert torch.equal(gamma, bn.weight)

    # the hand-written PyTorch equivalent with requires_grad_(False) moves the statistics
    naive = net()
    naive[1].requires_grad_(False)
    opt = torch.optim.SGD([p for p in naive.parameters() if p.requires_grad], lr=0.1, momentum=0.9)
    stats = _stats(naive[1])
    naive.train()
    for xb, yb in zip(torch.from_numpy(x).split(16), torch.from_numpy(y).split(16)):
        opt.zero_grad()
        nn.functional.cross_entropy(naive(xb), yb).backward()
        opt.step()
    assert not _same(stats, _stats(naive[1]))


def test_plain_pytorch_loop_sees_the_frozen_bn_policy():
    torch.manual_seed(0)
    module = nn.Sequential(nn.Linear(3, 4), _prime(nn.BatchNorm1d(4)), nn.ReLU(), nn.Linear(4, 2))
    model = fl.wrap(module)
    model.get_layer("1").trainable = False
    bn = module[1]
    stats = _stats(bn)
    opt = torch.optim.Adam(model.trainable_weights, lr=0.01)
    module.train()
    for _ in range(3):
        opt.zero_grad()
        nn.functional.cross_entropy(
            module(torch.randn(8, 3) * 4), torch.randint(0, 2, (8,))
        ).backward()
        opt.step()
    assert _same(stats, _stats(bn))
    assert module[0].weight.grad is not None


def test_batch_stats_mode_keeps_frozen_bn_in_batch_statistics():
    bn = _prime(nn.BatchNorm2d(4))
    twin = _prime(nn.BatchNorm2d(4))
    model = fl.wrap(nn.Sequential(bn))
    model.trainable = False
    model.set_batchnorm_mode("batch_stats")
    model.module.train()
    twin.train()
    x = torch.randn(8, 4, 3, 3) * 2 - 1
    out = model(x)
    assert torch.allclose(out, twin(x), atol=1e-6), "normalised with the batch's statistics"
    assert torch.equal(bn.running_mean, twin.running_mean), "and the running stats follow the batch"
    assert not bn.weight.requires_grad, "the parameters stay frozen"
    # eval() still means inference
    model.module.eval()
    twin.eval()
    assert torch.allclose(model(x), twin(x), atol=1e-6)


def test_batch_stats_mode_in_fit_updates_stats_but_not_frozen_params():
    torch.manual_seed(0)
    module = nn.Sequential(nn.Linear(3, 4), _prime(nn.BatchNorm1d(4)), nn.ReLU(), nn.Linear(4, 2))
    model = fl.wrap(module)
    model.get_layer("1").trainable = False
    model.set_batchnorm_mode("batch_stats")
    bn = module[1]
    stats, gamma = _stats(bn), bn.weight.detach().clone()
    model.compile(optimizer="sgd", loss="sparse_categorical_crossentropy")
    model.fit(
        np.random.rand(32, 3).astype("float32") * 5,
        np.arange(32) % 2,
        epochs=1,
        batch_size=8,
        verbose=0,
    )
    assert not _same(stats, _stats(bn))
    assert torch.equal(gamma, bn.weight)


def test_inference_mode_keeps_trainable_bn_on_running_stats_while_it_trains():
    torch.manual_seed(0)
    module = nn.Sequential(nn.Linear(3, 4), _prime(nn.BatchNorm1d(4)), nn.ReLU(), nn.Linear(4, 2))
    model = fl.wrap(module)
    bn = module[1]
    model.set_batchnorm_mode("inference")
    assert bn.weight.requires_grad, "the policy does not freeze anything"
    stats = _stats(bn)
    gamma, beta = bn.weight.detach().clone(), bn.bias.detach().clone()
    # in train mode it normalises exactly as in eval mode
    x = torch.randn(8, 3)
    module.train()
    out_train = model(x)
    module.eval()
    assert torch.equal(out_train, model(x))
    module.train()
    model.compile(optimizer=fl.optimizers.Adam(0.05), loss="sparse_categorical_crossentropy")
    model.fit(
        np.random.rand(32, 3).astype("float32") * 5,
        np.arange(32) % 2,
        epochs=2,
        batch_size=8,
        verbose=0,
    )
    assert _same(stats, _stats(bn)), "running statistics untouched"
    assert not torch.equal(gamma, bn.weight) and not torch.equal(beta, bn.bias), (
        "gamma/beta still train"
    )


def test_inference_mode_in_a_plain_loop():
    bn = _prime(nn.BatchNorm2d(4))
    model = fl.wrap(nn.Sequential(nn.Conv2d(3, 4, 1), bn))
    model.set_batchnorm_mode("inference")
    opt = torch.optim.SGD(model.trainable_weights, lr=0.1)
    stats, gamma = _stats(bn), bn.weight.detach().clone()
    model.module.train()
    model(torch.randn(4, 3, 5, 5)).pow(2).mean().backward()
    opt.step()
    assert _same(stats, _stats(bn))
    assert not torch.equal(gamma, bn.weight)


def test_auto_mode_restores_default_policy():
    bn = _prime(nn.BatchNorm1d(4))
    model = fl.wrap(nn.Sequential(bn))
    model.set_batchnorm_mode("inference")
    model.set_batchnorm_mode("auto")
    model.module.train()
    stats = _stats(bn)
    model(torch.randn(8, 4))
    assert not _same(stats, _stats(bn))


def test_batchnorm_mode_errors():
    model = fl.wrap(nn.Sequential(nn.BatchNorm1d(2)))
    with pytest.raises(ValueError, match="batch_stats"):
        model.set_batchnorm_mode("train")
    with pytest.raises(ValueError, match="no BatchNorm"):
        fl.wrap(nn.Linear(2, 2)).set_batchnorm_mode("inference")


def test_frozen_timm_efficientnet_matches_eval_in_train_mode():
    torch.manual_seed(0)
    net = timm.create_model("efficientnet_lite0", pretrained=False, num_classes=3)
    for m in net.modules():
        if isinstance(m, nn.BatchNorm2d):
            _prime(m, seed=len(m.running_mean))
    model = fl.wrap(net)
    assert any(isinstance(m, BatchNormAct2d) for m in net.modules())
    model.trainable = False
    bns = [m for m in net.modules() if isinstance(m, nn.BatchNorm2d)]
    stats = [_stats(m) for m in bns]
    x = torch.randn(2, 3, 32, 32)
    net.train()
    with torch.no_grad():
        out_train = model(x)
        net.eval()
        out_eval = model(x)
    assert torch.equal(out_train, out_eval)
    assert all(_same(s, _stats(m)) for s, m in zip(stats, bns))
    # unfreezing just the head's BatchNorm brings it (alone) back to batch statistics
    model.get_layer("bn2").trainable = True
    net.train()
    with torch.no_grad():
        model(x)
    moved = [not _same(s, _stats(m)) for s, m in zip(stats, bns)]
    assert moved == [m is net.bn2 for m in bns]


def test_bn_added_to_sequential_later_gets_the_policy():
    model = fl.Sequential([nn.Linear(3, 4)])
    bn = _prime(nn.BatchNorm1d(4))
    model.add(bn)
    model.layers[1].trainable = False
    model.module.train()
    stats = _stats(bn)
    model(torch.randn(8, 3))
    assert _same(stats, _stats(bn))


def test_bn_frozen_through_plain_requires_grad_after_wrapping():
    # frostline reads freezing done in plain PyTorch too (no flag set): the BN is frozen
    bn = _prime(nn.BatchNorm1d(4))
    model = fl.wrap(nn.Sequential(nn.Linear(3, 4), bn))
    bn.requires_grad_(False)
    assert model.layers[1].trainable is False
    model.module.train()
    stats = _stats(bn)
    model(torch.randn(8, 3))
    assert _same(stats, _stats(bn))


def test_batch_stats_mode_for_frozen_bn_in_the_frozen_prefix():
    # the frozen prefix is normally run as an inference copy and cached; a frozen BN kept
    # in batch-statistics mode must still see each batch (no cache, no folding)
    torch.manual_seed(0)
    bn = _prime(nn.BatchNorm2d(4))
    module = nn.Sequential(
        nn.Conv2d(3, 4, 3), bn, nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 2)
    )
    model = fl.wrap(module)
    model.freeze(fl.select.first(2))
    model.set_batchnorm_mode("batch_stats")
    stats = _stats(bn)
    model.compile(optimizer="sgd", loss="sparse_categorical_crossentropy")
    x = np.random.rand(16, 3, 6, 6).astype("float32") * 4
    model.fit(x, np.arange(16) % 2, epochs=2, batch_size=8, shuffle=False, verbose=0)
    assert int(bn.num_batches_tracked) == int(stats[2]) + 4, "one update per training batch"
    assert not torch.equal(stats[0], bn.running_mean)


def test_auto_mode_frozen_bn_in_the_frozen_prefix_stays_put_during_fit():
    torch.manual_seed(0)
    bn = _prime(nn.BatchNorm2d(4))
    module = nn.Sequential(
        nn.Conv2d(3, 4, 3), bn, nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 2)
    )
    model = fl.wrap(module)
    model.freeze(fl.select.first(2))
    stats = _stats(bn)
    model.compile(optimizer="sgd", loss="sparse_categorical_crossentropy")
    x = np.random.rand(16, 3, 6, 6).astype("float32") * 4
    model.fit(x, np.arange(16) % 2, epochs=2, batch_size=8, verbose=0)
    assert _same(stats, _stats(bn))
