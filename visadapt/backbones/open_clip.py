"""open_clip dual encoders, loaded offline from a local file, a ``local-dir:`` folder, or open_clip's cache.

``open_clip_backbone`` builds any open_clip architecture, optionally loads weights, normalises attention (fused
``in_proj_weight`` -> ``attn.qkv`` / ``attn.proj`` Linears, see :mod:`visadapt.backbones.attention`) and wraps the
towers in :class:`OpenCLIPDualEncoder`. Module names then read ``visual.transformer.resblocks.N.attn.qkv`` and
``text.transformer.resblocks.N.attn.qkv`` whatever the architecture's text tower layout, because the model is
always built with open_clip's custom-text layout (a ``text`` submodule); open_clip converts checkpoints written in
the classic layout when it loads them.

Pitfalls handled here (see ``reference/style_and_ecosystem.md`` §4.6):

* **QuickGELU.** OpenAI's CLIP weights were trained with QuickGELU. open_clip checks this only for pretrained *tags*;
  with a file path nothing warns and accuracy drops silently (open_clip #771). This builder turns QuickGELU on
  when the file name contains ``openai`` (or the tag's config asks for it) and prints a note.
* **Unsafe unpickling.** ``.pt``/``.bin`` checkpoints are read with ``torch.load(weights_only=True)``. The original
  OpenAI release files are TorchScript archives, which ``weights_only`` refuses. A TorchScript archive is code, so
  it is read (with ``torch.jit.load``, then converted to a temporary safetensors file) only when the user opts in
  with ``allow_torchscript=True``.
* **Downloads.** Only a known pretrained tag can trigger open_clip's downloader; in offline mode the tag must
  already be in the cache, and the error says so.
"""

from __future__ import annotations

import logging
import os
import tempfile
import warnings
import zipfile
from copy import deepcopy
from pathlib import Path
from typing import Any

import torch
from torch import nn

from visadapt.backbones._registry import register_backbone
from visadapt.backbones.attention import matching_presets
from visadapt.backbones.attention import normalize_attention as _normalize_attention
from visadapt.backbones.base import Backbone, DualEncoder, Preprocess

log = logging.getLogger(__name__)

__all__ = [
    "OPEN_CLIP_PRESETS",
    "TINY_OPEN_CLIP_CFG",
    "TINY_OPEN_CLIP_NAME",
    "OpenCLIPDualEncoder",
    "open_clip_backbone",
    "register_open_clip_config",
    "tiny_open_clip_backbone",
]

_WEIGHT_SUFFIXES = (".safetensors", ".pt", ".pth", ".bin", ".ckpt", ".npz")

TINY_OPEN_CLIP_NAME = "visadapt-tiny-clip"
"""open_clip architecture name under which the tiny test configuration is registered."""

TINY_OPEN_CLIP_CFG: dict[str, Any] = {
    "embed_dim": 32,
    # head_width 32 on width 64 gives 2 vision heads.
    "vision_cfg": {"image_size": 32, "patch_size": 8, "width": 64, "head_width": 32, "layers": 2},
    # The real CLIP context length and vocabulary, so that the real BPE tokenizer and prompt learners apply.
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2},
}
"""A two-layer CLIP (vision width 64, text width 32) that runs in milliseconds on a CPU."""

_BLOCK = r"transformer\.resblocks\.\d+"
# Each preset is a list of alternatives; a ``[q,k,v]`` suffix belongs to its own alternative.
_TOWER_PRESETS: dict[str, list[str]] = {
    "attn_qkv": [rf"{_BLOCK}\.attn\.qkv[q,k,v]"],
    "attn_qv": [rf"{_BLOCK}\.attn\.qkv[q,v]"],
    "attn_qkv_fused": [rf"{_BLOCK}\.attn\.qkv"],
    "attn_proj": [rf"{_BLOCK}\.attn\.proj"],
    "attn_qkv_proj": [rf"{_BLOCK}\.attn\.qkv[q,k,v]", rf"{_BLOCK}\.attn\.proj"],
    "mlp": [rf"{_BLOCK}\.mlp\.(c_fc|c_proj)"],
    "all_linear": [rf"{_BLOCK}\.attn\.qkv[q,k,v]", rf"{_BLOCK}\.(attn\.proj|mlp\.(c_fc|c_proj))"],
}


def _towers(prefix: str) -> dict[str, str]:
    return {name: "|".join(f"{prefix}\\.{alt}" for alt in alts) for name, alts in _TOWER_PRESETS.items()}


OPEN_CLIP_PRESETS: dict[str, str] = {
    **_towers("(visual|text)"),
    **{f"vision_{name}": rule for name, rule in _towers("visual").items()},
    **{f"text_{name}": rule for name, rule in _towers("text").items()},
}
"""Target presets on normalised open_clip towers, meaning what they mean on every family: ``attn_qkv`` is three
independent adapters on the q, k and v slices of the fused qkv Linear (``[q,k,v]``; CLIP-LoRA's placement, as
the three Linears of ``hf_clip``), ``attn_qkv_fused`` one adapter on the whole fused matrix (one down-projection
shared by q, k and v). ``vision_*`` / ``text_*`` restrict a preset to one tower.

Presets that match no module of a given model (for instance the attention presets of a timm vision tower) are
left out of that backbone's ``target_presets``.
"""


class OpenCLIPDualEncoder(DualEncoder):
    """open_clip towers behind the :class:`~visadapt.backbones.base.DualEncoder` interface.

    Holds the two towers as ``visual`` and ``text`` (so module names match the presets); the CLIP temperature is
    a fixed float.

    Args:
        model: An open_clip model with the custom-text layout (``model.visual`` and ``model.text``).
        tokenizer: open_clip tokenizer (callable on a list of strings).
    """

    def __init__(self, model: nn.Module, tokenizer: Any) -> None:
        super().__init__()
        if not hasattr(model, "text"):
            raise TypeError("OpenCLIPDualEncoder needs open_clip's custom-text layout (build with force_custom_text)")
        self.visual = model.visual
        self.text = model.text
        self.tokenizer = tokenizer
        self.logit_scale = float(model.logit_scale.detach().exp().reshape(-1)[0])
        bias = getattr(model, "logit_bias", None)
        self.logit_bias = None if bias is None else float(bias.detach().reshape(-1)[0])
        self.context_length = int(getattr(model.text, "context_length", 77))

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        """Unnormalised image embeddings ``(B, embed_dim)``."""
        return _first(self.visual(images))

    def tokenize(self, texts: list[str] | str) -> torch.Tensor:
        """Token ids ``(N, context_length)`` (LongTensor on the CPU) from the model's own tokenizer."""
        return self.tokenizer([texts] if isinstance(texts, str) else list(texts))

    def encode_text(self, tokens: torch.Tensor) -> torch.Tensor:
        """Unnormalised text embeddings ``(N, embed_dim)`` from token ids."""
        return _first(self.text(tokens))


def _first(out: Any) -> torch.Tensor:
    # CoCa towers return (latent, tokens); the contrastive latent comes first.
    return out[0] if isinstance(out, tuple) else out


def register_open_clip_config(name: str, cfg: dict[str, Any]) -> None:
    """Make ``cfg`` available to ``open_clip.create_model(name)``, in memory (no file is written).

    Args:
        name: Architecture name; must not shadow a built-in open_clip config with a different content.
        cfg: open_clip model config (``embed_dim``, ``vision_cfg``, ``text_cfg`` ...).
    """
    from open_clip import factory

    current = factory.get_model_config(name)
    if current is not None and current != cfg:
        raise ValueError(f"open_clip config {name!r} already exists with a different content")
    # open_clip rebuilds this dict on every rescan but keeps the entries it holds, so the entry survives
    # later add_model_config() calls. Always go through the module attribute: the dict object is replaced.
    factory._MODEL_CONFIGS[name] = deepcopy(cfg)


def _is_torchscript(path: Path) -> bool:
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as zf:
        names = zf.namelist()
    return any(n.endswith("constants.pkl") or "/code/" in n for n in names)


def _torchscript_to_safetensors(path: Path, out_dir: str) -> str:
    """Convert a TorchScript archive (the original OpenAI release) to a safetensors state dict."""
    from safetensors.torch import save_file

    log.info("open_clip: %s is a TorchScript archive; reading its weights with torch.jit.load", path.name)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # torch 2.10+ marks TorchScript as deprecated
            scripted = torch.jit.load(str(path), map_location="cpu")
    except (AttributeError, RuntimeError) as err:
        raise RuntimeError(
            f"could not read the TorchScript archive {path} ({err}). Convert it once with a PyTorch version that "
            "still reads TorchScript: save torch.jit.load(path).state_dict() with safetensors.torch.save_file."
        ) from err
    skip = {"input_resolution", "context_length", "vocab_size"}
    state = {
        k: v.detach().float().contiguous() if v.is_floating_point() else v.detach().contiguous()
        for k, v in scripted.state_dict().items()
        if isinstance(v, torch.Tensor) and k not in skip and not k.endswith("attn_mask")
    }
    out = os.path.join(out_dir, path.stem + ".safetensors")
    save_file(state, out)
    return out


def _resolve_source(model_name: str, pretrained: str | None) -> tuple[str, str | None, str, str | None]:
    """Return ``(model_name, pretrained_for_open_clip, kind, weights_label)``.

    ``kind`` is ``random``, ``file``, ``tag`` or ``local-dir``.
    """
    import open_clip

    if model_name.startswith("local-dir:"):
        folder = Path(model_name[len("local-dir:"):]).expanduser()
        _check_local_dir(folder)
        if pretrained:
            raise ValueError("pretrained must be empty when model_name is 'local-dir:<folder>' (weights come from it)")
        return f"local-dir:{folder}", None, "local-dir", folder.name
    if model_name.startswith("hf-hub:"):
        raise ValueError(
            f"model_name={model_name!r} needs the Hugging Face Hub; visadapt loads open_clip models offline. "
            "Download the repository once and pass model_name='local-dir:<folder>' instead."
        )
    if pretrained in (None, "", "none", "random"):
        return model_name, None, "random", "random"
    path = Path(pretrained).expanduser()
    if path.is_dir():
        _check_local_dir(path)
        return f"local-dir:{path}", None, "local-dir", path.name
    if path.is_file():
        return model_name, str(path), "file", path.name
    tags = open_clip.list_pretrained_tags_by_model(model_name)
    if pretrained in tags or pretrained.lower() in tags:
        return model_name, pretrained, "tag", pretrained
    if path.suffix in _WEIGHT_SUFFIXES or os.sep in pretrained or "/" in pretrained:
        raise FileNotFoundError(
            f"open_clip weights file not found: {path}. Expected a state-dict file (.safetensors preferred; "
            f".pt/.bin are read with weights_only=True) for architecture {model_name!r}, or a folder with "
            "open_clip_config.json plus open_clip_model.safetensors (pass it as model_name='local-dir:<folder>')."
        )
    raise ValueError(
        f"pretrained={pretrained!r} is neither an existing file nor a known open_clip tag for {model_name!r}; "
        f"known tags: {', '.join(tags) or '(none)'}"
    )


def _check_local_dir(folder: Path) -> None:
    if not (folder / "open_clip_config.json").is_file():
        raise FileNotFoundError(
            f"open_clip local folder {folder} has no open_clip_config.json. Expected layout: "
            f"{folder}/open_clip_config.json (with 'model_cfg' and optional 'preprocess_cfg') and "
            f"{folder}/open_clip_model.safetensors."
        )


def _auto_quick_gelu(model_name: str, kind: str, pretrained: str | None, label: str | None) -> bool | None:
    """QuickGELU decision when the caller left it to us (None keeps the architecture's own setting)."""
    import open_clip

    if kind == "tag" and pretrained is not None:
        if open_clip.get_pretrained_cfg(model_name, pretrained).get("quick_gelu", False):
            return True
    elif kind == "file" and label is not None and "openai" in label.lower():
        return True
    return None


def _preprocess(model: nn.Module) -> tuple[Preprocess, dict[str, Any]]:
    cfg = dict(getattr(model.visual, "preprocess_cfg", {}) or {})
    size = cfg.get("size", getattr(model.visual, "image_size", 224))
    if isinstance(size, (tuple, list)):
        image_size = int(size[0]) if len(set(size)) == 1 else int(max(size))
    else:
        image_size = int(size)
    pre = Preprocess(image_size=image_size)
    if cfg.get("mean") is not None:
        pre.mean = tuple(float(v) for v in cfg["mean"])
    if cfg.get("std") is not None:
        pre.std = tuple(float(v) for v in cfg["std"])
    if cfg.get("interpolation"):
        pre.interpolation = str(cfg["interpolation"])
    return pre, cfg


@register_backbone("open_clip")
def open_clip_backbone(
        model_name: str = "ViT-B-16",
        pretrained: str | None = None,
        normalize_attention: bool = True,
        quick_gelu: bool | None = None,
        image_size: int | None = None,
        context_length: int | None = None,
        precision: str = "fp32",
        allow_torchscript: bool = False,
) -> Backbone:
    """An open_clip CLIP model as a dual encoder, loaded offline.

    Args:
        model_name: open_clip architecture (``ViT-B-16``, ``ViT-B-16-quickgelu``, ``RN50`` ...) or
            ``local-dir:<folder>`` with ``open_clip_config.json`` plus weights.
        pretrained: Weights: None for random init; a local file (``.safetensors`` preferred; ``.pt``/``.bin``
            are read with ``weights_only=True``; TorchScript archives such as OpenAI's originals are converted); a
            folder (same as ``local-dir:``); or an open_clip tag such as ``openai`` or ``laion2b_s34b_b88k``, which
            must already be in the cache when offline.
        normalize_attention: Replace the fused ``in_proj_weight`` attention with ``qkv``/``proj`` Linears so that
            adapters can target q, k, v (outputs are unchanged).
        quick_gelu: Use QuickGELU. None decides automatically: on when the weights file name contains
            ``openai`` or the tag's config asks for it, otherwise the architecture's own setting.
        image_size: Override the vision tower's input size (position embeddings of loaded weights are resized).
        context_length: Override the text context length.
        precision: open_clip precision string (``fp32``, ``bf16``, ``fp16``, ``pure_bf16`` ...).
        allow_torchscript: Read a TorchScript ``pretrained`` archive (OpenAI's original ``.pt`` files) with
            ``torch.jit.load``. A TorchScript archive is code: loading it runs what it contains, so it is refused
            unless this is ``True``; pass it only for files from a source you trust, or convert the file once to
            safetensors.

    Returns:
        A :class:`Backbone` whose ``model`` is an :class:`OpenCLIPDualEncoder`.

    Raises:
        FileNotFoundError: When ``pretrained`` looks like a path that does not exist, or a folder lacks
            ``open_clip_config.json``.
        RuntimeError: When a pretrained tag is not in the local cache and the machine is offline.
    """
    import open_clip

    name, oc_pretrained, kind, label = _resolve_source(model_name, pretrained)
    force_quick_gelu = False
    model_kwargs: dict[str, Any] = {}
    if quick_gelu is None:
        quick_gelu = _auto_quick_gelu(name, kind, oc_pretrained, label)
        if quick_gelu:
            log.warning("open_clip: using QuickGELU activations for %s (OpenAI-trained weights need them; "
                        "pass quick_gelu=False to keep GELU)", label)
    if quick_gelu:
        force_quick_gelu = True
    elif quick_gelu is False:
        model_kwargs["quick_gelu"] = False  # overrides '-quickgelu' architectures too

    with tempfile.TemporaryDirectory(prefix="visadapt-open_clip-") as tmp:
        if kind == "file" and _is_torchscript(Path(oc_pretrained)):
            if not allow_torchscript:
                raise ValueError(
                    f"open_clip: {oc_pretrained} is a TorchScript archive, which is code (torch.jit.load runs it). "
                    "It is refused unless you opt in for a file you trust: backbone_kwargs={allow_torchscript: "
                    "true}; or convert it once to safetensors and pass that file")
            oc_pretrained = _torchscript_to_safetensors(Path(oc_pretrained), tmp)
        try:
            model = open_clip.create_model(
                name,
                pretrained=oc_pretrained,
                precision=precision,
                force_quick_gelu=force_quick_gelu,
                force_custom_text=True,
                force_image_size=image_size,
                force_context_length=context_length,
                weights_only=True,
                **model_kwargs,
            )
        except RuntimeError as err:
            if kind == "tag" and os.environ.get("HF_HUB_OFFLINE", "0") not in ("", "0", "false", "False"):
                raise RuntimeError(
                    f"open_clip weights {name!r}/{pretrained!r} are not in the local cache and HF_HUB_OFFLINE is "
                    "set, so they cannot be downloaded. Pass pretrained=<path to a local .safetensors file> "
                    "or model_name='local-dir:<folder>' instead."
                ) from err
            raise
    tokenizer = _tokenizer(name, context_length)
    n_attn = _normalize_attention(model) if normalize_attention else 0
    encoder = OpenCLIPDualEncoder(model, tokenizer)
    preprocess, preprocess_cfg = _preprocess(model)

    arch = "local-dir" if kind == "local-dir" else name
    uses_quick_gelu = _uses_quick_gelu(model)
    if uses_quick_gelu and not arch.endswith("-quickgelu"):
        arch = f"{arch}-quickgelu"
    presets = matching_presets(encoder, OPEN_CLIP_PRESETS) if normalize_attention else {}
    return Backbone(
        model=encoder,
        family="open_clip",
        identity=f"open_clip:{arch}:{label}",
        target_presets=presets,
        preprocess=preprocess,
        extra={
            "model_name": name,
            "pretrained": pretrained,
            "quick_gelu": uses_quick_gelu,
            "attention_normalized": n_attn,
            "context_length": encoder.context_length,
            "feature_dim": getattr(model.visual, "output_dim", None),
            "block_pattern": r"resblocks\.(\d+)\.",  # block index, searched in parameter names of either tower
            "preprocess_cfg": preprocess_cfg,
        },
    )


def _tokenizer(name: str, context_length: int | None) -> Any:
    import open_clip

    key = (name, context_length)
    if name.startswith("local-dir:"):  # files may change between calls
        return open_clip.get_tokenizer(name, context_length=context_length)
    if key not in _TOKENIZERS:  # building the BPE tables takes a noticeable fraction of a second
        _TOKENIZERS[key] = open_clip.get_tokenizer(name, context_length=context_length)
    return _TOKENIZERS[key]


_TOKENIZERS: dict[tuple[str, int | None], Any] = {}


def _uses_quick_gelu(model: nn.Module) -> bool:
    from open_clip.transformer import QuickGELU

    return any(isinstance(m, QuickGELU) for m in model.modules())


@register_backbone("tiny_open_clip")
def tiny_open_clip_backbone(
        pretrained: str | None = None,
        normalize_attention: bool = True,
        quick_gelu: bool | None = None,
        seed: int | None = None,
        allow_torchscript: bool = False,
) -> Backbone:
    """A two-layer, randomly initialised open_clip CLIP (32x32 images, real CLIP tokenizer) for tests and demos.

    Args:
        pretrained: Optional local weights file for the tiny architecture (used by round-trip tests).
        normalize_attention: Replace fused attention projections with ``qkv``/``proj`` Linears.
        quick_gelu: As in ``open_clip``; None decides from the file name.
        seed: Seed for the random weights; None draws them from the global random state.
        allow_torchscript: Read a TorchScript ``pretrained`` archive (code; see :func:`open_clip_backbone`).
    """
    register_open_clip_config(TINY_OPEN_CLIP_NAME, TINY_OPEN_CLIP_CFG)
    with torch.random.fork_rng(devices=[], enabled=seed is not None):
        if seed is not None:
            torch.manual_seed(seed)
        return open_clip_backbone(
            TINY_OPEN_CLIP_NAME, pretrained=pretrained, normalize_attention=normalize_attention,
            quick_gelu=quick_gelu, allow_torchscript=allow_torchscript,
        )
