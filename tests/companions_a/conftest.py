"""A tiny classifier LightningModule with a LoRA-adapted MLP body, for the companion tests (seconds, no download)."""

from __future__ import annotations

import copy

import lightning.pytorch as pl
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from visadapt.adapters import inject


class Body(nn.Module):
    """Two hidden Linears (the adapted ones) and a frozen linear head."""

    def __init__(self) -> None:
        super().__init__()
        self.lin0 = nn.Linear(12, 10)
        self.lin1 = nn.Linear(10, 10)
        self.head = nn.Linear(10, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.lin1(torch.tanh(self.lin0(x)))))


class ToyClassifier(pl.LightningModule):
    """Cross-entropy on ``Body``; the optimiser is a factory of the trainable parameters (SGD by default)."""

    def __init__(self, body: nn.Module, optimizer=None) -> None:
        super().__init__()
        self.body = body
        self.optimizer_fn = optimizer or (lambda params: torch.optim.SGD(params, lr=0.1))

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = nn.functional.cross_entropy(self.body(x), y)
        self.log("train_loss", loss)
        return loss

    def configure_optimizers(self):
        return self.optimizer_fn([p for p in self.parameters() if p.requires_grad])


def _data(n: int = 32, seed: int = 0) -> TensorDataset:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 12, generator=gen)
    return TensorDataset(x, (x[:, :3].sum(1) > 0).long() + (x[:, 3] > 1).long())


class Toy:
    """Factory of fresh copies of one seeded body, its data, and a quiet CPU trainer."""

    def __init__(self) -> None:
        torch.manual_seed(0)
        self.body = Body()
        self.data = _data()

    def body_copy(self, zero_head: bool = False) -> Body:
        body = copy.deepcopy(self.body)
        if zero_head:
            nn.init.zeros_(body.head.weight)
            nn.init.zeros_(body.head.bias)
        return body

    def adapted(self, config, zero_head: bool = False, optimizer=None) -> ToyClassifier:
        body = self.body_copy(zero_head)
        inject(body, config, verbose=False)
        return ToyClassifier(body, optimizer)

    def loader(self, batch_size: int = 8) -> DataLoader:
        return DataLoader(self.data, batch_size=batch_size, shuffle=False)

    def batches(self, count: int, batch_size: int = 8) -> list:
        return [b for _, b in zip(range(count), self.loader(batch_size))]

    @staticmethod
    def trainer(tmp_path, callbacks, **kw) -> pl.Trainer:
        kw.setdefault("max_steps", 1)
        return pl.Trainer(accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
                          enable_model_summary=False, num_sanity_val_steps=0, default_root_dir=tmp_path,
                          callbacks=callbacks, **kw)


@pytest.fixture
def toy() -> Toy:
    return Toy()
