"""LoFiT: the edited attention output against a direct per-head computation, head selection against a direct ranking,
the step-2 config, the L1 penalty, merging into weight and bias, and the refusal to export the offset as a LoRA."""

from __future__ import annotations

import copy

import pytest
import torch

from visadapt.adapters import (
    REGULARISERS,
    LoFiTConfig,
    adapter_layers,
    export_peft,
    inject,
    load_adapter,
    merge_adapters,
    save_adapter,
    unmerge_adapters,
)
from visadapt.adapters.lofit import bias_step_config, select_heads

PROJ = r"blocks\.\d+\.attn\.proj"


def _proj_inputs(model, run) -> dict[str, torch.Tensor]:
    """The input of every attention proj (the concatenated head outputs z) in one forward of ``model``."""
    seen, hooks = {}, []
    for name, module in model.named_modules():
        if name.endswith("attn.proj"):
            hooks.append(module.register_forward_pre_hook(lambda m, a, n=name: seen.__setitem__(n, a[0].detach())))
    with torch.no_grad():
        run(model)
    for h in hooks:
        h.remove()
    return seen


def test_scale_step_edits_each_head_as_the_paper_and_selection_ranks_head_norms(toy):
    case = toy("vit")  # 2 blocks, width 32, 2 heads of 16
    base = copy.deepcopy(case.model)
    inject(case.model, LoFiTConfig(target=PROJ, num_heads=2, init_std=0.3), verbose=False)
    for name, layer in adapter_layers(case.model):
        core = layer.adapters["default"]
        z = torch.randn(5, 32)
        w, b = layer.base_layer.weight, layer.base_layer.bias
        heads = z.view(5, 2, 16) * (1 + core.lofit_A.view(2, 16))  # z_h <- (1 + A_h) * z_h, per head
        with torch.no_grad():
            torch.testing.assert_close(layer(z), heads.reshape(5, 32) @ w.T + b, rtol=1e-5, atol=1e-6)
    with torch.no_grad():
        assert (case.run(case.model) - case.run(base)).abs().max() > 1e-3
    # L1 penalty: l1 * sum |a| over both layers
    expected = sum(5e-4 * layer.adapters["default"].lofit_A.abs().sum() for _, layer in adapter_layers(case.model))
    torch.testing.assert_close(REGULARISERS.get("lofit")(case.model), expected)
    # selection: global top-3 of the 4 (layer, head) pairs by ||a_h||_2, computed directly
    scores = []
    for name, layer in adapter_layers(case.model):
        a = layer.adapters["default"].lofit_A.detach()
        scores += [(a[16 * h : 16 * (h + 1)].norm().item(), name, h) for h in range(2)]
    expected_heads: dict[str, list[int]] = {}
    for _, name, h in sorted(scores, reverse=True)[:3]:
        expected_heads.setdefault(name, []).append(h)
    chosen = select_heads(case.model, 3)
    assert chosen == {k: sorted(v) for k, v in expected_heads.items()}
    assert sum(len(v) for v in chosen.values()) == 3
    with pytest.raises(ValueError, match="top_k must be in"):
        select_heads(case.model, 5)


def test_bias_step_offsets_only_the_selected_heads_and_merges_into_the_bias(toy, tmp_path):
    case = toy("vit")
    step1 = copy.deepcopy(case.model)
    inject(step1, LoFiTConfig(target=PROJ, num_heads=2, init_std=0.3), verbose=False)
    with torch.no_grad():  # make block 1 head 0 the strongest, then block 0 head 1
        step1.blocks[1].attn.proj.adapters["default"].lofit_A[:16] = 5.0
        step1.blocks[0].attn.proj.adapters["default"].lofit_A[16:] = 3.0
    config = bias_step_config(step1, 2)
    assert config.mode == "bias" and select_heads(step1, 2) == {"blocks.0.attn.proj": [1], "blocks.1.attn.proj": [0]}
    model = copy.deepcopy(case.model)
    z_before = _proj_inputs(model, case.run)
    report = inject(model, config, verbose=False)
    assert report.adapter_parameters == 2 * 16  # only the two selected heads' offsets exist
    with torch.no_grad():
        for name, layer in adapter_layers(model):
            core = layer.adapters["default"]
            core.lofit_v.normal_()
            head = {"blocks.0.attn.proj": 1, "blocks.1.attn.proj": 0}[name]
            v = torch.zeros(32)
            v[16 * head : 16 * (head + 1)] = core.lofit_v[0]
            z = torch.randn(4, 32)
            w, b = layer.base_layer.weight, layer.base_layer.bias
            torch.testing.assert_close(layer(z), (z + v) @ w.T + b, rtol=1e-5, atol=1e-5)
    # the first proj's input is unchanged by the adapter (it acts after it), so its output is W (z + v) + b there
    assert torch.equal(_proj_inputs(model, case.run)["blocks.0.attn.proj"], z_before["blocks.0.attn.proj"])
    with torch.no_grad():
        adapted = case.run(model)
        merge_adapters(model)
        torch.testing.assert_close(case.run(model), adapted, rtol=1e-5, atol=1e-5)
        proj = model.blocks[0].attn.proj
        assert not torch.equal(proj.base_layer.bias, case.model.blocks[0].attn.proj.bias)
        assert torch.equal(proj.base_layer.weight, case.model.blocks[0].attn.proj.weight)  # only the bias moves
        unmerge_adapters(model)
        torch.testing.assert_close(proj.base_layer.bias, case.model.blocks[0].attn.proj.bias, rtol=0, atol=1e-6)
    with pytest.raises(NotImplementedError, match="no PEFT LoRA form"):
        export_peft(model, tmp_path / "peft")
    save_adapter(model, tmp_path / "own", base_identity="toy")
    other = copy.deepcopy(case.model)
    load_adapter(other, tmp_path / "own")
    with torch.no_grad():
        assert torch.equal(case.run(other), adapted)


def test_scale_step_exports_to_peft_with_identical_outputs(toy, tmp_path):
    peft = pytest.importorskip("peft")
    case = toy("vit")
    base = copy.deepcopy(case.model)
    inject(case.model, LoFiTConfig(target=PROJ, num_heads=2, init_std=0.3), verbose=False)
    export_peft(case.model, tmp_path)
    loaded = peft.PeftModel.from_pretrained(base, tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(case.run(loaded), case.run(case.model), rtol=1e-5, atol=1e-5)


def test_two_step_switches_at_the_right_step_to_the_top_heads_and_freezes_exactly(tmp_path):
    from torch import nn

    from visadapt.adapters import SCHEDULES

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 12), nn.Tanh(), nn.Linear(12, 4))
    base = copy.deepcopy(model)
    inject(model, LoFiTConfig(target="0|2", num_heads=4, mode="two_step", select_fraction=0.5, top_k=3, init_std=0.1),
           verbose=False)
    params = [p for p in model.parameters() if p.requires_grad]
    optimiser = torch.optim.AdamW(params, lr=5e-2, weight_decay=0.1)
    schedule = SCHEDULES.get("lofit")()
    cores = [model[0].adapters["default"], model[2].adapters["default"]]
    gen = torch.Generator().manual_seed(1)
    model.train()
    for step in range(1, 9):  # 8 steps: the switch happens after step ceil(0.5 * 8) = 4
        a_before = [c.lofit_A.detach().clone() for c in cores]
        v_before = [c.lofit_v.detach().clone() for c in cores]
        optimiser.zero_grad()
        l1 = REGULARISERS.get("lofit")(model)
        assert (l1 is None) == (step > 4)
        loss = model(torch.randn(16, 8, generator=gen)).pow(2).mean() + (0.0 if l1 is None else l1)
        loss.backward()
        optimiser.step()
        if step == 4:  # the selection must use the a values right after step 4: rank them directly
            scores = sorted(((c.lofit_A.detach().view(4, -1).norm(dim=1)[h].item(), i, h)
                             for i, c in enumerate(cores) for h in range(4)), reverse=True)[:3]
            expected = [sorted(h for _, j, h in scores if j == i) for i in range(2)]
        schedule.on_train_step_end(model, step, 8, lr=0.0)
        for i, c in enumerate(cores):
            if step < 4:
                assert torch.equal(c.lofit_v, torch.zeros_like(c.lofit_v))  # offsets do not train in step 1
                assert not torch.equal(c.lofit_A, a_before[i])
            if step > 4:
                assert torch.equal(c.lofit_A, torch.zeros_like(c.lofit_A))  # frozen at zero despite AdamW
                moved = (c.lofit_v != v_before[i]).view(4, -1).any(1)
                assert moved.tolist() == [h in c.heads for h in range(4)]
    assert [c.heads for c in cores] == expected and all(c.switched for c in cores)
    assert REGULARISERS.get("lofit")(model) is None  # no L1 after the switch
    model.eval()
    x = torch.randn(3, 8)
    save_adapter(model, tmp_path, base_identity="toy")
    load_adapter(base, tmp_path)
    base.eval()
    with torch.no_grad():
        assert torch.equal(base(x), model(x))
    loaded = base[0].adapters["default"]
    base.train()
    base(x)  # the first training forward reads the step back from the parameters
    assert loaded.switched and loaded.heads == cores[0].heads
