"""SPEC 12: outputs meet targets as in Keras (position, name, one-key ModelOutput)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from tiny_models import bert_config
from torch import nn
from torch.utils.data import DataLoader, Dataset, TensorDataset

import frostline as fl


class TwoHeads(nn.Module):
    def __init__(self, as_dict: bool = False) -> None:
        super().__init__()
        self.trunk = nn.Linear(4, 8)
        self.a = nn.Linear(8, 3)
        self.b = nn.Linear(8, 1)
        self.as_dict = as_dict

    def forward(self, x):
        h = torch.relu(self.trunk(x))
        if self.as_dict:
            return {"cls": self.a(h), "reg": self.b(h)}
        return self.a(h), self.b(h)


def data(n: int = 32):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(n, 4)).astype("float32")
    return x, rng.integers(0, 3, n), rng.normal(size=(n, 1)).astype("float32")


def two_heads(as_dict: bool = False) -> fl.Model:
    torch.manual_seed(0)
    model = fl.wrap(TwoHeads(as_dict))
    loss = (
        {"cls": "sparse_categorical_crossentropy", "reg": "mse"}
        if as_dict
        else ["sparse_categorical_crossentropy", "mse"]
    )
    model.compile(optimizer=fl.optimizers.SGD(0.1), loss=loss, metrics=None)
    return model


class PairTargets(Dataset):
    def __init__(self) -> None:
        self.x, self.ya, self.yb = data()

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i):
        return self.x[i], (self.ya[i], self.yb[i])


def reference_losses():
    model = two_heads()
    x, ya, yb = data()
    return model.evaluate(x, [ya, yb], return_dict=True, verbose=0)


@pytest.mark.parametrize(
    "make",
    [
        lambda x, ya, yb: ((x, [ya, yb]), {}),
        lambda x, ya, yb: ((x, (ya, yb)), {}),
        lambda x, ya, yb: ((x, {0: ya, 1: yb}), {}),
        lambda x, ya, yb: ((torch.tensor(x), (torch.tensor(ya), torch.tensor(yb))), {}),
        lambda x, ya, yb: (
            (TensorDataset(torch.tensor(x), torch.tensor(ya), torch.tensor(yb)),),
            {},
        ),
        lambda x, ya, yb: ((PairTargets(),), {}),
        lambda x, ya, yb: (
            (DataLoader(TensorDataset(torch.tensor(x), torch.tensor(ya), torch.tensor(yb)), 8),),
            {},
        ),
        lambda x, ya, yb: ((DataLoader(PairTargets(), batch_size=8),), {}),
    ],
    ids=[
        "list",
        "tuple",
        "int-dict",
        "tensors",
        "TensorDataset",
        "Dataset",
        "loader",
        "loader-pairs",
    ],
)
def test_tuple_outputs_meet_targets_by_position(make):
    x, ya, yb = data()
    args, kwargs = make(x, ya, yb)
    model = two_heads()
    logs = model.evaluate(*args, return_dict=True, verbose=0, **kwargs)
    ref = reference_losses()
    assert set(logs) == {"loss", "0_loss", "1_loss"}
    for k in logs:
        assert logs[k] == pytest.approx(ref[k], rel=1e-5)
    hist = model.fit(*args, epochs=2, batch_size=8, verbose=0, **kwargs)
    assert hist.history["loss"][1] < hist.history["loss"][0]


def test_validation_split_and_data_with_several_targets():
    x, ya, yb = data()
    model = two_heads()
    h = model.fit(x, [ya, yb], validation_split=0.25, epochs=1, verbose=0)
    assert "val_0_loss" in h.history
    h = model.fit(x, (ya, yb), validation_data=(x[:8], (ya[:8], yb[:8])), epochs=1, verbose=0)
    assert "val_1_loss" in h.history


def test_dict_outputs_by_name_and_by_position():
    x, ya, yb = data()
    model = two_heads(as_dict=True)
    by_name = model.evaluate(x, {"cls": ya, "reg": yb}, return_dict=True, verbose=0)
    by_pos = model.evaluate(x, [ya, yb], return_dict=True, verbose=0)
    assert by_name == pytest.approx(by_pos)
    assert set(by_name) == {"loss", "cls_loss", "reg_loss"}


def test_mismatches_name_outputs_and_targets():
    x, ya, yb = data()
    model = two_heads()
    with pytest.raises(ValueError) as e:
        model.fit(x, [ya], epochs=1, verbose=0)
    msg = str(e.value)
    assert "tuple of 2" in msg and "1 target" in msg
    with pytest.raises(ValueError) as e:
        model.fit(x, {"cls": ya, "reg": yb}, epochs=1, verbose=0)
    assert "'cls'" in str(e.value) and "tuple of 2" in str(e.value)
    named = two_heads(as_dict=True)
    with pytest.raises(ValueError) as e:
        named.fit(x, {"cls": ya, "other": yb}, epochs=1, verbose=0)
    msg = str(e.value)
    assert "'reg'" in msg and "'other'" in msg and "'cls'" in msg
    with pytest.raises(ValueError, match="x has 32 samples but y\\[1\\] has 5"):
        model.fit(x, [ya, yb[:5]], epochs=1, verbose=0)


def test_single_loss_on_several_outputs_names_them():
    x, ya, yb = data()
    model = fl.wrap(TwoHeads())
    model.compile(optimizer="sgd", loss="mse")
    with pytest.raises(ValueError) as e:
        model.fit(x, yb, epochs=1, verbose=0)
    msg = str(e.value)
    assert "tuple of 2" in msg and "one loss per output" in msg


def test_bert_sequence_classification_with_one_loss():
    from transformers import BertForSequenceClassification

    torch.manual_seed(0)
    model = fl.wrap(BertForSequenceClassification(bert_config(num_labels=3)))
    model.compile(
        optimizer=fl.optimizers.Adam(1e-2),
        loss="sparse_categorical_crossentropy",
        metrics=["accuracy"],
    )
    x = np.random.randint(0, 50, (32, 8))
    y = np.random.randint(0, 3, 32)
    hist = model.fit(x, y, epochs=2, batch_size=16, verbose=0)
    assert set(hist.history) >= {"loss", "accuracy"}
    logs = model.evaluate(x, y, return_dict=True, verbose=0)
    assert set(logs) == {"loss", "accuracy"}


class TwoKeyOutput(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 3)

    def forward(self, x):
        h = self.lin(x)
        return {"logits": h, "hidden": h.detach()}


def test_one_key_dict_is_its_tensor_and_two_keys_are_named():
    class OneKey(TwoKeyOutput):
        def forward(self, x):
            return {"logits": self.lin(x)}

    x, ya, _ = data()
    one = fl.wrap(OneKey())
    one.compile(optimizer="sgd", loss="sparse_categorical_crossentropy", metrics=["accuracy"])
    assert set(one.evaluate(x, ya, return_dict=True, verbose=0)) == {"loss", "accuracy"}
    two = fl.wrap(TwoKeyOutput())
    two.compile(optimizer="sgd", loss="sparse_categorical_crossentropy")
    with pytest.raises(ValueError) as e:
        two.evaluate(x, ya, verbose=0)
    msg = str(e.value)
    assert "'logits'" in msg and "'hidden'" in msg and "loss={'logits'" in msg
    two.compile(optimizer="sgd", loss={"logits": "sparse_categorical_crossentropy"})
    assert set(two.evaluate(x, ya, return_dict=True, verbose=0)) == {"loss", "logits_loss"}
