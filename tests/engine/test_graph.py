"""The frozen part from the dataflow graph (frostline.engine.frozen), on many architectures.

For each model (tiny configs, random init): freeze all but the head (phase 1) or all but
the last few weights (phase 2), trace, partition, and check that
* ``trainable(*frozen(x))`` equals the model's forward (eval; train where nothing random),
* the trainable part holds the user's own Parameter objects (``p is q``),
* the frozen part is non-trivial and its frontier is per-sample.
"""

from __future__ import annotations

import numpy as np
import pytest
import timm
import torch
import torchvision
from hf_models import hf_bert, hf_gpt2
from torch import nn

import frostline as fl
from frostline.core import batchnorm
from frostline.engine.frozen import (
    GraphError,
    call_model,
    inputs_of,
    partition,
    same_outputs,
    trace,
)
from frostline.engine.runner import CacheState, CacheStatus, OffReason

pytestmark = pytest.mark.usefixtures("one_thread")


class SkipShared(nn.Module):
    """Skips and one layer used twice."""

    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Linear(6, 8)
        self.shared = nn.Linear(8, 8)
        self.mid = nn.Linear(8, 8)
        self.head = nn.Linear(16, 3)

    def forward(self, x):
        a = torch.relu(self.inp(x))
        b = self.shared(a)
        c = self.shared(torch.relu(self.mid(b)) + a)
        return self.head(torch.cat([b, c], 1))


def images() -> torch.Tensor:
    return torch.randn(4, 3, 32, 32)


def tokens() -> dict[str, torch.Tensor]:
    ids = torch.randint(3, 100, (4, 12))
    mask = torch.ones(4, 12, dtype=torch.long)
    mask[0, 9:] = 0
    return {"input_ids": ids, "attention_mask": mask}


ARCHS = {
    "timm_vit": (
        lambda: timm.create_model(
            "vit_tiny_patch16_224", img_size=32, patch_size=8, depth=2, num_classes=3
        ),
        images,
    ),
    "timm_convnext": (
        lambda: timm.create_model(
            "convnext_atto", depths=(1, 1, 1, 1), dims=(8, 16, 24, 32), num_classes=3
        ),
        images,
    ),
    "timm_resnet": (lambda: timm.create_model("resnet10t", num_classes=3), images),
    "timm_efficientnet": (lambda: timm.create_model("efficientnet_b0", num_classes=3), images),
    "timm_mobilenetv3": (
        lambda: timm.create_model("mobilenetv3_small_050", num_classes=3),
        images,
    ),
    "timm_regnet": (lambda: timm.create_model("regnetx_002", num_classes=3), images),
    "tv_resnet18": (lambda: torchvision.models.resnet18(num_classes=3), images),
    "tv_mobilenet_v3_small": (
        lambda: torchvision.models.mobilenet_v3_small(num_classes=3),
        images,
    ),
    "tv_efficientnet_b0": (lambda: torchvision.models.efficientnet_b0(num_classes=3), images),
    "tv_densenet": (
        lambda: torchvision.models.DenseNet(
            growth_rate=8, block_config=(2, 2), num_init_features=8, num_classes=3
        ),
        images,
    ),
    "tv_squeezenet": (lambda: torchvision.models.squeezenet1_1(num_classes=3), images),
    "hf_bert": (hf_bert, tokens),
    "hf_gpt2": (hf_gpt2, tokens),
    "skip_shared": (SkipShared, lambda: torch.randn(4, 6)),
}


def freeze_all_but_last(model: nn.Module, k: int) -> None:
    params = list(model.parameters())
    model.requires_grad_(False)
    for p in params[-k:]:
        p.requires_grad_(True)


@pytest.mark.parametrize("arch", sorted(ARCHS))
@pytest.mark.parametrize("phase", [1, 2])
def test_partition_reproduces_the_model(arch: str, phase: int) -> None:
    torch.manual_seed(0)
    build, data = ARCHS[arch]
    model, x = build(), data()
    freeze_all_but_last(model, 2 if phase == 1 else 6)
    batchnorm.install_all(model)  # as fit does: frozen BatchNorm uses running statistics
    own = {id(p) for p in model.parameters()}
    for training in (False, True):
        model.train(training)
        part = partition(trace(model, x))
        assert part.frozen is not None, f"{arch}: no frozen part"
        assert part.frozen_nodes > part.trainable_nodes or phase == 2
        # the trainable part holds the user's own weights, the trainable ones among them
        mine = list(part.trainable.parameters())
        assert all(id(p) in own for p in mine)
        assert {id(p) for p in model.parameters() if p.requires_grad} <= {id(p) for p in mine}
        frontier = part.run_frozen(x)
        assert all(not t.requires_grad for t in frontier if isinstance(t, torch.Tensor))
        assert all(t.shape[0] == 4 for t in frontier)
        if training and part.random is not None:
            continue  # random masks are drawn in another order; checked in eval mode
        torch.manual_seed(1)
        ref = call_model(model, x)
        torch.manual_seed(1)
        out = part.trainable(*frontier)
        assert same_outputs(ref, out), f"{arch} phase {phase} training={training}"
        if part.random is None and part.stateful is None:
            assert part.mixes_samples is None, part.mixes_samples


def test_phase_one_frontier_is_the_pooled_features() -> None:
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=3).eval()
    freeze_all_but_last(model, 2)
    part = partition(trace(model, images()))
    assert part.boundary == ("flatten",) and part.shapes == ((512,),)
    freeze_all_but_last(model, 5)  # layer4.1.conv2, layer4.1.bn2, fc
    part = partition(trace(model, images()))
    # the residual input and bn1 (its in-place ReLU is shared, so it is recomputed after)
    assert part.boundary == ("layer4.0#add", "layer4.1.bn1")


def test_gradients_reach_the_users_parameters() -> None:
    torch.manual_seed(0)
    model = SkipShared()
    freeze_all_but_last(model, 2)
    x = torch.randn(5, 6)
    part = partition(trace(model, x))
    part.trainable(*part.run_frozen(x)).sum().backward()
    assert model.head.weight.grad is not None
    assert all(p.grad is None for p in model.shared.parameters())


def test_shared_layer_trainable_in_one_use_is_trainable_in_both() -> None:
    torch.manual_seed(0)
    model = SkipShared()
    model.requires_grad_(False)
    model.shared.requires_grad_(True)
    model.head.requires_grad_(True)
    x = torch.randn(5, 6)
    part = partition(trace(model, x))
    assert part.boundary == ("relu",)  # right below the first use of the shared layer
    assert same_outputs(part.trainable(*part.run_frozen(x)), model(x))


class Branchy(nn.Module):
    """Data-dependent control flow in a submodule: that submodule becomes a leaf."""

    class Gate(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(4, 4)

        def forward(self, x):
            if x.sum() > 0:
                return self.lin(x)
            return -self.lin(x)

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Linear(4, 4)
        self.gate = self.Gate()
        self.head = nn.Linear(4, 2)

    def forward(self, x):
        return self.head(self.gate(torch.relu(self.stem(x))))


def test_untraceable_submodule_becomes_a_leaf() -> None:
    torch.manual_seed(0)
    model = Branchy()
    freeze_all_but_last(model, 2)
    x = torch.randn(4, 4)
    t = trace(model, x)
    assert t.backend == "fx" and t.leaves == ("model.gate",)
    part = partition(t)
    assert part.boundary == ("gate",)
    assert same_outputs(part.trainable(*part.run_frozen(x)), model(x))


class Scaled(nn.Module):
    """A traced-through module reading its own parameter (a ``get_attr`` in the graph)."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.ones(4))

    def forward(self, x):
        return x * self.scale


def test_a_trace_is_current_until_a_layer_or_weight_is_replaced() -> None:
    net = nn.Sequential(nn.Linear(4, 4), Scaled(), nn.Linear(4, 2))
    t = trace(net, torch.randn(3, 4))
    assert t.current()
    with torch.no_grad():
        net[0].weight.mul_(2.0)  # a weight written in place: the graph still calls it
    assert t.current()
    net[2] = nn.Linear(4, 2)  # a layer the graph calls, replaced
    assert not t.current()
    t = trace(net, torch.randn(3, 4))
    net[1].scale = nn.Parameter(torch.zeros(4))  # a weight the graph reads, replaced
    assert not t.current()


class RootBranch(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(4, 4)

    def forward(self, x):
        y = self.a(x)
        if y.sum() > 0:
            return y
        return -y


def test_untraceable_root_raises_with_both_reasons() -> None:
    with pytest.raises(GraphError, match="fx: .*export: "):
        trace(RootBranch(), torch.randn(3, 4))


class InplaceHazard(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.f, self.head, self.g = nn.Linear(4, 4), nn.Linear(4, 4), nn.Linear(4, 4)

    def forward(self, x):
        a = self.f(x)
        t = self.head(a)  # reads a before the frozen in-place write below
        a.mul_(2)
        return t + self.g(a)


def test_inplace_write_after_a_trainable_read_is_refused() -> None:
    model = InplaceHazard()
    model.requires_grad_(False)
    model.head.requires_grad_(True)
    with pytest.raises(GraphError, match="in place"):
        partition(trace(model, torch.randn(3, 4)))


class BatchPosition(nn.Module):
    """A frozen value that depends on the sample's position in the batch."""

    def __init__(self) -> None:
        super().__init__()
        self.f, self.head = nn.Linear(4, 4), nn.Linear(4, 2)

    def forward(self, x):
        h = self.f(x)
        pos = torch.arange(x.shape[0], dtype=h.dtype)
        return self.head(h) + pos[:, None]


def test_batch_position_values_are_recomputed_not_cached() -> None:
    torch.manual_seed(0)
    model = BatchPosition()
    model.f.requires_grad_(False)
    x = torch.randn(5, 4)
    part = partition(trace(model, x))
    assert part.mixes_samples is None
    assert part.boundary == ("input:x", "f")  # x.shape[0] is recomputed from the raw input
    # rows of the frontier depend on their sample only: a cache served in another order is exact
    front = part.run_frozen(x)
    order = torch.tensor([3, 1, 4])
    assert same_outputs(part.trainable(*(t[order] for t in front)), model(x[order]))


class Noisy(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.f, self.head = nn.Linear(4, 4), nn.Linear(4, 2)

    def forward(self, x):
        return self.head(nn.functional.dropout(self.f(x), 0.5, training=self.training))


class NoisyDeep(Noisy):
    def __init__(self) -> None:
        super().__init__()
        self.g = nn.Linear(4, 4)

    def forward(self, x):
        return self.head(self.g(nn.functional.dropout(self.f(x), 0.5, training=self.training)))


def test_functional_dropout_in_the_frozen_part_is_random_in_train_mode_only() -> None:
    model = NoisyDeep()
    model.f.requires_grad_(False)
    model.g.requires_grad_(False)
    x = torch.randn(3, 4)
    part = partition(trace(model.train(), x))
    assert part.random == "dropout draws random numbers (torch generator)"
    assert partition(trace(model.eval(), x)).random is None


def test_functional_dropout_feeding_the_head_runs_on_the_trainable_side() -> None:
    model = Noisy()
    model.f.requires_grad_(False)
    x = torch.randn(3, 4)
    part = partition(trace(model.train(), x))
    assert part.random is None and part.boundary == ("f",)
    torch.manual_seed(1)
    ref = model(x)
    torch.manual_seed(1)
    assert same_outputs(part.trainable(*part.run_frozen(x)), ref)  # the same mask, drawn after


def test_batchnorm_in_batch_statistics_mode_is_flagged() -> None:
    model = nn.Sequential(
        nn.Linear(4, 4), nn.BatchNorm1d(4, track_running_stats=False), nn.Linear(4, 2)
    )
    model[:2].requires_grad_(False)
    part = partition(trace(model.eval(), torch.randn(3, 4)))
    assert part.random is None
    assert part.batch_statistics is not None and "batch-statistics" in part.batch_statistics


class TwoInputs(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(20, 4)
        self.num = nn.Linear(3, 4)
        self.head = nn.Linear(4, 2)

    def forward(self, ids, feats):
        return self.head(self.emb(ids).mean(1) + self.num(feats))


def test_several_positional_inputs_and_token_ids() -> None:
    torch.manual_seed(0)
    model = TwoInputs()
    model.emb.requires_grad_(False)
    model.num.requires_grad_(False)
    x = (torch.randint(0, 20, (4, 5)), torch.randn(4, 3))
    names, _, kw = inputs_of(model, x)
    assert names == ("ids", "feats") and not kw
    part = partition(trace(model, x))
    assert part.boundary == ("add",)
    assert same_outputs(part.trainable(*part.run_frozen(x)), model(*x))


def test_dict_inputs_are_keywords_when_forward_takes_them() -> None:
    class Kw(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = nn.Linear(2, 2)

        def forward(self, left, right=None):
            return self.a(left) + right

    class OneDict(nn.Module):
        def forward(self, batch):
            return batch["left"]

    x = {"left": torch.ones(2, 2), "right": torch.ones(2, 2)}
    assert inputs_of(Kw(), x)[2] is True
    assert inputs_of(OneDict(), x)[2] is False
    assert call_model(OneDict(), x) is x["left"]


# ------------------------------------------------------------------ through fit


def _fit_data(arch: str):
    rng = np.random.default_rng(0)
    if arch.startswith("hf_"):
        ids = rng.integers(3, 100, (12, 12)).astype(np.int64)
        mask = np.ones((12, 12), dtype=np.int64)
        mask[::3, 9:] = 0
        return {"input_ids": ids, "attention_mask": mask}, rng.integers(0, 3, 12)
    if arch == "skip_shared":
        return rng.standard_normal((12, 6)).astype(np.float32), rng.integers(0, 3, 12)
    return rng.standard_normal((12, 3, 32, 32)).astype(np.float32), rng.integers(0, 3, 12)


def _fit(arch: str, **kw) -> tuple[fl.Model, list[float], list]:
    torch.manual_seed(0)
    model = fl.wrap(ARCHS[arch][0]())
    model.trainable = False
    model.unfreeze(fl.select.last(1))
    model.compile(optimizer="sgd", loss="sparse_categorical_crossentropy")
    x, y = _fit_data(arch)
    statuses = []

    class Record(fl.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            statuses.append(self.model._trainer.runner.status["train"])

    history = model.fit(x, y, epochs=2, batch_size=4, seed=0, verbose=0, callbacks=[Record()], **kw)
    return model, history.history["loss"], statuses


@pytest.mark.slow
@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_fit_with_the_cache_equals_fit_without(arch: str) -> None:
    cached, losses, statuses = _fit(arch)
    plain, plain_losses, plain_statuses = _fit(arch, cache=False)
    np.testing.assert_allclose(losses, plain_losses, rtol=1e-4, atol=1e-5)
    assert all(s.reason is OffReason.DISABLED for s in plain_statuses)
    for (name, a), b in zip(cached.module.state_dict().items(), plain.module.state_dict().values()):
        if not torch.is_floating_point(a):
            continue
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=name)
    if statuses[0].reason in (OffReason.STOCHASTIC, OffReason.RANDOM):
        # dropout in the frozen part: off by default, cacheable in inference mode
        inf, inf_losses, inf_statuses = _fit(arch, frozen_inference=True)
        _, ref_losses, _ = _fit(arch, frozen_inference=True, cache=False)
        np.testing.assert_allclose(inf_losses, ref_losses, rtol=1e-4, atol=1e-5)
        statuses = inf_statuses
        assert all(s.frozen_mode == "inference" for s in statuses)
    assert [s.state for s in statuses] == [CacheState.BUILT, CacheState.REUSED], statuses
    assert statuses[0].boundary and statuses[0].samples == 12


def _global_hooks() -> dict[str, int]:
    from torch.nn.modules import module as nn_module
    from torch.optim import optimizer as optim_module

    dicts = {n: getattr(nn_module, n) for n in dir(nn_module) if n.startswith("_global_")}
    dicts.update(
        {n: getattr(optim_module, n) for n in dir(optim_module) if n.startswith("_global_")}
    )
    return {n: len(d) for n, d in dicts.items() if isinstance(d, dict)}


def test_fit_leaves_no_process_wide_hooks() -> None:
    before = _global_hooks()
    assert any("optimizer" in n for n in before) and any("registration" in n for n in before)
    model, _, _ = _fit("skip_shared", frozen_inference=True)
    assert _global_hooks() == before
    # the step counter watched the model's own optimizer only, and let go when fit returned
    assert not model._live.optimizer._optimizer_step_post_hooks


class Counting(nn.Module):
    """A forward that reads Python state a trace bakes in: no trace reproduces it."""

    def __init__(self) -> None:
        super().__init__()
        self.body, self.head = nn.Linear(6, 6), nn.Linear(6, 3)
        self.calls = 0

    def forward(self, x):
        self.calls += 1
        return self.head(self.body(x) * (1.0 + 0.0 * self.calls) + (self.calls % 2))


class Gated(nn.Module):
    """Data-dependent control flow in the root forward: neither tracer can follow it."""

    def __init__(self) -> None:
        super().__init__()
        self.body, self.head = nn.Linear(6, 6), nn.Linear(6, 3)

    def forward(self, x):
        h = self.body(x)
        if h.sum() > 0:
            h = h * 2
        return self.head(h)


@pytest.mark.parametrize(
    ("factory", "reason", "words"),
    [
        (Gated, OffReason.NOT_TRACEABLE, "could not be traced"),
        (Counting, OffReason.NOT_VERIFIED, "does not reproduce"),
    ],
)
def test_untraceable_models_train_as_a_plain_loop_and_say_why(factory, reason, words, capsys):
    x = np.random.default_rng(0).standard_normal((12, 6)).astype(np.float32)
    y = np.arange(12) % 3
    losses = []
    for cache in ("auto", False):
        torch.manual_seed(0)
        model = fl.wrap(factory())
        model.layers[0].trainable = False
        model.compile(optimizer="sgd", loss="sparse_categorical_crossentropy")
        capsys.readouterr()
        losses.append(
            model.fit(x, y, epochs=2, batch_size=4, seed=0, verbose=2, cache=cache).history["loss"]
        )
        log = capsys.readouterr().out
        if cache == "auto":
            status = model.cache_status["train"]
            assert status.state is CacheState.OFF and status.reason is reason, status
            assert words in log and not status.boundary
    np.testing.assert_allclose(losses[0], losses[1], rtol=1e-6)


def test_a_frontier_that_fits_nowhere_turns_the_cache_off(monkeypatch):
    from frostline.engine.runner import cache as runner_mod

    monkeypatch.setattr(runner_mod, "free_bytes", lambda _dir: 16)  # a full disk
    x = np.random.default_rng(0).standard_normal((12, 6)).astype(np.float32)
    model = fl.wrap(SkipShared())
    model.trainable = False
    model.unfreeze(fl.select.last(1))
    model.compile(optimizer="sgd", loss="mse")
    model.fit(x, np.zeros((12, 3), "float32"), epochs=1, verbose=0, cache_memory_bytes=0)
    status = model.cache_status["train"]
    assert status.reason is OffReason.TOO_LARGE and status.boundary == ("cat",)
    # with room on disk the same run spills there
    monkeypatch.setattr(runner_mod, "free_bytes", lambda _dir: 1 << 40)
    model.fit(x, np.zeros((12, 3), "float32"), epochs=1, verbose=0, cache_memory_bytes=0)
    assert model.cache_status["train"].location == "disk"


HEADLESS = {
    "timm_vit": lambda: timm.create_model(
        "vit_tiny_patch16_224", img_size=32, patch_size=8, depth=2, num_classes=0
    ),
    "timm_convnext": lambda: timm.create_model(
        "convnext_atto", depths=(1, 1, 1, 1), dims=(8, 16, 24, 32), num_classes=0
    ),
    "timm_efficientnet": lambda: timm.create_model("efficientnet_b0", num_classes=0),
    "timm_regnet": lambda: timm.create_model("regnetx_002", num_classes=0),
    "tv_resnet18": lambda: torchvision.models.resnet18(num_classes=3),
}


def _two_phase(arch: str, cache) -> tuple[list[float], CacheStatus, int]:
    torch.manual_seed(0)
    net = HEADLESS[arch]()
    if arch.startswith("tv_"):
        net.fc = nn.Identity()
    with torch.no_grad():
        features = net(torch.zeros(2, 3, 32, 32)).shape[1]
    base = fl.wrap(net, name="base")
    model = fl.Sequential([base, nn.Linear(features, 3)])
    base.trainable = False
    model.compile(optimizer="sgd", loss="sparse_categorical_crossentropy")
    x, y = _fit_data(arch)
    model.fit(x, y, epochs=1, batch_size=4, seed=0, verbose=0, cache=cache)
    base.unfreeze(fl.select.last(3))
    model.compile(optimizer="sgd", loss="sparse_categorical_crossentropy")
    losses = model.fit(x, y, epochs=2, batch_size=4, seed=0, verbose=0, cache=cache)
    trainable = sum(p.numel() for p in model.module.parameters() if p.requires_grad)
    return losses.history["loss"], model.cache_status["train"], trainable


@pytest.mark.slow
@pytest.mark.parametrize("arch", sorted(HEADLESS))
def test_phase_two_caches_right_below_the_first_unfrozen_computation(arch: str) -> None:
    losses, status, trainable = _two_phase(arch, "auto")
    plain, _, _ = _two_phase(arch, False)
    np.testing.assert_allclose(losses, plain, rtol=1e-4, atol=1e-5)
    assert status.state is CacheState.REUSED, status
    assert all(b.startswith("base.") for b in status.boundary), status.boundary
    assert trainable > 3 * 4  # more than the head trains


class DictSet(torch.utils.data.Dataset):
    """Samples as ``({"ids": ..., "feats": ...}, label)``: what a tokenizer pipeline yields."""

    def __init__(self, ids, feats, y) -> None:
        self.ids, self.feats, self.y = ids, feats, y

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i):
        return {"ids": self.ids[i], "feats": self.feats[i]}, self.y[i]


@pytest.mark.parametrize("source", ["arrays", "tuple", "loader"])
def test_keyword_and_positional_inputs_through_fit(source: str) -> None:
    rng = np.random.default_rng(0)
    ids = rng.integers(0, 20, (12, 5)).astype(np.int64)
    feats = rng.standard_normal((12, 3)).astype(np.float32)
    y = np.arange(12) % 2
    losses, statuses = [], []
    for cache in ("auto", False):
        torch.manual_seed(0)
        model = fl.wrap(TwoInputs())
        model.trainable = False
        model.unfreeze(fl.select.last(1))
        model.compile(optimizer="sgd", loss="sparse_categorical_crossentropy")
        if source == "arrays":
            data = ({"ids": ids, "feats": feats}, y)
        elif source == "tuple":
            data = ((ids, feats), y)
        else:
            ds = DictSet(torch.from_numpy(ids), torch.from_numpy(feats), torch.from_numpy(y))
            data = (torch.utils.data.DataLoader(ds, batch_size=4), None)
        kw = {} if source == "loader" else {"batch_size": 4, "shuffle": False}
        losses.append(
            model.fit(*data, epochs=2, seed=0, verbose=0, cache=cache, **kw).history["loss"]
        )
        statuses.append(model.cache_status["train"])
    np.testing.assert_allclose(losses[0], losses[1], rtol=1e-6)
    assert statuses[0].boundary == ("add",), statuses[0]
    expected = OffReason.NOT_DETERMINISTIC if source == "loader" else None
    assert statuses[0].reason is expected and statuses[1].reason is OffReason.DISABLED


class ShapeBranch(nn.Module):
    """A shape read as a Python int: fx proxies it (the fx traces do not reproduce the
    model), torch.export sees an int."""

    def __init__(self) -> None:
        super().__init__()
        self.lin, self.bn, self.head = nn.Linear(6, 6), nn.BatchNorm1d(6), nn.Linear(6, 3)

    def forward(self, x):
        h = self.bn(self.lin(x))
        if isinstance(x.shape[1], int):
            h = h * 2
        return self.head(h)


def test_export_traced_batchnorm_follows_its_policy_when_unfrozen() -> None:
    x = np.random.default_rng(0).standard_normal((12, 6)).astype(np.float32)
    y = np.arange(12) % 3
    torch.manual_seed(0)
    model = fl.wrap(ShapeBranch())
    model.trainable = False
    model.unfreeze(fl.select.last(1))
    model.compile(optimizer="sgd", loss="sparse_categorical_crossentropy")
    model.fit(x, y, epochs=1, batch_size=4, verbose=0)
    runner = model._trainer.runner
    assert runner.part.traced.backend == "export" and runner.part.boundary == ("mul.Tensor",)
    stats = model.module.bn.running_mean.clone()
    assert torch.equal(model.module.bn.running_mean, stats)  # frozen: running statistics
    model.get_layer("bn").trainable = True  # now it normalises with batch statistics
    model.compile(optimizer="sgd", loss="sparse_categorical_crossentropy")
    model.fit(x, y, epochs=1, batch_size=4, verbose=0)
    assert not torch.equal(model.module.bn.running_mean, stats)  # and updates them


def test_an_identity_is_recomputed_not_cached_next_to_its_input() -> None:
    class Shortcut(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.skip, self.b = nn.Linear(4, 4), nn.Identity(), nn.Linear(4, 4)

        def forward(self, x):
            h = torch.relu(self.a(x))
            return self.b(h) + self.skip(h)

    model = Shortcut()
    model.a.requires_grad_(False)
    x = torch.randn(3, 4)
    part = partition(trace(model, x))
    assert part.boundary == ("relu",)  # one tensor, not relu and skip(relu)
    assert same_outputs(part.trainable(*part.run_frozen(x)), model(x))


def _count_traces(monkeypatch) -> list[int]:
    from frostline.engine.runner import splits as runner_mod

    calls: list[int] = []
    real = runner_mod.trace
    monkeypatch.setattr(runner_mod, "trace", lambda *a, **k: calls.append(1) or real(*a, **k))
    return calls


def _dropout_model() -> fl.Model:
    torch.manual_seed(0)
    body = nn.Sequential(
        nn.Linear(6, 8), nn.Dropout(0.3), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Dropout(0.3)
    )
    base = fl.wrap(body, name="base")
    model = fl.Sequential([base, nn.Linear(8, 3)])
    base.trainable = False
    model.compile(optimizer="sgd", loss="sparse_categorical_crossentropy")
    return model


def test_a_mode_change_inside_a_whole_layer_keeps_the_fx_trace(monkeypatch) -> None:
    """With ``frozen_inference`` the frozen part's Dropouts run in eval mode; after an
    unfreeze one of them is trainable-side (training mode). fx calls Dropout as a
    whole module, so phase 2 re-partitions the same trace, and stays exact."""
    x = np.random.default_rng(0).standard_normal((24, 6)).astype(np.float32)
    y = np.arange(24) % 3
    calls = _count_traces(monkeypatch)
    models = {c: _dropout_model() for c in (False, "auto")}
    for cache, model in models.items():
        calls.clear()
        kw = {"epochs": 2, "batch_size": 8, "seed": 0, "verbose": 0, "cache": cache}
        model.fit(x, y, frozen_inference=True, **kw)
        model.layers[0].get_layer("3").trainable = True
        model.compile(optimizer="sgd", loss="sparse_categorical_crossentropy")
        model.fit(x, y, frozen_inference=True, **kw)
        assert len(calls) == 1, cache  # one trace for both phases
    status = models["auto"].cache_status["train"]
    # phase 2: base.1's Dropout (then a ReLU) feeds the unfrozen base.3 only, so it runs
    # on the trainable side, in training mode, and the cache sits in front of it
    assert status.state is CacheState.REUSED and status.boundary == ("base.0",), status
    assert models["auto"].layers[0].module[1].training
    for (name, a), b in zip(
        models["auto"].module.state_dict().items(), models[False].module.state_dict().values()
    ):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=name)


class TrainBranch(nn.Module):
    """Reads its own ``training`` flag: an fx trace bakes the branch in."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(6, 8), nn.Linear(8, 3)

    def forward(self, x):
        h = torch.relu(self.a(x))
        if self.training:
            h = h * 2
        return self.b(h)


def test_a_mode_change_of_a_traced_through_module_traces_again(monkeypatch) -> None:
    x = np.random.default_rng(0).standard_normal((12, 6)).astype(np.float32)
    y = np.arange(12) % 3
    calls = _count_traces(monkeypatch)
    torch.manual_seed(0)
    model = fl.wrap(TrainBranch())
    model.get_layer("a").trainable = False
    model.compile(optimizer="sgd", loss="sparse_categorical_crossentropy")
    model.fit(x, y, epochs=1, batch_size=4, verbose=0)
    loss = model.evaluate(x, y, batch_size=4, verbose=0)  # eval mode: no doubling
    assert len(calls) == 2
    with torch.no_grad():
        ref = nn.functional.cross_entropy(
            model.module.eval()(torch.from_numpy(x)), torch.from_numpy(y)
        )
    assert loss == pytest.approx(float(ref), rel=1e-5)
