"""fl.recipes: two-phase fine-tuning, the strategy table, verification, forgetting."""

from __future__ import annotations

import math
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from sklearn.datasets import load_digits
from torch import nn

import frostline as fl
from frostline.workflows import recipes

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def digits():
    d = load_digits()
    return (d.data / 16).astype("float32"), d.target.astype("int64")


def _mlp_base(name: str = "base") -> fl.Model:
    return fl.wrap(
        nn.Sequential(
            nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 16), nn.ReLU(), nn.Linear(16, 8), nn.ReLU()
        ),
        name=name,
    )


def _snapshot(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# --------------------------------------------------------------------------- two-phase


def test_two_phase_fine_tuning_beats_feature_extraction(digits):
    """Base pretrained on a related task (parity) through a narrow bottleneck: its frozen
    features are not quite right for 10 digits, so unfreezing it in phase 2 must help."""
    x, y = digits
    fl.seed_everything(0)
    base = _mlp_base()
    pre = fl.Sequential([base, nn.Linear(8, 2)])
    pre.compile(fl.optimizers.Adam(1e-2), loss="sparse_categorical_crossentropy")
    pre.fit(x[:1200], y[:1200] % 2, epochs=5, batch_size=64, verbose=0, seed=0)
    pretrained = _snapshot(base.module)

    class SeeBase(fl.Callback):
        """Records, per epoch, whether the base is bitwise at its pretrained values."""

        def __init__(self):
            self.untouched = []

        def on_epoch_end(self, epoch, logs=None):
            self.untouched.append(_same(_snapshot(base.module), pretrained))

    see = SeeBase()
    model = fl.Sequential([base, nn.Linear(8, 10)])
    r = recipes.two_phase(
        model,
        base,
        x[:1200],
        y[:1200],
        unfreeze=2,
        phase1_epochs=5,
        phase2_epochs=5,
        phase1_lr=1e-2,
        phase2_lr=1e-2,
        loss="sparse_categorical_crossentropy",
        metrics=["accuracy"],
        batch_size=64,
        validation_data=(x[1200:], y[1200:]),
        callbacks=[see],
        verbose=0,
        seed=0,
    )
    acc = r.history["val_accuracy"]
    assert r.phase_boundary == 5 and r.history["phase"] == [1] * 5 + [2] * 5
    assert len(acc) == 10 and r.phase1.history["val_accuracy"] == acc[:5]
    assert acc[-1] > acc[4] + 0.1, acc  # fine-tuning pays on this task
    assert see.untouched == [True] * 5 + [False] * 5  # phase 1 never touched the base
    # phase 2 ran at its own rate, epochs numbered after phase 1's
    assert model.learning_rate == pytest.approx(1e-2)
    assert [g["lr"] for g in model.optimizer.param_groups] == [pytest.approx(1e-2)]
    assert r.phase2.epoch == [5, 6, 7, 8, 9] and r.epoch == list(range(10))
    # the first leaf layer of the base (not in last(2)) stayed frozen and unchanged
    first = base.leaf_layers()[0]
    assert first.trainable is False
    assert torch.equal(first.module.weight, pretrained["0.weight"])
    assert r.unfreeze_plan.paths == ["2", "4"] and r.freeze_plan.action == "freeze"
    assert "phase 2 (last(2) unfrozen, lr 0.01)" in r.summary()


def test_two_phase_base_inside_a_wrapped_model_and_selector(digits):
    x, y = digits
    fl.seed_everything(1)
    net = nn.Sequential(
        nn.Sequential(
            nn.Conv2d(1, 4, 3),
            nn.BatchNorm2d(4),
            nn.ReLU(),
            nn.Conv2d(4, 4, 3),
            nn.BatchNorm2d(4),
            nn.ReLU(),
        ),
        nn.Flatten(),
        nn.Linear(4 * 4 * 4, 10),
    )
    model = fl.wrap(net)
    base = model.layers[0]  # a plain Layer inside the model
    xi = x[:256].reshape(-1, 1, 8, 8)
    r = recipes.two_phase(
        model,
        base,
        xi,
        y[:256],
        unfreeze=fl.select.of_type("Conv2d") & fl.select.last(3),
        phase1_epochs=1,
        phase2_epochs=1,
        loss="sparse_categorical_crossentropy",
        batch_size=64,
        verbose=0,
    )
    assert r.unfreeze_plan.paths == ["3"]
    assert model.learning_rate == 1e-5 and r.phase1_lr == 1e-3  # the seeds' defaults
    assert [lay.trainable for lay in base.leaf_layers()] == [False, False, True, False]
    assert fl.batchnorm.mode_of(net[0][4]) == "inference"  # the Keras guide's BN advice
    # phase 2's running statistics (BN in inference mode) did not move
    assert model.last_verification.ok
    # the same by name
    r2 = recipes.two_phase(
        model,
        "0",
        xi,
        y[:256],
        unfreeze=None,
        phase1_epochs=0,
        phase2_epochs=1,
        loss="sparse_categorical_crossentropy",
        verbose=0,
    )
    assert r2.phase_boundary == 0 and r2.history["phase"] == [2]
    assert all(lay.trainable for lay in base.leaf_layers())


def test_two_phase_early_stopping_and_history_join(digits):
    x, y = digits
    fl.seed_everything(2)
    base = _mlp_base()
    model = fl.Sequential([base, nn.Linear(8, 10)])
    r = recipes.two_phase(
        model,
        base,
        x[:300],
        y[:300],
        unfreeze=1,
        phase1_epochs=30,
        phase2_epochs=2,
        phase1_lr=0.3,
        loss="sparse_categorical_crossentropy",
        metrics=["accuracy"],
        validation_split=0.2,
        early_stopping={"patience": 0, "min_delta": 10.0},
        verbose=0,
    )
    # min_delta=10: no epoch ever improves on the first -> each phase stops after 2 epochs
    assert r.phase_boundary == 2 and len(r.phase2.epoch) == 2
    assert set(r.history) >= {"loss", "accuracy", "val_loss", "val_accuracy", "phase", "epoch_time"}
    assert all(len(v) == 4 for v in r.history.values())


def test_two_phase_errors():
    base = fl.wrap(nn.Sequential(nn.Linear(4, 4)), name="base")
    model = fl.Sequential([base, nn.Linear(4, 2)])
    x, y = np.zeros((8, 4), "float32"), np.zeros(8, "int64")
    kw = dict(loss="mse", verbose=0)
    with pytest.raises(ValueError, match="needs a loss"):
        recipes.two_phase(model, base, x, y, verbose=0)
    with pytest.raises(ValueError, match="not part of model"):
        recipes.two_phase(model, nn.Linear(4, 4), x, y, **kw)
    with pytest.raises(ValueError, match="phase2_lr"):
        recipes.two_phase(model, base, x, y, phase2_lr=0, **kw)
    with pytest.raises(fl.SelectionError, match="matched no layer"):
        recipes.two_phase(model, base, x, y, unfreeze="nope*", **kw)
    with pytest.raises(TypeError, match="numbers the epochs itself"):
        recipes.two_phase(model, base, x, y, initial_epoch=3, **kw)
    with pytest.raises(ValueError, match="unfreeze=0"):
        recipes.two_phase(model, base, x, y, unfreeze=0, **kw)
    headless = fl.Sequential([base])
    with pytest.raises(ValueError, match="nothing is left to train"):
        recipes.two_phase(headless, base, x, y, **kw)


# --------------------------------------------------------------------------- strategy table


@pytest.mark.parametrize(
    ("size", "sim", "frozen"),
    [
        ("small", "similar", 9),
        ("small", "dissimilar", 6),
        ("large", "similar", 3),
        ("large", "dissimilar", 0),
    ],
)
def test_apply_strategy_table(size, sim, frozen):
    base = fl.wrap(nn.Sequential(*[nn.Linear(3, 3) for _ in range(9)]), name="base")
    base.layers[8].trainable = False  # the strategy sets the whole base, whatever it was
    plan = recipes.apply_strategy(base, size, sim)
    states = [lay.trainable for lay in base.leaf_layers()]
    assert states == [False] * frozen + [True] * (9 - frozen)
    assert isinstance(plan, fl.Plan) and plan.applied
    assert len(plan.frozen) == frozen and plan.frozen_params == 12 * frozen
    text = str(plan)
    assert recipes.STRATEGY_TABLE[(size, sim)][1] in text  # the rationale, quoted
    assert f"{size} target dataset, {sim} tasks" in text


def test_apply_strategy_options():
    net = nn.Sequential(*[nn.Linear(3, 3) for _ in range(4)])
    plan = recipes.apply_strategy(net, "large", "dissimilar", fraction=0.25, dry_run=True)
    assert plan.frozen == ["0"] and not plan.applied
    assert all(p.requires_grad for p in net.parameters())  # dry run: nothing changed
    assert [c.path for c in plan.changes] == ["0"] and "[dry run]" in str(plan)
    # small+dissimilar keeps at least one frozen and one trainable layer
    assert recipes.apply_strategy(net, "small", "dissimilar", fraction=1.0).trainable == ["3"]
    with pytest.raises(ValueError, match="freezes all base layers"):
        recipes.apply_strategy(net, "small", "similar", fraction=0.5)
    with pytest.raises(ValueError, match="dataset_size"):
        recipes.apply_strategy(net, "medium", "similar")
    with pytest.raises(ValueError, match="similarity"):
        recipes.apply_strategy(net, "small", "same")
    with pytest.raises(ValueError, match="fraction"):
        recipes.apply_strategy(net, "large", "similar", fraction=1.5)


# --------------------------------------------------------------------------- verification


def _tamper_model():
    model = fl.wrap(nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2)))
    model.layers[0].trainable = False
    model.compile("adam", loss="sparse_categorical_crossentropy")
    return model


class _Tamper(fl.Callback):
    """Changes a frozen weight behind frostline's back (no trainable flip, no optimizer)."""

    def __init__(self, at_epoch: int):
        self.at_epoch = at_epoch

    def on_epoch_end(self, epoch, logs=None):
        if epoch == self.at_epoch:
            with torch.no_grad():
                self.model.module[0].weight.data.mul_(1.001)


def test_fit_catches_a_frozen_weight_changed_behind_its_back():
    model = _tamper_model()
    x, y = np.random.rand(16, 4).astype("float32"), np.random.randint(0, 2, 16)
    with pytest.raises(fl.FrozenWeightsChanged, match=r"0\.weight"):
        model.fit(x, y, epochs=2, verbose=0, callbacks=[_Tamper(0)])
    # VerifyFrozen pins it to the epoch it happened in
    model = _tamper_model()
    cb = recipes.VerifyFrozen()
    with pytest.raises(fl.FrozenWeightsChanged, match=r"0\.weight \(found after epoch 2\)"):
        model.fit(x, y, epochs=4, verbose=0, callbacks=[_Tamper(1), cb])
    assert [r["ok"] for r in cb.reports] == [True, False]
    # per batch, and only recording
    model = _tamper_model()
    cb = recipes.VerifyFrozen(every="batch", raise_error=False)
    model.fit(x, y, batch_size=8, epochs=2, verbose=0, callbacks=[cb], verify_frozen=False)
    assert len(cb.reports) == 4 and all(r["ok"] and r["checked"] == 2 for r in cb.reports)


def test_verify_frozen_exempts_layers_unfrozen_on_purpose():
    model = _tamper_model()
    x, y = np.random.rand(16, 4).astype("float32"), np.random.randint(0, 2, 16)
    cb = recipes.VerifyFrozen()
    model.fit(x, y, epochs=3, verbose=0, callbacks=[fl.schedules.UnfreezeAt(1, "0"), cb])
    assert (
        all(r["ok"] for r in cb.reports)
        and cb.reports[0]["checked"] == 2
        and cb.reports[1]["checked"] == 0
    )
    with recipes.verify_frozen(model) as check:  # a plain PyTorch loop
        opt = torch.optim.SGD([p for p in model.module.parameters() if p.requires_grad], lr=0.1)
        model.module(torch.rand(4, 4)).sum().backward()
        opt.step()
    assert check.report is not None and check.report.ok
    with pytest.raises(ValueError, match="every"):
        recipes.VerifyFrozen(every="step")


# --------------------------------------------------------------------------- forgetting


def test_forgetting_report_frozen_trunk_keeps_the_source_task(digits):
    x, y = digits
    a, b = y < 5, y >= 5
    xa, ya, xb, yb = x[a], y[a], x[b], y[b] - 5
    fl.seed_everything(0)
    src = fl.Sequential(
        [
            nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU()),
            nn.Linear(32, 5),
        ]
    )
    src.compile(fl.optimizers.Adam(1e-2), loss="sparse_categorical_crossentropy")
    src.fit(xa[:700], ya[:700], epochs=15, batch_size=64, verbose=0, seed=0)
    original = _snapshot(src.module)

    def strategy(freeze: bool):
        def fine_tune(m: fl.Model) -> float:
            m.layers[0].trainable = not freeze
            target = fl.Sequential([m.layers[0], nn.Linear(32, 5)])
            target.compile(
                fl.optimizers.Adam(1e-2),
                loss="sparse_categorical_crossentropy",
                metrics=["accuracy"],
            )
            target.fit(xb[:700], yb[:700], epochs=15, batch_size=64, verbose=0, seed=0)
            return target.evaluate(xb[700:], yb[700:], verbose=0, return_dict=True)["accuracy"]

        return fine_tune

    report = recipes.forgetting_report(
        src, (xa[700:], ya[700:]), {"frozen": strategy(True), "full": strategy(False)}
    )
    assert report.source_before > 0.8
    assert report["frozen"].change == 0.0 and report["frozen"].weights_changed == 0
    assert report["full"].change < -0.05  # catastrophic forgetting, measured
    assert report["full"].weights_changed > 1000 and report["full"].result > report["frozen"].result
    assert _same(_snapshot(src.module), original)  # the source model itself is untouched
    text = str(report)
    assert "source-task accuracy before fine-tuning" in text and "frozen" in text and "full" in text
    assert not math.isnan(report["full"].source_after)


def test_forgetting_report_arguments():
    src = fl.wrap(nn.Linear(2, 2))
    data = (np.zeros((4, 2), "float32"), np.zeros(4, "int64"))
    with pytest.raises(TypeError, match="fine_tune"):
        recipes.forgetting_report(src, data, {"x": 3})
    with pytest.raises(ValueError, match="metric"):
        recipes.forgetting_report(src, data, lambda m: None, metric="f1")
    with pytest.raises(ValueError, match="source_eval"):
        recipes.forgetting_report(src, data[0], lambda m: None)

    def mse(pred, true):
        return float(((pred - true[:, None]) ** 2).mean())

    r = recipes.forgetting_report(src, data, lambda m: None, metric=mse)
    assert r.metric == "mse" and list(r.rows) == ["<lambda>"] and r.rows["<lambda>"].change == 0.0


# --------------------------------------------------------------------------- docs


def test_docs_recipes_examples_run(capsys):
    """Every code block of docs/recipes.md runs, in order, in one namespace."""
    doc = Path(__file__).resolve().parents[2] / "docs" / "recipes.md"
    blocks = re.findall(r"```python\n(.*?)```", doc.read_text(), re.S)
    assert len(blocks) >= 7
    ns: dict = {}
    for i, code in enumerate(blocks):
        exec(compile(code, f"docs/recipes.md block {i + 1}", "exec"), ns)
    out = capsys.readouterr().out
    assert "found after epoch 2" in out and "source-task accuracy before fine-tuning" in out
