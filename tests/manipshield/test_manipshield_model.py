"""ManipShield: losses against direct reference computations, LDS on planted data, shapes and gradients of the tiny
VLM, transformers LLaVA / Qwen2-VL from local folders, learning on generated data, checkpoints, the task and the
paper configs."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from visadapt.adapters import LoRAConfig
from visadapt.backbones import register_backbone
from visadapt.backbones.base import Backbone, Preprocess
from visadapt.backbones.vlm import VisionLanguageModel, VLMOutput, train_bpe_tokenizer
from visadapt.methods.manipshield import ManipShield, contrastive_loss, generalized_iou, lda_separation

ROOT = Path(__file__).resolve().parents[2]


# -- contrastive loss ---------------------------------------------------------------------------------------------
def _reference_contrastive(z, labels, pairs, t, pairing, w):
    """Loop over anchors: -1/|P| sum_p [s_ip - log sum_{j != i} w_ij exp(s_ij)]."""
    n, total, anchors = len(z), 0.0, 0
    for i in range(n):
        pos = [j for j in range(n) if j != i and (labels[j] == labels[i] if pairing == "label" else pairs[j] == pairs[i])]
        if not pos:
            continue
        den = sum((w if (pairs[j] == pairs[i] and labels[j] != labels[i]) else 1.0)
                  * math.exp(float(z[i] @ z[j]) / t) for j in range(n) if j != i)
        total += -sum(float(z[i] @ z[p]) / t - math.log(den) for p in pos) / len(pos)
        anchors += 1
    return total / anchors


@pytest.mark.parametrize(("pairing", "weight"), [("label", 1.0), ("label", 3.0), ("twin", 2.0)])
def test_contrastive_loss_equals_reference(pairing, weight):
    g = torch.Generator().manual_seed(0)
    z = torch.nn.functional.normalize(torch.randn(10, 5, generator=g, dtype=torch.float64), dim=-1)
    labels = torch.tensor([0, 1, 0, 1, 0, 1, 1, 0, 1, 0])
    pairs = torch.tensor([0, 0, 1, 1, 2, 2, 2, 3, 4, 5])  # a group with two edits; pair 5 has no twin
    got = contrastive_loss(z, labels, pairs, 0.2, pairing, weight)
    assert float(got) == pytest.approx(_reference_contrastive(z, labels.tolist(), pairs.tolist(), 0.2, pairing,
                                                              weight), rel=1e-10)


def test_hard_negative_weight_raises_the_loss_of_close_twins():
    z = torch.nn.functional.normalize(torch.tensor([[1.0, 0.1], [1.0, 0.0], [0.0, 1.0], [0.1, 1.0]]), dim=-1)
    labels, pairs = torch.tensor([0, 1, 0, 1]), torch.tensor([0, 0, 1, 1])
    assert contrastive_loss(z, labels, pairs, 0.5, "label", 4.0) > contrastive_loss(z, labels, pairs, 0.5, "label", 1.0)


def test_generalized_iou_known_values():
    a = torch.tensor([[0.0, 0.0, 0.5, 0.5], [0.0, 0.0, 0.2, 0.2]])
    b = torch.tensor([[0.25, 0.25, 0.75, 0.75], [0.8, 0.8, 1.0, 1.0]])
    # IoU 1/7, hull 0.5625; disjoint: IoU 0, hull 1, union 0.08
    expected = torch.tensor([1 / 7 - (0.5625 - 0.4375) / 0.5625, 0.0 - (1.0 - 0.08) / 1.0])
    assert torch.allclose(generalized_iou(a, b), expected, atol=1e-6)


# -- LDS --------------------------------------------------------------------------------------------------------------
def test_lda_separation_equals_direct_formula():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(40, 6))
    y = np.array([0, 1] * 20)
    x[y == 1, :2] += 1.5
    xs = (x - x.mean(0)) / x.std(0, ddof=1)
    m0, m1 = xs[y == 0].mean(0), xs[y == 1].mean(0)
    c = np.concatenate([xs[y == 0] - m0, xs[y == 1] - m1])
    sw = c.T @ c / (len(x) - 2)
    sw_shrunk = sw + (0.1 * np.trace(sw) / 6 + 1e-6) * np.eye(6)
    expected = (m1 - m0) @ np.linalg.solve(sw_shrunk, m1 - m0)
    assert lda_separation(torch.tensor(x), torch.tensor(y), 0.1) == pytest.approx(expected, rel=1e-9)


class PlantedVLM(VisionLanguageModel):
    """Hidden states read off the image: layer 3 carries the label (+2 on 4 of 8 dims), the others pure noise."""

    def __init__(self) -> None:
        super().__init__()
        self.tokenizer = train_bpe_tokenizer(["is it edited"], vocab_size=270, min_frequency=1)
        self.hidden_size, self.num_layers, self.num_visual_tokens = 8, 4, 1
        self.language_model = torch.nn.Linear(1, 1)
        self.vision = torch.nn.Conv2d(3, 3, 1)

    def forward(self, images, text_ids, text_mask=None):
        b, t = len(images), 1 + text_ids.shape[1]
        flat = images.flatten(1)  # 48 numbers per image: layers 0..4 read disjoint slices
        label = (images[:, 0, 0, 0] > 100).float()[:, None]
        states = []
        for layer in range(5):
            h = flat[:, 8 * layer:8 * layer + 8].clone()
            h[:, 0] = h[:, 0] % 100  # the label marker lives in pixel 0 only
            if layer == 3:
                h[:, :4] += 2.0 * label
            states.append(h[:, None].expand(b, t, 8))
        visual = torch.zeros(t, dtype=torch.bool)
        visual[0] = True
        return VLMOutput(tuple(states), torch.zeros(b, t, len(self.tokenizer)), visual, 1)


@register_backbone("test_planted_vlm")
def _planted() -> Backbone:
    """Planted-layer VLM (tests only)."""
    return Backbone(model=PlantedVLM(), family="test", identity="planted", preprocess=Preprocess(4))


def test_lds_picks_the_planted_layer_and_the_choice_is_stored(tmp_path):
    g = torch.Generator().manual_seed(0)
    images = torch.randn(48, 3, 4, 4, generator=g)
    labels = torch.arange(48) % 2
    images[:, 0, 0, 0] = images[:, 0, 0, 0].abs() % 1 + 200.0 * labels  # the marker the planted layer reads
    loader = [{"image": images[i:i + 16], "label": labels[i:i + 16]} for i in range(0, 48, 16)]
    model = ManipShield(backbone="test_planted_vlm", contrastive_weight=0.0, train_language_model=False,
                        eval_ela=False)
    assert int(model.lds_layer_selected) == -1
    assert model.select_layer(loader) == 3
    scores = model.report["lds"]["scores"]
    assert np.argmax(scores) == 2 and scores[2] > 10 * max(scores[:2] + scores[3:])
    assert int(model.lds_layer_selected) == 3 and model.hparams["lds_layer_selected"] == 3
    # stored in the checkpoint and reused by a model rebuilt from it alone
    import lightning.pytorch as pl

    ckpt = {"state_dict": model.state_dict(), "pytorch-lightning_version": pl.__version__,
            "hyper_parameters": dict(model.hparams)}
    model.on_save_checkpoint(ckpt)
    assert ckpt["state_dict"]["lds_layer_selected"].item() == 3
    torch.save(ckpt, tmp_path / "m.ckpt")
    again = ManipShield.from_checkpoint(tmp_path / "m.ckpt")
    assert int(again.lds_layer_selected) == 3


# -- the tiny VLM -------------------------------------------------------------------------------------------------------
TEXTS = ["Manipulated. In the centre of the image, a region was spliced in.",
         "Authentic. The image shows no manipulated region."]


def test_forward_backward_shapes_and_what_trains():
    model = ManipShield(backbone="tiny_vlm", vision_adapter=LoRAConfig(target="tiny_conv_1x1", r=2),
                        lds_layer=2, backbone_kwargs={"seed": 0}, eval_ela=False)
    model._build(tokenizer_texts=TEXTS * 3)
    model.train()
    b = 4
    batch = {"image": torch.randn(b, 3, 32, 32), "text": TEXTS * 2, "label": torch.tensor([1, 0, 1, 0]),
             "pair_id": torch.tensor([0, 0, 1, 1]), "has_box": torch.tensor([True, False, True, False]),
             "box": torch.tensor([[0.1, 0.2, 0.5, 0.6], [0, 0, 0, 0], [0.3, 0.3, 0.9, 0.8], [0, 0, 0, 0]]),
             "cues": torch.zeros(b, 12)}
    res = model(batch["image"], batch["text"])
    out = res["out"]
    assert len(out.hidden_states) == model.vlm.num_layers + 1 == 4
    assert out.hidden_states[2].shape[:1] == (b,) and out.hidden_states[2].shape[-1] == 32
    assert out.visual_mask.sum() == 4 and out.text_start == 4  # grid 2 -> 4 visual tokens
    assert res["score"].shape == (b,) and res["cue_logits"].shape == (b, 12) and res["box"].shape == (b, 4)
    assert (res["box"][:, 2:] >= res["box"][:, :2]).all() and res["z"].norm(dim=-1).allclose(torch.ones(b))
    parts = model.losses(batch)
    assert set(parts) == {"text", "contrastive", "detection", "cues", "box_l1", "box_giou", "loss"}
    parts["loss"].backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    assert any("lora_A" in n for n in grads) and any(n.startswith("vlm.projector") for n in grads)
    assert all(g is not None for n, g in grads.items() if "lora_B" in n or n.startswith("detection_head"))
    frozen = [n for n, p in model.named_parameters() if not p.requires_grad]
    assert frozen and all(n.startswith("vlm.vision.") and ".adapters." not in n for n in frozen)


def test_greedy_generate_with_cached_visual_tokens_equals_full_reruns():
    from visadapt.backbones import build_backbone
    from visadapt.backbones.vlm import VisionLanguageModel

    vlm = build_backbone("tiny_vlm", tokenizer_texts=TEXTS * 3, seed=1).model.eval()
    images, prefix = torch.randn(2, 3, 32, 32), torch.tensor([vlm.encode("Manipulated.")] * 2)
    assert vlm.greedy_generate(images, prefix, 8) == VisionLanguageModel.greedy_generate(vlm, images, prefix, 8)


# -- transformers VLMs from local folders --------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["llava", "qwen2_vl"])
def test_hf_vlm_from_a_local_folder_trains_through_manipshield(kind, tmp_path):
    from visadapt.backbones.vlm import save_tiny_llava, save_tiny_qwen2_vl

    folder = (save_tiny_llava if kind == "llava" else save_tiny_qwen2_vl)(tmp_path / kind)
    size = 8 if kind == "llava" else 56
    model = ManipShield(backbone="hf_vlm", backbone_kwargs={"model_dir": str(folder), "image_size": size},
                        vision_adapter=LoRAConfig(target="vision_attn_qv", r=2),
                        lm_adapter=LoRAConfig(target="lm_attn_qv", r=2), train_language_model=False, lds_layer=1,
                        eval_ela=False)
    n_visual = 16 if kind == "llava" else 4
    assert model.vlm.num_visual_tokens == n_visual and model.vlm.num_layers == 2
    res = model(torch.randn(2, 3, size, size), TEXTS)
    assert res["out"].visual_mask.sum() == n_visual and res["score"].shape == (2,)
    (res["lm_loss"] + res["score"].sum()).backward()
    trained = {n for n, p in model.named_parameters() if p.requires_grad and p.grad is not None}
    assert any("vision_tower" in n or "visual" in n for n in trained if "lora" in n)
    assert any("language_model" in n for n in trained if "lora" in n)
    assert not any(p.requires_grad for n, p in model.vlm.named_parameters() if ".adapters." not in n)


def test_qwen2_vl_patches_match_the_image_processor():
    from transformers import Qwen2VLImageProcessor

    from visadapt.backbones.vlm import qwen2_vl_patches

    img = np.random.default_rng(0).random((56, 84, 3)).astype(np.float32)
    proc = Qwen2VLImageProcessor(do_resize=False, do_rescale=False, do_normalize=False, patch_size=14,
                                 temporal_patch_size=2, merge_size=2)
    ref = proc(images=img, return_tensors="pt")["pixel_values"]
    got = qwen2_vl_patches(torch.from_numpy(img).permute(2, 0, 1)[None], 14, 2, 2)
    assert got.shape == ref.shape == (4 * 6, 3 * 2 * 14 * 14)
    assert torch.allclose(got, ref.float(), atol=1e-6)


# -- learning, checkpoint and report (shared tiny training run) ------------------------------------------------------
def test_learning_happens_on_generated_data(trained):
    rows = [r for r in trained["rows"] if r.get("train_text")]
    text = [float(r["train_text"]) for r in rows]
    assert len(text) >= 30
    assert np.mean(text[-5:]) < 0.8 * np.mean(text[:5])  # the language head learns the explanations
    det = [float(r["train_detection"]) for r in rows if r.get("train_detection")]
    assert det and np.mean(det[-5:]) < math.log(2)  # the detection BCE leaves chance level
    report = json.loads((trained["log_dir"] / "report.json").read_text())
    assert report["lds"]["step"] == 12 and 1 <= report["lds"]["layer"] <= 3
    assert set(report["manipshield"]["per_editor"]) == {"splicing"} == set(report["ela"]["per_editor"])
    assert report["held_out_editors"] == ["splicing"] and "splicing" not in report["train_editors"]
    assert "| splicing | manipshield |" in (trained["log_dir"] / "report.md").read_text()


def test_checkpoint_rebuilds_the_same_predictions(trained):
    model = trained["model"].eval()
    again = ManipShield.from_checkpoint(trained["ckpt"])
    assert int(again.lds_layer_selected) == int(model.lds_layer_selected) >= 1
    batch = next(iter(trained["dm"].test_dataloader()))
    a, b = model.predict_batch(batch["image"]), again.predict_batch(batch["image"])
    for k in ("score", "cues", "box"):
        assert torch.equal(a[k], b[k]), k
    ckpt = torch.load(trained["ckpt"], weights_only=True)
    assert not any(k.startswith("vlm.vision.") and ".adapters." not in k for k in ckpt["state_dict"])


def test_checkpoint_missing_a_trained_tensor_is_an_error(trained, tmp_path):
    from visadapt.methods.base import MissingCheckpointKeysError

    ckpt = torch.load(trained["ckpt"], weights_only=True)
    del ckpt["state_dict"]["detection_head.0.weight"]
    torch.save(ckpt, tmp_path / "broken.ckpt")
    with pytest.raises(MissingCheckpointKeysError, match="detection_head"):
        ManipShield.from_checkpoint(tmp_path / "broken.ckpt")


# -- the task and the paper configs ----------------------------------------------------------------------------------
def test_default_task_runs_under_fast_dev_run(gen_root, tmp_path, monkeypatch):
    from visadapt.cli import cli_main

    monkeypatch.chdir(tmp_path)
    task = yaml.safe_load((ROOT / "tasks" / "manipshield.yaml").read_text())
    assert task["data"]["init_args"]["test_editors"] and task["model"]["init_args"]["backbone"] == "manipshield_vlm"
    cli = cli_main(["fit", "-c", str(ROOT / "tasks" / "manipshield.yaml"), "--trainer.fast_dev_run=1",
                    "--trainer.accelerator=cpu", f"--data.init_args.root={gen_root}",
                    "--data.init_args.num_images=5", "--data.init_args.test_images=2",
                    "--data.init_args.dataset_kwargs={size: 64}", "--data.init_args.batch_size=4",
                    "--model.init_args.backbone_kwargs={image_size: 64}",
                    "--data.init_args.preprocess={image_size: 64, mean: [0.5, 0.5, 0.5], std: [0.5, 0.5, 0.5]}",
                    "--model.init_args.explain_eval_images=2", "--model.init_args.max_new_tokens=4"])
    model = cli.model
    assert model.preprocess.image_size == 64 and cli.datamodule.preprocess.image_size == 64
    assert int(model.lds_layer_selected) >= 1  # fast_dev_run is shorter than lds_at_step: selected at the end
    assert "auc" in model.report["manipshield"]["overall"] and "auc" in model.report["ela"]["overall"]


PAPER = sorted((ROOT / "configs" / "paper" / "manipshield").glob("*.yaml"))


def test_paper_configs_exist():
    assert {p.stem for p in PAPER} == {"llava", "qwen2_vl"}


@pytest.mark.parametrize("cfg", PAPER, ids=lambda p: p.stem)
def test_paper_config_parses_and_instantiates_with_tiny_overrides(cfg, tmp_path, gen_root):
    from lightning.pytorch import LightningDataModule
    from lightning.pytorch.cli import LightningCLI

    from visadapt.backbones.vlm import save_tiny_llava, save_tiny_qwen2_vl
    from visadapt.methods import AdapterModule

    folder = (save_tiny_llava if cfg.stem == "llava" else save_tiny_qwen2_vl)(tmp_path / cfg.stem)
    size = 8 if cfg.stem == "llava" else 28
    cli = LightningCLI(AdapterModule, LightningDataModule, subclass_mode_model=True, subclass_mode_data=True,
                       run=False, auto_configure_optimizers=False, save_config_callback=None, args=[
                           "-c", str(cfg), "--trainer.accelerator=cpu", "--trainer.precision=32",
                           "--trainer.logger=false",
                           f"--model.init_args.backbone_kwargs={{model_dir: {folder}, image_size: {size}}}",
                           "--data.init_args.dataset=generated_manipulations", f"--data.init_args.root={gen_root}"])
    model = cli.model
    raw = yaml.safe_load(cfg.read_text())["model"]["init_args"]
    assert model.hparams.vision_adapter["r"] == raw["vision_adapter"]["init_args"]["r"]
    assert model.hparams.lm_adapter["alpha"] == raw["lm_adapter"]["init_args"]["alpha"]
    assert not model.hparams.train_language_model
    assert model.vision_injection.matched and all("lora" not in n or p.requires_grad
                                                  for n, p in model.named_parameters())
