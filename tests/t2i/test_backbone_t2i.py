"""Text-to-image backbones: prompt encoding against diffusers' own pipelines, seeded sampling, local folders, the
tiny trained base model (it follows class and colour prompts) and its training task."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from visadapt.backbones import build_backbone
from visadapt.backbones.t2i import T2I_BASE_TRAIN_COMMAND, TextToImage, t2i_base_dirs
from visadapt.errors import UserError

ROOT = Path(__file__).resolve().parents[2]
PROMPTS = ["a photo of sks dog", "a red cube on a table"]


@pytest.fixture(scope="module")
def tiny_sd() -> TextToImage:
    return build_backbone("tiny_sd", seed=0).model


@pytest.fixture(scope="module")
def tiny_sdxl() -> TextToImage:
    return build_backbone("tiny_sdxl", seed=0).model


def test_sd_encode_prompt_equals_the_diffusers_pipeline(tiny_sd):
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline(unet=tiny_sd.unet, vae=tiny_sd.vae, text_encoder=tiny_sd.text_encoder,
                                   tokenizer=tiny_sd.tokenizer, scheduler=tiny_sd.sample_scheduler,
                                   safety_checker=None, feature_extractor=None, image_encoder=None,
                                   requires_safety_checker=False)
    enc = tiny_sd.encode_prompt(PROMPTS)
    ref, _ = pipe.encode_prompt(PROMPTS, "cpu", 1, False)
    assert enc["prompt_embeds"].shape == (2, 77, 32) and enc["pooled"] is None
    assert enc["attention_mask"].shape == (2, 77) and enc["input_ids"].shape == (2, 77)
    assert torch.equal(enc["prompt_embeds"], ref)


def test_sdxl_prompt_is_both_penultimate_states_concatenated_and_pooled_from_encoder_2(tiny_sdxl):
    from diffusers import StableDiffusionXLPipeline

    enc = tiny_sdxl.encode_prompt(PROMPTS)
    assert enc["prompt_embeds"].shape == (2, 77, 64) and enc["pooled"].shape == (2, 32)
    # direct computation from the two encoders
    states, last = [], []
    for tok, model in zip(tiny_sdxl.tokenizers, tiny_sdxl.text_encoders):
        ids = tok(PROMPTS, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
        out = model(ids, output_hidden_states=True)
        states.append(out.hidden_states[-2])
        last.append(out.hidden_states[-1])
    torch.testing.assert_close(enc["prompt_embeds"], torch.cat(states, -1), rtol=0, atol=0)
    torch.testing.assert_close(enc["pooled"], out.text_embeds, rtol=0, atol=0)
    assert not torch.allclose(enc["prompt_embeds"], torch.cat(last, -1))  # the penultimate rule matters
    # and diffusers' own SDXL pipeline agrees
    pipe = StableDiffusionXLPipeline(vae=tiny_sdxl.vae, text_encoder=tiny_sdxl.text_encoder,
                                     text_encoder_2=tiny_sdxl.text_encoder_2, tokenizer=tiny_sdxl.tokenizers[0],
                                     tokenizer_2=tiny_sdxl.tokenizers[1], unet=tiny_sdxl.unet,
                                     scheduler=tiny_sdxl.sample_scheduler)
    ref, _, ref_pooled, _ = pipe.encode_prompt(PROMPTS, device="cpu", num_images_per_prompt=1,
                                               do_classifier_free_guidance=False)
    torch.testing.assert_close(enc["prompt_embeds"], ref, rtol=0, atol=1e-6)
    torch.testing.assert_close(enc["pooled"], ref_pooled, rtol=0, atol=1e-6)


def test_token_rows_find_the_word(tiny_sd):
    rows = tiny_sd.token_rows("a photo of sks dog", "dog")
    assert "".join(rows.tokens[i] for i in rows.rows) == "dog</w>"  # byte-level tokenizer: one row per letter
    assert rows.rows == [12, 13, 14] and rows.content_rows == list(range(1, 15))
    assert rows.pad_rows == list(range(16, 77)) and rows.tokens[15] == "<|endoftext|>"
    twice = tiny_sd.token_rows("a dog and a dog", "dog")
    assert len(twice.rows) == 6
    with pytest.raises(UserError, match="cat"):
        tiny_sd.token_rows("a photo of sks dog", "cat")


def test_sample_is_a_function_of_the_seed(tiny_sd):
    enc = tiny_sd.encode_prompt(PROMPTS)
    a = tiny_sd.sample(enc["prompt_embeds"], seeds=[3, 4], steps=3, guidance_scale=2.0)
    b = tiny_sd.sample(enc["prompt_embeds"][[1, 0]], seeds=[4, 3], steps=3, guidance_scale=2.0)
    assert a.dtype == torch.uint8 and a.shape == (2, 16, 16, 3)
    assert torch.equal(a, b[[1, 0]])  # same seed and prompt -> same image, whatever the batch position
    c = tiny_sd.sample(enc["prompt_embeds"], seeds=[5, 6], steps=3, guidance_scale=2.0)
    assert not torch.equal(a, c)
    one = tiny_sd.generate(PROMPTS[:1], seeds=[3], steps=3, guidance_scale=2.0)
    assert torch.equal(one, a[:1])
    # the pipeline's own latent, scheduled the same way: our denoising loop equals diffusers' pipeline call
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline(unet=tiny_sd.unet, vae=tiny_sd.vae, text_encoder=tiny_sd.text_encoder,
                                   tokenizer=tiny_sd.tokenizer, scheduler=tiny_sd.sample_scheduler,
                                   safety_checker=None, feature_extractor=None, image_encoder=None,
                                   requires_safety_checker=False)
    neg = tiny_sd.encode_prompt([""])["prompt_embeds"]
    ref = pipe(prompt_embeds=enc["prompt_embeds"][:1], negative_prompt_embeds=neg, num_inference_steps=3,
               guidance_scale=2.0, latents=tiny_sd.initial_noise([3]), output_type="np", height=16, width=16).images
    ours = a[:1].float()
    assert (torch.from_numpy(ref * 255).round() - ours).abs().max() <= 1  # uint8 rounding


def test_sd_local_reads_a_saved_pipeline_folder(tiny_sd, tmp_path):
    for name in ("unet", "vae", "text_encoder", "tokenizer"):
        getattr(tiny_sd, name).save_pretrained(tmp_path / name)
    tiny_sd.noise_scheduler.save_pretrained(tmp_path / "scheduler")
    loaded = build_backbone("sd_local", model_dir=str(tmp_path)).model
    assert torch.equal(loaded.encode_prompt(PROMPTS)["prompt_embeds"], tiny_sd.encode_prompt(PROMPTS)["prompt_embeds"])
    x = torch.randn(1, 4, 8, 8)
    emb = tiny_sd.encode_prompt(PROMPTS[:1])["prompt_embeds"]
    torch.testing.assert_close(loaded.unet_forward(x, torch.tensor([10]), emb), tiny_sd.unet_forward(x, torch.tensor([10]), emb), rtol=0, atol=1e-5)
    with pytest.raises(FileNotFoundError, match="text_encoder_2"):
        build_backbone("sdxl_local", model_dir=str(tmp_path))


def test_missing_base_weights_say_how_to_train_them(tmp_path):
    with pytest.raises(UserError, match="visadapt fit -c tasks/t2i_base.yaml"):
        build_backbone("visadapt_t2i_base", model_dir=str(tmp_path))
    assert T2I_BASE_TRAIN_COMMAND in (ROOT / "tasks" / "t2i_base.yaml").read_text()


def test_shipped_base_follows_class_and_colour_prompts():
    from visadapt.data.captions import CLASS_WORDS, fashion_class_means, score_samples

    package = t2i_base_dirs()[-1]  # the package's copy, not a user's cache (which would be found first)
    assert (package / "t2i_base.json").is_file(), "the trained base must ship in visadapt/assets/t2i_base"
    model = build_backbone("visadapt_t2i_base", model_dir=str(package)).model
    assert sum(p.numel() for p in model.unet.parameters()) < 2.5e6
    classes, colours = [1, 7, 8, 3], ["black", "red", "blue", "yellow"]  # trousers, sneaker, bag, dress
    prompts = [f"a photo of a {c} {CLASS_WORDS[k]}" for k, c in zip(classes, colours)]
    seeds = [0, 1, 2]
    enc = model.encode_prompt(prompts)["prompt_embeds"].repeat_interleave(len(seeds), 0)
    images = model.sample(enc, seeds=seeds * len(prompts), steps=10, guidance_scale=1.5)
    labels = [k for k in classes for _ in seeds]
    scores = score_samples(images, labels, [c for c in colours for _ in seeds], fashion_class_means(per_class=50))
    assert scores["class_agreement"] >= CLASS_AGREEMENT_MIN, scores  # chance: 0.1
    assert scores["colour_agreement"] >= COLOUR_AGREEMENT_MIN, scores  # chance: 0.125
    # same seeds, two class prompts: the images differ, and each is nearer its own class mean
    pair = model.encode_prompt(["a photo of a black trousers", "a photo of a black bag"])["prompt_embeds"]
    a, b = model.sample(pair, seeds=[7, 7], steps=10, guidance_scale=1.5)
    assert (a.float() - b.float()).abs().mean() > 10


CLASS_AGREEMENT_MIN = 0.5
COLOUR_AGREEMENT_MIN = 0.5


@pytest.mark.slow  # MiniLM, two Fashion-MNIST splits, 10 prompts sampled and scored: the heaviest test here
def test_t2i_base_task_trains_exports_and_reloads(tmp_path):
    from visadapt.cli import cli_main

    cli = cli_main(["fit", "-c", str(ROOT / "tasks" / "t2i_base.yaml"), "--trainer.max_steps=2",
                    "--trainer.max_time=null", "--trainer.accelerator=cpu",
                    "--data.init_args.dataset_kwargs={limit: 256}", "--data.init_args.batch_size=4",
                    "--model.init_args.eval_seeds=1", "--model.init_args.eval_steps=2",
                    f"--trainer.logger.init_args.save_dir={tmp_path}", f"--trainer.default_root_dir={tmp_path}"])
    report = cli.model.report
    assert report["steps"] == 2 and 0 <= report["eval_class_agreement"] <= 1
    out = Path(report["exported"])
    meta = json.loads((out / "t2i_base.json").read_text())
    assert meta["trained_steps"] == 2 and meta["max_length"] == 16
    reloaded = build_backbone("visadapt_t2i_base", model_dir=str(out)).model
    ema = cli.model.ema_unet.state_dict()
    for k, v in reloaded.unet.state_dict().items():  # exported in float16: the EMA weights to fp16 precision
        torch.testing.assert_close(v, ema[k].half().float(), rtol=0, atol=0)
    assert (out.parent / "samples.png").is_file() and (out.parent / "loss.png").is_file()


def test_base_exports_record_their_prediction_type_and_load_with_it(tmp_path):
    from visadapt.backbones.t2i import T2I_BASE_META, save_t2i_base

    for kind in ("sample", "epsilon"):
        built = build_backbone("visadapt_t2i_base", pretrained=False, seed=0, prediction_type=kind).model
        assert built.prediction_type == kind
        folder = save_t2i_base(built, tmp_path / kind, {"version": "test"})
        assert json.loads((folder / T2I_BASE_META).read_text())["scheduler"]["prediction_type"] == kind
        loaded = build_backbone("visadapt_t2i_base", model_dir=str(folder)).model
        assert loaded.prediction_type == kind and loaded.sample_scheduler.config.prediction_type == kind
    # a folder from before the json recorded a scheduler is an epsilon model
    meta = json.loads((tmp_path / "sample" / T2I_BASE_META).read_text())
    del meta["scheduler"]
    (tmp_path / "sample" / T2I_BASE_META).write_text(json.dumps(meta))
    assert build_backbone("visadapt_t2i_base", model_dir=str(tmp_path / "sample")).model.prediction_type == "epsilon"
    with pytest.raises(ValueError, match="prediction_type"):
        build_backbone("visadapt_t2i_base", pretrained=False, prediction_type="x0")
