"""Randomness is first-class: found by what it draws, never cached stale, never baked.

Every random form of issue 21 (a layer flipping each sample with ``torch.rand(batch)``,
torchvision's ``RandomHorizontalFlip`` as a layer, a branch on ``random.random()``, on
``np.random.rand()``, a layer drawing from its own ``torch.Generator``, a Dataset whose
``__getitem__`` flips at random) trains, with and without the cache, for 6 seeds, to the
very losses of the plain model trained eagerly by a hand-written loop with the same seed:
the same draws in the same order, fresh in every epoch (a stale cache or a trace that baked
one draw gives other losses), and no crash. A Dropout between the frozen part and the head
runs on the trainable side, so the cache sits in front of it. Data declared deterministic
is checked when its cache is reused.
"""

from __future__ import annotations

import random
import warnings

import numpy as np
import pytest
import torch
import torchvision
from torch import nn
from torch.utils.data import Dataset
from torchvision.transforms import v2

import frostline as fl
from frostline.engine import rng
from frostline.engine.runner import CacheState, OffReason, executor
from frostline.engine.runner import splits as runner

pytestmark = pytest.mark.usefixtures("one_thread")

N, F, K, BATCH, EPOCHS = 24, 6, 3, 8, 3
SEEDS = range(6)


class TorchFlip(nn.Module):
    """Flips each sample with probability 1/2 (``torch.rand(batch)``)."""

    def forward(self, x):
        flip = torch.rand(x.shape[0], device=x.device) < 0.5
        return torch.where(flip[:, None], x.flip(-1), x)


class PythonFlip(nn.Module):
    def forward(self, x):
        return x.flip(-1) if random.random() < 0.5 else x


class NumpyFlip(nn.Module):
    def forward(self, x):
        return x.flip(-1) if np.random.rand() < 0.5 else x


class GeneratorFlip(nn.Module):
    """Draws from its own generator (``torch.rand(..., generator=self.gen)``)."""

    def __init__(self) -> None:
        super().__init__()
        self.gen = torch.Generator().manual_seed(7)

    def forward(self, x):
        flip = torch.rand(x.shape[0], generator=self.gen) < 0.5
        return torch.where(flip[:, None], x.flip(-1), x)


class OpaqueFlip(nn.Module):
    """fx cannot trace it (a branch on tensor values), so it runs whole: it flips each
    sample with ``torch.rand`` (augmentation at its front edge), then frozen weights."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(F, F)

    def forward(self, x):
        flip = torch.rand(x.shape[0], device=x.device) < 0.5
        x = torch.where(flip[:, None], x.flip(-1), x)
        if x.abs().sum() > 0:  # data-dependent control flow
            x = torch.relu(self.lin(x))
        return x


class OpaqueDropout(nn.Module):
    """Runs whole (a branch on tensor values): frozen weights, then a ``Dropout`` at its
    back edge."""

    def __init__(self) -> None:
        super().__init__()
        self.lin, self.drop = nn.Linear(F, F), nn.Dropout(0.5)

    def forward(self, x):
        h = self.lin(x)
        if h.abs().sum() > 0:  # data-dependent control flow
            h = torch.relu(h)
        return self.drop(h)


LAYERS = {
    "torch.rand": TorchFlip,
    "RandomHorizontalFlip": lambda: v2.RandomHorizontalFlip(),
    "random.random": PythonFlip,
    "np.random.rand": NumpyFlip,
    "torch.Generator": GeneratorFlip,
    "opaque torch.rand": OpaqueFlip,
    "opaque Dropout": OpaqueDropout,
}
FORMS = [*LAYERS, "Dataset"]
WHY = {
    "torch.rand": "torch generator",
    "RandomHorizontalFlip": "torch generator",
    "random.random": "Python random",
    "np.random.rand": "NumPy global RNG",
    "torch.Generator": "torch.Generator on cpu",
    "opaque torch.rand": "torch generator",
    "opaque Dropout": "torch generator",
}


class Flippy(Dataset):
    """Flips a sample at random on every read, yet declares itself deterministic."""

    deterministic = True

    def __init__(self, x: np.ndarray, y: np.ndarray) -> None:
        self.x, self.y = torch.from_numpy(x), torch.from_numpy(y)

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i):
        x = self.x[i]
        return (x.flip(-1) if torch.rand(()) < 0.5 else x), self.y[i]

    def fingerprint(self) -> str:
        return "flippy-v1"


def data() -> tuple[np.ndarray, np.ndarray]:
    g = np.random.default_rng(0)
    return g.standard_normal((N, F)).astype(np.float32), g.integers(0, K, N)


def build(form: str) -> tuple[nn.Module, nn.Module]:
    """``Sequential(random layer, frozen base, head)``: the same weights for every call
    (a random layer's own weights are frozen too)."""
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(F, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU())
    head = nn.Linear(8, K)
    front = LAYERS[form]() if form in LAYERS else nn.Identity()
    base.requires_grad_(False)
    front.requires_grad_(False)
    return nn.Sequential(front, base, head), base


def plain_losses(net: nn.Module, seed: int, dataset: Dataset | None = None) -> list[float]:
    """The plain model, trained eagerly by a hand-written loop (SGD, lr 0.1), seeded as
    ``fit(seed=)`` seeds."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    x, y = data()
    xs, ys = torch.from_numpy(x), torch.from_numpy(y)
    opt = torch.optim.SGD([p for p in net.parameters() if p.requires_grad], lr=0.1)
    losses = []
    for _ in range(EPOCHS):
        total = 0.0
        for start in range(0, N, BATCH):
            if dataset is not None:
                items = [dataset[i] for i in range(start, start + BATCH)]
                xb = torch.stack([a for a, _ in items])
                yb = torch.stack([b for _, b in items])
            else:
                xb, yb = xs[start : start + BATCH], ys[start : start + BATCH]
            loss = nn.functional.cross_entropy(net(xb), yb)
            loss.backward()
            opt.step()
            opt.zero_grad()
            total += float(loss.detach()) * len(xb)
        losses.append(total / N)
    return losses


def fit_losses(net: nn.Module, seed: int, cache, dataset: Dataset | None = None):
    model = fl.wrap(net)
    model.compile(optimizer=fl.optimizers.SGD(0.1), loss="sparse_categorical_crossentropy")
    x, y = data()
    args = (dataset, None) if dataset is not None else (x, y)
    history = model.fit(
        *args, batch_size=BATCH, epochs=EPOCHS, seed=seed, shuffle=False, verbose=0, cache=cache
    )
    return history.history["loss"], model.cache_status["train"]


@pytest.mark.parametrize("cache", ["auto", False], ids=["cache", "no-cache"])
@pytest.mark.parametrize("form", FORMS)
def test_every_random_form_trains_as_the_plain_model(form: str, cache) -> None:
    for seed in SEEDS:
        net, _ = build(form)
        dataset = Flippy(*data()) if form == "Dataset" else None
        want = plain_losses(net, seed, dataset)
        net, _ = build(form)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            got, status = fit_losses(net, seed, cache, Flippy(*data()) if dataset else None)
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6, err_msg=f"seed {seed}")
        assert len(set(np.round(want, 6))) == EPOCHS  # each epoch drew afresh
        assert not status.cached
        flagged = [w for w in caught if "dataset Flippy" in str(w.message)]
        if cache is False:
            assert status.reason is OffReason.DISABLED
            assert not flagged
        else:
            assert explained(form, status), status
            # declared deterministic, the dataset draws while the cache is built: one warning
            assert len(flagged) == (form == "Dataset")


def explained(form: str, status) -> bool:
    """Whether the cache status gives the right reason: what draws, and from where."""
    if form == "Dataset":
        return (
            status.reason is OffReason.DATA_RANDOM
            and "dataset Flippy is declared deterministic, but reading it draws random "
            "numbers (torch generator)"
            in status.detail
        )
    where = "'0.drop'" if form == "opaque Dropout" else "'0'"  # the Dropout inside
    return status.reason is OffReason.RANDOM and status.detail.startswith(
        f"layer {where} draws random numbers ({WHY[form]})"
    )


class Twice(nn.Module):
    """A weightless step between the random layer and the frozen base: the pre-check
    cannot tell, the trace decides."""

    def forward(self, x):
        return x * 2.0


@pytest.mark.parametrize("form", list(LAYERS))
def test_the_trace_finds_each_random_layer(form: str, monkeypatch) -> None:
    prechecks: list = []
    real = runner.watch_frozen

    def watched(*args):
        prechecks.append(real(*args))
        return prechecks[-1]

    monkeypatch.setattr(runner, "watch_frozen", watched)
    for seed in (0, 1):
        for cache in ("auto", False):
            net, _ = build(form)
            net.insert(1, Twice())
            want = plain_losses(net, seed)
            net, _ = build(form)
            net.insert(1, Twice())
            got, status = fit_losses(net, seed, cache)
            np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
            if cache == "auto":
                assert status.reason is OffReason.RANDOM, status
                assert f"layer '0' draws random numbers ({WHY[form]})" in status.detail
    assert prechecks and all(p.effect is None for p in prechecks)  # decided by the trace


def test_without_the_rng_watch_random_forms_go_wrong(monkeypatch) -> None:
    """The watch is what finds them: with it blind, fit bakes or caches draws (other
    losses than the plain model's), or it catches them later for another reason (a
    batch-dependence check, a failed probe, a cache check) and says so."""
    monkeypatch.setattr(rng.RngState, "moved", lambda self: ())
    wrong = {}
    for form in FORMS:
        net, _ = build(form)
        dataset = Flippy(*data()) if form == "Dataset" else None
        want = plain_losses(net, 0, dataset)
        net, _ = build(form)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            got, status = fit_losses(net, 0, "auto", Flippy(*data()) if dataset else None)
        if not np.allclose(got, want, rtol=1e-5, atol=1e-6):
            wrong[form] = "other losses"
        elif not explained(form, status):
            wrong[form] = str(status)
    assert set(wrong) == set(FORMS), wrong
    assert wrong["random.random"] == wrong["np.random.rand"] == "other losses"  # baked


# ------------------------------------------------------- random layers fx cannot trace


class OpaqueImageFlip(nn.Module):
    """Runs whole (a branch on tensor values): flips each image at random, one draw per
    sample (augmentation at its front edge)."""

    def forward(self, x):
        flip = torch.rand(x.shape[0], device=x.device) < 0.5
        x = torch.where(flip[:, None, None, None], x.flip(-1), x)
        return x if x.abs().sum() > 0 else -x  # data-dependent control flow


class OpaqueImageDropout(nn.Module):
    """Runs whole: ``Dropout`` on feature maps (one draw per element, so where each draw
    lands depends on the memory format) inside it, between frozen convolutions."""

    def __init__(self) -> None:
        super().__init__()
        self.drop = nn.Dropout(0.3)

    def forward(self, x):
        h = self.drop(x)
        return torch.relu(h) if h.abs().sum() > 0 else h  # data-dependent control flow


def conv_model(form: str) -> nn.Module:
    """A frozen conv + BatchNorm body (running statistics of its own, so folding them
    into the convolutions changes the arithmetic) with the opaque random layer in it."""
    torch.manual_seed(0)

    def block(cin: int, cout: int) -> list[nn.Module]:
        bn = nn.BatchNorm2d(cout)
        bn.running_mean.uniform_(-0.5, 0.5)
        bn.running_var.uniform_(0.5, 2.0)
        return [nn.Conv2d(cin, cout, 3, padding=1), bn, nn.ReLU()]

    if form == "classifier Dropout":  # VGG's: frozen weights read what the Dropout drew
        pool = [nn.AdaptiveAvgPool2d(1), nn.Flatten()]
        classifier = [nn.Linear(8, 8), nn.ReLU(), nn.Dropout(0.5), nn.Linear(8, 8), nn.ReLU()]
        base = nn.Sequential(*block(3, 8), *block(8, 8), *pool, *classifier)
        base.requires_grad_(False)
        return nn.Sequential(base, nn.Linear(8, K))
    if form == "augmentation":
        body = [OpaqueImageFlip(), *block(3, 8), *block(8, 8)]
    else:
        body = [*block(3, 8), OpaqueImageDropout(), *block(8, 8)]
    base = nn.Sequential(*body, nn.AdaptiveAvgPool2d(1), nn.Flatten())
    base.requires_grad_(False)
    return nn.Sequential(base, nn.Linear(8, K))


def image_losses(net: nn.Module, seed: int, x: np.ndarray, y: np.ndarray) -> list[float]:
    """The plain model trained eagerly (frozen BatchNorms on running statistics)."""
    torch.manual_seed(seed)
    opt = torch.optim.SGD([p for p in net.parameters() if p.requires_grad], lr=0.1)
    net.train()
    for m in net.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.eval()
    losses = []
    for _ in range(EPOCHS):
        total = 0.0
        for s in range(0, len(x), BATCH):
            xb, yb = torch.from_numpy(x[s : s + BATCH]), torch.from_numpy(y[s : s + BATCH])
            loss = nn.functional.cross_entropy(net(xb), yb)
            loss.backward()
            opt.step()
            opt.zero_grad()
            total += float(loss.detach()) * len(xb)
        losses.append(total / len(x))
    return losses


@pytest.mark.parametrize("form", ["augmentation", "dropout", "classifier Dropout"])
def test_an_opaque_random_layer_runs_as_set_and_the_rest_folds(form: str, monkeypatch) -> None:
    """A module fx cannot trace that draws random numbers is never cached nor baked: fit
    trains as the eager loop does, with and without the cache, for every seed. The frozen
    layers around it still run as the folded, channels_last copy: the random layer runs
    there as set, on contiguous inputs, so it draws what the plain model draws. A Dropout
    whose draws frozen weights read (a VGG classifier with only its last layer trainable)
    is left to the trace in an image model, so its conv body runs folded too; the
    pre-check decides it before tracing only where nothing could fold."""
    from frostline.engine.fuse import AsSet, InferenceCopy

    made: list = []
    real = executor.inference_copy

    def recorded(*args, **kwargs):
        made.append(real(*args, **kwargs))
        return made[-1]

    monkeypatch.setattr(executor, "inference_copy", recorded)
    g = np.random.default_rng(0)
    x = g.standard_normal((N, 3, 8, 8)).astype(np.float32)
    y = g.integers(0, K, N)
    for seed in range(3):
        want = image_losses(conv_model(form), seed, x, y)
        assert len(set(np.round(want, 6))) == EPOCHS
        for cache in ("auto", False):
            made.clear()
            model = fl.wrap(conv_model(form))
            model.compile(optimizer=fl.optimizers.SGD(0.1), loss="sparse_categorical_crossentropy")
            h = model.fit(
                x, y, batch_size=BATCH, epochs=EPOCHS, seed=seed, shuffle=False, verbose=0,
                cache=cache,
            )  # fmt: skip
            np.testing.assert_allclose(h.history["loss"], want, rtol=1e-4, atol=1e-5)
            status = model.cache_status["train"]
            assert not status.cached
            if cache == "auto":
                assert status.reason is OffReason.RANDOM, status
                assert status.detail.startswith("layer '0."), status
            folded = [c for c in made if isinstance(c, InferenceCopy)]
            assert folded and all(c.folded for c in folded), made
            assert all(any(isinstance(m, AsSet) for m in c.modules()) for c in folded)


# ---------------------------------------------------------- random ops on the trainable side


def head_model(drop: float = 0.2) -> tuple[nn.Module, nn.Module]:
    """The Keras guide's head: a frozen base, ``Dropout``, then ``Linear``."""
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(F, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU())
    base.requires_grad_(False)
    return nn.Sequential(base, nn.Dropout(drop), nn.Linear(8, K)), base


@pytest.mark.parametrize("seed", [0, 1])
def test_a_dropout_head_is_cached_in_front_of(seed: int) -> None:
    net, _ = head_model()
    want = plain_losses(net, seed)
    statuses = {}
    for cache in ("auto", False):
        net, _ = head_model()
        got, statuses[cache] = fit_losses(net, seed, cache)
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    status = statuses["auto"]
    assert status.state is CacheState.REUSED and status.boundary == ("0.3",), status


def test_a_dropout_head_keeps_training_with_the_frozen_part_in_inference_mode() -> None:
    net, base = head_model()
    want = plain_losses(net, 0)  # base has no dropout: inference mode changes nothing
    net, base = head_model()
    model = fl.wrap(net)
    model.compile(optimizer=fl.optimizers.SGD(0.1), loss="sparse_categorical_crossentropy")
    modes: list = []

    class Modes(fl.callbacks.Callback):
        def on_train_batch_begin(self, batch, logs=None):
            modes.append((net[0].training, net[1].training))

    x, y = data()
    h = model.fit(
        x, y, batch_size=BATCH, epochs=EPOCHS, seed=0, shuffle=False, verbose=0,
        frozen_inference=True, callbacks=[Modes()],
    )  # fmt: skip
    np.testing.assert_allclose(h.history["loss"], want, rtol=1e-5, atol=1e-6)
    assert set(modes) == {(False, True)}  # the base in eval mode, the Dropout training
    assert model.cache_status["train"].state is CacheState.REUSED


ZOO = {  # torchvision classifiers whose head starts with a Dropout: (build, input size)
    "mobilenet_v2": (lambda: torchvision.models.mobilenet_v2(num_classes=K, width_mult=0.25), 32),
    # classifier = Dropout, Conv, ReLU, AdaptiveAvgPool
    "squeezenet1_1": (lambda: torchvision.models.squeezenet1_1(num_classes=K), 32),
    # Dropout before fc; no aux heads, nothing downloaded
    "googlenet": (
        lambda: torchvision.models.googlenet(num_classes=K, aux_logits=False, init_weights=False),
        32,
    ),
    "inception_v3": (  # 75 px: the smallest input Inception v3 takes
        lambda: torchvision.models.inception_v3(
            num_classes=K, aux_logits=False, init_weights=False
        ),
        75,
    ),
}


def zoo_model(arch: str, unfreeze: str) -> nn.Module:
    torch.manual_seed(0)
    net = ZOO[arch][0]()
    net.requires_grad_(False)
    net.get_submodule(unfreeze).requires_grad_(True)
    return net


@pytest.mark.slow
@pytest.mark.parametrize(
    "arch, unfreeze, boundary",
    [
        ("mobilenet_v2", "classifier", "flatten"),
        ("mobilenet_v2", "classifier.1", "flatten"),
        ("squeezenet1_1", "classifier", "features.12#cat"),
        ("googlenet", "fc", "flatten"),
        ("inception_v3", "fc", "avgpool"),
    ],
)
def test_torchvision_classifiers_are_cached_in_front_of_their_dropout(
    arch: str, unfreeze: str, boundary: str
) -> None:
    """The Dropout at the head of the classifier runs on the trainable side: the cache
    holds the frozen body's output, and the losses are those of ``cache=False`` and of
    the plain model trained eagerly with the same seed (the same dropout masks)."""
    g = np.random.default_rng(0)
    size = ZOO[arch][1]
    x = g.standard_normal((16, 3, size, size)).astype(np.float32)
    y = g.integers(0, K, 16)
    # the plain model, eagerly: the frozen BatchNorms use running statistics, as fit's do
    net = zoo_model(arch, unfreeze)
    torch.manual_seed(3)
    opt = torch.optim.SGD([p for p in net.parameters() if p.requires_grad], lr=0.1)
    net.train()
    for m in net.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.eval()
    want = []
    for _ in range(2):
        total = 0.0
        for s in range(0, 16, 8):
            loss = nn.functional.cross_entropy(
                net(torch.from_numpy(x[s : s + 8])), torch.from_numpy(y[s : s + 8])
            )
            loss.backward()
            opt.step()
            opt.zero_grad()
            total += float(loss.detach()) * 8
        want.append(total / 16)
    for cache in ("auto", False):
        model = fl.wrap(zoo_model(arch, unfreeze))
        model.compile(optimizer=fl.optimizers.SGD(0.1), loss="sparse_categorical_crossentropy")
        h = model.fit(x, y, batch_size=8, epochs=2, seed=3, shuffle=False, verbose=0, cache=cache)
        np.testing.assert_allclose(h.history["loss"], want, rtol=1e-4, atol=1e-5)
        if cache == "auto":
            status = model.cache_status["train"]
            assert status.state is CacheState.REUSED, status
            assert status.boundary == (boundary,), status


# ------------------------------------------------------------- declared-deterministic data


class Drifting(Dataset):
    """Declared deterministic, but each read adds how often it was read: no generator
    moves, only reading a sample again shows it."""

    deterministic = True

    def __init__(self, x: np.ndarray, y: np.ndarray) -> None:
        self.x, self.y = torch.from_numpy(x), torch.from_numpy(y)
        self.reads = 0

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i):
        self.reads += 1
        return self.x[i] + self.reads, self.y[i]

    def fingerprint(self) -> str:
        return "drifting-v1"


def test_a_reused_cache_is_checked_against_the_data() -> None:
    net, _ = head_model(drop=0.0)
    model = fl.wrap(net)
    model.compile(optimizer=fl.optimizers.SGD(0.1), loss="sparse_categorical_crossentropy")
    notes: list = []

    class Record(fl.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            notes.append(self.model.cache_status["train"])

    ds = Drifting(*data())
    with pytest.warns(UserWarning, match="dataset Drifting is declared deterministic") as w:
        model.fit(ds, batch_size=BATCH, epochs=3, verbose=0, callbacks=[Record()])
    assert len([m for m in w if "Drifting" in str(m.message)]) == 1  # one warning
    assert notes[0].state is CacheState.BUILT
    assert all(s.reason is OffReason.DATA_RANDOM for s in notes[1:]), notes
    assert "read again gives other values" in notes[1].detail
    # a dataset that reads the same every time is checked and kept
    stable = Flippy(*data())
    stable.__class__ = type("Stable", (Flippy,), {"__getitem__": lambda s, i: (s.x[i], s.y[i])})
    notes.clear()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model.fit(stable, batch_size=BATCH, epochs=2, verbose=0, callbacks=[Record()])
    assert [s.state for s in notes] == [CacheState.BUILT, CacheState.REUSED], notes


def test_the_rng_helpers_restore_every_generator() -> None:
    gen = torch.Generator().manual_seed(3)
    own = random.Random(4)
    before = (torch.get_rng_state(), random.getstate(), np.random.get_state()[1].copy())
    with rng.kept([gen, own]) as k:
        torch.rand(2)
        random.random()
        np.random.rand()
        torch.rand(2, generator=gen)
        own.random()
    assert set(k.moved) == {
        "torch generator",
        "Python random",
        "NumPy global RNG",
        "torch.Generator on cpu",
        "random.Random",
    }
    assert torch.equal(torch.get_rng_state(), before[0]) and random.getstate() == before[1]
    assert np.array_equal(np.random.get_state()[1], before[2])
    assert gen.initial_seed() == 3 and torch.equal(
        torch.rand(2, generator=gen), torch.rand(2, generator=torch.Generator().manual_seed(3))
    )


# ------------------------------------------------------------------ worker processes


class Counted(Dataset):
    """Deterministic samples; counts the reads made in this (the main) process."""

    def __init__(self, x: np.ndarray, y: np.ndarray) -> None:
        self.x, self.y = torch.from_numpy(x), torch.from_numpy(y)
        self.main_reads = 0

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i):
        if torch.utils.data.get_worker_info() is None:
            self.main_reads += 1
        return self.x[i], self.y[i]


@pytest.mark.slow
def test_fit_reads_a_dataset_with_worker_processes() -> None:
    losses, reads = {}, {}
    for workers in (0, 2):
        net, _ = head_model(drop=0.0)
        model = fl.wrap(net)
        model.compile(optimizer=fl.optimizers.SGD(0.1), loss="sparse_categorical_crossentropy")
        ds = Counted(*data())
        h = model.fit(ds, batch_size=BATCH, epochs=2, seed=0, verbose=0, workers=workers)
        losses[workers], reads[workers] = h.history["loss"], ds.main_reads
    np.testing.assert_allclose(losses[2], losses[0], rtol=1e-6)
    assert reads[0] == 4 + 2 * N  # the example, then every sample of both epochs
    assert reads[2] == 4  # only the example: the epochs were read by the workers
    with pytest.raises(ValueError, match="workers .* must be an int >= 0, got -1"):
        model.fit(ds, epochs=1, verbose=0, workers=-1)
