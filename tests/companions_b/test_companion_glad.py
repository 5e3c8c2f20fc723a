"""The GLAD companion callback: one step equals plain grad + SAM grad (same batch, same dropout mask) + combine,
computed directly from the pure functions of visadapt.methods.glad, on CLIP few-shot and on a non-CLIP method."""

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from visadapt.adapters import REGULARISERS, LoRAConfig, adapter_layers, inject
from visadapt.data import FewShotDataModule
from visadapt.errors import UserError
from visadapt.methods import AdapterModule, ClipFewShot
from visadapt.methods.companions.glad import Glad
from visadapt.methods.glad import combine, perturbation
from visadapt.rng import capture_rng_states, restore_rng_states


class Spy(pl.Callback):
    """Runs before Glad: records each micro-batch, the random state and the parameters before the step."""

    def __init__(self):
        self.seen = []

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        params = {n: p.detach().clone() for n, p in module.named_parameters() if p.requires_grad}
        self.seen.append((batch, batch_idx, capture_rng_states(), params))


def trainer_for(tmp_path, callbacks, **kw):
    return pl.Trainer(accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
                      enable_model_summary=False, num_sanity_val_steps=0, default_root_dir=tmp_path,
                      limit_val_batches=0, max_steps=1, callbacks=callbacks, **kw)


def reference_grad(module, loss_fn, batch, rng, rho, rule, alpha, granularity, divide=1):
    """GLAD's combined gradient written out: g, then g_sam at theta + rho g/|g| with the same random state."""
    params = [p for p in module.parameters() if p.requires_grad]
    restore_rng_states(rng)
    g = torch.autograd.grad(loss_fn(batch) / divide, params)
    eps = perturbation(list(g), rho)
    with torch.no_grad():
        for p, e in zip(params, eps):
            p.add_(e)
    restore_rng_states(rng)
    g_sam = torch.autograd.grad(loss_fn(batch) / divide, params)
    with torch.no_grad():
        for p, e in zip(params, eps):
            p.sub_(e)
    return combine(list(g), list(g_sam), rule, alpha, granularity)


def test_registered_as_a_regulariser_and_not_an_adapter_variant():
    from visadapt.adapters import ADAPTERS

    assert REGULARISERS.get("glad") is Glad and "glad" not in ADAPTERS.names()


def test_clip_step_equals_plain_plus_sam_plus_combine_with_the_same_dropout_mask(tmp_path):
    torch.manual_seed(0)
    model = ClipFewShot("tiny_open_clip", adapter=LoRAConfig(target="attn_qkv", r=2, dropout=0.5),
                        eval_baselines=False, optimizer=lambda p: torch.optim.SGD(p, lr=1.0), schedule="constant")
    for _, layer in adapter_layers(model.model):  # non-zero B so that every factor gets a gradient
        for p in layer.adapters.parameters():
            torch.nn.init.normal_(p, std=0.02)
    masks = []
    layer = adapter_layers(model.model)[0][1]
    drop = next(m for m in layer.adapters.modules() if isinstance(m, nn.Dropout))
    drop.register_forward_hook(lambda m, i, o: masks.append((o != 0).clone()) if m.training else None)
    spy, glad = Spy(), Glad(rho=0.05)  # the default rule: project, alpha 0, per tensor (ProGrad)
    data = FewShotDataModule("procedural_shapes", shots=4, seed=1, batch_size=8, eval_batch_size=64, augment="none",
                             dataset_kwargs={"num_per_class": 20}, preprocess=model.preprocess)
    trainer_for(tmp_path, [spy, glad]).fit(model, data)
    assert len(masks) == 2 and torch.equal(masks[0], masks[1])  # two passes, one dropout mask
    assert 0.3 < masks[0].float().mean() < 0.7
    (batch, _, rng, before), = spy.seen
    after = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    with torch.no_grad():
        for n, p in model.named_parameters():
            if p.requires_grad:
                p.copy_(before[n])
    model.train()
    ref = reference_grad(model, model.loss_on, batch, rng, 0.05, "project", 0.0, "tensor")
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    assert any(not torch.equal(d, torch.zeros_like(d)) for d in ref)
    for n, d in zip(names, ref):
        assert torch.allclose(after[n], before[n] - d, atol=1e-6), n


class TinyClassifier(AdapterModule):
    """A non-CLIP method: an MLP with LoRA (dropout) on both layers, cross-entropy on (x, y) batches."""

    def __init__(self, **kw):
        super().__init__(optimizer=lambda p: torch.optim.SGD(p, lr=0.5), schedule="constant", **kw)
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 3))
        for p in self.net.parameters():
            p.requires_grad_(False)
        inject(self.net, LoRAConfig(target=r"0|2", r=2, dropout=0.3), verbose=False)
        for _, layer in adapter_layers(self.net):
            for p in layer.adapters.parameters():
                nn.init.normal_(p, std=0.3)

    def loss_of(self, batch):
        x, y = batch
        return F.cross_entropy(self.net(x), y)

    def training_step(self, batch, batch_idx):
        loss = self.loss_of(batch)
        self.log("train_loss", loss)
        return loss

    def train_dataloader(self):
        gen = torch.Generator().manual_seed(3)
        x, y = torch.randn(16, 6, generator=gen), torch.randint(0, 3, (16,), generator=gen)
        return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=8)


@pytest.mark.parametrize("rule,granularity", [("mix", "tensor"), ("decompose", "flat")])
def test_non_clip_method_with_gradient_accumulation(tmp_path, rule, granularity):
    model = TinyClassifier()
    spy, glad = Spy(), Glad(rho=0.1, rule=rule, alpha=0.3, granularity=granularity)
    trainer_for(tmp_path, [spy, glad], accumulate_grad_batches=2).fit(model)
    assert len(spy.seen) == 2  # one optimiser step over two micro-batches
    after = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    before = spy.seen[0][3]
    with torch.no_grad():
        for n, p in model.named_parameters():
            if p.requires_grad:
                p.copy_(before[n])
    model.train()
    total = None
    for batch, _, rng, _ in spy.seen:  # each micro-batch is combined on its own, then accumulated
        d = reference_grad(model, model.loss_of, batch, rng, 0.1, rule, 0.3, granularity, divide=2)
        total = d if total is None else [a + b for a, b in zip(total, d)]
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    for n, d in zip(names, total):
        assert torch.allclose(after[n], before[n] - 0.5 * d, atol=1e-6), n
    plain = [p.detach() for p in model.parameters() if p.requires_grad]
    assert not all(torch.allclose(after[n], b) for n, b in zip(names, plain))  # it really moved


def test_refuses_manual_optimisation(tmp_path):
    model = TinyClassifier()
    model.automatic_optimization = False
    with pytest.raises(UserError, match="automatic optimisation"):
        trainer_for(tmp_path, [Glad()]).fit(model)


def test_bad_rule_is_refused_when_the_callback_is_built():
    with pytest.raises(ValueError, match="rule"):
        Glad(rule="average")
