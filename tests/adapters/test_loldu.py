"""LoLDU: the LDU factors (permutation as an index), the update equals the official re-parametrised weight, only the
diagonal (and the scale) train, and the update exports to PEFT with identical outputs."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from visadapt.adapters import adapter_state_dict, export_peft, inject
from visadapt.adapters.loldu import LoLDU, LoLDUConfig, ldu


@pytest.mark.parametrize("shape", [(12, 7), (7, 12), (9, 9)])
def test_ldu_factors_and_permutation_index(shape):
    w = torch.randn(*shape, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    perm, lower, d, upper = ldu(w)
    p, l_ref, u_ref = torch.linalg.lu(w)  # W = P L U with a dense P
    assert perm.dtype == torch.int64 and perm.shape == (shape[0],)
    assert torch.equal(p.argmax(1), perm)  # (P L)[i] = L[perm[i]]
    torch.testing.assert_close(lower, l_ref)
    torch.testing.assert_close(d[:, None] * upper, u_ref)
    assert torch.equal(torch.diagonal(upper), torch.ones(min(shape), dtype=torch.float64))
    torch.testing.assert_close(((lower * d) @ upper)[perm], w)


@pytest.mark.parametrize("train_scale", [False, True])
def test_update_equals_the_official_reparametrised_weight(train_scale):
    torch.manual_seed(0)
    w = torch.randn(10, 6)
    core = LoLDU(w, LoLDUConfig(target="x", r=4, alpha=2.0, train_scale=train_scale, normalize="unit_diagonal"))
    assert core.num_parameters() == 4 + int(train_scale)
    assert torch.equal(core.delta_weight(), torch.zeros(10, 6))
    # no dense permutation matrix is stored: only the index, L_r, U_r, z0 (and the scale) as buffers
    assert max(b.numel() for b in core.buffers()) == 10 * 4 and core.ldu_perm.shape == (10,)
    with torch.no_grad():
        core.lora_z.add_(torch.randn(4))
        if train_scale:
            core.lora_sigma.mul_(1.7)
    # the official form: W_res + σ P L_r diag(z) U_r with W_res = W - σ0 P L_r diag(z0) U_r
    p, lower, upper = torch.linalg.lu(w.double())
    d = torch.diagonal(upper)
    l_r, u_r, z0 = lower[:, :4], (upper / d[:, None])[:4], d[:4]
    sigma0 = 2.0 / 4
    sigma = core.lora_sigma.item() if train_scale else sigma0
    w_res = w.double() - sigma0 * p @ l_r @ torch.diag(z0) @ u_r
    official = w_res + sigma * p @ l_r @ torch.diag(core.lora_z.detach().double()) @ u_r
    torch.testing.assert_close(w + core.delta_weight(), official.float(), rtol=1e-5, atol=1e-5)


def test_rank_is_capped_and_only_the_diagonal_trains():
    torch.manual_seed(0)
    model, x = nn.Sequential(nn.Linear(5, 9), nn.Tanh(), nn.Linear(9, 3)), torch.randn(20, 5)
    base = copy.deepcopy(model)
    inject(model, LoLDUConfig(target="0|2", r=768), verbose=False)  # the official default rank: capped per matrix
    assert [t.shape for t in adapter_state_dict(model).values()] == [(5,), (3,)]
    with torch.no_grad():
        assert torch.equal(model(x), base(x))
    goal = torch.randn(20, 3, generator=torch.Generator().manual_seed(1))
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=5e-2)
    losses = []
    for _ in range(30):
        opt.zero_grad()
        loss = nn.functional.mse_loss(model(x), goal)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.95 * losses[0]


def test_exports_to_peft_with_identical_outputs(toy, tmp_path):
    peft = pytest.importorskip("peft")
    case = toy("clip_attn")
    base = copy.deepcopy(case.model)
    inject(case.model, LoLDUConfig(target=case.target, r=4, train_scale=True), verbose=False)
    with torch.no_grad():
        for n, p in case.model.named_parameters():
            if p.requires_grad:
                p.mul_(1.5)
        adapted, unadapted = case.run(case.model), case.run(base)
    export_peft(case.model, tmp_path)
    loaded = peft.PeftModel.from_pretrained(base, tmp_path)
    with torch.no_grad():
        out = case.run(loaded)
    assert (adapted - unadapted).abs().max() > 1e-2 * unadapted.abs().max()
    torch.testing.assert_close(out, adapted, rtol=1e-5, atol=1e-5 * adapted.abs().max().item())


def test_row_norm_factors_reproduce_the_weight():
    w = torch.randn(12, 7, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    perm, lower, d, upper = ldu(w, "row_norm")
    _, _, u_ref = torch.linalg.lu(w)
    torch.testing.assert_close(upper.norm(dim=1), torch.ones(7, dtype=torch.float64))
    torch.testing.assert_close(d, u_ref.norm(dim=1) * torch.diagonal(u_ref).sign())  # signed row norms of LU's U
    torch.testing.assert_close(((lower * d) @ upper)[perm], w)


def test_a_step_stays_bounded_with_a_tiny_pivot():
    """Regression (issue 15): with the official unit-diagonal U a tiny LU pivot d_i makes row i of U ~ 1/d_i (1e7 on
    EfficientNet-Lite0's 1x1 convs, 1e31 on the rank-deficient text projection), so one AdamW step on z_i moved W
    by ~1e4 |W| here and training collapsed to chance. The default row-norm D keeps the step below LoRA's."""
    from visadapt.adapters.lora import LoRA, LoRAConfig

    gen = torch.Generator().manual_seed(0)
    w = torch.randn(10, 8, generator=gen)
    w[:, 1] = 0.5 * w[:, 0] + 1e-6 * torch.randn(10, generator=gen)  # the second pivot is ~1e-6
    assert ldu(w)[2].abs().min() < 1e-5

    def step(adapter: nn.Module, h: float = 1e-3) -> float:  # |ΔW| / (h |W|) after AdamW's first step (± h)
        g = torch.Generator().manual_seed(1)
        with torch.no_grad():
            for p in adapter.parameters():
                p.add_(h * torch.sign(torch.randn(p.shape, generator=g)))
            return (adapter.delta_weight().norm() / (h * w.norm())).item()

    lora = step(LoRA(w, LoRAConfig(target="x", r=8, alpha=8)))
    default = step(LoLDU(w, LoLDUConfig(target="x", r=8)))
    official = step(LoLDU(w, LoLDUConfig(target="x", r=8, normalize="unit_diagonal")))
    assert default < lora and official > 1e3 * lora
    # the bound: a step of h on every z moves W by at most sigma h sum_i |L_i| (unit-norm rows of U)
    core = LoLDU(w, LoLDUConfig(target="x", r=8))
    with torch.no_grad():
        core.lora_z.add_(1e-3)
    assert core.delta_weight().norm() <= 1e-3 / 8 * core.ldu_L.norm(dim=0).sum() * 1.0001
