"""DreamBooth-LoRA training (Lightning) on a tiny random pipeline, and the DreamBooth folder reader."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from visadapt.data import create_dataset
from visadapt.data.base import BadImageError
from visadapt.data.dreambooth import DreamBoothDataModule
from visadapt.methods.decor import DecorConfig, DreamBoothLoRA

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::DeprecationWarning",
                                        "ignore:.*does not have many workers.*", "ignore:.*LeafSpec.*")


def _write_images(folder, n, seed, size=16):
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(n):
        Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(folder / f"{i:02d}.png")


def _val_loss(model, dm) -> float:
    model.eval()
    losses = []
    with torch.no_grad():
        for b, batch in enumerate(dm.val_dataloader()):
            images, prompts, is_class = model._flatten_batch(batch)
            gen = torch.Generator().manual_seed(1234 + b)
            losses.append(float(model.noise_prediction_loss(images, prompts, is_class, generator=gen)["loss"]))
    return float(np.mean(losses))


def test_training_loss_decreases_with_prior_preservation(tmp_path):
    import lightning.pytorch as pl

    pl.seed_everything(0)
    _write_images(tmp_path / "data" / "red_cube", 3, 0)
    (tmp_path / "data" / "prompts_and_classes.txt").write_text("subject_name,class\nred_cube,cube\n")
    _write_images(tmp_path / "class", 4, 1)
    model = DreamBoothLoRA(backbone="tiny_sd", optimizer=lambda p: torch.optim.AdamW(p, lr=3e-2))
    base = {k: v.clone() for k, v in model.t2i.unet.state_dict().items() if "adapters" not in k}
    dm = DreamBoothDataModule(dataset="dreambooth", root=str(tmp_path / "data"), dataset_kwargs={"subject": "red_cube"},
                              instance_prompt="a photo of sks cube", class_root=str(tmp_path / "class"),
                              class_prompt="a photo of cube", num_class_images=4, batch_size=2,
                              preprocess=model.preprocess)
    dm.setup("fit")
    assert dm.train_set.instance.classnames == ["cube"]  # from prompts_and_classes.txt
    batch = next(iter(dm.train_dataloader()))
    assert batch["image"].shape == (2, 3, 16, 16) and batch["class_image"].shape == (2, 3, 16, 16)
    before = _val_loss(model, dm)
    trainer = pl.Trainer(max_steps=40, accelerator="cpu", logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                         limit_val_batches=0, default_root_dir=tmp_path)
    trainer.fit(model, dm)
    after = _val_loss(model, dm)
    # the loss is measured with fixed noise and timesteps (deterministic): any drop is learning, not sampling
    # noise. The default recipe (rank-4 LoRA on attention only) cannot cancel the random convolutions' output, so
    # the drop is bounded (about 5% in 40 steps here)
    assert after < 0.97 * before, (before, after)
    # only the LoRA trained: the UNet's own weights are bit-identical
    for k, v in model.t2i.unet.state_dict().items():
        if k in base:
            assert torch.equal(v, base[k]), k
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".adapters." in n and n.startswith("t2i.unet.") for n in trainable)
    assert (tmp_path / "pytorch_lora_weights.safetensors").is_file()  # diffusers-format export at the end of fit


def test_loss_is_instance_plus_weighted_prior():
    model = DreamBoothLoRA(backbone="tiny_sd", prior_loss_weight=0.5)
    images = torch.rand(4, 3, 16, 16) * 2 - 1
    prompts = ["a sks cube", "a sks cube", "a cube", "a cube"]
    is_class = torch.tensor([False, False, True, True])
    with torch.no_grad():
        out = model.noise_prediction_loss(images, prompts, is_class, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(out["loss"], out["instance_loss"] + 0.5 * out["prior_loss"])
    assert float(out["prior_loss"]) > 0 and float(out["instance_loss"]) > 0
    assert not torch.allclose(out["instance_loss"], out["prior_loss"])


def test_train_decor_projects_the_training_prompt():
    model = DreamBoothLoRA(backbone="tiny_sd", train_decor=DecorConfig(undesired=["red"]))
    enc = model.encode(["a red cube"])
    plain = model.t2i.encode_prompt(["a red cube"])["prompt_embeds"]
    basis = model._train_projection.token_projector
    assert (enc["prompt_embeds"] @ basis).abs().max() < 1e-5
    assert not torch.allclose(enc["prompt_embeds"], plain)


def test_dreambooth_reader_errors_name_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a folder"):
        create_dataset("dreambooth", root=str(tmp_path / "missing"))
    _write_images(tmp_path / "ds" / "dog", 2, 0)
    with pytest.raises(FileNotFoundError, match=r"sub-folders \['dog'\]"):
        create_dataset("dreambooth", root=str(tmp_path / "ds"))
    (tmp_path / "ds" / "dog" / "02.png").write_bytes(b"not an image")
    ds = create_dataset("dreambooth", root=str(tmp_path / "ds"), subject="dog")
    assert ds.classnames == ["dog"] and len(ds) == 3
    with pytest.raises(BadImageError, match="02.png"):
        ds[2]
    skipped = create_dataset("dreambooth", root=str(tmp_path / "ds" / "dog"), on_bad_image="skip")
    assert len(skipped) == 2 and "02.png" in skipped.skipped[0]
    dm = DreamBoothDataModule(root=str(tmp_path / "ds" / "dog"), class_root=str(tmp_path / "ds" / "dog"),
                              class_prompt="a dog", num_class_images=50, on_bad_image="skip")
    with pytest.raises(ValueError, match="holds 2 class images"):
        dm.setup("fit")


def test_fashion_subject_is_one_two_tone_item():
    ds = create_dataset("fashion_subject", count=4)
    views = [np.asarray(ds.load(i)).astype(int) for i in range(4)]
    assert views[0].shape == (32, 32, 3) and (views[0][:2] == 255).all()  # white padding, as the base model's data
    v = views[0]
    red = (v[..., 0] > v[..., 2] + 60) & (v.sum(-1) < 600)
    blue = (v[..., 2] > v[..., 0] + 60) & (v.sum(-1) < 600)
    assert red.sum() > 20 and blue.sum() > 20
    assert np.nonzero(red)[0].max() <= np.nonzero(blue)[0].min() + 1  # red above the middle, blue below
    np.testing.assert_array_equal(views[1], views[0][:, ::-1])  # view 2 is the mirror image


def test_colour_share_counts_the_garment_pixels_in_the_asked_colour():
    from visadapt.data.captions import COLOURS, colour_share, colourise

    # a 2x4 garment at full ink on white: left half red, right half green; half ink reads as the same paint
    gray = np.zeros((1, 8, 8), np.uint8)
    gray[0, 2:6, 0:8] = 255
    img = ((colourise(gray, np.array([COLOURS["red"]]), pad=0) + 1) * 127.5).round().permute(0, 2, 3, 1)
    green = ((colourise(gray, np.array([COLOURS["green"]]), pad=0) + 1) * 127.5).round().permute(0, 2, 3, 1)
    img[:, :, 4:] = green[:, :, 4:]
    img = img.to(torch.uint8)
    assert colour_share(img, "red") == 0.5 and colour_share(img, "green") == 0.5 and colour_share(img, "blue") == 0.0
    # a garment with lighter parts (ink 160 of 255 next to full ink) still reads as one paint
    shaded = gray.copy()
    shaded[0, 2:6, 4:] = 160
    blue = ((colourise(shaded, np.array([COLOURS["blue"]]), pad=0) + 1) * 127.5).round()
    assert colour_share(blue.permute(0, 2, 3, 1).to(torch.uint8), "blue") == 1.0
    assert colour_share(torch.full((1, 8, 8, 3), 255, dtype=torch.uint8), "red") == 0.0  # no garment at all
    with pytest.raises(ValueError, match="unknown colour"):
        colour_share(img, "teal")
    # the offline subject: its ink splits between red and blue, none green
    ds = create_dataset("fashion_subject", count=1)
    subject = torch.from_numpy(np.asarray(ds.load(0)).copy())[None]
    red, blue = colour_share(subject, "red"), colour_share(subject, "blue")
    assert red > 0.25 and blue > 0.25 and red + blue > 0.95 and colour_share(subject, "green") == 0.0
