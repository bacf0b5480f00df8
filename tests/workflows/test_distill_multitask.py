"""Multi-task models on a frozen shared trunk, and distillation from a frozen teacher."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from sklearn.datasets import load_digits
from torch import nn

import frostline as fl
from frostline.workflows import recipes
from frostline.workflows.distill import DistillationModule

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def digits():
    d = load_digits()
    return (d.data / 16).astype("float32"), d.target.astype("int64")


def _snapshot(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# --------------------------------------------------------------------------- multi-task


def test_multitask_heads_learn_while_the_trunk_stays_bitwise_frozen(digits):
    x, y = digits
    x, y = x[:1000], y[:1000]
    fl.seed_everything(0)
    trunk = nn.Sequential(nn.Linear(64, 32), nn.BatchNorm1d(32), nn.ReLU())
    pre = fl.Sequential([trunk, nn.Linear(32, 10)])  # "pretrained" trunk
    pre.compile(fl.optimizers.Adam(1e-2), loss="sparse_categorical_crossentropy")
    pre.fit(x, y, epochs=2, batch_size=64, verbose=0, seed=0)
    frozen = _snapshot(trunk)

    model = recipes.multitask_model(
        trunk,
        {"digit": nn.Linear(32, 10), "odd": nn.Linear(32, 2), "ink": nn.Linear(32, 1)},
        freeze_trunk=True,
    )
    assert model.get_layer("trunk").trainable is False and model.get_layer("heads.odd").trainable
    model.compile(
        fl.optimizers.Adam(1e-2),
        loss={
            "digit": "sparse_categorical_crossentropy",
            "odd": "sparse_categorical_crossentropy",
            "ink": "mse",
        },
        loss_weights={"digit": 1.0, "odd": 0.5, "ink": 2.0},
        metrics={"digit": ["accuracy"], "odd": ["accuracy"]},
    )
    targets = {"digit": y, "odd": y % 2, "ink": x.mean(1, keepdims=True)}
    h = model.fit(x, targets, epochs=4, batch_size=64, verbose=0, seed=0)
    hist = h.history
    assert set(hist) == {
        "loss",
        "digit_loss",
        "odd_loss",
        "ink_loss",
        "digit_accuracy",
        "odd_accuracy",
        "epoch_time",
    }
    for head in ("digit", "odd", "ink"):  # every head learns
        assert hist[f"{head}_loss"][-1] < hist[f"{head}_loss"][0], head
    assert hist["digit_accuracy"][-1] > 0.8 and hist["odd_accuracy"][-1] > 0.8
    # the total is the weighted sum of the heads' losses
    total = hist["digit_loss"][-1] + 0.5 * hist["odd_loss"][-1] + 2.0 * hist["ink_loss"][-1]
    assert hist["loss"][-1] == pytest.approx(total, rel=1e-5)
    # the shared trunk (BatchNorm running statistics included) is bitwise unchanged
    assert _same(_snapshot(trunk), frozen)
    assert model.last_verification.ok and model.last_verification.checked == 6
    out = model.predict(x[:5])
    assert set(out) == {"digit", "odd", "ink"} and out["ink"].shape == (5, 1)


def test_multitask_model_arguments():
    with pytest.raises(ValueError, match="non-empty dict"):
        recipes.multitask_model(nn.Linear(2, 2), {})
    with pytest.raises(ValueError, match="without dots"):
        recipes.multitask_model(nn.Linear(2, 2), {"a.b": nn.Linear(2, 1)})
    with pytest.raises(TypeError, match="head 'a'"):
        recipes.multitask_model(nn.Linear(2, 2), {"a": 3})
    m = recipes.multitask_model(fl.wrap(nn.Linear(2, 2)), {"a": nn.Linear(2, 1)})
    assert [lay.path for lay in m.leaf_layers()] == ["trunk", "heads.a"]


# --------------------------------------------------------------------------- distillation


def _teacher(x, y):
    fl.seed_everything(0)
    net = nn.Sequential(
        nn.Linear(64, 64), nn.BatchNorm1d(64), nn.ReLU(), nn.Dropout(0.2), nn.Linear(64, 10)
    )
    t = fl.wrap(net)
    t.compile(fl.optimizers.Adam(1e-2), loss="sparse_categorical_crossentropy")
    t.fit(x, y, epochs=4, batch_size=64, verbose=0, seed=0)
    return net


def test_distilled_student_moves_toward_a_bitwise_unchanged_teacher(digits):
    x, y = digits
    teacher = _teacher(x[:1000], y[:1000])
    teacher.train()  # distill runs it in eval mode anyway, and puts this back
    for p in teacher[0].parameters():
        p.requires_grad_(True)
    before = _snapshot(teacher)
    seen = []
    teacher.register_forward_hook(lambda m, i, o: seen.append((len(i[0]), m.training)))
    fl.seed_everything(1)
    student = nn.Sequential(nn.Linear(64, 10))
    h = recipes.distill(
        student,
        teacher,
        x[:1000],
        y[:1000],
        temperature=3.0,
        alpha=0.8,
        epochs=4,
        optimizer=fl.optimizers.Adam(1e-2),
        batch_size=64,
        validation_data=(x[1000:], y[1000:]),
        verbose=0,
        seed=0,
    )
    kl, val_kl = h.history["kl"], h.history["val_kl"]
    assert kl[-1] < kl[0] * 0.8 and val_kl[-1] < val_kl[0]  # the student moves toward the teacher
    assert h.history["agreement"][-1] > h.history["agreement"][0]
    assert h.history["val_accuracy"][-1] > 0.7
    assert _same(_snapshot(teacher), before)  # never updated, running statistics included
    assert all(not training for _, training in seen)  # always in inference mode (BN, dropout)
    # frozen prefix: the teacher ran once over each data set (plus the one-off checks), not every epoch
    assert sum(n for n, _ in seen) < 1797 + 50
    # put back as it was
    assert teacher.training and all(p.requires_grad for p in teacher[0].parameters())


def test_distill_without_labels_and_arguments(digits):
    x, y = digits
    teacher = nn.Sequential(nn.Linear(64, 10))
    fl.seed_everything(2)
    student = nn.Sequential(nn.Linear(64, 16), nn.ReLU(), nn.Linear(16, 10))
    h = recipes.distill(
        student,
        teacher,
        torch.from_numpy(x[:256]),
        epochs=3,
        optimizer=fl.optimizers.Adam(1e-2),
        verbose=0,
    )
    assert "accuracy" not in h.history and h.history["kl"][-1] < h.history["kl"][0]
    # the loss: alpha * T^2 * KL(teacher_T || student_T) + (1 - alpha) * CE; soft term only without labels
    s, t, labels = torch.randn(5, 10), torch.randn(5, 10), torch.randint(0, 10, (5,))
    pt, ls = torch.softmax(t / 4, 1), torch.log_softmax(s / 4, 1)
    soft = 16 * (pt * (pt.log() - ls)).sum(1).mean()
    hard = nn.functional.cross_entropy(s, labels)
    packed = torch.cat([s, t], 1)
    assert recipes.DistillationLoss(4.0, 0.3)(packed, labels).item() == pytest.approx(
        (0.3 * soft + 0.7 * hard).item(), rel=1e-5
    )
    assert recipes.DistillationLoss(4.0, 0.3, hard_labels=False)(
        packed, labels
    ).item() == pytest.approx(soft.item(), rel=1e-5)
    with pytest.raises(ValueError, match="temperature"):
        recipes.distill(student, teacher, x, y, temperature=0)
    with pytest.raises(ValueError, match="alpha"):
        recipes.distill(student, teacher, x, y, alpha=1.5)
    with pytest.raises(ValueError, match="separate modules"):
        recipes.distill(teacher, teacher, x, y)
    with pytest.raises(ValueError, match="shaped like the teacher"):
        recipes.distill(nn.Linear(64, 3), teacher, x[:32], y[:32], verbose=0)
    assert all(p.requires_grad for p in teacher.parameters())  # restored after the failure too


def test_distillation_module_keeps_the_teacher_in_eval_mode():
    m = DistillationModule(nn.Linear(4, 3), nn.Sequential(nn.Linear(4, 3), nn.Dropout(0.5)))
    m.train()
    assert m.training and m.student.training and not m.teacher.training
    out = m(torch.ones(2, 4))
    assert out.shape == (2, 6)
    assert torch.equal(out[:, 3:], m.teacher.net(torch.ones(2, 4)))
    # a (fused) copy of the teacher stage still tells the student stage how to unpack
    assert copy.deepcopy(m.teacher)._packing is m.student._packing


def test_frozen_multitask_trunk_is_cached_and_matches_uncached(capsys):
    def build():
        torch.manual_seed(0)
        trunk = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU())
        m = fl.recipes.multitask_model(
            trunk, {"a": nn.Linear(16, 3), "b": nn.Linear(16, 1)}, freeze_trunk=True
        )
        m.compile(
            "adam",
            loss={"a": "sparse_categorical_crossentropy", "b": "mse"},
            metrics={"a": ["accuracy"]},
        )
        return m

    rng = np.random.default_rng(0)
    x = rng.random((64, 6), dtype=np.float32)
    y = {"a": rng.integers(0, 3, 64), "b": rng.random((64, 1), dtype=np.float32)}
    cached, plain = build(), build()
    cached.fit(x, y, epochs=3, batch_size=16, verbose=2, seed=0)
    out = capsys.readouterr().out
    assert "cache: built" in out and "cache: reused" in out and "after 'trunk.3'" in out
    plain.fit(x, y, epochs=3, batch_size=16, verbose=0, seed=0, cache=False)
    for (k, a), (_, b) in zip(
        cached.module.state_dict().items(), plain.module.state_dict().items()
    ):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7, msg=k)
