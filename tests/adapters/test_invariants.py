"""The adapter invariant table: every registered variant x every toy model x every invariant (the peft pattern).

Adding a variant: one row in ``VARIANTS`` (``test_every_registered_variant_has_a_row`` enforces it).
"""

from __future__ import annotations

import copy
import importlib.util

import pytest
import torch
from torch import nn

from visadapt.adapters import (
    ADAPTERS,
    BlockLoRAConfig,
    CompLoRA,
    CompLoRAConfig,
    KaSAConfig,
    LaMDAConfig,
    LoFiTConfig,
    LoLDUConfig,
    LoRAConfig,
    LoRASBConfig,
    MixLoRAConfig,
    NLoRAConfig,
    RandLoRAConfig,
    SoRAConfig,
    adapter_class,
    adapter_layers,
    adapter_state_dict,
    count_parameters,
    disable_adapters,
    inject,
    is_adapter_param,
    load_adapter,
    merge_adapters,
    save_adapter,
    set_active_adapter,
    unmerge_adapters,
)

VARIANTS = {
    "lora": LoRAConfig(r=4, alpha=8, rslora=True, init="gaussian"),
    # dropout > 0: training runs the per-slice (one mask per fused-qkv slice) path
    "lora_dropout": LoRAConfig(r=2, alpha=2, dropout=0.25),
    "block_lora": BlockLoRAConfig(r=4, alpha=8, n_blocks=2),  # the shared (tied-arms) form
    "block_lora_arms": BlockLoRAConfig(r=4, alpha=8, n_blocks=2, form="arms", dropout=0.25, arm_dropout=True),
    "comp_lora": CompLoRAConfig(r=4, alpha=8, protected=2),
    "comp_lora_proj_in": CompLoRAConfig(r=4, alpha=8, protected=3, side="input", parametrization="projector"),
    "randlora": RandLoRAConfig(r=4, alpha=8),  # own-size bases per layer (PEFT parity: test_randlora.py)
    "sora": SoRAConfig(r=4, alpha=8, dropout=0.25),  # gate g ~ N(0, 1) between A and B
    # Nyström init, offset: starts at W (bitwise). The official core W[I, J]: the default pinv core of a random toy
    # weight is ill-conditioned, so merge rounding exceeds the table's tolerance (pinv: test_nlora.py)
    "nlora": NLoRAConfig(r=3, alpha=3, select="norm", core="raw"),
    "loldu": LoLDUConfig(r=3, train_scale=True),  # LDU factors of W; z and the scale train
    "kasa": KaSAConfig(r=2, alpha=4),  # not identity at init: the r smallest singular components are dropped
    "lamda_pp": LaMDAConfig(r=2, alpha=4, rank_allocation="energy", r_max=4),  # LaMDA++: per-matrix ranks
    "mixlora": MixLoRAConfig(r=2, alpha=4, num_experts=3, top_k=2, dropout=0.25),  # not mergeable: see below
    # step 1 (per-head scaling) on any layer: heads = groups of input features; the bias step: test_lofit.py
    "lofit": LoFiTConfig(num_heads=2, init_std=0.1),
    "lora_sb": LoRASBConfig(r=2),  # LoRA-XS bases (top-r singular vectors of W), R = 0; the data init: companions
}
NOT_MERGEABLE = {
    "mixlora": "MixLoRA routes each token to its top-k experts: the update depends on the input, so there is no weight "
    "to merge, no delta_weight and no weighted sum of matrices (merging raises; checked in the merge test)",
}
MODELS = ["mlp", "vit", "clip_attn", "bert", "unet", "convnet"]
if importlib.util.find_spec("visadapt.backbones.open_clip") is not None:
    MODELS.append("open_clip")  # the real tiny open_clip from the backbone layer
CASES = [(v, m) for v in VARIANTS for m in MODELS]


def _adapted(toy, variant: str, model_name: str, name: str = "default"):
    case = toy(model_name)
    base = copy.deepcopy(case.model)
    config = copy.deepcopy(VARIANTS[variant])
    config.target = case.target
    inject(case.model, config, name=name, verbose=False)
    return case, base


@torch.no_grad()
def _perturb(model: nn.Module, std: float = 0.1, seed: int = 1) -> None:
    """Give every adapter tensor random values so that merge checks are not trivially true (B = 0 at init)."""
    gen = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        if is_adapter_param(name):
            p.copy_(torch.randn(p.shape, generator=gen) * std)


def _base_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k.replace("base_layer.", ""): v.clone() for k, v in model.state_dict().items() if not is_adapter_param(k)}


def _assert_close(actual: torch.Tensor, expected: torch.Tensor, rel: float = 1e-5) -> None:
    scale = expected.abs().max().item()
    torch.testing.assert_close(actual, expected, rtol=rel, atol=rel * max(scale, 1e-12))


def test_every_registered_variant_has_a_row(toy_names):
    covered = {type(c) for c in VARIANTS.values()}
    for name in ADAPTERS.names():
        assert ADAPTERS.get(name).config_class in covered, f"variant {name!r} has no row in VARIANTS"
    assert set(MODELS) <= set(toy_names)


@pytest.mark.parametrize("variant,model_name", CASES)
def test_identity_at_init_and_disabled_equals_base(toy, variant, model_name):
    case, base = _adapted(toy, variant, model_name)
    with torch.inference_mode():
        expected = case.run(base)
        if adapter_class(VARIANTS[variant]).identity_at_init:
            assert torch.equal(case.run(case.model), expected)
        _perturb(case.model)
        with disable_adapters(case.model):
            assert torch.equal(case.run(case.model), expected)
        assert not torch.allclose(case.run(case.model), expected, rtol=1e-3, atol=1e-4), "adapter has no effect"


@pytest.mark.parametrize("variant,model_name", CASES)
def test_only_adapter_parameters_train(toy, variant, model_name):
    case, _ = _adapted(toy, variant, model_name)
    before = {k: v.clone() for k, v in case.model.state_dict().items()}
    trainable = [n for n, p in case.model.named_parameters() if p.requires_grad]
    assert trainable and all(is_adapter_param(n) for n in trainable)
    assert count_parameters(case.model)[0] == sum(p.numel() for p in case.model.parameters() if p.requires_grad)
    optimiser = torch.optim.Adam(case.model.parameters(), lr=1e-2)
    torch.manual_seed(0)
    goal = torch.randn_like(case.run(case.model))
    case.model.train()  # adapter dropout (where configured) is active: the per-slice / per-arm mask path trains
    for _ in range(3):
        optimiser.zero_grad()
        nn.functional.mse_loss(case.run(case.model), goal).backward()
        optimiser.step()
    after = case.model.state_dict()
    buffers = {n for n, _ in case.model.named_buffers()}  # fixed adapter buffers (LoRA-SB): test_companion_lora_sb.py
    for key, value in before.items():
        if is_adapter_param(key) and key in buffers:
            continue
        if is_adapter_param(key):
            assert not torch.equal(after[key], value), f"adapter tensor {key} did not change"
        else:
            assert torch.equal(after[key], value), f"base tensor {key} changed"


@pytest.mark.parametrize("variant,model_name", CASES)
def test_merge_equals_adapted_and_is_idempotent_and_unmerge_restores(toy, variant, model_name):
    case, _ = _adapted(toy, variant, model_name)
    _perturb(case.model)
    if variant in NOT_MERGEABLE:
        with pytest.raises(NotImplementedError):
            merge_adapters(case.model)
        assert not any(layer.merged for _, layer in adapter_layers(case.model))
        pytest.skip(NOT_MERGEABLE[variant])
    base_weights = _base_state(case.model)
    with torch.inference_mode():
        adapted = case.run(case.model)
        merge_adapters(case.model)
        merged = case.run(case.model)
        merged_weights = _base_state(case.model)
        merge_adapters(case.model)  # idempotent
        again = case.run(case.model)
        assert all(torch.equal(merged_weights[k], v) for k, v in _base_state(case.model).items())
        unmerge_adapters(case.model)
        unmerge_adapters(case.model)  # idempotent
        unmerged = case.run(case.model)
    _assert_close(merged, adapted)
    assert torch.equal(again, merged)
    _assert_close(unmerged, adapted)
    for key, value in _base_state(case.model).items():
        torch.testing.assert_close(value, base_weights[key], rtol=0, atol=1e-6, msg=f"unmerge did not restore {key}")


@pytest.mark.parametrize("variant,model_name", CASES)
def test_save_load_roundtrip(toy, variant, model_name, tmp_path):
    case, base = _adapted(toy, variant, model_name)
    _perturb(case.model)
    save_adapter(case.model, tmp_path, base_identity=f"toy:{model_name}")
    config = load_adapter(base, tmp_path, base_identity=f"toy:{model_name}")
    assert type(config) is type(VARIANTS[variant])
    assert adapter_state_dict(base).keys() == adapter_state_dict(case.model).keys()
    with torch.inference_mode():
        assert torch.equal(case.run(base), case.run(case.model))


@pytest.mark.parametrize("variant,model_name", CASES)
def test_dtype_follows_base_and_low_precision_is_finite(toy, variant, model_name):
    case = toy(model_name)
    case.model.to(torch.bfloat16)
    config = copy.deepcopy(VARIANTS[variant])
    config.target = case.target
    inject(case.model, config, verbose=False)
    _perturb(case.model)
    assert all(p.dtype == torch.bfloat16 for p in case.model.parameters())
    with torch.inference_mode():
        out = case.run(case.model, torch.bfloat16)
    assert out.dtype == torch.bfloat16 and torch.isfinite(out.float()).all()


# --- invariants of particular features ------------------------------------------------------------------------------


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_weighted_combination_is_sum_of_scaled_deltas(toy, variant):
    if variant in NOT_MERGEABLE:
        pytest.skip(NOT_MERGEABLE[variant])
    case = toy("vit")
    base = copy.deepcopy(case.model)
    for i, name in enumerate(["a", "b"]):
        config = copy.deepcopy(VARIANTS[variant])
        config.target = case.target
        inject(case.model, config, name=name, verbose=False)
        _perturb(case.model, seed=10 + i)
    set_active_adapter(case.model, {"a": 0.7, "b": -1.5})
    with torch.no_grad():
        combined = case.run(case.model)
        for module_name, layer in adapter_layers(case.model):
            weight = base.get_submodule(module_name).weight
            weight += 0.7 * layer.delta_weight("a") - 1.5 * layer.delta_weight("b")
            torch.testing.assert_close(
                layer.delta_weight(), 0.7 * layer.delta_weight("a") - 1.5 * layer.delta_weight("b")
            )
        _assert_close(combined, case.run(base))


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_fused_qkv_slices_leave_k_exactly_unchanged(variant):
    torch.manual_seed(0)
    layer = nn.Sequential()
    layer.add_module("qkv", nn.Linear(12, 36))
    base = copy.deepcopy(layer)
    config = copy.deepcopy(VARIANTS[variant])
    config.target = r"qkv[q,v]"
    inject(layer, config, verbose=False)
    _perturb(layer)
    x = torch.randn(3, 5, 12)
    with torch.no_grad():
        out, ref = layer(x), base(x)
    assert torch.equal(out[..., 12:24], ref[..., 12:24])
    assert not torch.allclose(out[..., :12], ref[..., :12]) and not torch.allclose(out[..., 24:], ref[..., 24:])
    if variant in NOT_MERGEABLE:
        pytest.skip(f"forward checked; no delta_weight: {NOT_MERGEABLE[variant]}")
    delta = layer.qkv.delta_weight()
    assert torch.equal(delta[12:24], torch.zeros_like(delta[12:24]))


def test_block_lora_has_fewer_parameters_than_lora_at_the_same_rank(toy):
    counts = {}
    for label, config in [
        ("lora", LoRAConfig(r=8)),
        ("shared", BlockLoRAConfig(r=8, n_blocks=4)),
        ("arms", BlockLoRAConfig(r=8, n_blocks=4, form="arms")),
    ]:
        case = toy("vit")
        config.target = case.target
        counts[label] = inject(case.model, config, verbose=False).adapter_parameters
    # per matrix: LoRA r*(in + out); shared form (r/n)*(in + out); arms (r/n)*in + r*out.
    # The ViT rows are 32->96, 32->32, 32->128, 128->32, in two blocks.
    shapes = [(96, 32), (32, 32), (128, 32), (32, 128)]
    assert counts["lora"] == 2 * sum(8 * (o + i) for o, i in shapes)
    assert counts["shared"] == 2 * sum(2 * (o + i) for o, i in shapes) == counts["lora"] // 4
    assert counts["arms"] == 2 * sum(2 * i + 8 * o for o, i in shapes)


@pytest.mark.parametrize("side", ["both", "input", "output"])
@pytest.mark.parametrize("parametrization", ["basis", "projector"])
def test_comp_lora_update_is_orthogonal_to_protected_directions(side, parametrization):
    torch.manual_seed(0)
    model = nn.ModuleDict({"fc": nn.Linear(24, 40), "qkv": nn.Linear(24, 72)})
    weights = {n: model.get_submodule(n).weight.detach().clone() for n in ("fc", "qkv")}
    config = CompLoRAConfig(target=r"fc|qkv[q,v]", r=4, protected=5, side=side, parametrization=parametrization)
    inject(model, config, verbose=False)
    optimiser = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(3):  # "after training", as the reference note asks
        optimiser.zero_grad()
        x = torch.randn(8, 24)
        (model.fc(x).pow(2).mean() + model.qkv(x).pow(2).mean()).backward()
        optimiser.step()
    checks = 0
    for module_name, layer in adapter_layers(model):
        for core, rows in layer.parts("default"):
            assert isinstance(core, CompLoRA)
            w = weights[module_name] if rows is None else weights[module_name][rows[0] : rows[1]]
            u, _, vh = torch.linalg.svd(w.double())
            delta = core.delta_weight().double()
            assert delta.norm() > 0
            if side in ("both", "output"):
                assert (u[:, :5].T @ delta).norm() <= 1e-5 * delta.norm()
            if side in ("both", "input"):
                assert (delta @ vh[:5].T).norm() <= 1e-5 * delta.norm()
            u_k, v_k = core.protected_directions()
            assert (u_k is not None) == (side in ("both", "output")) and (v_k is not None) == (
                side in ("both", "input")
            )
            checks += 1
    assert checks == 3
    if parametrization == "basis" and side == "both":
        fc = model.fc.adapters["default"]
        assert fc.num_parameters() == 4 * (24 - 5) + 4 * (40 - 5)  # r (in + out - 2k)
