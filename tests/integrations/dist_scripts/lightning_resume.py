"""A Lightning fit with an unfreeze and an LR scheduler, whole or resumed; run by tests/integrations/test_lightning.py.

``python lightning_resume.py OUT onecycle,plateau full`` trains 4 epochs with each
scheduler, checkpointing each epoch under ``OUT/<scheduler>/``; ``... resume`` continues
each from its epoch-1 checkpoint in this fresh process. The final weights and rates go to
``OUT/<scheduler>/<mode>.pt``.
"""

import sys
from pathlib import Path

import lightning.pytorch as pl
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import frostline as fl
from frostline.integrations.lightning import FreezeCallback

EPOCHS, STEPS = 4, 4


class Net(pl.LightningModule):
    def __init__(self, sched: str) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.backbone = nn.Sequential(
            nn.Linear(4, 8),
            nn.BatchNorm1d(8),
            nn.ReLU(),
            nn.Linear(8, 8),
            nn.ReLU(),
            nn.Linear(8, 8),
        )
        self.head = nn.Linear(8, 2)
        self.sched = sched

    def forward(self, x):
        return self.head(self.backbone(x))

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = nn.functional.cross_entropy(self(x), y)
        self.log("train_loss", loss, on_step=True, on_epoch=False)
        return loss

    def configure_optimizers(self):
        opt = torch.optim.AdamW([p for p in self.parameters() if p.requires_grad], lr=0.01)
        if self.sched == "onecycle":
            sched = torch.optim.lr_scheduler.OneCycleLR(
                opt, max_lr=0.05, total_steps=EPOCHS * STEPS
            )
            return [opt], [{"scheduler": sched, "interval": "step"}]
        sched = torch.optim.lr_scheduler.ReduceLROnPlateau(
            opt, factor=0.7, patience=2, threshold=0.05, min_lr=[1e-3]
        )
        # stepped per batch: Lightning saves an epoch's checkpoint before an epoch-interval
        # plateau scheduler steps, so that one would not resume bitwise even without frostline
        return [opt], [{"scheduler": sched, "monitor": "train_loss", "interval": "step"}]


def main(out: Path, sched: str, mode: str) -> None:
    out.mkdir(parents=True, exist_ok=True)
    ckpt = str(out / "ckpt" / "epoch=1.ckpt") if mode == "resume" else None
    g = torch.Generator().manual_seed(1)
    data = TensorDataset(torch.randn(48, 4, generator=g), torch.randint(0, 2, (48,), generator=g))
    net = Net(sched)
    cb = FreezeCallback(
        [fl.schedules.UnfreezeAt(1, "backbone.5", learning_rate=0.02)], freeze="backbone"
    )
    callbacks: list = [cb]
    if mode == "full":
        callbacks.append(
            pl.callbacks.ModelCheckpoint(
                dirpath=out / "ckpt", filename="{epoch}", save_top_k=-1, every_n_epochs=1
            )
        )
    trainer = pl.Trainer(
        max_epochs=EPOCHS,
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=mode == "full",
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=str(out),
        callbacks=callbacks,
    )
    trainer.fit(net, DataLoader(data, batch_size=12, shuffle=False), ckpt_path=ckpt)
    assert cb.report is not None and cb.report.ok
    opt = trainer.optimizers[0]
    torch.save(
        {
            "weights": {k: v.clone() for k, v in net.state_dict().items()},
            "lrs": [g["lr"] for g in opt.param_groups],
        },
        out / f"{mode}.pt",
    )


if __name__ == "__main__":
    for name in sys.argv[2].split(","):
        main(Path(sys.argv[1]) / name, name, sys.argv[3])
