"""The frozen prefix: found where it should be, run without autograd, numerically unchanged.

* the prefix (stages before the first stage holding a trainable parameter) runs with no
  autograd recording: the activation it hands to the trainable part has no ``grad_fn``,
  frozen parameters never get a ``.grad``, and the optimizer holds only trainable ones;
* the boundary sits right below the first trainable stage: for ``Sequential([base, head])``,
  for timm models with frozen leading blocks and for leaf-layer selections;
* freezing does not change the forward (SPEC 5), the optimised prefix (BatchNorm folded,
  channels_last) gives the unoptimised numbers within float tolerance, and gradients
  still flow through frozen layers to trainable layers before them.
"""

from __future__ import annotations

import re

import numpy as np
import pytest
import timm
import torch
from torch import nn
from torch.optim.optimizer import register_optimizer_step_pre_hook
from torch.utils.data import DataLoader, TensorDataset

import frostline as fl
from frostline.engine.runner import Runner

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: one thread, no contention


def conv_base(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    body = nn.Sequential(
        nn.Conv2d(3, 6, 3, padding=1),
        nn.BatchNorm2d(6),
        nn.ReLU(),
        nn.Conv2d(6, 6, 3, padding=1),
        nn.BatchNorm2d(6),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
    )
    with torch.no_grad():
        for m in body.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.3, 0.3)
    return body


def images(n: int = 32, side: int = 8, classes: int = 3, seed: int = 0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, 3, side, side)).astype(np.float32)
    return x, rng.integers(0, classes, n).astype(np.int64)


def fit_notes(model: fl.Model, x, y, capsys, **kw) -> list[str]:
    kw.setdefault("epochs", 1)
    kw.setdefault("seed", 0)
    if not isinstance(x, DataLoader):
        kw.setdefault("batch_size", 16)
    capsys.readouterr()
    model.fit(x, y, verbose=2, **kw)
    return re.findall(r"cache: (.*)$", capsys.readouterr().out, re.MULTILINE)


def boundary(model: fl.Model) -> str:
    runner = model._trainer.runner
    assert isinstance(runner, Runner)
    return runner.boundary_name


class GradRecorder:
    """Names of the parameters holding a gradient at each optimizer step (any optimizer)."""

    def __init__(self, module: nn.Module) -> None:
        self.names = {id(p): n for n, p in module.named_parameters()}
        self.seen: set[str] = set()

    def __enter__(self) -> GradRecorder:
        def hook(optimizer, args, kwargs):
            for group in optimizer.param_groups:
                for p in group["params"]:
                    if p.grad is not None:
                        self.seen.add(self.names[id(p)])
            self.steps += 1

        self.steps = 0
        self.handle = register_optimizer_step_pre_hook(hook)
        return self

    def __exit__(self, *exc) -> None:
        self.handle.remove()


# ----------------------------------------------------------- no autograd in the prefix


@pytest.mark.parametrize("source", ["cached", "uncached", "dataloader"])
def test_frozen_prefix_runs_without_autograd(source, capsys):
    x, y = images()
    base = fl.wrap(conv_base(), name="base")
    head = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3))
    model = fl.Sequential([base, head])
    base.trainable = False
    model.compile(optimizer=fl.optimizers.Adam(1e-2), loss="sparse_categorical_crossentropy")
    seen: list[torch.Tensor] = []
    # the head's first layer: the stage right after the boundary
    handle = head[0].register_forward_pre_hook(lambda m, args: seen.append(args[0]))
    kw: dict = {"cache": False} if source == "uncached" else {}
    data = (x, y)
    if source == "dataloader":
        ds = TensorDataset(torch.from_numpy(x), torch.from_numpy(y))
        data = (DataLoader(ds, batch_size=16), None)
    with GradRecorder(model.module) as rec:
        notes = fit_notes(model, *data, capsys, epochs=2, **kw)
    handle.remove()
    expected = {"cached": "built", "uncached": "off (cache=False)", "dataloader": "off (data"}
    assert notes[0].startswith(expected[source]), notes
    assert boundary(model) == "base.7"
    # the boundary activation the head trains on: no graph behind it (plus the model's
    # start-up checks on two samples, also without a graph)
    assert rec.steps == 4 and len(seen) >= 4
    assert sorted(len(t) for t in seen)[-4:] == [16, 16, 16, 16]
    assert all(t.grad_fn is None and not t.requires_grad for t in seen)
    # frozen parameters never got a gradient, every trainable one did
    trainable = {n for n, p in model.module.named_parameters() if p.requires_grad}
    assert (
        rec.seen
        == trainable
        == {"sequential.0.weight", "sequential.0.bias", "sequential.2.weight", "sequential.2.bias"}
    )
    assert all(p.grad is None for p in base.module.parameters())
    # optimizer state holds only the trainable parameters
    opt = model.optimizer
    in_groups = {id(p) for g in opt.param_groups for p in g["params"]}
    assert in_groups == {id(p) for p in model.trainable_weights}
    assert {id(p) for p in opt.state} == in_groups


def test_frozen_prefix_activation_is_detached_even_for_inputs_that_require_grad():
    base = fl.wrap(conv_base(), name="base")
    model = fl.Sequential([base, nn.Linear(6, 3)])
    base.trainable = False
    runner = Runner(model.module)
    x = torch.randn(4, 3, 8, 8, requires_grad=True)
    runner.verify(x.detach())
    (out,) = runner.run_prefix(x)
    assert out.grad_fn is None and not out.requires_grad
    assert out.shape == (4, 6)


# ------------------------------------------------------------------ where the boundary is


def test_boundary_of_sequential_base_head(capsys):
    x, y = images()
    base = fl.wrap(conv_base(), name="base")
    model = fl.Sequential([base, nn.Linear(6, 3)])
    base.trainable = False
    model.compile(optimizer="sgd", loss="sparse_categorical_crossentropy")
    notes = fit_notes(model, x, y, capsys)
    assert notes[0].startswith("built (32 samples after 'base.7'"), notes
    # unfreeze the second conv: the prefix shrinks to the stages before it
    base.layers[3].trainable = True
    notes = fit_notes(model, x, y, capsys)
    assert boundary(model) == "base.2"
    assert notes[0].startswith("built (32 samples after 'base.2'"), notes
    # everything trainable: no prefix at all
    model.trainable = True
    notes = fit_notes(model, x, y, capsys)
    assert boundary(model) == "(none)"
    assert notes[0] == "off (no frozen part: the first computation is trainable)"


@pytest.mark.parametrize(
    ("arch", "frozen", "expected"),
    [
        ("resnet18", ("conv1", "bn1", "layer1"), "layer1.1"),  # layers expand into blocks
        ("resnet18", ("conv1", "bn1", "layer1", "layer2", "layer3"), "layer3.1"),
        ("mobilenetv2_100", ("conv_stem", "bn1", "blocks.0", "blocks.1", "blocks.2"), "blocks.2.2"),
        ("efficientnet_b0", ("conv_stem", "bn1", "blocks.0"), "blocks.0.0"),
    ],
)
def test_boundary_of_timm_models_with_frozen_leading_blocks(arch, frozen, expected, capsys):
    x, y = images(n=16, side=32, classes=5)
    torch.manual_seed(0)
    model = fl.wrap(timm.create_model(arch, pretrained=False, num_classes=5))
    model.freeze(fl.select.name(*frozen))
    model.compile(optimizer="sgd", loss="sparse_categorical_crossentropy")
    notes = fit_notes(model, x, y, capsys)
    assert boundary(model).startswith(expected)  # the block's output (its residual add, ...)
    assert notes[0].startswith(f"built (16 samples after '{expected}"), notes


def test_boundary_of_leaf_selection_on_mobilenetv2(capsys):
    x, y = images(n=16, side=32, classes=10)
    torch.manual_seed(0)
    base = fl.models.pretrained("mobilenetv2_100", pretrained=False, headless=True)
    model = fl.Sequential([base, nn.Linear(1280, 10)])
    base.trainable = False
    model.compile(optimizer=fl.optimizers.Adam(1e-3), loss="sparse_categorical_crossentropy")
    fit_notes(model, x, y, capsys)
    assert boundary(model) == "mobilenetv2_100.global_pool.flatten"  # the whole base (its
    # classifier is an nn.Identity: recomputed, not cached twice)
    base.unfreeze(fl.select.last(10))
    model.compile(optimizer=fl.optimizers.Adam(1e-5), loss="sparse_categorical_crossentropy")
    notes = fit_notes(model, x, y, capsys)
    # the first unfrozen leaf is blocks.5.2.conv_pwl: the frozen part ends right below it,
    # with the block's input kept for its residual connection
    first = next(leaf for leaf in base.leaf_layers() if leaf.trainable)
    assert first.path == "blocks.5.2.conv_pwl"
    assert boundary(model) == "mobilenetv2_100.blocks.5.1#add + mobilenetv2_100.blocks.5.2.bn2"
    after = "'mobilenetv2_100.blocks.5.1#add' + 'mobilenetv2_100.blocks.5.2.bn2'"
    assert notes[0].startswith(f"built (16 samples after {after}"), notes
    assert sum(p.numel() for p in model.trainable_weights) == 1_052_810
    # frozen BatchNorms inside the partly trainable block keep inference mode in the suffix
    stats = base.module.blocks[5][2].bn1.running_mean.clone()
    fit_notes(model, x, y, capsys)
    assert torch.equal(base.module.blocks[5][2].bn1.running_mean, stats)


def test_boundary_follows_structure_changes_between_fits(capsys):
    x, y = images()
    model = fl.Sequential([nn.Linear(3 * 8 * 8, 16), nn.ReLU(), nn.Linear(16, 3)])
    model.layers[0].trainable = False
    model.compile(optimizer="sgd", loss="sparse_categorical_crossentropy")
    flat = x.reshape(len(x), -1)
    fit_notes(model, flat, y, capsys)
    assert boundary(model) == "re_lu"
    model.pop()
    model.add(nn.Linear(16, 5))
    model.compile(optimizer="sgd", loss="sparse_categorical_crossentropy")
    y5 = np.arange(len(x)) % 5
    fit_notes(model, flat, y5, capsys)  # trains the new 5-way layer, not the popped one
    assert model.predict(flat).shape == (len(x), 5)
    assert model._trainer.runner.suffix(torch.zeros(2, 16)).shape == (2, 5)
    # a frozen layer replaced by another one: the new weights are used, not the old store
    model.module.linear = nn.Linear(3 * 8 * 8, 16)
    model.layers[0].trainable = False
    fit_notes(model, flat, y5, capsys)
    (got,) = model._trainer.runner.run_prefix(torch.from_numpy(flat[:4]))
    with torch.no_grad():
        want = torch.relu(model.module.linear(torch.from_numpy(flat[:4])))
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)


# ------------------------------------------------------- forward unchanged (SPEC 5)


def test_forward_unchanged_by_freezing():
    torch.manual_seed(0)
    mlp = fl.Sequential([nn.Linear(5, 8), nn.LayerNorm(8), nn.GELU(), nn.Linear(8, 2)])
    x = torch.randn(6, 5)
    mlp.module.train()
    before = mlp(x)
    mlp.layers[0].trainable = False
    mlp.layers[1].trainable = False
    assert torch.equal(mlp(x), before)  # train mode, no BatchNorm: bit for bit

    conv = fl.wrap(conv_base())
    xi = torch.randn(4, 3, 8, 8)
    conv.module.eval()
    before = conv(xi)
    conv.trainable = False
    assert torch.equal(conv(xi), before)
    # frozen BatchNorm in a train()-mode model computes what eval() computes (SPEC 4)
    conv.module.train()
    assert torch.equal(conv(xi), before)


@pytest.mark.parametrize("arch", ["mobilenetv2_100", "resnet18", "efficientnet_b0"])
def test_optimised_prefix_matches_the_unoptimised_forward(arch):
    torch.manual_seed(0)
    net = timm.create_model(arch, pretrained=False, num_classes=0)
    with torch.no_grad():  # non-trivial BatchNorm statistics, so folding is exercised
        for m in net.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 2.0)
    base = fl.wrap(net, name="base")
    model = fl.Sequential([base, nn.Linear(net.num_features, 4)])
    base.trainable = False
    runner = Runner(model.module)
    x = torch.randn(8, 3, 48, 48)
    runner.verify(x)
    (fast,) = runner.run_prefix(x)
    assert (
        runner.executor.fused is not None and runner.executor.fused.folded
    )  # BatchNorm really folded
    with torch.no_grad():
        ref = net.eval()(x)
    torch.testing.assert_close(fast, ref, rtol=1e-4, atol=1e-5)


def frozen_resnet_runner() -> tuple[nn.Module, Runner, torch.Tensor]:
    """A timm ResNet-18 base frozen under a new head, its runner and a batch it ran on."""
    torch.manual_seed(0)
    net = timm.create_model("resnet18", pretrained=False, num_classes=0)
    base = fl.wrap(net, name="base")
    model = fl.Sequential([base, nn.Linear(net.num_features, 4)])
    base.trainable = False
    runner = Runner(model.module)
    x = torch.randn(8, 3, 32, 32)
    runner.verify(x)
    runner.run_prefix(x)
    return net, runner, x


def test_optimised_prefix_shares_the_weights_and_sees_data_writes():
    """The folded view keeps no weight copy, so a write that bumps no version is seen too."""
    net, runner, x = frozen_resnet_runner()
    fused = runner.executor.fused
    assert fused is not None and fused.folded
    mine = {id(t) for t in (*net.parameters(), *net.buffers())}
    assert all(id(t) in mine for t in (*fused.parameters(), *fused.buffers()))

    net.bn1.running_var.data.copy_(net.bn1.running_var * 3.0)  # no version bump
    net.conv1.weight.data.copy_(net.conv1.weight * -1.0)
    (fast,) = runner.run_prefix(x)
    assert runner.executor.fused is fused  # the same view, not rebuilt
    with torch.no_grad():
        ref = net.eval()(x)
    torch.testing.assert_close(fast, ref, rtol=1e-4, atol=1e-5)


def test_the_split_output_is_the_copy_reference_while_the_weights_hold(monkeypatch):
    """The split ran its frozen part on the example already: the folded copy is checked
    against that output, not a run of its own, unless the frozen weights changed since."""
    from frostline.engine.runner import executor as runner_mod

    seen: list[tuple[bool, bool]] = []
    real = runner_mod.inference_copy

    def spy(*args, **kwargs):
        out = real(*args, **kwargs)
        seen.append((kwargs.get("reference") is not None, out is not None))
        return out

    monkeypatch.setattr(runner_mod, "inference_copy", spy)
    net, runner, x = frozen_resnet_runner()
    assert seen == [(True, True)]
    with torch.no_grad():
        net.conv1.weight.mul_(-1.0)  # a new version: the split's output is stale
    (fast,) = runner.run_prefix(x)
    assert seen[1:] == [(False, True)]  # checked against a fresh reference, and used
    with torch.no_grad():
        ref = net.eval()(x)
    torch.testing.assert_close(fast, ref, rtol=1e-4, atol=1e-5)


def test_checking_reused_caches_folds_no_new_copy(monkeypatch):
    """The first reuse of the training and validation caches recomputes a few entries
    with the plain frozen part: folding a copy for them (and again for the other role
    after each switch between train and eval) cost more than the check itself."""
    from frostline.engine.runner import executor as runner_mod

    folds: list[int] = []
    real = runner_mod.inference_copy

    def spy(*args, **kwargs):
        folds.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(runner_mod, "inference_copy", spy)
    x, y = images(n=40)
    base = fl.wrap(conv_base(), name="base")
    model = fl.Sequential([base, nn.Linear(6, 3)])
    base.trainable = False
    model.compile(optimizer="sgd", loss="sparse_categorical_crossentropy")
    model.fit(
        x[:32], y[:32], epochs=3, batch_size=8, verbose=0, seed=0, validation_data=(x[32:], y[32:])
    )
    assert [str(s).split()[0] for s in model.cache_status.values()] == ["reused", "reused"]
    assert len(folds) == 2  # one folded copy per role, for the build


def test_evaluate_through_the_cache_matches_a_plain_forward():
    x, y = images(n=40)
    base = fl.wrap(conv_base(), name="base")
    head = nn.Linear(6, 3)
    model = fl.Sequential([base, head])
    base.trainable = False
    model.compile(optimizer="sgd", loss="sparse_categorical_crossentropy")
    model.fit(x, y, epochs=1, batch_size=8, verbose=0, seed=0)
    cached = model.evaluate(x, y, batch_size=8, verbose=0)
    with torch.no_grad():
        logits = model.module.eval()(torch.from_numpy(x))
        plain = float(nn.functional.cross_entropy(logits, torch.from_numpy(y)))
    assert cached == pytest.approx(plain, abs=1e-5)


# ------------------------------------ gradients through frozen layers to earlier ones


def test_gradients_flow_through_frozen_layers_to_earlier_trainable_ones(capsys):
    torch.manual_seed(0)
    model = fl.Sequential([nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 3)])
    first, middle, last = model.layers[0], model.layers[2], model.layers[4]
    middle.trainable = False
    x = np.random.default_rng(0).standard_normal((32, 4)).astype(np.float32)
    y = np.arange(32) % 3

    out = model(torch.from_numpy(x))
    nn.functional.cross_entropy(out, torch.from_numpy(y)).backward()
    assert first.module.weight.grad is not None and first.module.weight.grad.abs().sum() > 0
    assert middle.module.weight.grad is None
    for p in model.module.parameters():
        p.grad = None

    w_first, w_middle = first.module.weight.detach().clone(), middle.module.weight.detach().clone()
    model.compile(optimizer=fl.optimizers.SGD(0.1), loss="sparse_categorical_crossentropy")
    with GradRecorder(model.module) as rec:
        notes = fit_notes(model, x, y, capsys)
    assert notes[0] == "off (no frozen part: the first computation is trainable)"
    assert boundary(model) == "(none)"
    assert rec.seen == {"linear.weight", "linear.bias", "linear_2.weight", "linear_2.bias"}
    assert not torch.equal(first.module.weight, w_first)  # trained through the frozen middle
    assert torch.equal(middle.module.weight, w_middle)
    assert last.trainable


def test_gradients_flow_through_a_frozen_conv_block(capsys):
    torch.manual_seed(0)
    body = conv_base()
    model = fl.Sequential([nn.Conv2d(3, 3, 1), fl.wrap(body, name="body"), nn.Linear(6, 3)])
    model.layers[1].trainable = False
    x, y = images()
    w_body = {k: v.clone() for k, v in body.state_dict().items()}
    w_first = model.layers[0].module.weight.detach().clone()
    model.compile(optimizer=fl.optimizers.SGD(0.1), loss="sparse_categorical_crossentropy")
    with GradRecorder(model.module) as rec:
        notes = fit_notes(model, x, y, capsys)
    assert notes[0] == "off (no frozen part: the first computation is trainable)"
    assert rec.seen == {"conv2d.weight", "conv2d.bias", "linear.weight", "linear.bias"}
    assert not torch.equal(model.layers[0].module.weight, w_first)
    for k, v in body.state_dict().items():  # frozen BatchNorm statistics untouched too
        assert torch.equal(v, w_body[k]), k


def test_uncached_dataset_samples_are_read_once_per_epoch():
    class Counting(torch.utils.data.Dataset):
        def __init__(self):
            self.reads = 0

        def __len__(self):
            return 24

        def __getitem__(self, i):
            self.reads += 1
            return torch.full((4,), float(i) / 24), i % 2

    torch.manual_seed(0)
    model = fl.Sequential([nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2)])
    model.layers[0].trainable = False
    model.compile("adam", "sparse_categorical_crossentropy")
    ds = Counting()  # not declared deterministic: no cache, every batch read from the dataset
    model.fit(ds, epochs=2, batch_size=8, verbose=0)
    assert ds.reads <= 2 * 24 + 4  # two epochs, plus the 4-sample probe that traces the model


def test_fit_carries_its_cache_options_to_the_runner_unchanged(tmp_path) -> None:
    """One frozen CacheOptions, named as fit names them, from fit to the engine."""
    from frostline.engine.runner import CacheOptions

    model = fl.wrap(nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2)))
    model.layers[0].trainable = False
    model.compile(optimizer="sgd", loss="sparse_categorical_crossentropy")
    x, y = np.ones((8, 4), "float32"), np.arange(8) % 2
    model.fit(x, y, verbose=0, cache_memory_bytes=1 << 20, cache_dir=tmp_path)
    runner = model._trainer.runner
    assert runner.options == CacheOptions(cache_memory_bytes=1 << 20, cache_dir=tmp_path)
    model.fit(x, y, verbose=0, cache_memory_bytes=1 << 20, cache_dir=tmp_path)
    assert model._trainer.runner is runner  # the same options: the same runner and cache
    model.fit(x, y, verbose=0, cache=False)
    assert model._trainer.runner.options == CacheOptions(cache=False)
    with pytest.raises(ValueError, match="cache must be True, False or 'auto', got 'yes'"):
        model.fit(x, y, verbose=0, cache="yes")
