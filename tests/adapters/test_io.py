"""Adapter files: the visadapt format's checks, strict state-dict loading, and the exchange formats' layout."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from visadapt.adapters import (
    BlockLoRAConfig,
    CompLoRAConfig,
    LoRAConfig,
    adapter_state_dict,
    export_diffusers,
    export_peft,
    import_peft,
    inject,
    is_adapter_param,
    load_adapter,
    load_adapter_state_dict,
    save_adapter,
)


def _model(width: int = 8):
    torch.manual_seed(0)
    model = nn.Module()
    model.blocks = nn.ModuleList(
        [nn.ModuleDict({"qkv": nn.Linear(width, 3 * width), "fc": nn.Linear(width, 5)}) for _ in range(2)]
    )
    return model


def _run(model, x):
    return sum(block["qkv"](x).sum() + block["fc"](x).sum() for block in model.blocks)


TARGET = r"blocks\.\d+\.qkv[q,v]|blocks\.\d+\.fc"


def _trained(config):
    model = _model()
    inject(model, config, verbose=False)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if is_adapter_param(name):
                p.normal_()
    return model


def test_save_writes_safetensors_and_json(tmp_path):
    model = _trained(BlockLoRAConfig(target=TARGET, r=4, n_blocks=2))
    save_adapter(model, tmp_path, base_identity="toy:two-blocks")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["visadapt_adapter.json", "visadapt_adapter.safetensors"]
    meta = json.loads((tmp_path / "visadapt_adapter.json").read_text())
    assert meta["variant"] == "block_lora" and meta["base_identity"] == "toy:two-blocks"
    assert meta["config"]["n_blocks"] == 2 and meta["config"]["target"] == TARGET
    layer = meta["layers"]["blocks.0.qkv"]
    assert layer["weight_shape"] == [24, 8] and layer["slices"] == ["q", "v"]
    assert layer["tensors"]["adapters.default.q.lora_B"] == [8, 2]  # the shared form: one (out, r/n) B
    assert load_file(str(tmp_path / "visadapt_adapter.safetensors")).keys() == adapter_state_dict(model).keys()


def test_load_refuses_wrong_shapes_naming_the_first_layer(tmp_path):
    save_adapter(_trained(LoRAConfig(target=TARGET)), tmp_path, base_identity="toy")
    other = _model()
    other.blocks[0]["fc"] = nn.Linear(8, 6)
    with pytest.raises(ValueError, match=r"layer 'blocks\.0\.fc'.*\(5, 8\).*\(6, 8\)"):
        load_adapter(other, tmp_path)
    assert not any(is_adapter_param(n) for n, _ in other.named_parameters())  # nothing was injected
    with pytest.raises(ValueError, match=r"layer 'blocks\.0\.qkv'"):
        load_adapter(_model(width=6), tmp_path)


def test_load_refuses_wrong_base_and_missing_layer(tmp_path):
    save_adapter(_trained(LoRAConfig(target=TARGET)), tmp_path, base_identity="toy:a")
    with pytest.raises(ValueError, match="saved for base model 'toy:a', not 'toy:b'"):
        load_adapter(_model(), tmp_path, base_identity="toy:b")
    small = _model()
    del small.blocks[1]
    with pytest.raises(ValueError, match=r"layer 'blocks\.1\.qkv'.*does not exist"):
        load_adapter(small, tmp_path)
    with pytest.raises(FileNotFoundError):
        load_adapter(_model(), tmp_path / "nowhere")


def test_load_into_existing_adapter_and_under_another_name(tmp_path):
    source = _trained(CompLoRAConfig(target=TARGET, r=2, protected=2))
    save_adapter(source, tmp_path, base_identity="toy")
    x = torch.randn(3, 8)
    target = _model()
    config = load_adapter(target, tmp_path, name="restored")
    assert isinstance(config, CompLoRAConfig) and config.protected == 2
    assert torch.equal(_run(target, x), _run(source, x))
    with torch.no_grad():
        for name, p in target.named_parameters():
            if is_adapter_param(name):
                p.zero_()
    load_adapter(target, tmp_path, name="restored")  # already injected: only the values are loaded
    assert torch.equal(_run(target, x), _run(source, x))


def test_load_adapter_state_dict_strict_errors():
    model = _trained(LoRAConfig(target=TARGET))
    state = dict(adapter_state_dict(model))
    key = next(iter(state))
    missing = dict(state)
    del missing[key]
    with pytest.raises(KeyError, match="missing adapter key"):
        load_adapter_state_dict(model, missing)
    load_adapter_state_dict(model, missing, strict=False)
    with pytest.raises(KeyError, match="unexpected adapter key 'blocks.9"):
        load_adapter_state_dict(model, {**state, "blocks.9.fc.adapters.default.lora_A": state[key]})
    with pytest.raises(ValueError, match=f"shape mismatch for {key}"):
        load_adapter_state_dict(model, {**state, key: torch.zeros(1, 1)})


def test_peft_export_layout_for_slices(tmp_path):
    model = _trained(LoRAConfig(target=TARGET, r=2, alpha=4))
    export_peft(model, tmp_path, base_model_name_or_path="toy")
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["base_model_name_or_path"] == "toy"
    assert cfg["r"] == 2 and cfg["lora_alpha"] == 4.0
    assert cfg["rank_pattern"] == {"blocks.0.qkv": 4, "blocks.1.qkv": 4}  # q and v slices: rank 2 + 2
    assert cfg["alpha_pattern"] == {"blocks.0.qkv": 8.0, "blocks.1.qkv": 8.0}  # same scale 2.0
    tensors = load_file(str(tmp_path / "adapter_model.safetensors"))
    b = tensors["base_model.model.blocks.0.qkv.lora_B.weight"]
    assert b.shape == (24, 4) and torch.equal(b[8:16], torch.zeros(8, 4))  # k rows are exactly zero
    assert not (tmp_path / "adapter_model.bin").exists()


def test_import_peft_rejects_unsupported(tmp_path):
    model = _trained(LoRAConfig(target=TARGET))
    export_peft(model, tmp_path)
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    (tmp_path / "adapter_config.json").write_text(json.dumps({**cfg, "use_dora": True}))
    with pytest.raises(NotImplementedError, match="use_dora"):
        import_peft(_model(), tmp_path)
    (tmp_path / "adapter_model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="adapter_model.safetensors"):
        import_peft(_model(), tmp_path)


def test_diffusers_export_folds_the_scale(tmp_path):
    model = _trained(LoRAConfig(target=r"blocks\.0\.fc", r=2, alpha=6))
    path = export_diffusers(tmp_path, unet=model)
    tensors = load_file(str(path))
    layer = model.blocks[0]["fc"]
    b = tensors["unet.blocks.0.fc.lora_B.weight"]
    torch.testing.assert_close(b @ tensors["unet.blocks.0.fc.lora_A.weight"], layer.delta_weight())
    with pytest.raises(ValueError, match="components"):
        export_diffusers(tmp_path, vae=model)
