"""Text-to-image generation with a LoRA and the DECOR projection: ``generate`` and the alpha sweep ``t2i_sweep``.

Both read a task YAML (the one ``fit`` trains): the backbone from ``model.init_args.backbone`` /
``backbone_kwargs``, and prompts, undesired prompts, seeds and metric models from ``model.init_args.evaluation``
(:class:`~visadapt.methods.decor.DecorEvalConfig`). The LoRA is a diffusers ``pytorch_lora_weights.safetensors``
(``--ckpt``; default: the newest one under the task's run folder ``<save_dir>/<name>/version_*/``), loaded with
:func:`~visadapt.adapters.import_diffusers`, so a LoRA trained elsewhere works the same way.

DECOR edits only the prompt's per-token embeddings (``prompt_embeds``, every row); the negative embeddings are
projected only with ``project_negative`` and SDXL's pooled embedding only with ``project_pooled``.

``t2i_sweep`` generates every (alpha, prompt) cell for fixed seeds and scores it: CLIP-T (image vs. prompt without
the identifier), CLIP-I (image vs. the reference images of the task's data section) and DINO when a DINO model is
configured. Each finished cell is one file, ``cells/a<alpha>_p<prompt>.npz`` (images and scores), written to a
temporary name and renamed, so an interrupted sweep resumes without regenerating finished cells. It then writes
``table.md``, ``table.json``, ``pareto.png`` (CLIP-T against CLIP-I, one point per alpha) and ``grid.png``.
"""

from __future__ import annotations

import json
import os
import re
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from PIL import Image
from tqdm.auto import tqdm

from visadapt.adapters import import_diffusers
from visadapt.backbones import build_backbone, to_device
from visadapt.errors import UserError
from visadapt.methods.decor import DecorEvalConfig, DecorProjection, build_projection, check_alpha
from visadapt.metrics.alignment import clip_i, clip_t, dino_score, pareto_front

Runner = Callable[[list[str]], Any]
LORA_FILE = "pytorch_lora_weights.safetensors"
DEFAULT_BACKBONE = "visadapt_t2i_base"


# -- task reading -----------------------------------------------------------------------------------------------------


def _merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    """``extra`` over ``base``, dictionaries merged key by key, anything else replaced (as jsonargparse's -c)."""
    out = dict(base)
    for k, v in extra.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def read_task(task: str | Path | list[str]) -> dict[str, Any]:
    """The task YAML(s) as one dict (later files override earlier ones); a clear error naming the file when one is
    missing or invalid, or when the result is not a DreamBoothLoRA task."""
    cfg: dict[str, Any] = {}
    for one in ([task] if isinstance(task, (str, Path)) else list(task)):
        path = Path(one)
        if not path.is_file():
            raise UserError(f"task file not found: {path}")
        try:
            part = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as e:
            raise UserError(f"{path} is not valid YAML: {e}") from None
        if not isinstance(part, dict):
            raise UserError(f"{path}: a task file must be a YAML mapping")
        cfg = _merge(cfg, part)
    model = cfg.get("model") or {}
    if not isinstance(model, dict) or not str(model.get("class_path", "")).endswith("DreamBoothLoRA"):
        raise UserError(f"{task}: model.class_path must be DreamBoothLoRA (a text-to-image task), got "
                        f"{model.get('class_path') if isinstance(model, dict) else model!r}")
    return cfg


def _task_args(task: str | list[str]) -> list[str]:
    files = [task] if isinstance(task, str) else list(task)
    return [a for f in files for a in ("-c", str(f))]


def _init_args(section: dict[str, Any] | None) -> dict[str, Any]:
    return dict((section or {}).get("init_args") or {})


def evaluation_config(cfg: dict[str, Any], task: str | Path = "task") -> DecorEvalConfig:
    """The task's ``model.init_args.evaluation`` as a :class:`DecorEvalConfig` (defaults when absent)."""
    raw = _init_args(cfg.get("model")).get("evaluation") or {}
    try:
        return DecorEvalConfig(**raw)
    except TypeError as e:
        raise UserError(f"{task}: model.init_args.evaluation: {e}") from None


def run_folder(cfg: dict[str, Any]) -> Path:
    """``<save_dir>/<name>`` of the task's logger (``runs/default`` when the task names none)."""
    logger = (cfg.get("trainer") or {}).get("logger")
    init = _init_args(logger) if isinstance(logger, dict) else {}
    return Path(init.get("save_dir", "runs")) / str(init.get("name", "default"))


def newest_lora(cfg: dict[str, Any]) -> Path | None:
    """The LoRA of the newest ``version_N`` run of the task, or ``None``."""
    folder = run_folder(cfg)
    found = []
    for d in folder.glob("version_*"):
        m = re.fullmatch(r"version_(\d+)", d.name)
        if m and (d / LORA_FILE).is_file():
            found.append((int(m.group(1)), d / LORA_FILE))
    return max(found)[1] if found else None


def load_model(cfg: dict[str, Any], ckpt: str | None = None, no_lora: bool = False,
               backbone_kwargs: dict[str, Any] | None = None) -> tuple[Any, str, Path | None]:
    """Build the task's text-to-image backbone (``backbone_kwargs`` replace the task's) and load its LoRA; returns
    ``(model, identity, lora_file)``."""
    args = _init_args(cfg.get("model"))
    kwargs = backbone_kwargs if backbone_kwargs is not None else (args.get("backbone_kwargs") or {})
    bb = build_backbone(args.get("backbone", DEFAULT_BACKBONE), **kwargs)
    model = bb.model.eval()
    lora = None
    if not no_lora:
        lora = Path(ckpt) if ckpt else newest_lora(cfg)
        if lora is None:
            raise UserError(f"no LoRA found under {run_folder(cfg)}/version_*/{LORA_FILE}: train it first "
                            "(python -m visadapt fit -c <task>), pass --ckpt <file>, or --no_lora for the base model")
        if lora.is_dir():
            lora = lora / LORA_FILE
        if not lora.is_file():
            raise UserError(f"LoRA file not found: {lora}")
        components = {"unet": model.unet}
        if getattr(model, "text_encoder", None) is not None:
            components["text_encoder"] = model.text_encoder
        import_diffusers(lora, strict_components=False, **components)
        print(f"visadapt: LoRA {lora} loaded into {bb.identity}")
    return model, bb.identity, lora


# -- generation -------------------------------------------------------------------------------------------------------


@torch.no_grad()
def generate_images(model: Any, prompts: list[str], seeds: list[int], alpha: float = 0.0,
                    projection: DecorProjection | None = None, steps: int = 25, guidance_scale: float = 5.0,
                    negative_prompt: str = "") -> np.ndarray:
    """``(len(prompts), len(seeds), H, W, 3)`` uint8 images; the prompts' embeddings DECOR-projected with ``alpha``.

    The seeds fix the initial noise, so a prompt gives the same images for the same seeds at every alpha.
    """
    alpha = check_alpha(alpha)
    enc = model.encode_prompt(list(prompts))
    neg = model.encode_prompt([negative_prompt])
    if projection is not None and alpha > 0:
        enc = projection.apply(enc, alpha)
        neg = projection.apply(neg, alpha, negative=True)
    out = []
    for i in range(len(prompts)):
        images = model.sample(enc["prompt_embeds"][i : i + 1], neg["prompt_embeds"],
                              None if enc.get("pooled") is None else enc["pooled"][i : i + 1], neg.get("pooled"),
                              seeds=list(seeds), steps=steps, guidance_scale=guidance_scale)
        out.append(np.asarray(images.cpu() if isinstance(images, torch.Tensor) else images, dtype=np.uint8))
    return np.stack(out)


def image_grid(rows: np.ndarray, scale: int = 1, pad: int = 2) -> Image.Image:
    """A ``(R, C, H, W, 3)`` uint8 array as one grid image (white gutters), each image enlarged ``scale`` times."""
    r, c, h, w, _ = rows.shape
    hs, ws = h * scale, w * scale
    canvas = Image.new("RGB", (c * ws + (c + 1) * pad, r * hs + (r + 1) * pad), "white")
    for i in range(r):
        for j in range(c):
            tile = Image.fromarray(rows[i, j]).resize((ws, hs), Image.NEAREST)
            canvas.paste(tile, (pad + j * (ws + pad), pad + i * (hs + pad)))
    return canvas


def _atomic_save_image(image: Image.Image, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.stem}.tmp-{os.getpid()}{path.suffix}")
    image.save(tmp)
    os.replace(tmp, path)


def _scale_for(size: int) -> int:
    return max(1, 96 // size)


def generate(task: str | list[str], prompt: list[str] | None = None, alpha: list[float] = [0.0],  # noqa: B006
             ckpt: str | None = None, no_lora: bool = False, undesired: list[str] | None = None,
             seeds: list[int] | None = None, steps: int | None = None, guidance_scale: float | None = None,
             negative_prompt: str | None = None, project_negative: bool | None = None,
             project_pooled: bool | None = None, mode: str | None = None, out: str | None = None,
             save_images: str | None = None, num: int | None = None,
             backbone_kwargs: dict[str, Any] | None = None) -> Path:
    """Generate an image grid (rows: prompt x alpha, columns: seeds) with the task's model, LoRA and DECOR.

    Args:
        task: Task YAML (as for ``fit -c``), or several merged in order.
        prompt: Prompts (default: the task's ``evaluation.prompts``).
        alpha: DECOR projection degrees in [0, 1] (0 = no projection); one grid row per prompt and alpha.
        ckpt: diffusers LoRA file or folder; default: the newest run of the task.
        no_lora: Use the base model without LoRA.
        undesired: Undesired prompts (default: the task's ``evaluation.undesired``).
        seeds: Seeds, one image each (default: the task's).
        steps: Sampling steps (default: the task's).
        guidance_scale: Classifier-free guidance scale (default: the task's).
        negative_prompt: Negative prompt (default: the task's).
        project_negative: Project the negative embeddings too (default: the task's, normally no).
        project_pooled: SDXL: project the pooled embedding too (default: the task's, normally no).
        mode: Undesired-vector reading, ``words`` or ``axes`` (default: the task's).
        out: Grid PNG path; default ``<run folder>/generate/grid.png``.
        save_images: Also write every image as a PNG into this folder (e.g. class images for prior preservation).
        num: With ``save_images``: this many images per prompt (seeds 0..num-1), replacing ``seeds``.
        backbone_kwargs: Replace the task's ``model.init_args.backbone_kwargs`` (e.g. ``{model_dir: ...}``).
    """
    cfg = read_task(task)
    ev = evaluation_config(cfg, task)
    prompts = ev.resolved_prompts(list(prompt) if prompt else None)
    seeds = list(range(num)) if num else list(seeds or ev.seeds)
    overrides = {k: v for k, v in {"project_negative": project_negative, "project_pooled": project_pooled,
                                   "mode": mode}.items() if v is not None}
    decor = ev.decor()
    for k, v in overrides.items():
        setattr(decor, k, v)
    if undesired is not None:
        decor.undesired = list(undesired)
    alphas = [check_alpha(a) for a in alpha]
    model, identity, lora = load_model(cfg, ckpt, no_lora, backbone_kwargs)
    projection = None
    if any(a > 0 for a in alphas):
        if not decor.undesired:
            raise UserError("alpha > 0 needs undesired prompts: --undesired '[...]' or evaluation.undesired in the task")
        projection = build_projection(model.encode_prompt, decor)
        print(f"visadapt: DECOR projects out {decor.undesired} ({decor.mode} reading, rank {projection.rank})")
    rows, labels = [], []
    for p in tqdm(prompts, desc="prompts"):
        for a in alphas:
            rows.append(generate_images(model, [p], seeds, a, projection, steps or ev.steps,
                                        guidance_scale if guidance_scale is not None else ev.guidance_scale,
                                        ev.negative_prompt if negative_prompt is None else negative_prompt)[0])
            labels.append(f"{p} | alpha={a:g}")
    grid_rows = np.stack(rows)
    path = Path(out) if out else run_folder(cfg) / "generate" / "grid.png"
    _atomic_save_image(image_grid(grid_rows, _scale_for(grid_rows.shape[2])), path)
    path.with_suffix(".txt").write_text("rows (top to bottom):\n" + "\n".join(labels) + f"\ncolumns: seeds {seeds}\n"
                                        f"model: {identity}\nlora: {lora}\n")
    if save_images:
        folder = Path(save_images)
        for i, row in enumerate(grid_rows):
            for j, img in enumerate(row):
                _atomic_save_image(Image.fromarray(img), folder / f"{i:03d}_{seeds[j]:04d}.png")
        print(f"visadapt: {grid_rows.shape[0] * grid_rows.shape[1]} images written to {folder}")
    print(f"visadapt: grid written to {path} (rows: prompt x alpha, columns: seeds {seeds})")
    return path


# -- the sweep --------------------------------------------------------------------------------------------------------


class Scorer:
    """Embeds images and texts with the metric models and scores CLIP-T / CLIP-I / DINO."""

    def __init__(self, ev: DecorEvalConfig, references: list[Image.Image]) -> None:
        from visadapt.data.transforms import build_transform

        bb = build_backbone(ev.metric_backbone, **ev.metric_backbone_kwargs)
        self.metric_name = bb.identity
        self.clip = bb.model.eval()
        self.clip_tf = build_transform(bb.preprocess, train=False)
        self.dino = self.dino_tf = None
        if ev.dino_backbone:
            dbb = build_backbone(ev.dino_backbone, **ev.dino_backbone_kwargs)
            self.dino, self.dino_tf = dbb.model.eval(), build_transform(dbb.preprocess, train=False)
        self.ref_clip = self.image_features(references)
        self.ref_dino = self.dino_features(references) if self.dino is not None else None
        self.identifier = ev.identifier
        self.colour_match = ev.colour_match

    @torch.no_grad()
    def image_features(self, images: list[Image.Image]) -> torch.Tensor:
        batch = torch.stack([self.clip_tf(im) for im in images])
        return self.clip.encode_image(batch).float()

    @torch.no_grad()
    def dino_features(self, images: list[Image.Image]) -> torch.Tensor:
        feats = self.dino(torch.stack([self.dino_tf(im) for im in images]))
        return (feats if isinstance(feats, torch.Tensor) else feats[0]).float()

    def text_prompt(self, prompt: str) -> str:
        """The prompt without the identifier token (what CLIP-T compares with)."""
        return " ".join(w for w in prompt.split() if w != self.identifier)

    @torch.no_grad()
    def text_features(self, prompt: str) -> torch.Tensor:
        return self.clip.encode_text(to_device(self.clip.tokenize([self.text_prompt(prompt)]), "cpu")).float()

    def score(self, images: np.ndarray, prompt: str) -> dict[str, float]:
        pil = [Image.fromarray(im) for im in images]
        feats = self.image_features(pil)
        out = {"clip_t": clip_t(feats, self.text_features(prompt)), "clip_i": clip_i(feats, self.ref_clip)}
        if self.dino is not None:
            out["dino"] = dino_score(self.dino_features(pil), self.ref_dino)
        if self.colour_match:
            from visadapt.data.captions import COLOURS, colour_share

            named = [w for w in self.text_prompt(prompt).lower().split() if w in COLOURS]
            out["colour_match"] = (colour_share(torch.from_numpy(np.ascontiguousarray(images)), named[0])
                                   if len(named) == 1 else None)  # no (or an ambiguous) colour: not counted
        return out


def reference_images(cfg: dict[str, Any]) -> list[Image.Image]:
    """The subject's reference images from the task's data section (its registered dataset, no transform)."""
    from visadapt.data import DATASETS

    data = _init_args(cfg.get("data"))
    kwargs = dict(data.get("dataset_kwargs") or {})
    if data.get("root") is not None:
        kwargs["root"] = data["root"]
    ds = DATASETS.get(data.get("dataset", "dreambooth"))(**kwargs)
    return [ds.load(i) for i in range(len(ds))]


def _mean(values: list[float | None]) -> float | None:
    """Mean over the prompts that have the score (colour match is None for a prompt naming no colour)."""
    kept = [v for v in values if v is not None]
    return float(np.mean(kept)) if kept else None


def _cell_name(alpha: float, prompt_index: int) -> str:
    return f"a{alpha:.3f}_p{prompt_index:03d}"


def _save_cell(path: Path, images: np.ndarray, scores: dict[str, float], meta: dict[str, Any]) -> None:
    tmp = path.with_name(f"{path.stem}.tmp-{os.getpid()}.npz")
    np.savez(tmp, images=images, scores=json.dumps(scores), meta=json.dumps(meta))
    os.replace(tmp, path)


def _load_cell(path: Path) -> tuple[np.ndarray, dict[str, float]] | None:
    try:
        with np.load(path, allow_pickle=False) as z:
            return z["images"], json.loads(str(z["scores"]))
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile):  # a damaged cell is regenerated
        return None


def sweep_table(rows: list[dict[str, Any]], metric_name: str, has_dino: bool, text_axis: str = "clip_t") -> str:
    """Markdown table of the per-alpha means; the Pareto front is taken over (CLIP-I, ``text_axis``)."""
    has_colour = "colour_match" in rows[0]
    head = ("| alpha | CLIP-T | CLIP-I |" + (" DINO |" if has_dino else "") + (" colour match |" if has_colour else "")
            + " Pareto |")
    lines = [f"Metric model: {metric_name}" + (" (the offline DeViSE preset, not CLIP)" if "devise" in metric_name
                                               else ""), "", head, "|---" * (head.count("|") - 1) + "|"]
    front = set(pareto_front([(r["clip_i"], r[text_axis]) for r in rows]))
    for i, r in enumerate(rows):
        cells = [f"{r['alpha']:g}", f"{r['clip_t']:.4f}", f"{r['clip_i']:.4f}"]
        if has_dino:
            cells.append(f"{r['dino']:.4f}")
        if has_colour:
            cells.append("–" if r["colour_match"] is None else f"{r['colour_match']:.3f}")
        cells.append("yes" if i in front else "")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def pareto_plot(rows: list[dict[str, Any]], path: Path, metric_name: str, title: str = "DECOR alpha sweep",
                text_axis: str = "clip_t") -> None:
    """Text alignment (``text_axis``) against CLIP-I, one labelled point per alpha, the Pareto front marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    xs, ys = [r["clip_i"] for r in rows], [r[text_axis] for r in rows]
    fig, ax = plt.subplots(figsize=(4.6, 3.6), dpi=110)
    ax.plot(xs, ys, "o-", color="#4477aa", alpha=0.5, label="alpha 0 → 1")
    front = sorted(pareto_front(list(zip(xs, ys))), key=lambda i: xs[i])
    ax.plot([xs[i] for i in front], [ys[i] for i in front], "s", color="#cc3311", mfc="none", ms=10,
            label="Pareto front")
    for r, x, y in zip(rows, xs, ys):
        ax.annotate(f"α={r['alpha']:g}", (x, y), textcoords="offset points", xytext=(5, 4), fontsize=8)
    ax.set_xlabel("image alignment CLIP-I (to the references)")
    ax.set_ylabel("text alignment CLIP-T" if text_axis == "clip_t" else "text alignment: colour match")
    ax.set_title(f"{title}\n(metric model: {metric_name.split(':')[0]})", fontsize=9)
    ax.legend(fontsize=7, loc="best")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.stem}.tmp-{os.getpid()}.png")
    fig.savefig(tmp)
    plt.close(fig)
    os.replace(tmp, path)


def t2i_sweep(task: str | list[str], ckpt: str | None = None, out: str | None = None, alphas: list[float] | None = None,
              seeds: list[int] | None = None, prompts: list[str] | None = None, steps: int | None = None,
              fit: bool = False, fit_args: list[str] | None = None, backbone_kwargs: dict[str, Any] | None = None,
              runner: Runner | None = None) -> dict[str, Any]:
    """The DECOR alpha sweep: every (alpha, prompt) cell for fixed seeds, scored; table, Pareto plot and grid.

    Args:
        task: Task YAML (a DreamBoothLoRA task with an ``evaluation`` section), or several merged in order.
        ckpt: diffusers LoRA file or folder; default: the newest run of the task.
        out: Sweep folder; default ``<run folder>/sweep``. Finished cells in ``cells/`` are reused.
        alphas: Projection degrees (default: the task's, 0, 0.25, 0.5, 0.75, 1).
        seeds: Seeds, one image each per prompt (default: the task's).
        prompts: Evaluation prompts (default: the task's).
        steps: Sampling steps (default: the task's).
        fit: Train the LoRA first (``python -m visadapt fit -c <task>``), then sweep with it.
        fit_args: Extra ``fit`` arguments with ``fit``, e.g. ``["--trainer.max_steps=10"]``; the sweep then uses
            the backbone the fit used.
        backbone_kwargs: Replace the task's ``model.init_args.backbone_kwargs`` (e.g. ``{model_dir: ...}``).
        runner: Runs ``fit`` from its arguments (the CLI passes its own).
    """
    cfg = read_task(task)
    ev = evaluation_config(cfg, task)
    if fit:
        if runner is None:
            raise TypeError("t2i_sweep(fit=True) needs runner= (python -m visadapt t2i_sweep passes it)")
        cli = runner(["fit", *_task_args(task), *(fit_args or [])])
        lora_file = getattr(cli.model, "lora_file", None)
        if lora_file is None:
            raise UserError("the fit wrote no LoRA file (model.init_args.save_lora false, or fast_dev_run)")
        ckpt = str(lora_file)
        cfg["model"].setdefault("init_args", {})["backbone"] = cli.model.hparams["backbone"]
        if backbone_kwargs is None:
            backbone_kwargs = dict(cli.model.hparams.get("backbone_kwargs") or {})
    alphas = [check_alpha(a) for a in (alphas if alphas is not None else ev.alphas)]
    seeds, prompts = list(seeds or ev.seeds), ev.resolved_prompts(list(prompts) if prompts else None)
    steps = steps or ev.steps
    out_dir = Path(out) if out else run_folder(cfg) / "sweep"
    (out_dir / "cells").mkdir(parents=True, exist_ok=True)
    model, identity, lora = load_model(cfg, ckpt, backbone_kwargs=backbone_kwargs)
    decor = ev.decor()
    projection = build_projection(model.encode_prompt, decor) if any(a > 0 for a in alphas) else None
    scorer = Scorer(ev, reference_images(cfg))
    print(f"visadapt: text/image alignment scored with {scorer.metric_name}"
          + (" — the offline DeViSE dual encoder (EfficientNet-Lite0 + MiniLM), NOT CLIP" if "devise" in
             scorer.metric_name else ""))
    meta = {"model": identity, "lora": str(lora), "seeds": seeds, "steps": steps, "undesired": decor.undesired,
            "mode": decor.mode, "guidance_scale": ev.guidance_scale}
    cells: dict[tuple[float, int], tuple[np.ndarray, dict[str, float]]] = {}
    todo = [(a, i) for a in alphas for i in range(len(prompts))]
    reused = 0
    for a, i in tqdm(todo, desc="sweep cells"):
        path = out_dir / "cells" / f"{_cell_name(a, i)}.npz"
        cell_meta = {**meta, "alpha": a, "prompt": prompts[i]}
        loaded = _load_cell(path) if path.is_file() else None
        if loaded is not None:
            if ev.colour_match and "colour_match" not in loaded[1]:  # a cell from a sweep without the flag
                loaded = (loaded[0], scorer.score(loaded[0], prompts[i]))  # rescore its images, keep them
                _save_cell(path, loaded[0], loaded[1], cell_meta)
            cells[(a, i)] = loaded
            reused += 1
            continue
        images = generate_images(model, [prompts[i]], seeds, a, projection, steps, ev.guidance_scale,
                                 ev.negative_prompt)[0]
        scores = scorer.score(images, prompts[i])
        _save_cell(path, images, scores, cell_meta)
        cells[(a, i)] = (images, scores)
    if reused:
        print(f"visadapt: {reused} finished cell(s) reused from {out_dir / 'cells'}")
    rows = []
    for a in alphas:
        per = [cells[(a, i)][1] for i in range(len(prompts))]
        row = {"alpha": a, **{k: _mean([p[k] for p in per]) for k in per[0]}}
        row["per_prompt"] = per
        rows.append(row)
    has_dino = "dino" in rows[0]
    if any(r.get(ev.text_axis) is None for r in rows):
        raise UserError(f"evaluation.text_axis {ev.text_axis!r} is not scored: set evaluation.colour_match: true, and "
                        "let at least one prompt name a colour")
    table = sweep_table(rows, scorer.metric_name, has_dino, ev.text_axis)
    (out_dir / "table.md").write_text(table)
    result = {"task": task if isinstance(task, str) else list(task), **meta, "metric_model": scorer.metric_name,
              "prompts": prompts,
              "rows": rows, "text_axis": ev.text_axis,
              "pareto": [rows[i]["alpha"] for i in pareto_front([(r["clip_i"], r[ev.text_axis])
                                                                                for r in rows])],
              "reused_cells": reused}
    (out_dir / "table.json").write_text(json.dumps(result, indent=1))
    pareto_plot(rows, out_dir / "pareto.png", scorer.metric_name, text_axis=ev.text_axis)
    grid = np.stack([np.stack([cells[(a, i)][0][0] for i in range(len(prompts))]) for a in alphas])
    _atomic_save_image(image_grid(grid, _scale_for(grid.shape[2])), out_dir / "grid.png")
    (out_dir / "grid.txt").write_text(f"rows: alpha {alphas}\ncolumns: prompts (seed {seeds[0]})\n"
                                      + "\n".join(prompts) + "\n")
    print(table)
    print(f"visadapt: sweep written to {out_dir} (table.md, table.json, pareto.png, grid.png)")
    return result


# -- command lines ----------------------------------------------------------------------------------------------------


def _parse(fn: Callable, prog: str, args: list[str], skip: set[str]) -> dict[str, Any]:
    from jsonargparse import ArgumentParser

    parser = ArgumentParser(prog=prog, description=(fn.__doc__ or "").split("\n\n")[0], parser_mode="yaml")
    parser.add_argument("-c", "--config_task", dest="task", action="append",
                        help="Task YAML; repeat to merge several (later ones override)")
    parser.add_function_arguments(fn, skip=skip | {"task"})
    cfg = parser.parse_args(args)
    kwargs = {k: v for k, v in vars(cfg).items() if not k.startswith("__")}
    if not kwargs.get("task"):
        parser.error("a task YAML is required: -c tasks/<task>.yaml")
    return kwargs


def generate_main(args: list[str]) -> Path:
    """``python -m visadapt generate -c <task.yaml> --prompt '[...]' --alpha '[0, 1]' [--ckpt ...] ...``."""
    return generate(**_parse(generate, "python -m visadapt generate", args, set()))


def t2i_sweep_main(args: list[str], runner: Runner | None = None) -> dict[str, Any]:
    """``python -m visadapt t2i_sweep -c <task.yaml> [--fit true] [--ckpt ...]``."""
    return t2i_sweep(**_parse(t2i_sweep, "python -m visadapt t2i_sweep", args, {"runner"}), runner=runner)


__all__ = ["generate", "generate_images", "generate_main", "image_grid", "load_model", "newest_lora", "pareto_plot",
           "read_task", "reference_images", "sweep_table", "t2i_sweep", "t2i_sweep_main"]
