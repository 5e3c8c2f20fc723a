"""BA-LoRA: each term against a direct computation, each term's gradient reaches the adapter parameters, and one
step with the callback equals a step on the gradient of task loss + weighted terms."""

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from visadapt.adapters import REGULARISERS, LoRAConfig, adapter_layers, disable_adapters, inject
from visadapt.methods import AdapterModule
from visadapt.methods.companions.ba_lora import BaLora, consistency, consistency_nlg, diversity, diversity_nlg, svd_term

GEN = torch.Generator().manual_seed(0)
Z = torch.randn(6, 4, generator=GEN, dtype=torch.float64)
P = torch.randn(6, 4, generator=GEN, dtype=torch.float64)


def test_consistency_is_the_mse_of_normalised_rows():
    ref = np.mean([(Z[i] / Z[i].norm() - P[i] / P[i].norm()).pow(2).mean().item() for i in range(6)])
    assert consistency(Z, P).item() == pytest.approx(ref, rel=1e-12)
    assert consistency(Z, 3 * Z).item() == pytest.approx(0.0, abs=1e-15)  # scale-invariant


def test_diversity_is_the_squared_offdiagonal_covariance_over_dim():
    cov = np.cov(Z.numpy(), rowvar=False)  # (D, D), unbiased like the official B - 1
    ref = (np.sum(cov**2) - np.sum(np.diag(cov) ** 2)) / 4
    assert diversity(Z).item() == pytest.approx(ref, rel=1e-10)


def test_svd_term_is_minus_the_top_k_share_of_singular_values():
    s = np.linalg.svd(Z.numpy(), compute_uv=False)
    assert svd_term(Z, k=2).item() == pytest.approx(-s[:2].sum() / s.sum(), rel=1e-6)
    assert svd_term(Z, k=4).item() == pytest.approx(-1.0, rel=1e-6)


def test_nlg_forms():
    p, q = F.softmax(P, -1), F.softmax(Z, -1)
    assert consistency_nlg(Z, P).item() == pytest.approx((p * (p.log() - q.log())).sum(-1).mean().item(), rel=1e-6)
    assert diversity_nlg(Z).item() == pytest.approx((q * q.log()).sum(-1).mean().item(), rel=1e-6)


def lora_mlp():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 4))
    for p in net.parameters():
        p.requires_grad_(False)
    inject(net, LoRAConfig(target="0|2", r=2), verbose=False)
    for _, layer in adapter_layers(net):
        for p in layer.adapters.parameters():
            nn.init.normal_(p, std=0.3)  # B != 0: the fine-tuned output differs from the pre-trained one
    return net


@pytest.mark.parametrize("term", ["consistency", "diversity", "svd"])
def test_each_term_sends_gradient_to_the_adapters(term):
    net = lora_mlp()
    x = torch.randn(7, 5, generator=torch.Generator().manual_seed(1))
    z = net(x)
    with torch.no_grad(), disable_adapters(net):
        pre = net(x)
    value = {"consistency": lambda: consistency(z, pre), "diversity": lambda: diversity(z),
             "svd": lambda: svd_term(z, 3)}[term]()
    params = [p for p in net.parameters() if p.requires_grad]
    grads = torch.autograd.grad(value, params)
    assert len(params) == 4 and all(torch.isfinite(g).all() and g.abs().sum() > 0 for g in grads)


class Tiny(AdapterModule):
    def __init__(self):
        super().__init__(optimizer=lambda p: torch.optim.SGD(p, lr=1.0), schedule="constant")
        self.net = lora_mlp()

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self.net(x), y)

    def train_dataloader(self):
        gen = torch.Generator().manual_seed(2)
        x, y = torch.randn(8, 5, generator=gen), torch.randint(0, 4, (8,), generator=gen)
        data = torch.utils.data.TensorDataset(x, y)
        return torch.utils.data.DataLoader(data, batch_size=8)


def test_one_step_uses_the_gradient_of_loss_plus_weighted_terms(tmp_path):
    model = Tiny()
    before = [p.detach().clone() for p in model.parameters() if p.requires_grad]
    lambdas = (0.5, 0.3, 0.2)  # large weights so that every term shows in the step
    cb = BaLora(module="net", lambda1=lambdas[0], lambda2=lambdas[1], lambda3=lambdas[2], k=2)
    pl.Trainer(accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
               enable_model_summary=False, max_steps=1, callbacks=[cb], default_root_dir=tmp_path).fit(model)
    after = [p.detach().clone() for p in model.parameters() if p.requires_grad]
    with torch.no_grad():
        for p, b in zip([p for p in model.parameters() if p.requires_grad], before):
            p.copy_(b)
    x, y = next(iter(model.train_dataloader()))
    z = model.net(x)
    with torch.no_grad(), disable_adapters(model.net):
        pre = model.net(x)
    total = (F.cross_entropy(z, y) + lambdas[0] * consistency(z, pre) + lambdas[1] * diversity(z)
             + lambdas[2] * svd_term(z, 2))
    grads = torch.autograd.grad(total, [p for p in model.parameters() if p.requires_grad])
    plain = torch.autograd.grad(F.cross_entropy(model.net(x), y), [p for p in model.parameters() if p.requires_grad])
    assert not all(torch.allclose(g, h, atol=1e-4) for g, h in zip(grads, plain))  # the terms matter
    for a, b, g in zip(after, before, grads):
        assert torch.allclose(a, b - g, atol=1e-6)
    assert set(cb.last) == {"consistency", "diversity", "svd"}
    assert REGULARISERS.get("ba_lora") is BaLora
