"""LoRAT's model pieces against direct computations: position grid, token types, labels and loss, LoRA placement."""

import math

import numpy as np
import pytest
import torch

from visadapt.methods.lorat import LoRAT, lorat_loss, plain_copy, rasterise_boxes, resize_position_grid

D, DEPTH, R = 64, 4, 64


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return LoRAT(backbone="tiny_tracking_vit", template_size=48, search_size=96)


def _cubic(t: float, a: float = -0.75) -> list[float]:
    """Keys' cubic convolution weights of the 4 taps at offsets -1, 0, 1, 2 (PyTorch's bicubic, A = -0.75)."""
    def k(x):
        x = abs(x)
        if x <= 1:
            return (a + 2) * x ** 3 - (a + 3) * x ** 2 + 1
        if x < 2:
            return a * x ** 3 - 5 * a * x ** 2 + 8 * a * x - 4 * a
        return 0.0
    return [k(t + 1), k(t), k(1 - t), k(2 - t)]


def _bicubic_reference(grid: np.ndarray, out: int) -> np.ndarray:
    """Separable bicubic resize written out: half-pixel centres (align_corners=False), taps clamped at the border."""
    n = grid.shape[0]

    def resize_axis(x, axis):
        res = []
        for o in range(out):
            src = (o + 0.5) * n / out - 0.5
            i0 = math.floor(src)
            w = _cubic(src - i0)
            idx = [min(max(i0 + d, 0), n - 1) for d in (-1, 0, 1, 2)]
            res.append(sum(wi * np.take(x, ii, axis=axis) for wi, ii in zip(w, idx)))
        return np.stack(res, axis=axis)

    return resize_axis(resize_axis(grid, 0), 1)


def test_position_grid_is_the_bicubic_resize_and_template_takes_its_top_left(model):
    native = model.vit.position_grid().detach().double().numpy()  # 8 x 8 x D
    assert native.shape == (8, 8, D)
    expected = _bicubic_reference(native, 12)
    got = model.pos_embed.detach().view(12, 12, D).double().numpy()
    np.testing.assert_allclose(got, expected, atol=1e-5)
    assert not model.pos_embed.requires_grad  # frozen in LoRAT
    # the template adds the top-left 6x6 block of the *search* grid (a crop, not a second interpolation)
    z = torch.randn(2, 3, 48, 48)
    tbox = torch.tensor([[0.25, 0.25, 0.75, 0.75], [0.0, 0.5, 0.3, 1.0]])
    with torch.no_grad():
        emb = model.embed_template(z, tbox) - model.vit.patchify(z)
        types = model.token_type_embed[rasterise_boxes(tbox, 6, 6).flatten(1).long()]
        pos = torch.from_numpy(expected[:6, :6].reshape(36, D)).float()
        torch.testing.assert_close(emb, pos[None] + types, atol=1e-5, rtol=0)
        x = torch.randn(1, 3, 96, 96)
        sx = model.embed_search(x) - model.vit.patchify(x)
        torch.testing.assert_close(sx[0], torch.from_numpy(expected.reshape(144, D)).float()
                                   + model.token_type_embed[2], atol=1e-5, rtol=0)
    # same size: no resampling at all
    g = torch.randn(5, 5, 3)
    torch.testing.assert_close(resize_position_grid(g, 5, 5), g)


def test_rasterised_cells_are_those_the_box_overlaps():
    gen = torch.Generator().manual_seed(1)
    a, b = torch.rand(200, 2, generator=gen), torch.rand(200, 2, generator=gen)
    boxes = torch.cat([torch.minimum(a, b), torch.maximum(a, b) + 0.01], 1).clamp(max=1.0)
    for h, w in ((6, 6), (12, 12), (5, 7)):
        got = rasterise_boxes(boxes, h, w)
        for n in range(len(boxes)):
            x1, y1, x2, y2 = (boxes[n] * torch.tensor([w, h, w, h])).tolist()
            for i in range(h):
                for j in range(w):
                    overlap = min(j + 1, x2) - max(j, x1) > 1e-4 and min(i + 1, y2) - max(i, y1) > 1e-4
                    assert bool(got[n, i, j]) == overlap, (n, i, j)


def test_template_foreground_types(model):
    box = torch.tensor([[0.2, 0.4, 0.6, 0.9]])
    mask = model.template_mask(box).view(6, 6)
    # columns floor(1.2)=1 .. floor(3.6 + 1 - eps)=4 exclusive; rows floor(2.4)=2 .. floor(5.4 + 1 - eps)=6 exclusive
    expected = torch.zeros(6, 6, dtype=torch.long)
    expected[2:6, 1:4] = 1
    assert torch.equal(mask, expected)


def _iou(a, b):
    iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = iw * ih
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union, union


def test_loss_matches_a_per_cell_reference():
    gen = torch.Generator().manual_seed(2)
    bsz, h, w = 3, 5, 5
    scores = torch.randn(bsz, h, w, generator=gen, requires_grad=True)
    c = torch.rand(bsz, h, w, 2, generator=gen) * 0.6 + 0.2
    s = torch.rand(bsz, h, w, 2, generator=gen) * 0.3 + 0.05
    boxes = torch.cat([c - s, c + s], -1).requires_grad_(True)
    target = torch.tensor([[0.1, 0.2, 0.5, 0.7], [0.3, 0.3, 0.9, 0.6], [0.0, 0.0, 0.15, 0.15]])
    out = lorat_loss(scores, boxes, target)
    cls = giou = 0.0
    npos = 0
    for n in range(bsz):
        t = target[n].tolist()
        for i in range(h):
            for j in range(w):
                inside = (min(j + 1, t[2] * w) - max(j, t[0] * w) > 1e-4
                          and min(i + 1, t[3] * h) - max(i, t[1] * h) > 1e-4)
                p = boxes[n, i, j].tolist()
                iou, union = _iou(p, t)
                soft = iou if inside else 0.0
                z = scores[n, i, j].item()
                sig = 1 / (1 + math.exp(-z))
                cls += -(soft * math.log(sig) + (1 - soft) * math.log(1 - sig))
                if inside:
                    npos += 1
                    hull = (max(p[2], t[2]) - min(p[0], t[0])) * (max(p[3], t[3]) - min(p[1], t[1]))
                    giou += 1 - (iou - (hull - union) / hull)
    assert int(out["num_pos"]) == npos > 0
    assert out["cls"].item() == pytest.approx(cls / npos, rel=1e-5)
    assert out["giou"].item() == pytest.approx(giou / npos, rel=1e-5)
    # the normaliser is what the caller passes (the cross-device mean), clamped to >= 1
    assert lorat_loss(scores, boxes, target, 2.0 * npos)["loss"].item() == pytest.approx(out["loss"].item() / 2,
                                                                                        rel=1e-6)
    assert lorat_loss(scores, boxes, target, 0.0)["loss"].item() == pytest.approx(out["loss"].item() * npos,
                                                                                 rel=1e-5)
    # the IoU target is detached: the classification term sends no gradient into the boxes
    out["cls"].backward()
    assert boxes.grad is None or torch.count_nonzero(boxes.grad) == 0
    assert torch.count_nonzero(scores.grad) == bsz * h * w


def test_lora_placement_counts_and_head(model):
    names = [n for n in model.injection.matched]
    assert len(names) == 4 * DEPTH
    assert {n.split(".", 3)[3] for n in names} == {"attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2"}
    assert all(s == ("q", "k", "v") for n, s in model.injection.slices.items() if n.endswith("qkv"))
    per_block = 3 * R * (D + D) + R * (D + D) + R * (D + 4 * D) + R * (4 * D + D)  # q, k, v, o, fc1, fc2
    counts = model.trainable_counts()
    assert counts["adapter"] == DEPTH * per_block
    assert counts["head"] == 2 * (2 * (D * D + D)) + (D + 1) + (4 * D + 4)
    assert counts["type_embed"] == 3 * D and counts["backbone"] == 0
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert all(".adapters." in n or n.startswith(("cls_head", "reg_head", "token_type_embed")) for n in trainable)
    cfg = model.adapter_cfg
    assert (cfg.r, cfg.alpha, cfg.init, cfg.init_std, cfg.dropout) == (64, 64.0, "trunc_normal", 0.02, 0.0)


def test_paper_b224_parameter_counts_from_the_architecture():
    """B-224 (ViT-B/14, 768 x 12): LoRA about 10.6 M and head about 2.4 M trainable parameters (reference notes)."""
    with torch.device("meta"):
        m = LoRAT(backbone="tracking_vit", backbone_kwargs={"model_name": "vit_base_patch14_dinov2"},
                  template_size=112, search_size=224)
    counts = m.trainable_counts()
    assert counts["adapter"] == 12 * (3 * 64 * 1536 + 64 * 1536 + 2 * 64 * (768 + 3072)) == 10_616_832
    assert counts["head"] == 2 * 2 * (768 * 768 + 768) + 769 + 4 * 769 == 2_366_213
    assert (m.z_grid, m.x_grid) == (8, 16)


def test_merged_copy_is_a_plain_vit_with_the_same_outputs(model):
    clone = plain_copy(model)
    from visadapt.adapters import adapter_layers

    assert adapter_layers(clone) == [] and len(adapter_layers(model)) == 4 * DEPTH
    z, x = torch.randn(2, 3, 48, 48), torch.randn(2, 3, 96, 96)
    tb = torch.tensor([[0.25, 0.25, 0.75, 0.75]] * 2)
    with torch.no_grad():
        s1, b1 = model.eval()(z, x, tb)
        s2, b2 = clone(z, x, tb)
    torch.testing.assert_close(s1, s2, atol=1e-4, rtol=0)
    torch.testing.assert_close(b1, b2, atol=1e-5, rtol=0)


def test_full_finetune_baseline_and_layer_decay():
    torch.manual_seed(0)
    m = LoRAT(backbone="tiny_tracking_vit", template_size=48, search_size=96, finetune=True, layer_decay=0.7)
    assert m.trainable_counts()["adapter"] == 0 and m.pos_embed.requires_grad
    opt = torch.optim.AdamW(m.param_groups(), lr=1e-4, weight_decay=0.1)
    # lr_scale: block i -> 0.7 ** (depth - i), embeddings 0.7 ** (depth + 1), head 1
    scale = {id(p): g["lr_scale"] for g in opt.param_groups for p in g["params"]}
    decay = {id(p): g["weight_decay"] for g in opt.param_groups for p in g["params"]}
    named = dict(m.named_parameters())
    assert scale[id(named["vit.trunk.blocks.0.attn.qkv.weight"])] == pytest.approx(0.7 ** 4)
    assert scale[id(named["vit.trunk.blocks.3.mlp.fc2.weight"])] == pytest.approx(0.7)
    assert scale[id(named["vit.trunk.patch_embed.proj.weight"])] == pytest.approx(0.7 ** 5)
    assert scale[id(named["cls_head.layers.0.weight"])] == 1.0
    # no weight decay on 1-D parameters and names containing "embed" (official rule); decay elsewhere
    assert decay[id(named["token_type_embed"])] == 0.0 and decay[id(named["pos_embed"])] == 0.0
    assert decay[id(named["vit.trunk.patch_embed.proj.weight"])] == 0.0
    assert decay[id(named["vit.trunk.blocks.0.norm1.weight"])] == 0.0
    assert decay[id(named["vit.trunk.blocks.0.attn.qkv.weight"])] == 0.1
    with pytest.raises(ValueError, match="adapter: null"):
        from visadapt.methods.lorat import default_lora

        LoRAT(backbone="tiny_tracking_vit", template_size=48, search_size=96, finetune=True, adapter=default_lora())


def test_tiny_backbone_position_grid_is_a_fixed_sincos_grid(model):
    grid = model.vit.position_grid().detach().double()
    k = torch.arange(16, dtype=torch.float64)
    w = 10000.0 ** (-k / 16)
    for i, j in ((0, 0), (3, 5), (7, 2)):
        expected = torch.cat([torch.sin(j * w), torch.cos(j * w), torch.sin(i * w), torch.cos(i * w)])
        torch.testing.assert_close(grid[i, j], expected, atol=1e-6, rtol=0)


def test_configure_optimizers_applies_the_layer_decay_to_the_rates():
    m = LoRAT(backbone="tiny_tracking_vit", template_size=48, search_size=96, finetune=True, layer_decay=0.7,
              schedule="constant", warmup_steps=0)
    opt = m.configure_optimizers()  # the shared AdapterModule mechanism scales each group's rate by its lr_scale
    base = opt.defaults["lr"]
    assert {round(g["lr"] / base, 9) for g in opt.param_groups} == {round(g["lr_scale"], 9) for g in opt.param_groups}
    assert min(g["lr"] for g in opt.param_groups) == pytest.approx(base * 0.7 ** 5)


def test_tiny_backbone_patch_size_sets_the_token_grids():
    m = LoRAT(backbone="tiny_tracking_vit", backbone_kwargs={"patch_size": 4}, template_size=32, search_size=64)
    assert (m.x_grid, m.z_grid) == (16, 8)
    scores, boxes = m(torch.zeros(2, 3, 32, 32), torch.zeros(2, 3, 64, 64), torch.tensor([[0.25, 0.25, 0.75, 0.75]] * 2))
    assert scores.shape == (2, 16, 16) and boxes.shape == (2, 16, 16, 4)
