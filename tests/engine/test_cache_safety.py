"""The frozen-prefix activation cache is never used when it would be wrong.

Every test trains the same tiny model twice, once with the cache allowed (the default,
``cache="auto"``) and once with ``cache=False``, through the same sequence of fits and
changes, and compares the weights afterwards: a stale cache (prefix outputs computed
for other weights, other data, another boundary or another mode) would make them
differ far beyond the 1e-6 tolerance. Where it matters the test also shows that the
change is material (training without it gives clearly different weights), and reads
the fit log's ``cache: ...`` note to check which path was taken (built, reused,
extended, invalidated or off).
"""

from __future__ import annotations

import collections
import hashlib
import re
from collections.abc import Callable

import numpy as np
import pytest
import torch
from timm.layers import DropPath
from torch import nn
from torch.utils.data import DataLoader, Dataset, TensorDataset

import frostline as fl
from frostline.engine.runner import CacheOptions, CacheState

N, C, S, K = 48, 3, 8, 3  # samples, channels, side, classes
BATCH = 16
TOL = 1e-6


# ------------------------------------------------------------------------- helpers


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: one thread, no contention


def make_data(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((N, C, S, S)).astype(np.float32)
    y = rng.integers(0, K, N).astype(np.int64)
    return x, y


class ResidualBody(nn.Module):
    """Not a Sequential: the same layers (children "0", "1", ...), with a skip connection
    from layer 2 around layers 3-4, so the frozen part comes from the dataflow graph."""

    def __init__(self, *layers: nn.Module) -> None:
        super().__init__()
        for i, layer in enumerate(layers):
            self.add_module(str(i), layer)

    def __getitem__(self, i: int) -> nn.Module:
        return self._modules[str(i)]

    def __len__(self) -> int:
        return len(self._modules)

    def forward(self, x):
        skip = None
        for i, layer in enumerate(self._modules.values()):
            if i == 5:  # the ReLU after the second conv/BN adds the skip first
                x = x + skip
            x = layer(x)
            if i == 2:
                skip = x
        return x


@pytest.fixture(autouse=True, params=["sequential", "residual"])
def body_kind(request):
    """Every trigger runs on a Sequential base and on a non-Sequential one with a skip."""
    global BODY
    BODY = request.param
    yield
    BODY = "sequential"


BODY = "sequential"


def build(extra: nn.Module | None = None, seed: int = 0) -> tuple[fl.Model, fl.Model]:
    """``Sequential([base, head])`` with a frozen conv/BN base; identical for equal seeds."""
    torch.manual_seed(seed)
    layers: list[nn.Module] = [
        nn.Conv2d(C, 6, 3, padding=1),
        nn.BatchNorm2d(6),
        nn.ReLU(),
        nn.Conv2d(6, 6, 3, padding=1),
        nn.BatchNorm2d(6),
        nn.ReLU(),
    ]
    if extra is not None:
        layers.append(extra)
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten()]
    body = nn.Sequential(*layers) if BODY == "sequential" else ResidualBody(*layers)
    with torch.no_grad():  # non-trivial statistics, so BN mode and folding matter
        for m in body.modules():
            if isinstance(m, nn.BatchNorm2d) and m.running_mean is not None:
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.3, 0.3)
    base = fl.wrap(body, name="base")
    model = fl.Sequential([base, nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, K)])
    base.trainable = False
    compile_(model)
    return model, base


def compile_(model: fl.Model, lr: float = 0.1) -> None:
    model.compile(
        optimizer=fl.optimizers.SGD(lr, momentum=0.9), loss="sparse_categorical_crossentropy"
    )


def fit(model: fl.Model, x, y=None, capsys=None, **kw) -> list[str]:
    """Fit with a one-line-per-epoch log; returns the ``cache: ...`` note of each epoch."""
    kw.setdefault("epochs", 2)
    kw.setdefault("seed", 0)
    if not isinstance(x, DataLoader):
        kw.setdefault("batch_size", BATCH)
    if capsys is not None:
        capsys.readouterr()
    model.fit(x, y, verbose=2 if capsys is not None else 0, **kw)
    if capsys is None:
        return []
    return re.findall(r"cache: (.*)$", capsys.readouterr().out, re.MULTILINE)


def weights(model: fl.Model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.module.state_dict().items()}


def assert_same(a: fl.Model | dict, b: fl.Model | dict, tol: float = TOL) -> None:
    wa = a if isinstance(a, dict) else weights(a)
    wb = b if isinstance(b, dict) else weights(b)
    assert wa.keys() == wb.keys()
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], atol=tol, rtol=0, msg=lambda m, k=k: f"{k}: {m}")


def max_diff(a: fl.Model | dict, b: fl.Model | dict) -> float:
    wa = a if isinstance(a, dict) else weights(a)
    wb = b if isinstance(b, dict) else weights(b)
    return max(float((wa[k].float() - wb[k].float()).abs().max()) for k in wa)


def twins(extra: Callable[[], nn.Module] | None = None):
    """Two identical models: ``cached`` (cache="auto") and ``plain`` (cache=False)."""
    return build(extra() if extra else None), build(extra() if extra else None)


# ------------------------------------------------------------------ the baseline


def test_cache_is_built_then_reused_and_matches_uncached(capsys):
    x, y = make_data()
    (m, _), (ref, _) = twins()
    notes = fit(m, x, y, capsys, epochs=3)
    assert notes[0].startswith("built (48 samples after 'base.7'"), notes
    assert all(n.startswith("reused") for n in notes[1:]), notes
    fit(ref, x, y, capsys, epochs=3, cache=False)
    assert_same(m, ref)
    # a second fit with nothing changed reuses the store across fits
    notes = fit(m, x, y, capsys)
    fit(ref, x, y, capsys, cache=False)
    assert all(n.startswith("reused") for n in notes), notes
    assert_same(m, ref)


def test_cache_false_never_caches(capsys):
    x, y = make_data()
    m, _ = build()
    notes = fit(m, x, y, capsys, cache=False)
    assert notes == ["off (cache=False)"] * 2


# --------------------------------------------------------- trainable set changes


def test_unfreezing_a_prefix_layer_moves_the_boundary_back(capsys):
    x, y = make_data()
    (m, base), (ref, ref_base) = twins()
    fit(m, x, y, capsys)
    fit(ref, x, y, cache=False)
    for b in (base, ref_base):
        b.layers[3].trainable = True  # the second conv: the prefix now ends at base.2
        b.layers[4].trainable = True
    notes = fit(m, x, y, capsys)
    fit(ref, x, y, cache=False)
    assert notes[0].startswith("built (48 samples after 'base.2'"), notes
    assert notes[1].startswith("reused (48 samples after 'base.2'"), notes
    assert_same(m, ref)


def reads(monkeypatch) -> collections.Counter:
    """How often fit hashes each tensor's bytes: the verification fingerprint at the start
    and its check at the end (frostline.engine.verify), the cache key (the runner)."""
    from frostline.engine import verify as verify_mod
    from frostline.engine.runner import weights as runner_mod

    counts: collections.Counter = collections.Counter()
    real = runner_mod.tensor_digest

    def counted(t):
        counts[id(t)] += 1
        return real(t)

    monkeypatch.setattr(runner_mod, "tensor_digest", counted)
    monkeypatch.setattr(verify_mod, "tensor_digest", counted)
    return counts


def tensor_ids(*modules: nn.Module) -> set[int]:
    return {id(t) for m in modules for t in (*m.parameters(), *m.buffers())}


def test_unfreezing_more_does_not_read_the_old_frozen_weights(capsys, monkeypatch):
    """A frontier that moves back cannot extend the stored one: the old frozen part's
    weights (which would only tell whether it may) are not hashed, the new part's are."""
    counts = reads(monkeypatch)
    x, y = make_data()
    (m, base), (ref, ref_base) = twins()
    fit(m, x, y, capsys)
    fit(ref, x, y, cache=False)
    for b in (base, ref_base):
        b.layers[3].trainable = True
        b.layers[4].trainable = True
    counts.clear()
    notes = fit(m, x, y, capsys)
    read = dict(counts)
    fit(ref, x, y, cache=False)
    assert notes[0].startswith("built (48 samples after 'base.2'"), notes
    body = base.module
    assert set(read) == tensor_ids(body[0], body[1])  # not base.3 nor base.4
    integer = {id(t) for t in body.buffers() if not t.is_floating_point()}
    assert all(n == (1 if i in integer else 2) for i, n in read.items()), read  # see below
    assert_same(m, ref)


def test_freezing_more_extends_the_cache(capsys):
    x, y = make_data()
    (m, base), (ref, ref_base) = twins()
    for b in (base, ref_base):
        b.unfreeze(fl.select.last(2))  # the second conv and its BN train
    notes = fit(m, x, y, capsys)
    fit(ref, x, y, cache=False)
    assert notes[0].startswith("built (48 samples after 'base.2'"), notes
    assert_same(m, ref)
    for b in (base, ref_base):
        b.trainable = False
    notes = fit(m, x, y, capsys)
    fit(ref, x, y, cache=False)
    # the stored outputs of base.0-2 are run through base.3-7, not the raw data again
    assert notes[0].startswith("extended (48 samples after 'base.7'"), notes
    assert notes[1].startswith("reused"), notes
    assert_same(m, ref)


def test_a_cpu_cache_build_or_extension_runs_the_frozen_part_on_16_samples_a_call(
    capsys, monkeypatch
):
    """Whatever the fit's batch size, a CPU cache is built and extended 16 samples at a
    time (faster and smaller: see ``_CPU_BUILD_CHUNK``); training still sees the fit's
    batches, and the weights equal an uncached fit's."""
    from frostline.engine.activations import ActivationStore

    real = ActivationStore.build_many.__func__  # type: ignore[attr-defined]
    calls: list[int] = []

    def counted(cls, fn, batches, n, **kw):
        def each():
            for idx, inputs in batches:
                calls.append(len(idx))
                yield idx, inputs

        return real(cls, fn, each(), n, **kw)

    monkeypatch.setattr(ActivationStore, "build_many", classmethod(counted))
    x, y = make_data()
    (m, base), (ref, ref_base) = twins()
    for b in (base, ref_base):
        b.unfreeze(fl.select.last(2))
    notes = fit(m, x, y, capsys, batch_size=40)
    assert notes[0].startswith("built (48 samples"), notes
    assert calls == [16, 16, 16], calls
    fit(ref, x, y, batch_size=40, cache=False)
    assert_same(m, ref)
    for b in (base, ref_base):
        b.trainable = False
    calls.clear()
    notes = fit(m, x, y, capsys, batch_size=40)
    assert notes[0].startswith("extended (48 samples"), notes
    assert calls == [16, 16, 16], calls
    fit(ref, x, y, batch_size=40, cache=False)
    assert_same(m, ref)


def test_unfreeze_inside_a_callback_takes_effect_and_stays_exact(capsys):
    x, y = make_data()

    class Unfreeze(fl.Callback):
        def on_epoch_begin(self, epoch, logs=None):
            if epoch == 1:
                self.model.layers[0].layers[3].trainable = True

    (m, _), (ref, _) = twins()
    notes = fit(m, x, y, capsys, callbacks=[Unfreeze()])
    fit(ref, x, y, cache=False, callbacks=[Unfreeze()])
    assert notes[0].startswith("built (48 samples after 'base.7'"), notes
    assert notes[1].startswith("built (48 samples after 'base.2'"), notes
    assert_same(m, ref)


# ------------------------------------------------------ prefix weights between fits


def _edit_inplace(base: fl.Model) -> None:
    with torch.no_grad():
        base.module[0].weight.mul_(1.5)


def _edit_load_state_dict(base: fl.Model) -> None:
    state = {k: v.clone() for k, v in base.module.state_dict().items()}
    state["3.weight"] = state["3.weight"] * -1.0
    base.module.load_state_dict(state)


def _edit_dot_data(base: fl.Model) -> None:
    base.module[0].weight.data.add_(0.25)  # invisible to Tensor._version


def _edit_assign_data(base: fl.Model) -> None:
    base.module[3].weight.data = base.module[3].weight.data * 0.5


def _edit_running_stats(base: fl.Model) -> None:
    with torch.no_grad():
        base.module[1].running_mean.add_(1.0)  # a frozen BN's statistics are prefix weights


def _edit_replace_parameter(base: fl.Model) -> None:
    conv = base.module[3]
    conv.weight = nn.Parameter(conv.weight.detach() + 0.3, requires_grad=False)


EDITS = {
    "in_place": _edit_inplace,
    "load_state_dict": _edit_load_state_dict,
    "dot_data_in_place": _edit_dot_data,
    "assign_data": _edit_assign_data,
    "running_stats": _edit_running_stats,
    "replace_parameter": _edit_replace_parameter,
}


@pytest.mark.parametrize("edit", sorted(EDITS))
def test_prefix_weights_changed_between_fits(edit, capsys):
    x, y = make_data()
    (m, base), (ref, ref_base) = twins()
    stale, _ = build()  # what a stale cache would train on: the unedited prefix
    for model in (m, ref, stale):
        fit(model, x, y, cache="auto" if model is m else False)
    EDITS[edit](base)
    EDITS[edit](ref_base)
    notes = fit(m, x, y, capsys)
    fit(ref, x, y, cache=False)
    fit(stale, x, y, cache=False)
    assert notes[0].startswith("built"), notes
    assert_same(m, ref)
    assert max_diff(ref, stale) > 1e-3  # the edit is material: staleness would show


# -------------------------------------------------------- prefix weights mid-fit


class EditFrozen(fl.Callback):
    """Edits a frozen weight once: in place mid-epoch, or through ``.data`` at an epoch end."""

    def __init__(self, how: str) -> None:
        self.how = how
        self.done = False

    def _weight(self) -> torch.Tensor:
        return self.model.layers[0].module[0].weight

    def on_train_batch_end(self, batch, logs=None):
        if self.how == "mid_epoch" and batch == 1 and not self.done:
            with torch.no_grad():
                self._weight().mul_(-1.0)
            self.done = True

    def on_epoch_end(self, epoch, logs=None):
        if self.how == "epoch_end" and epoch == 0 and not self.done:
            self._weight().data.mul_(-1.0)
            self.done = True


@pytest.mark.parametrize("how", ["mid_epoch", "epoch_end"])
def test_frozen_weight_edited_during_fit_is_reported(how):
    x, y = make_data()
    m, _ = build()
    with pytest.raises(fl.FrozenWeightsChanged, match=r"base\.0\.weight"):
        fit(m, x, y, callbacks=[EditFrozen(how)])


@pytest.mark.parametrize("how", ["mid_epoch", "epoch_end"])
def test_frozen_weight_edited_during_fit_uses_fresh_prefix_outputs(how, capsys):
    x, y = make_data()
    (m, _), (ref, _) = twins()
    stale, _ = build()
    notes = fit(m, x, y, capsys, epochs=3, callbacks=[EditFrozen(how)], verify_frozen=False)
    fit(ref, x, y, epochs=3, cache=False, callbacks=[EditFrozen(how)], verify_frozen=False)
    fit(stale, x, y, epochs=3, cache=False, verify_frozen=False)
    if how == "mid_epoch":
        # served from the store until the edit, computed fresh right after it
        assert notes[0].startswith("invalidated"), notes
    else:
        assert notes[0].startswith("built"), notes
    assert notes[1].startswith("built"), notes  # rebuilt for the edited weights
    assert notes[2].startswith("reused"), notes
    assert_same(m, ref)
    assert max_diff(ref, stale) > 1e-3


def test_frozen_weights_are_hashed_once_per_fit_unless_a_callback_may_write(monkeypatch):
    """Built-in callbacks promise not to write weights: each frozen weight is read once
    per fit, by the verification fingerprint, whose digests the cache key reuses. A
    user's callback (``writes_weights`` True by default) brings back the per-epoch hash
    that catches ``p.data`` edits (the test above)."""
    counts = reads(monkeypatch)
    x, y = make_data()
    m, base = build()
    frozen = tensor_ids(base.module)
    builtin = [
        fl.callbacks.EarlyStopping(monitor="loss", patience=9),
        fl.callbacks.TerminateOnNaN(),
    ]
    # the BatchNorms' step counters are integers: the cache key reads them, the
    # verification (of floating-point weights) does not
    integer = {id(t) for t in base.module.buffers() if not t.is_floating_point()}
    fit(m, x, y, epochs=4, callbacks=builtin)
    assert set(counts) == frozen
    # fingerprint and cache key: one read; the check at the end: one (3 when not shared)
    assert all(n == (1 if i in integer else 2) for i, n in counts.items()), counts

    class Noop(fl.Callback):
        pass

    counts.clear()
    fit(m, x, y, epochs=4, callbacks=[Noop()])
    assert set(counts) == frozen
    # the fingerprint, the cache key at each of the 4 epochs, the check
    assert all(n == (4 if i in integer else 6) for i, n in counts.items()), counts


# -------------------------------------------------------------------- data changes


@pytest.mark.parametrize("how", ["new_array", "same_array_in_place", "labels"])
def test_data_changed_between_fits(how, capsys):
    x, y = make_data()
    (m, _), (ref, _) = twins()
    stale, _ = build()
    xs = {id(model): x.copy() for model in (m, ref, stale)}
    ys = {id(model): y.copy() for model in (m, ref, stale)}
    for model in (m, ref, stale):
        fit(model, xs[id(model)], ys[id(model)], cache="auto" if model is m else False)
    for model in (m, ref):
        if how == "new_array":
            xs[id(model)] = xs[id(model)].copy()
            xs[id(model)][5, 1, 2, 3] += 4.0  # same shape, one element different
        elif how == "same_array_in_place":
            xs[id(model)][5, 1, 2, 3] += 4.0
        else:
            ys[id(model)] = ys[id(model)].copy()
            ys[id(model)][:8] = (ys[id(model)][:8] + 1) % K
    notes = fit(m, xs[id(m)], ys[id(m)], capsys)
    fit(ref, xs[id(ref)], ys[id(ref)], cache=False)
    fit(stale, xs[id(stale)], ys[id(stale)], cache=False)
    assert notes[0].startswith("built"), notes
    assert_same(m, ref)
    assert max_diff(ref, stale) > 1e-5


def test_validation_data_changed_between_fits(capsys):
    x, y = make_data()
    xv, yv = make_data(seed=1)
    (m, _), (ref, _) = twins()
    h1 = m.fit(x, y, validation_data=(xv, yv), epochs=1, batch_size=BATCH, seed=0, verbose=0)
    r1 = ref.fit(
        x, y, validation_data=(xv, yv), epochs=1, batch_size=BATCH, seed=0, verbose=0, cache=False
    )
    assert h1.history["val_loss"] == pytest.approx(r1.history["val_loss"], abs=TOL)
    xv2 = xv.copy()
    xv2[0] *= -1.0
    h2 = m.fit(x, y, validation_data=(xv2, yv), epochs=1, batch_size=BATCH, seed=0, verbose=0)
    r2 = ref.fit(
        x, y, validation_data=(xv2, yv), epochs=1, batch_size=BATCH, seed=0, verbose=0, cache=False
    )
    assert h2.history["val_loss"] == pytest.approx(r2.history["val_loss"], abs=TOL)
    assert_same(m, ref)


def test_evaluate_after_a_prefix_edit_matches_an_uncached_model():
    x, y = make_data()
    (m, base), (ref, ref_base) = twins()
    fit(m, x, y, epochs=3)
    fit(ref, x, y, epochs=3, cache=False)
    before = m.evaluate(x, y, batch_size=BATCH, verbose=0)  # builds the "evaluate" store
    assert m.evaluate(x, y, batch_size=BATCH, verbose=0) == pytest.approx(before, abs=TOL)
    _edit_load_state_dict(base)
    _edit_load_state_dict(ref_base)
    after = m.evaluate(x, y, batch_size=BATCH, verbose=0)
    ref.compile(optimizer="sgd", loss="sparse_categorical_crossentropy")
    ref._get_trainer()._runner(CacheOptions(cache=False))  # the reference evaluates uncached
    assert after == pytest.approx(ref.evaluate(x, y, batch_size=BATCH, verbose=0), abs=TOL)
    assert abs(after - before) > 1e-3


# ------------------------------------------------------- modes that forbid caching


def test_batch_statistics_mode_turns_the_cache_off(capsys):
    x, y = make_data()
    (m, base), (ref, ref_base) = twins()
    fit(m, x, y, capsys)
    fit(ref, x, y, cache=False)
    base.set_batchnorm_mode("batch_stats")
    ref_base.set_batchnorm_mode("batch_stats")
    notes = fit(m, x, y, capsys)
    fit(ref, x, y, cache=False)
    assert all(
        n.startswith("off (the frozen part has an active stochastic layer") for n in notes
    ), notes
    assert all("batch-statistics mode" in n for n in notes), notes
    assert_same(m, ref, tol=0)  # nothing cached: the very same computation
    # back to inference mode: the statistics moved while in batch mode, so a new store
    base.set_batchnorm_mode("auto")
    ref_base.set_batchnorm_mode("auto")
    notes = fit(m, x, y, capsys)
    fit(ref, x, y, cache=False)
    assert notes[0].startswith("built"), notes
    assert_same(m, ref)


STOCHASTIC = {
    "dropout": lambda: nn.Dropout(0.5),
    "dropout2d": lambda: nn.Dropout2d(0.3),
    "drop_path": lambda: DropPath(0.5),
}


def conv1x1() -> nn.Conv2d:
    torch.manual_seed(1)  # the same weights in both twins
    return nn.Conv2d(6, 6, 1)


@pytest.mark.parametrize("kind", sorted(STOCHASTIC))
def test_active_stochastic_layer_in_the_prefix_turns_the_cache_off(kind, capsys):
    # what it draws feeds a frozen convolution: the draw stays in the frozen part
    x, y = make_data()
    (m, _), (ref, _) = twins(lambda: nn.Sequential(STOCHASTIC[kind](), conv1x1()))
    notes = fit(m, x, y, capsys)
    fit(ref, x, y, cache=False)
    why = "off (randomness in the frozen part: layer 'base.6.0' draws random numbers"
    assert all(n.startswith(why) for n in notes), notes
    assert_same(m, ref, tol=0)


@pytest.mark.parametrize("kind", sorted(STOCHASTIC))
def test_random_layer_feeding_trainable_computation_runs_after_the_cache(kind, capsys):
    # it reads frozen values and feeds, through pooling, the trainable head only: it runs
    # on the trainable side, and the cache sits in front of it
    x, y = make_data()
    (m, _), (ref, _) = twins(STOCHASTIC[kind])
    notes = fit(m, x, y, capsys)
    fit(ref, x, y, cache=False)
    assert notes[0].startswith("built (48 samples after 'base.5', "), notes  # one tensor
    assert notes[1].startswith("reused"), notes
    assert_same(m, ref)


def test_timm_head_dropout_runs_after_the_cache(capsys):
    # timm applies its head dropout functionally (F.dropout), not through a module
    import timm

    x, y = make_data()
    models = []
    for _ in range(2):
        torch.manual_seed(0)
        m = fl.wrap(
            timm.create_model("mobilenetv2_100", pretrained=False, num_classes=K, drop_rate=0.5)
        )
        m.trainable = False
        m.get_layer("classifier").trainable = True
        compile_(m, lr=0.01)
        models.append(m)
    notes = fit(models[0], x, y, capsys)
    fit(models[1], x, y, cache=False)
    # timm's head dropout (F.dropout before the classifier) feeds the classifier only
    assert notes[0].startswith("built") and notes[1].startswith("reused"), notes
    assert_same(models[0], models[1])
    # evaluation runs the model in eval mode: no dropout, so the prefix may be cached
    loss = models[0].evaluate(x, y, batch_size=BATCH, verbose=0)
    assert models[0]._trainer.runner.status["evaluate"].state is CacheState.BUILT
    assert loss == pytest.approx(models[1].evaluate(x, y, batch_size=BATCH, verbose=0), abs=1e-5)


def test_batchnorm_without_running_statistics_turns_the_cache_off(capsys):
    # frozen or not, it normalises with the statistics of whatever batch it is given
    x, y = make_data()
    (m, _), (ref, _) = twins(lambda: nn.BatchNorm2d(6, track_running_stats=False))
    notes = fit(m, x, y, capsys)
    fit(ref, x, y, cache=False)
    assert all(n.startswith("off (the frozen part has an active stochastic layer") for n in notes)
    assert_same(m, ref, tol=0)


def test_inactive_dropout_does_not_block_the_cache(capsys):
    x, y = make_data()
    (m, _), (ref, _) = twins(lambda: nn.Dropout(0.0))
    notes = fit(m, x, y, capsys)
    fit(ref, x, y, cache=False)
    assert notes[0].startswith("built"), notes
    assert_same(m, ref)


# ---------------------------------------------------------------- data sources


class Digits(Dataset):
    """A map-style dataset; deterministic (and fingerprinted) only when it says so.

    Undeclared, it adds random noise per access (a random augmentation), so serving a
    stored prefix output would change the result.
    """

    def __init__(self, x, y, deterministic: bool | None = None) -> None:
        self.x, self.y = torch.from_numpy(x), torch.from_numpy(y)
        self.noise = not deterministic
        if deterministic is not None:
            self.deterministic = deterministic

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i):
        x = self.x[i]
        return (x + 0.5 * torch.randn_like(x) if self.noise else x), self.y[i]

    def fingerprint(self) -> str:
        return hashlib.sha256(self.x.numpy().tobytes()).hexdigest()


def test_dataloader_is_never_cached(capsys):
    x, y = make_data()
    (m, _), (ref, _) = twins()
    notes = fit(m, DataLoader(Digits(x, y), batch_size=BATCH), capsys=capsys)
    fit(ref, DataLoader(Digits(x, y), batch_size=BATCH), cache=False)
    assert all(n.startswith("off (data is not declared deterministic") for n in notes), notes
    assert_same(m, ref, tol=0)


def test_dataset_without_deterministic_flag_is_never_cached(capsys):
    x, y = make_data()
    (m, _), (ref, _) = twins()
    notes = fit(m, Digits(x, y), capsys=capsys)
    fit(ref, Digits(x, y), cache=False)
    assert all(n.startswith("off (data is not declared deterministic") for n in notes), notes
    assert_same(m, ref, tol=0)


def test_deterministic_dataset_is_cached_and_its_changes_seen(capsys):
    x, y = make_data()
    (m, _), (ref, _) = twins()
    notes = fit(m, Digits(x, y, deterministic=True), capsys=capsys)
    fit(ref, Digits(x, y, deterministic=True), cache=False)
    assert notes[0].startswith("built") and notes[1].startswith("reused"), notes
    assert_same(m, ref)
    x2 = x.copy()
    x2[7, 0, 0, 0] -= 3.0
    notes = fit(m, Digits(x2, y, deterministic=True), capsys=capsys)
    fit(ref, Digits(x2, y, deterministic=True), cache=False)
    assert notes[0].startswith("built"), notes
    assert_same(m, ref)


def test_tensor_dataset_is_cached(capsys):
    x, y = make_data()
    (m, _), (ref, _) = twins()
    ds = TensorDataset(torch.from_numpy(x), torch.from_numpy(y))
    notes = fit(m, ds, capsys=capsys)
    fit(ref, ds, cache=False)
    assert notes[0].startswith("built"), notes
    assert_same(m, ref)


# --------------------------------------------------------------- storage variants


def test_disk_spill_gives_the_same_result(capsys, tmp_path):
    x, y = make_data()
    (m, _), (ref, _) = twins()
    mem, _ = build()
    notes = fit(m, x, y, capsys, cache_memory_bytes=0, cache_dir=tmp_path)
    assert notes[0].startswith("built") and "in disk" in notes[0], notes
    assert notes[1].startswith("reused") and "in disk" in notes[1], notes
    assert any(tmp_path.iterdir())  # the spill file lives where it was told to
    notes = fit(mem, x, y, capsys)
    assert "in memory" in notes[0], notes
    fit(ref, x, y, cache=False)
    assert_same(m, mem, tol=0)  # the same values, stored elsewhere
    assert_same(m, ref)


def test_float16_cache_is_within_tolerance(capsys):
    x, y = make_data()
    (m, _), (ref, _) = twins()
    notes = fit(m, x, y, capsys, cache_dtype=torch.float16)
    fit(ref, x, y, cache=False)
    assert notes[0].startswith("built"), notes
    assert_same(m, ref, tol=5e-3)
