"""A Hugging Face Trainer run with an unfreeze and an LR scheduler, whole or resumed; run by
tests/integrations/test_huggingface.py, in one process or under torchrun (gloo, CPU).

``python hf_trainer.py OUT onecycle,plateau full`` trains 3 epochs with each scheduler,
checkpointing each epoch under ``OUT/<scheduler>/``; ``... resume`` continues each from
its checkpoint after epoch 1 (the unfreeze) in this fresh process. Each rank writes its
final weights and group rates to ``OUT/<scheduler>/<mode>-rank<r>.pt``.
"""

import os
import sys
from pathlib import Path

import torch
import transformers
from torch.utils.data import Dataset

import frostline as fl
from frostline.integrations.huggingface import FreezeCallback

EPOCHS = 3
WORLD = int(os.environ.get("WORLD_SIZE", "1"))


class Tokens(Dataset):
    def __init__(self, n: int = 32, seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
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


def main(out: Path, sched: str, mode: str) -> None:
    step = 2 * len(Tokens()) // (8 * WORLD) if mode == "resume" else None  # after epoch 1
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
    model = transformers.BertForSequenceClassification(config)
    cb = FreezeCallback(
        [fl.schedules.UnfreezeAt(1, "bert.encoder.layer.1", learning_rate=5e-4)], freeze="bert"
    )
    extra: dict = {}
    if sched == "plateau":
        extra = dict(
            lr_scheduler_type="reduce_lr_on_plateau",
            lr_scheduler_kwargs={
                "factor": 0.5,
                "patience": 0,
                "threshold": 10.0,
                "min_lr": [1e-5, 1e-5],
            },
            eval_strategy="epoch",
            metric_for_best_model="loss",
            greater_is_better=False,
        )
    args = transformers.TrainingArguments(
        output_dir=str(out),
        num_train_epochs=EPOCHS,
        per_device_train_batch_size=8,
        learning_rate=1e-3,
        weight_decay=0.01,
        report_to=[],
        save_strategy="epoch" if mode == "full" else "no",
        logging_strategy="no",
        use_cpu=True,
        ddp_backend="gloo" if WORLD > 1 else None,
        disable_tqdm=True,
        dataloader_num_workers=0,
        seed=0,
        **extra,
    )
    optimizers: tuple = (None, None)
    trainer_kw: dict = {}
    if sched == "onecycle":
        fl.wrap(model).freeze("bert")  # the optimizer the user builds sees the frozen base
        trainable = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(trainable, lr=1e-3, weight_decay=0.01)
        steps = EPOCHS * len(Tokens()) // (8 * WORLD)
        optimizers = (opt, torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=1e-3, total_steps=steps))
    else:
        trainer_kw["eval_dataset"] = Tokens(16, seed=1)
    trainer = transformers.Trainer(
        model=model,
        args=args,
        train_dataset=Tokens(),
        callbacks=[cb],
        optimizers=optimizers,
        **trainer_kw,
    )
    trainer.train(resume_from_checkpoint=None if step is None else str(out / f"checkpoint-{step}"))
    assert cb.report is not None and cb.report.ok
    if step is not None:
        assert cb.resumed == "full", cb.resumed
    opt = trainer.optimizer
    torch.save(
        {
            "weights": {k: v.detach().clone() for k, v in model.state_dict().items()},
            "lrs": [g["lr"] for g in opt.param_groups],
            "steps": trainer.state.global_step,
        },
        out / f"{mode}-rank{args.process_index}.pt",
    )


if __name__ == "__main__":
    for name in sys.argv[2].split(","):
        main(Path(sys.argv[1]) / name, name, sys.argv[3])
