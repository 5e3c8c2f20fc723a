"""Augmentation + contrastive loss: SupCon and NT-Xent against a direct computation; one step with the callback
equals a step on the gradient of CE(originals) + ce_weight * CE(views) + lambda * SupCon."""

import math

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from visadapt.adapters import REGULARISERS, LoRAConfig, adapter_layers, inject
from visadapt.methods import AdapterModule
from visadapt.methods.companions.contrastive_aug import ContrastiveAug, augment, simclr_loss, supcon_loss


def supcon_direct(z, labels, t):
    """Khosla et al. (2020), eq. 2 (L_out), written with loops."""
    n, losses = len(z), []
    for i in range(n):
        pos = [p for p in range(n) if p != i and labels[p] == labels[i]]
        if not pos:
            continue
        denom = sum(math.exp(float(z[i] @ z[a]) / t) for a in range(n) if a != i)
        losses.append(-sum(math.log(math.exp(float(z[i] @ z[p]) / t) / denom) for p in pos) / len(pos))
    return sum(losses) / len(losses)


def test_supcon_and_ntxent_match_direct_sums():
    gen = torch.Generator().manual_seed(0)
    z = F.normalize(torch.randn(8, 5, generator=gen, dtype=torch.float64), dim=-1)
    labels = torch.tensor([0, 1, 0, 2, 1, 0, 3, 2])  # class 3 has a single member: not an anchor
    assert supcon_loss(z, labels, 0.2).item() == pytest.approx(supcon_direct(z, labels, 0.2), rel=1e-10)
    pairs = torch.tensor([0, 1, 2, 3, 0, 1, 2, 3])  # NT-Xent: the positive is the other view only
    assert simclr_loss(z, 0.5).item() == pytest.approx(supcon_direct(z, pairs, 0.5), rel=1e-10)


def test_augment_is_seeded_and_changes_images():
    x = torch.randn(3, 2, 8, 8, generator=torch.Generator().manual_seed(1))
    a = augment(x, torch.Generator().manual_seed(5))
    b = augment(x, torch.Generator().manual_seed(5))
    assert a.shape == x.shape and torch.equal(a, b) and not torch.allclose(a, x)


class Tiny(AdapterModule):
    def __init__(self):
        super().__init__(optimizer=lambda p: torch.optim.SGD(p, lr=1.0), schedule="constant")
        torch.manual_seed(0)
        self.enc = nn.Sequential(nn.Flatten(), nn.Linear(16, 6))
        self.head = nn.Linear(6, 3)
        for p in self.enc.parameters():
            p.requires_grad_(False)
        inject(self.enc, LoRAConfig(target="1", r=2), verbose=False)
        for _, layer in adapter_layers(self.enc):
            for p in layer.adapters.parameters():
                nn.init.normal_(p, std=0.3)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self.head(self.enc(x)), y)

    def train_dataloader(self):
        gen = torch.Generator().manual_seed(2)
        data = torch.utils.data.TensorDataset(torch.randn(8, 1, 4, 4, generator=gen),
                                              torch.tensor([0, 1, 2, 0, 1, 2, 0, 1]))
        return torch.utils.data.DataLoader(data, batch_size=8)


def test_one_step_uses_the_gradient_of_ce_plus_augmented_ce_plus_supcon(tmp_path):
    model = Tiny()
    params = [p for p in model.parameters() if p.requires_grad]
    before = [p.detach().clone() for p in params]
    cb = ContrastiveAug(module="enc", lambda_=0.7, temperature=0.3, ce_weight=0.5, seed=4)
    pl.Trainer(accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
               enable_model_summary=False, max_steps=1, callbacks=[cb], default_root_dir=tmp_path).fit(model)
    after = [p.detach().clone() for p in params]
    with torch.no_grad():
        for p, b in zip(params, before):
            p.copy_(b)
    x, y = next(iter(model.train_dataloader()))
    views = augment(x, torch.Generator().manual_seed(4))
    z, zv = model.enc(x), model.enc(views)
    total = (F.cross_entropy(model.head(z), y) + 0.5 * F.cross_entropy(model.head(zv), y)
             + 0.7 * supcon_loss(F.normalize(torch.cat([z, zv]), dim=-1), torch.cat([y, y]), 0.3))
    grads = torch.autograd.grad(total, params)
    for a, b, g in zip(after, before, grads):
        assert torch.allclose(a, b - g, atol=1e-6)
    assert cb.last["contrastive"] > 0 and REGULARISERS.get("contrastive_aug") is ContrastiveAug
    lora = [p for n, p in model.named_parameters() if p.requires_grad and ".adapters." in n]
    assert lora and all(not torch.equal(a, b) for p, a, b in zip(params, after, before) if any(p is q for q in lora))
