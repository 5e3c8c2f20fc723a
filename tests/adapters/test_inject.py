"""Target rule, injection errors, switching, registries, config validation and the import boundary."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from torch import nn

from visadapt.adapters import (
    ADAPTERS,
    INITIALISERS,
    OPTIMISERS,
    REGULARISERS,
    SCHEDULES,
    AdapterConfig,
    AdapterLayer,
    BlockLoRAConfig,
    CompLoRAConfig,
    InjectionReport,
    LoRAConfig,
    adapter_layers,
    count_parameters,
    inject,
    is_adapter_param,
    merge_adapters,
    set_active_adapter,
    set_adapters_enabled,
    unmerge_adapters,
)
from visadapt.adapters.targets import parse_target


def test_parse_target_slices_and_alternatives():
    rules = parse_target(r".*attn\.qkv[q,v]|.*attn\.proj")
    assert [r.slices for r in rules] == [("q", "v"), None]
    assert rules[0].pattern.fullmatch("blocks.3.attn.qkv") and not rules[0].pattern.fullmatch("blocks.3.attn.qkvx")
    assert parse_target(r"qkv[v,q]")[0].slices == ("q", "v")  # canonical q, k, v order
    assert parse_target(r"to_[qv]")[0].slices is None  # a character class without commas stays a class
    assert parse_target(r"fc[12]")[0].slices is None
    assert parse_target(r"(a|b)\.qkv[k]")[0].slices == ("k",)
    assert parse_target(r"a\[q\]")[0].slices is None  # escaped brackets are literal
    assert len(parse_target(r"(x|y)|[|]z")) == 2  # '|' inside groups and classes does not split


@pytest.mark.parametrize("bad", ["", "qkv[q,q]", "(unclosed", "a||b"])
def test_parse_target_rejects(bad):
    with pytest.raises(ValueError):
        parse_target(bad)


def _mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4), nn.Conv2d(3, 3, 3))


def test_inject_report_and_freezing(capsys):
    model = _mlp()
    report = inject(model, LoRAConfig(target=r"0|2", r=2))
    printed = capsys.readouterr().out
    assert isinstance(report, InjectionReport) and report.matched == ["0", "2"]
    assert "lora adapter 'default' on 2 modules" in printed and f"{report.trainable:,}" in printed
    assert report.adapter_parameters == 2 * (8 + 16) + 2 * (16 + 4) == report.trainable
    assert (report.trainable, report.total) == count_parameters(model)
    assert all(p.requires_grad == is_adapter_param(n) for n, p in model.named_parameters())
    assert str(report).startswith("visadapt: lora")
    inject(model, LoRAConfig(target="2"), name="other", verbose=False)
    assert capsys.readouterr().out == ""


def test_no_match_lists_candidates():
    with pytest.raises(ValueError) as err:
        inject(_mlp(), LoRAConfig(target=r"blocks\.\d+\.qkv"), verbose=False)
    message = str(err.value)
    assert "matches no module" in message and "\n  0\n  2" in message
    assert "  3" not in message  # the 3x3 conv is not a candidate


def test_unsupported_match_is_refused():
    with pytest.raises(ValueError, match=r"not nn.Linear or 1x1 nn.Conv2d:\n  1 \(ReLU\)"):
        inject(_mlp(), LoRAConfig(target=r"[0-3]"), verbose=False)


def test_double_inject_refused_and_bad_names():
    model = _mlp()
    inject(model, LoRAConfig(target="0"), verbose=False)
    with pytest.raises(ValueError, match="already injected"):
        inject(model, LoRAConfig(target="2"), verbose=False)
    for bad in ["a.b", "", "keys", "1x"]:
        with pytest.raises(ValueError, match="adapter name"):
            inject(model, LoRAConfig(target="2"), name=bad, verbose=False)
    inject(model, BlockLoRAConfig(target="0|2", r=4, n_blocks=2), name="second", verbose=False)
    layer = model.get_submodule("0")
    assert isinstance(layer, AdapterLayer) and list(layer.adapters) == ["default", "second"]
    assert not isinstance(layer.base_layer, AdapterLayer)  # wrapped once, not twice
    assert layer.in_features == 8 and layer.weight is layer.base_layer.weight  # attributes reach the base


def test_slice_suffix_needs_a_fused_layer():
    with pytest.raises(ValueError, match="multiple of 3"):
        inject(nn.Sequential(nn.Linear(4, 10)), LoRAConfig(target="0[q,v]"), verbose=False)


def test_active_adapter_switching_and_merge_guards():
    model = _mlp()
    x = torch.randn(2, 8)
    inject(model, LoRAConfig(target="0"), name="a", verbose=False)
    inject(model, LoRAConfig(target="0|2"), name="b", verbose=False)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if is_adapter_param(name):
                p.normal_()
    assert model[0].active == {"b": 1.0}  # injection activates the new adapter only
    set_active_adapter(model, "a")
    assert model[0].active == {"a": 1.0} and model[2].active == {}
    with pytest.raises(KeyError, match="unknown adapter"):
        set_active_adapter(model, "c")
    set_active_adapter(model, {"a": 0.5, "b": 2})
    merge_adapters(model)
    with pytest.raises(RuntimeError, match="unmerge"):
        set_active_adapter(model, "a")
    with pytest.raises(RuntimeError, match="unmerge"):
        set_adapters_enabled(model, False)
    with pytest.raises(RuntimeError, match="unmerge"):
        inject(model, LoRAConfig(target="0"), name="c", verbose=False)
    unmerge_adapters(model)
    set_adapters_enabled(model, False)
    assert all(not layer.enabled for _, layer in adapter_layers(model))
    set_adapters_enabled(model, True)
    model[:3](x)


def test_adapter_on_strided_padded_1x1_conv_matches_merged():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(4, 6, 1, stride=(2, 3), padding=(1, 2)))
    inject(model, LoRAConfig(target="0", r=2), verbose=False)
    with torch.no_grad():
        model[0].adapters["default"].lora_B.normal_()
        x = torch.randn(2, 4, 7, 11)
        adapted = model(x)
        merge_adapters(model)
        torch.testing.assert_close(model(x), adapted, rtol=1e-5, atol=1e-6)


def test_registries_and_descriptions():
    described = ADAPTERS.describe()
    assert {"lora", "block_lora", "comp_lora"} <= set(described)
    assert all(text and "\n" not in text for text in described.values())



@pytest.mark.parametrize(
    "registry,kind",
    [(INITIALISERS, "initialiser"), (OPTIMISERS, "optimiser"), (REGULARISERS, "regulariser"), (SCHEDULES, "schedule")],
)
def test_companion_registries_register_describe_and_resolve(registry, kind):
    """The companion registries are empty today: register a companion the way a variant file would, then check that
    it resolves, is listed with its docstring's first line, and that an unknown name fails naming the kind."""
    assert registry.kind == kind
    assert all(registry.describe().values()), "a registered companion has no description"
    name = f"test_only_{kind}"

    @registry.register(name)
    def companion() -> None:
        """Does nothing; registered by a test.

        More text that the listing leaves out.
        """

    try:
        assert registry.get(name.upper()) is companion and name in registry
        assert registry.describe()[name] == "Does nothing; registered by a test."
        with pytest.raises(KeyError, match=f"Unknown {kind} 'missing'.*{name}"):
            registry.get("missing")
    finally:
        registry._items.pop(name, None)
        registry._help.pop(name, None)
    assert name not in registry


@pytest.mark.parametrize(
    "make,field",
    [
        (lambda: LoRAConfig(r=0), "r"),
        (lambda: LoRAConfig(dropout=1.0), "dropout"),
        (lambda: LoRAConfig(init="orthogonal"), "init"),
        (lambda: LoRAConfig(rank_pattern={"x": 0}), "rank_pattern"),
        (lambda: LoRAConfig(target="(bad"), "target"),
        (lambda: BlockLoRAConfig(r=6, n_blocks=4), "n_blocks"),
        (lambda: BlockLoRAConfig(r=8, n_blocks=4, rank_pattern={"x": 6}), "n_blocks"),
        (lambda: CompLoRAConfig(protected=-1), "protected"),
        (lambda: CompLoRAConfig(side="left"), "side"),
    ],
)
def test_config_validation_names_the_field(make, field):
    with pytest.raises(ValueError, match=field):
        make()


def test_rank_and_alpha_pattern():
    model = _mlp()
    config = LoRAConfig(target="0|2", r=4, alpha=4, rank_pattern={"2": 2}, alpha_pattern={"0": 8.0})
    inject(model, config, verbose=False)
    a0, a2 = model[0].adapters["default"], model[2].adapters["default"]
    assert (a0.r, a0.scale) == (4, 2.0) and (a2.r, a2.scale) == (2, 2.0)


def test_comp_lora_protected_too_large_names_the_layer():
    with pytest.raises(ValueError, match=r"^0: protected=8"):
        inject(nn.Sequential(nn.Linear(8, 16)), CompLoRAConfig(target="0", protected=8), verbose=False)


def test_configs_parse_with_jsonargparse_as_subclasses():
    jsonargparse = pytest.importorskip("jsonargparse")
    # what the CLI does (global settings)
    jsonargparse.set_parsing_settings(subclasses_enabled=[AdapterConfig], docstring_parse_attribute_docstrings=True)
    parser = jsonargparse.ArgumentParser()
    parser.add_argument("--adapter", type=AdapterConfig)
    cfg = parser.parse_args(
        ["--adapter", '{"class_path": "visadapt.adapters.BlockLoRAConfig", "init_args": {"r": 16, "n_blocks": 4}}']
    )
    adapter = parser.instantiate(cfg).adapter
    assert isinstance(adapter, BlockLoRAConfig) and (adapter.r, adapter.n_blocks, adapter.alpha) == (16, 4, 8.0)
    help_parser = jsonargparse.ArgumentParser()
    help_parser.add_class_arguments(BlockLoRAConfig, "adapter")
    text = help_parser.format_help()
    assert "Number of blocks" in text and "Rank of the update" in text


def test_no_lightning_and_no_other_visadapt_layers_imported():
    code = (
        "import sys, visadapt.adapters; "
        "bad = [m for m in sys.modules if m.split('.')[0] in ('lightning', 'pytorch_lightning') "
        "or m.startswith(('visadapt.backbones', 'visadapt.data', 'visadapt.methods'))]; "
        "print(bad); sys.exit(1 if bad else 0)"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("target", ["qkv", "qkv[q,v]", "qkv[k]"])
def test_gradients_match_autograd_reference(target):
    """The fused in-place up-projection has a hand-written backward: check it against finite differences."""
    torch.manual_seed(0)
    model = nn.Sequential()
    model.add_module("qkv", nn.Linear(4, 12).double())
    inject(model, LoRAConfig(target=target, r=2), verbose=False)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if is_adapter_param(name):
                p.normal_()
    params = [p for p in model.parameters() if p.requires_grad]
    x = torch.randn(2, 3, 4, dtype=torch.float64, requires_grad=True)
    # gradcheck perturbs the parameters in place, so the model sees them as the function's inputs
    assert torch.autograd.gradcheck(lambda x, *_: model(x), (x, *params))
