"""LISA: exactly the sampled layers (plus what always trains) change at every step; the sampling is the seeded
generator's; optimiser state of layers leaving the sample is dropped; timm / HF / open_clip stacks are found."""

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from visadapt.adapters import SCHEDULES
from visadapt.backbones import build_backbone
from visadapt.errors import UserError
from visadapt.methods import AdapterModule
from visadapt.methods.companions.lisa import Lisa, find_layers


class Stack(AdapterModule):
    """Embedding (frozen), a timm-like ``blocks`` Sequential of 5 frozen blocks, a trainable head."""

    def __init__(self, opt="sgd"):
        make = (lambda p: torch.optim.SGD(p, lr=0.1)) if opt == "sgd" else (lambda p: torch.optim.AdamW(p, lr=1e-2))
        super().__init__(optimizer=make, schedule="constant")
        torch.manual_seed(0)
        self.embed = nn.Linear(4, 8)
        self.blocks = nn.Sequential(*[nn.Sequential(nn.Linear(8, 8), nn.Tanh()) for _ in range(5)])
        self.head = nn.Linear(8, 3)
        for p in [*self.embed.parameters(), *self.blocks.parameters()]:
            p.requires_grad_(False)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self.head(self.blocks(self.embed(x))), y)

    def train_dataloader(self):
        gen = torch.Generator().manual_seed(1)
        x, y = torch.randn(32, 4, generator=gen), torch.randint(0, 3, (32,), generator=gen)
        data = torch.utils.data.TensorDataset(x, y)
        return torch.utils.data.DataLoader(data, batch_size=8)


class Recorder(pl.Callback):
    """After Lisa: the active layers of each step and the parameters after it."""

    def __init__(self, lisa):
        self.lisa, self.steps = lisa, []

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        self.before = {n: p.detach().clone() for n, p in module.named_parameters()}
        self.active = list(self.lisa.active)

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        changed = {n for n, p in module.named_parameters() if not torch.equal(p, self.before[n])}
        states = {i for i, ps in enumerate(self.lisa.params) if any(p in trainer.optimizers[0].state for p in ps)}
        self.steps.append((self.active, changed, states))


def run(tmp_path, steps=6, opt="sgd", **kw):
    model, lisa = Stack(opt), Lisa(**kw)
    rec = Recorder(lisa)
    pl.Trainer(accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
               enable_model_summary=False, max_steps=steps, callbacks=[lisa, rec],
               default_root_dir=tmp_path).fit(model)
    return model, lisa, rec


def test_exactly_the_sampled_layers_train_and_the_sampling_is_the_seeded_generators(tmp_path):
    model, lisa, rec = run(tmp_path, n_layers=2, interval=2, seed=7)
    gen = torch.Generator().manual_seed(7)  # direct reference: a randperm every `interval` steps
    expected = [sorted(int(i) for i in torch.randperm(5, generator=gen)[:2]) for _ in range(3)]
    assert [h[1] for h in lisa.history] == expected and [h[0] for h in lisa.history] == [0, 2, 4]
    assert len({tuple(e) for e in expected}) > 1  # the sample really changes
    for step, (active, changed, _) in enumerate(rec.steps):
        assert active == expected[step // 2]
        blocks = {int(n.split(".")[1]) for n in changed if n.startswith("blocks.")}
        assert blocks == set(active), step  # every sampled layer moved, no other did
        assert {"head.weight", "head.bias"} <= changed and not any(n.startswith("embed") for n in changed)
    # between steps every layer counts as trainable (checkpoints keep all of them)
    assert all(p.requires_grad for p in model.blocks.parameters())
    _, again, _ = run(tmp_path, n_layers=2, interval=2, seed=7)
    _, other, _ = run(tmp_path, n_layers=2, interval=2, seed=8)
    assert again.history == lisa.history and other.history != lisa.history


def test_optimiser_state_of_layers_leaving_the_sample_is_dropped_or_kept(tmp_path):
    _, _, rec = run(tmp_path, steps=6, opt="adamw", n_layers=1, interval=1, seed=3, state="drop")
    for active, _, states in rec.steps:
        assert states == set(active)  # only the layer of this step holds Adam moments
    _, _, rec = run(tmp_path, steps=6, opt="adamw", n_layers=1, interval=1, seed=3, state="keep")
    seen = set()
    for active, _, states in rec.steps:
        seen |= set(active)
        assert states == seen  # moments of every layer trained so far stay


@pytest.mark.parametrize("backbone,names", [
    ("tiny_vit", ["trunk.blocks.0", "trunk.blocks.1"]),  # timm: blocks is an nn.Sequential
    ("tiny_open_clip", ["visual.transformer.resblocks.0", "visual.transformer.resblocks.1",
                        "text.transformer.resblocks.0", "text.transformer.resblocks.1"]),
])
def test_layer_stacks_of_timm_open_clip_and_hf_are_found(backbone, names):
    assert [n for n, _ in find_layers(build_backbone(backbone).model)] == names


def test_hf_layout_and_explicit_stack():
    encoder = nn.Module()
    encoder.layer = nn.ModuleList([nn.Linear(2, 2) for _ in range(3)])
    model = nn.Module()
    model.encoder, model.pooler = encoder, nn.Sequential(nn.Linear(2, 2))
    assert [n for n, _ in find_layers(model)] == ["encoder.layer.0", "encoder.layer.1", "encoder.layer.2"]
    assert [n for n, _ in find_layers(model, stack="pooler")] == ["pooler.0"]
    with pytest.raises(UserError, match="no layer stack"):
        find_layers(nn.Sequential(nn.Linear(2, 2)))
    assert SCHEDULES.get("lisa") is Lisa


def test_resuming_continues_the_same_samples_and_keeps_every_trained_layer(tmp_path):
    def trainer(steps, callbacks):
        return pl.Trainer(accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
                          enable_model_summary=False, max_steps=steps, default_root_dir=tmp_path, callbacks=callbacks)

    class AtStart(pl.Callback):
        def on_train_start(self, trainer, module):
            self.params = {n: p.detach().clone() for n, p in module.named_parameters()}

    full = Lisa(n_layers=2, interval=2, seed=5)
    trainer(8, [full]).fit(Stack())
    first_model, first = Stack(), Lisa(n_layers=2, interval=2, seed=5)
    t = trainer(4, [first])
    t.fit(first_model)
    t.save_checkpoint(tmp_path / "half.ckpt")
    keys = set(torch.load(tmp_path / "half.ckpt", weights_only=True)["state_dict"])
    assert {f"blocks.{i}.0.weight" for i in range(5)} <= keys  # every layer LISA may have changed is saved
    resumed, start = Lisa(n_layers=2, interval=2, seed=5), AtStart()
    trainer(8, [resumed, start]).fit(Stack(), ckpt_path=tmp_path / "half.ckpt")
    assert resumed.history == full.history  # the generator and the sample continue where they were
    for n, p in first_model.named_parameters():  # the resumed run starts from the trained blocks
        assert torch.equal(start.params[n], p.detach()), n
