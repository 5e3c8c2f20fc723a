"""Build time and Fashion-MNIST accuracy of the offline DeViSE preset (``devise_effnet_minilm``).

Builds the preset twice (the first build fits and caches the text->image map unless the cache already holds it; the
second reads the cache), then measures zero-shot and K-shot nearest-class-mean top-1 on Fashion-MNIST with the
preset's own eval transform. Prints the numbers and writes ``benchmarks/results/devise_eval.json``.

    python benchmarks/devise_eval.py                      # 1,000 test images, 16 shots, seeds 1 2 3
    python benchmarks/devise_eval.py --refit              # time a cold build (fits the map again)
    python benchmarks/devise_eval.py --test-per-class 50 --seeds 1

The results are discussed in ``docs/devise_and_coop.md``. This file is evaluation code: it reads the data layer,
so it lives here and not in ``visadapt/backbones/`` (backbones never import data).
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from visadapt.backbones import Backbone
from visadapt.backbones.devise import FIT_TEMPLATE, DeViSEDualEncoder, devise_effnet_minilm

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results" / "devise_eval.json"


@torch.no_grad()
def image_features(model: DeViSEDualEncoder, dataset: Any, indices: list[int], batch_size: int = 50) -> torch.Tensor:
    """L2-normalised image features of ``dataset[indices]`` (samples are dicts with a transformed ``image``)."""
    feats = [model.encode_image(torch.stack([dataset[i]["image"] for i in indices[s:s + batch_size]])
                                .contiguous(memory_format=torch.channels_last))  # faster convolutions on CPU
             for s in range(0, len(indices), batch_size)]
    return F.normalize(torch.cat(feats), dim=-1)


def fashion_mnist_eval(backbone: Backbone | None = None, test_per_class: int = 100, shots: int = 16,
                       seeds: tuple[int, ...] = (1, 2, 3), template: str = FIT_TEMPLATE,
                       root: str | None = None) -> dict[str, Any]:
    """Zero-shot and K-shot nearest-class-mean top-1 of the DeViSE preset on Fashion-MNIST (reference §2.3).

    Images are inverted to dark-on-white (``fashion_mnist(invert=True)``), grey replicated to RGB by the dataset and
    upsampled from 28 to 224 px (bicubic) by the backbone's eval transform. The test images are ``test_per_class``
    per class drawn with seed 0; the shots come from the train split, one draw per seed (no seeds: zero-shot only).

    Returns:
        ``zero_shot`` and ``ncm`` (mean over seeds) top-1, ``ncm_per_seed``, ``n_test`` and ``seconds``.
    """
    from visadapt.data.fashion_mnist import FASHION_MNIST_CLASSES, fashion_mnist
    from visadapt.data.fewshot import sample_per_class
    from visadapt.data.transforms import build_transform

    start = time.perf_counter()
    backbone = backbone or devise_effnet_minilm()
    model = backbone.model.eval()
    transform = build_transform(backbone.preprocess, train=False)
    test = fashion_mnist(root, split="test", transform=transform, invert=True)
    test_idx = sample_per_class(test.labels, test_per_class, seed=0)
    y_test = torch.tensor([test.labels[i] for i in test_idx])
    x_test = image_features(model, test, test_idx)

    with torch.no_grad():
        prompts = [template.format(c) for c in FASHION_MNIST_CLASSES]
        text = F.normalize(model.encode_text(model.tokenize(prompts)), dim=-1)
    zero_shot = (x_test @ text.T).argmax(1).eq(y_test).float().mean().item()

    train = fashion_mnist(root, split="train", transform=transform, invert=True)
    ncm = []
    for seed in seeds:
        idx = sample_per_class(train.labels, shots, seed)
        feats, labels = image_features(model, train, idx), torch.tensor([train.labels[i] for i in idx])
        means = torch.stack([feats[labels == c].mean(0) for c in range(len(FASHION_MNIST_CLASSES))])
        ncm.append((x_test @ F.normalize(means, dim=-1).T).argmax(1).eq(y_test).float().mean().item())
    return {"zero_shot": zero_shot, "ncm": sum(ncm) / len(ncm) if ncm else None, "ncm_per_seed": ncm,
            "n_test": len(test_idx), "shots": shots, "seconds": time.perf_counter() - start}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Build the preset (timed), print its Fashion-MNIST zero-shot and few-shot accuracy, write the JSON."""
    parser = argparse.ArgumentParser(prog="benchmarks/devise_eval.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--cache-dir", default=None, help="cache folder (default $VISADAPT_CACHE or ~/.cache/visadapt)")
    parser.add_argument("--refit", action="store_true", help="fit the text->image map again (times a cold build)")
    parser.add_argument("--test-per-class", type=int, default=100)
    parser.add_argument("--shots", type=int, default=16)
    parser.add_argument("--seeds", type=int, nargs="*", default=[1, 2, 3])
    parser.add_argument("--root", default=None, help="Fashion-MNIST folder (default: the Debian location)")
    parser.add_argument("--out", default=str(RESULTS), help="JSON file for the results")
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

    builds = []
    for label, refit in (("first build" + (" (refit)" if args.refit else ""), args.refit), ("second build", False)):
        start = time.perf_counter()
        backbone = devise_effnet_minilm(cache_dir=args.cache_dir, refit=refit)
        builds.append({"label": label, "seconds": time.perf_counter() - start,
                       "map_fitted": backbone.extra["projection_fitted"]})
        print(f"{label}: {builds[-1]['seconds']:.1f} s, map fitted: {backbone.extra['projection_fitted']}, "
              f"cache: {backbone.extra['projection_cache']}", flush=True)
    r = fashion_mnist_eval(backbone, args.test_per_class, args.shots, tuple(args.seeds), root=args.root)
    print(f"Fashion-MNIST, {r['n_test']} test images (inverted, 224 px), threads={torch.get_num_threads()}")
    print(f"  zero-shot top-1 ('{FIT_TEMPLATE}'): {r['zero_shot']:.3f}")
    if r["ncm"] is not None:
        print(f"  {r['shots']}-shot nearest class mean top-1: {r['ncm']:.3f} (seeds {args.seeds}: "
              f"{', '.join(f'{a:.3f}' for a in r['ncm_per_seed'])})")
    print(f"  evaluation time: {r['seconds']:.0f} s")
    result = {"builds": builds, "threads": torch.get_num_threads(), "seeds": args.seeds, **r}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"written to {out}")
    return result


if __name__ == "__main__":
    main()
