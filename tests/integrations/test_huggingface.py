"""frostline.integrations.huggingface: the seeds' workflows inside a real transformers.Trainer."""

from __future__ import annotations

import pytest
import torch
from torch.utils.data import Dataset

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")

import frostline as fl  # noqa: E402
from frostline.integrations.huggingface import FreezeCallback  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


class Tokens(Dataset):
    def __init__(self, n: int = 32) -> None:
        g = torch.Generator().manual_seed(0)
        self.ids = torch.randint(0, 99, (n, 8), generator=g)
        self.labels = torch.randint(0, 2, (n,), generator=g)

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i):
        return {
            "input_ids": self.ids[i],
            "attention_mask": torch.ones(8, dtype=torch.long),
            "labels": self.labels[i],
        }


def bert():
    torch.manual_seed(0)
    config = transformers.BertConfig(
        vocab_size=99,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=37,
        max_position_embeddings=16,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        num_labels=2,
    )
    return transformers.BertForSequenceClassification(config)


def args(tmp_path, epochs: int, **kw):
    return transformers.TrainingArguments(
        output_dir=str(tmp_path),
        num_train_epochs=epochs,
        per_device_train_batch_size=8,
        learning_rate=1e-3,
        weight_decay=0.01,
        warmup_steps=2,
        report_to=[],
        save_strategy=kw.pop("save_strategy", "no"),
        logging_strategy="no",
        use_cpu=True,
        disable_tqdm=True,
        dataloader_num_workers=0,
        seed=0,
        **kw,
    )


def snapshot(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


class Watch(transformers.TrainerCallback):
    """Weights at each epoch end; learning rates of every group right after each step."""

    def __init__(self) -> None:
        self.epochs: list[dict[str, torch.Tensor]] = []
        self.rates: list[list[tuple[float, float]]] = []

    def on_epoch_end(self, args, state, control, model=None, **kw):
        self.epochs.append(snapshot(model))

    def on_optimizer_step(self, args, state, control, optimizer=None, **kw):
        self.rates.append(
            [(g["lr"], g.get("initial_lr", g.get("base_lr"))) for g in optimizer.param_groups]
        )


def test_a_layer_unfrozen_mid_training_really_trains_on_the_trainers_schedule(tmp_path):
    model = bert()
    before = snapshot(model)
    cb = FreezeCallback([fl.schedules.UnfreezeAt(1, "bert.encoder.layer.1")], freeze="bert")
    watch = Watch()
    trainer = transformers.Trainer(
        model=model, args=args(tmp_path, 3), train_dataset=Tokens(), callbacks=[cb, watch]
    )
    trainer.train()
    after = snapshot(model)
    new = "bert.encoder.layer.1.attention.self.query.weight"
    # epoch 0: still frozen; from epoch 1 on it trains
    assert torch.equal(watch.epochs[0][new], before[new])
    assert not torch.equal(watch.epochs[1][new], watch.epochs[0][new])
    assert not torch.equal(after[new], watch.epochs[1][new])
    # what stayed frozen is bitwise unchanged, and verified
    for k in ("bert.embeddings.word_embeddings.weight", "bert.encoder.layer.0.output.dense.weight"):
        assert torch.equal(after[k], before[k]), k
    assert cb.report is not None and cb.report.ok
    # the Trainer's two groups, then frostline's (decay and no-decay) on the same schedule
    assert len(trainer.optimizer.param_groups) == 4
    decays = [g["weight_decay"] for g in trainer.optimizer.param_groups]
    assert decays == [0.01, 0.0, 0.01, 0.0]
    for step in watch.rates[4:]:
        (lr0, init0), *rest = step
        assert len(rest) == 3
        for lr, init in rest:
            assert lr / init == pytest.approx(lr0 / init0)
    assert watch.rates[-1][0][0] < watch.rates[4][0][0]  # linear decay reached the new groups too


def test_discriminative_rates_and_gradual_unfreezing(tmp_path):
    model = bert()
    cb = FreezeCallback(
        [
            fl.schedules.DiscriminativeLR("bert.encoder.layer", 1e-3, decay=0.5),
            fl.schedules.GradualUnfreezing("bert.encoder.layer", start_epoch=1),
        ],
        freeze="bert",
    )
    trainer = transformers.Trainer(
        model=model, args=args(tmp_path, 3), train_dataset=Tokens(), callbacks=[cb]
    )
    trainer.train()
    base = {
        id(p): g["base_lr"]
        for g in trainer.optimizer.param_groups
        if "base_lr" in g
        for p in g["params"]
    }
    layers = model.bert.encoder.layer
    assert base[id(layers[1].output.dense.weight)] == pytest.approx(1e-3)
    assert base[id(layers[0].output.dense.weight)] == pytest.approx(5e-4)
    assert [(e["epoch"], e["groups"]) for e in cb.schedules[1].log] == [(1, ["1"]), (2, ["0"])]
    assert cb.report.ok


def test_resume_from_a_trainer_checkpoint_continues_with_the_trainable_state(tmp_path):
    def callback():
        return FreezeCallback(
            [
                fl.schedules.DiscriminativeLR("bert.encoder.layer", 1e-3, decay=0.5),
                fl.schedules.GradualUnfreezing("bert.encoder.layer", start_epoch=1),
            ],
            freeze="bert",
        )

    full = bert()
    transformers.Trainer(
        model=full, args=args(tmp_path / "full", 3), train_dataset=Tokens(), callbacks=[callback()]
    ).train()

    out = tmp_path / "run"
    first = transformers.Trainer(
        model=bert(),
        args=args(out, 3, save_strategy="epoch"),
        train_dataset=Tokens(),
        callbacks=[callback()],
    )
    first.train()
    resumed = bert()
    cb = callback()
    trainer = transformers.Trainer(
        model=resumed,
        args=args(out, 3, save_strategy="no"),
        train_dataset=Tokens(),
        callbacks=[cb],
    )
    trainer.train(resume_from_checkpoint=str(out / "checkpoint-8"))
    assert cb.resumed == "full"
    for k, v in full.state_dict().items():
        assert torch.equal(resumed.state_dict()[k], v), k
    assert cb.report.ok
    # the Trainer's own optimizer.pt still loads into a plain Trainer-built optimizer
    sd = torch.load(out / "checkpoint-8" / "optimizer.pt", weights_only=True)
    assert len(sd["param_groups"]) == 2 and "frostline" in sd


def test_a_trainer_that_would_replace_the_callback_is_refused(tmp_path):
    with pytest.raises(ValueError, match="restore_callback_states_from_checkpoint"):
        transformers.Trainer(
            model=bert(),
            args=args(tmp_path, 1, restore_callback_states_from_checkpoint=True),
            train_dataset=Tokens(),
            callbacks=[FreezeCallback(freeze="bert")],
        )
    with pytest.raises(TypeError, match="frostline callbacks"):
        FreezeCallback("bert")


def test_unfrozen_parameters_join_with_the_options_of_the_users_own_groups(tmp_path):
    """An optimizer built by hand (decay 0.05 / none) is followed, not the Trainer's 0.01."""
    model = bert()
    fl.wrap(model).freeze("bert")
    decay = set(transformers.Trainer.get_decay_parameter_names(None, model))
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    opt = torch.optim.AdamW(
        [
            {"params": [p for n, p in trainable if n in decay], "weight_decay": 0.05},
            {"params": [p for n, p in trainable if n not in decay], "weight_decay": 0.0},
        ],
        lr=1e-3,
    )
    cb = FreezeCallback([fl.schedules.UnfreezeAt(1, "bert.encoder.layer.1")])
    trainer = transformers.Trainer(
        model=model,
        args=args(tmp_path, 2),
        train_dataset=Tokens(),
        callbacks=[cb],
        optimizers=(opt, None),
    )
    trainer.train()
    where = {id(p): g for g in opt.param_groups for p in g["params"]}
    layer = "bert.encoder.layer.1."
    joined = {n: where[id(p)]["weight_decay"] for n, p in model.named_parameters() if layer in n}
    assert joined and all(v == (0.05 if n in decay else 0.0) for n, v in joined.items())
    assert {v for v in joined.values()} == {0.05, 0.0}


@pytest.mark.parametrize("keep", [False, True], ids=["keras-semantics", "keep_frozen"])
def test_unfreezing_a_parent_and_the_children_frozen_by_hand(tmp_path, keep):
    model = bert()
    model.bert.embeddings.requires_grad_(False)  # frozen by hand
    before = snapshot(model)
    cb = FreezeCallback([fl.schedules.UnfreezeAt(1, "bert")], freeze="bert", keep_frozen=keep)
    trainer = transformers.Trainer(
        model=model, args=args(tmp_path, 2), train_dataset=Tokens(), callbacks=[cb]
    )
    trainer.train()
    after = snapshot(model)
    word = "bert.embeddings.word_embeddings.weight"
    assert not torch.equal(
        after["bert.encoder.layer.0.output.dense.weight"],
        before["bert.encoder.layer.0.output.dense.weight"],
    )
    # UnfreezeAt(1, "bert") reaches the embeddings too (Keras semantics) unless keep_frozen
    assert torch.equal(after[word], before[word]) is keep
    assert cb.report.ok


@pytest.mark.slow
def test_two_processes_unfreeze_and_resume_bitwise_with_onecycle_and_plateau(tmp_path):
    """torchrun, 2 CPU processes (gloo): the layer unfrozen after DDP was built is averaged
    over the processes, and a resume in fresh processes continues bitwise."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).parent / "dist_scripts" / "hf_trainer.py"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(sys.path)}
    for mode in ("full", "resume"):
        proc = subprocess.run(
            [
                sys.executable,
                "-m",
                "torch.distributed.run",
                "--nproc-per-node",
                "2",
                str(script),
                str(tmp_path),
                "onecycle,plateau",
                mode,
            ],
            env=env,
            capture_output=True,
            text=True,
            timeout=480,
        )
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    for sched in ("onecycle", "plateau"):
        runs = {
            (m, r): torch.load(tmp_path / sched / f"{m}-rank{r}.pt")
            for m in ("full", "resume")
            for r in (0, 1)
        }
        reference = runs[("full", 0)]
        new = "bert.encoder.layer.1.attention.self.query.weight"
        assert not torch.equal(reference["weights"][new], bert().state_dict()[new])  # it trained
        for key, run in runs.items():
            for k, v in reference["weights"].items():
                assert torch.equal(run["weights"][k], v), f"{sched} {key}: {k}"
            assert run["lrs"] == reference["lrs"]
        rates = reference["lrs"]  # the Trainer's two groups, then the unfrozen ones at 5e-4 / 1e-3
        assert rates[-1] / rates[0] == pytest.approx(0.5)
