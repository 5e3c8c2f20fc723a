"""Flexora and DiffoRA: the unrolled hypergradient equals finite differences of the unrolled objective on a tiny
problem; the selection and discretisation rules; a search run on CLIP writes an adapter fragment that selects
exactly the chosen modules and that fit's parser accepts."""

from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
import yaml

from visadapt.adapters import SCHEDULES, LoRAConfig, adapter_layers
from visadapt.cli import cli_main
from visadapt.data import FewShotDataModule
from visadapt.methods import ClipFewShot
from visadapt.methods.companions.diffora import DiffoRA, discretise
from visadapt.methods.companions.flexora import Flexora, select_above_mean, unrolled_hypergradient

ROOT = Path(__file__).resolve().parents[2]


def test_unrolled_hypergradient_equals_finite_differences_of_the_unrolled_objective():
    gen = torch.Generator().manual_seed(0)
    xt, yt = torch.randn(12, 3, generator=gen, dtype=torch.float64), torch.randn(12, generator=gen, dtype=torch.float64)
    xv, yv = torch.randn(9, 3, generator=gen, dtype=torch.float64), torch.randn(9, generator=gen, dtype=torch.float64)
    w = torch.randn(3, generator=gen, dtype=torch.float64, requires_grad=True)
    alpha = torch.tensor([0.7, 1.3, -0.4], dtype=torch.float64, requires_grad=True)
    lr = 0.05

    def train(w_, a_):  # the hyperparameter scales each weight, as Flexora's alpha scales each layer's adapter
        return ((xt @ (a_ * w_) - yt) ** 2).mean() + 0.1 * (a_ * w_).pow(4).sum()

    def val(w_, a_):
        return ((xv @ (a_ * w_) - yv) ** 2).mean()

    w0 = w.detach().clone()
    got = unrolled_hypergradient(lambda: train(w, alpha), lambda: val(w, alpha), [w], [alpha], lr, fd_eps=1e-4)[0]

    def unrolled(a_):  # F(alpha) = L_val(w - lr grad_w L_train(w, alpha), alpha), evaluated exactly
        w_ = w.detach().clone().requires_grad_(True)
        g = torch.autograd.grad(train(w_, a_), w_)[0]
        return val(w.detach() - lr * g, a_).item()

    h = 1e-6
    fd = torch.tensor([(unrolled(alpha.detach() + h * e) - unrolled(alpha.detach() - h * e)) / (2 * h)
                       for e in torch.eye(3, dtype=torch.float64)], dtype=torch.float64)
    first_order = torch.autograd.grad(val(w, alpha), alpha)[0]
    assert torch.allclose(got, fd, rtol=1e-5, atol=1e-8)
    assert not torch.allclose(first_order, fd, rtol=1e-3)  # the second-order term matters here
    assert torch.equal(w.detach(), w0)  # the weights are restored exactly


def test_selection_rules():
    assert select_above_mean([0.9, 1.2, 1.0, 1.5]) == [1, 3]  # mean 1.15
    assert select_above_mean([1.0, 1.0, 1.0]) == [0]  # nothing above the mean: the best one (first on ties)
    assert select_above_mean([0.2, 0.9, 0.9, 0.1], top_k=2) == [1, 2]
    assert discretise([0.3, 0.8, 0.5, 0.8, 0.1], 0.5) == [1, 2, 3]  # ceil(2.5) = 3 largest
    assert discretise([0.5, 0.5, 0.5, 0.5], 0.25) == [0]  # ties: the earlier module
    assert discretise([0.1, 0.2], 1.0) == [0, 1]
    with pytest.raises(ValueError, match="keep_ratio"):
        discretise([0.1], 0.0)


@pytest.mark.parametrize("kind", ["flexora", "diffora"])
def test_search_on_clip_writes_a_fragment_that_selects_exactly_the_chosen_modules(kind, tmp_path):
    torch.manual_seed(0)
    adapter = LoRAConfig(target="vision_attn_qkv", r=2, alpha=4.0)
    model = ClipFewShot("tiny_open_clip", adapter=adapter, eval_baselines=False)
    out = tmp_path / f"{kind}.yaml"
    cb = Flexora(alpha_lr=0.2, out=str(out)) if kind == "flexora" else DiffoRA(keep_ratio=0.5, dam_lr=0.2, out=str(out))
    data = FewShotDataModule("procedural_shapes", shots=4, seed=1, batch_size=8, eval_batch_size=64, augment="none",
                             dataset_kwargs={"num_per_class": 12}, preprocess=model.preprocess)
    pl.Trainer(accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
               enable_model_summary=False, max_steps=3, limit_val_batches=0, callbacks=[cb],
               default_root_dir=tmp_path).fit(model, data)
    assert SCHEDULES.get(kind) is type(cb)
    scores = list(cb.scores.values()) if kind == "flexora" else cb.gammas()
    start = 1.0 if kind == "flexora" else 0.5
    assert len(scores) == 2 and all(abs(s - start) > 1e-4 for s in scores)  # the scales were learnt
    frag = yaml.safe_load(out.read_text())
    init = frag["model"]["init_args"]["adapter"]["init_args"]
    assert frag["model"]["init_args"]["adapter"]["class_path"] == "visadapt.adapters.lora.LoRAConfig"
    assert (init["r"], init["alpha"]) == (2, 4.0) and len(cb.selected) == 1
    fresh = ClipFewShot("tiny_open_clip", adapter=LoRAConfig(**init), eval_baselines=False)
    assert ["model." + n for n, _ in adapter_layers(fresh.model)] == cb.selected
    with pytest.raises(SystemExit) as e:  # fit's own parser takes the fragment on top of a task
        cli_main(["fit", "-c", str(ROOT / "tasks" / "clip_fewshot.yaml"), "-c", str(out), "--print_config"])
    assert e.value.code == 0
