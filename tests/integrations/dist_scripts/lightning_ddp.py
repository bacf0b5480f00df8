"""Two CPU processes (gloo) under lightning's strategy="ddp"; run by tests/integrations/test_lightning.py.

Each rank sees different data. The trainable set changes twice (a block is unfrozen at
epoch 1 and frozen again at epoch 2): unless DDP is rebuilt, the newly trainable
block's gradients are not all-reduced and the ranks end with different weights.
"""

import json
import sys
from pathlib import Path

import lightning.pytorch as pl
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import frostline as fl
from frostline.integrations.lightning import FreezeCallback


class Net(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.backbone = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU())
        self.head = nn.Linear(8, 2)

    def forward(self, x):
        return self.head(self.backbone(x))

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.cross_entropy(self(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD([p for p in self.parameters() if p.requires_grad], lr=0.1)


class RefreezeAt(fl.Callback):
    def __init__(self, epoch: int, name: str) -> None:
        self.epoch, self.name = epoch, name

    def on_epoch_begin(self, epoch, logs=None):
        if epoch == self.epoch:
            self.model.get_layer(self.name).trainable = False


def main(out: Path) -> None:
    g = torch.Generator().manual_seed(3)
    data = TensorDataset(torch.randn(64, 4, generator=g), torch.randint(0, 2, (64,), generator=g))
    net = Net()
    start = {k: v.clone() for k, v in net.state_dict().items()}
    cb = FreezeCallback(
        [fl.schedules.UnfreezeAt(1, "backbone.2"), RefreezeAt(2, "backbone.2")], freeze="backbone"
    )
    trainer = pl.Trainer(
        max_epochs=3,
        accelerator="cpu",
        devices=2,
        strategy="ddp",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=str(out),
        callbacks=[cb],
    )
    trainer.fit(net, DataLoader(data, batch_size=8, shuffle=False))
    rank = trainer.global_rank
    end = net.state_dict()
    torch.save({k: v.clone() for k, v in end.items()}, out / f"rank{rank}.pt")
    result = {
        "rebuilds": cb.ddp_rebuilds,
        "verified": bool(cb.report is not None and cb.report.ok),
        "unfrozen_moved": not torch.equal(start["backbone.2.weight"], end["backbone.2.weight"]),
        "frozen_moved": not torch.equal(start["backbone.0.weight"], end["backbone.0.weight"]),
    }
    (out / f"rank{rank}.json").write_text(json.dumps(result))


if __name__ == "__main__":
    main(Path(sys.argv[1]))
