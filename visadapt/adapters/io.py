"""Adapter files: visadapt's own format, the PEFT directory format, and the diffusers LoRA file. Safetensors only.

* :func:`save_adapter` / :func:`load_adapter`: ``visadapt_adapter.safetensors`` (tensors keyed by the model's
  state-dict keys) plus ``visadapt_adapter.json`` (variant, config, base model identity, and per layer the base
  weight shape, slices and tensor shapes). Loading checks the identity and the shapes before touching the model
  and names the first layer that does not fit. Every variant round-trips exactly.
* :func:`export_peft` / :func:`import_peft`: ``adapter_config.json`` + ``adapter_model.safetensors`` as written
  by ``PeftModel.save_pretrained`` (keys ``base_model.model.<module>.lora_A.weight``). A LoRA on whole layers is
  exported as is. Every other variant here is an exact low-rank update ``s * B_eff A_eff`` and is exported as
  the equivalent plain LoRA: fused-qkv slice adapters become one full-width LoRA of rank ``sum r`` whose ``B``
  has zero rows for the slices that are not adapted (k), Block-LoRA a rank-``r/n`` LoRA with ``B = sum B_i``,
  Comp-LoRA a rank-``r`` LoRA with the bases folded into ``A`` and ``B``. Ranks and alphas that differ from the
  config's go to PEFT's ``rank_pattern`` / ``alpha_pattern``. A variant without a low-rank form raises.
* :func:`export_diffusers`: ``pytorch_lora_weights.safetensors`` with ``unet.`` / ``text_encoder.`` / ...
  prefixes and PEFT-style keys, for ``pipe.load_lora_weights``. The scale is folded into ``B`` because diffusers
  assumes ``alpha = r`` when the file carries no alphas.
"""

from __future__ import annotations

import json
import os
import math
import re
from collections import Counter
from dataclasses import asdict, fields
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from visadapt.adapters._registry import ADAPTERS, variant_name
from visadapt.adapters.base import ADAPTER_CONTAINER, AdapterConfig, AdapterLayer
from visadapt.adapters.inject import (
    _inject_modules,
    adapter_layers,
    adapter_names,
    adapter_state_dict,
    load_adapter_state_dict,
    set_active_adapter,
)
from visadapt.adapters.lora import LoRAConfig
from visadapt.errors import CorruptFileError

FORMAT = "visadapt-adapter"
FORMAT_VERSION = 1
CONFIG_FILE = "visadapt_adapter.json"
WEIGHTS_FILE = "visadapt_adapter.safetensors"
PEFT_CONFIG_FILE = "adapter_config.json"
PEFT_WEIGHTS_FILE = "adapter_model.safetensors"
DIFFUSERS_WEIGHTS_FILE = "pytorch_lora_weights.safetensors"
_PEFT_PREFIX = "base_model.model."


def _layers_with(model: nn.Module, name: str) -> list[tuple[str, AdapterLayer]]:
    layers = [(n, layer) for n, layer in adapter_layers(model) if name in layer.adapters]
    if not layers:
        raise KeyError(f"adapter {name!r} not found; this model has {adapter_names(model) or '(none)'}")
    return layers


def _shape(t: Tensor) -> list[int]:
    return [int(s) for s in t.shape]


def _tensors_for_file(state: dict[str, Tensor]) -> dict[str, Tensor]:
    return {k: v.detach().contiguous().cpu() for k, v in state.items()}


# --- visadapt format ----------------------------------------------------------------------------------------------


def save_adapter(model: nn.Module, path_dir: str | Path, base_identity: str, name: str = "default") -> Path:
    """Write adapter ``name`` to ``path_dir`` (created if needed); returns the directory.

    ``base_identity`` describes the base model (``Backbone.identity``); :func:`load_adapter` can check it.
    """
    path = Path(path_dir)
    path.mkdir(parents=True, exist_ok=True)
    layers = _layers_with(model, name)
    config = layers[0][1].configs[name]
    state = adapter_state_dict(model, name)
    layer_info = {}
    for module_name, layer in layers:
        prefix = f"{module_name}."
        slices = layer.slices[name]
        layer_info[module_name] = {
            "layer": type(layer.base_layer).__name__,
            "weight_shape": _shape(layer.base_weight),
            "slices": list(slices) if slices else None,
            "tensors": {k[len(prefix) :]: _shape(v) for k, v in state.items() if k.startswith(prefix)},
        }
    meta = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "name": name,
        "variant": variant_name(config),
        "config": asdict(config),
        "base_identity": base_identity,
        "layers": layer_info,
    }
    text = json.dumps(meta, indent=2)
    # each file is written next to its target and renamed, so a kill never leaves a half-written adapter file
    tmp = path / f"{WEIGHTS_FILE}.tmp-{os.getpid()}"
    save_file(_tensors_for_file(state), str(tmp), metadata={"visadapt": text})
    os.replace(tmp, path / WEIGHTS_FILE)
    tmp = path / f"{CONFIG_FILE}.tmp-{os.getpid()}"
    tmp.write_text(text + "\n")
    os.replace(tmp, path / CONFIG_FILE)
    return path


def _config_from_dict(variant: str, values: dict) -> AdapterConfig:
    cls = ADAPTERS.get(variant).config_class
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ValueError(f"{cls.__name__} has no field(s) {unknown}; the file was written by another visadapt version")
    return cls(**values)


def load_adapter(
    model: nn.Module, path_dir: str | Path, base_identity: str | None = None, name: str = "default"
) -> AdapterConfig:
    """Load an adapter saved by :func:`save_adapter` into ``model`` as adapter ``name``; returns its config.

    The adapter is injected first (on exactly the layers recorded in the file) unless ``name`` already exists on
    those layers. Raises ``ValueError`` before changing the model when ``base_identity`` is given and differs
    from the recorded one, or when a recorded layer is missing or has another shape (naming the first one).
    """
    path = Path(path_dir)
    if not (path / CONFIG_FILE).is_file():
        raise FileNotFoundError(f"{path} has no {CONFIG_FILE}; is it a visadapt adapter directory?")
    try:
        meta = json.loads((path / CONFIG_FILE).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CorruptFileError(f"{path / CONFIG_FILE} is not valid JSON ({e}); save the adapter again") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise ValueError(f"{path / CONFIG_FILE} is not a {FORMAT} file")
    if base_identity is not None and meta["base_identity"] != base_identity:
        raise ValueError(f"adapter in {path} was saved for base model {meta['base_identity']!r}, not {base_identity!r}")
    config = _config_from_dict(meta["variant"], meta["config"])
    existing = name in adapter_names(model)
    plan = {}
    for module_name, info in meta["layers"].items():
        try:
            module = model.get_submodule(module_name)
        except AttributeError:
            raise ValueError(f"layer {module_name!r} of the adapter in {path} does not exist in this model") from None
        weight = module.base_weight if isinstance(module, AdapterLayer) else getattr(module, "weight", None)
        if weight is None or _shape(weight) != info["weight_shape"]:
            got = None if weight is None else tuple(weight.shape)
            raise ValueError(
                f"layer {module_name!r}: the adapter in {path} expects a base weight of shape "
                f"{tuple(info['weight_shape'])}, this model has {got}"
            )
        if existing and not (isinstance(module, AdapterLayer) and name in module.adapters):
            raise ValueError(f"adapter {name!r} exists in the model but not on layer {module_name!r}")
        plan[module_name] = tuple(info["slices"]) if info["slices"] else None
    saved, wanted = f".{ADAPTER_CONTAINER}.{meta['name']}.", f".{ADAPTER_CONTAINER}.{name}."
    state = {k.replace(saved, wanted, 1): v for k, v in _read_safetensors(path / WEIGHTS_FILE).items()}
    # Inject and load as one step: any failure (a missing or mis-shaped tensor) leaves the model as it was.
    originals = {m: model.get_submodule(m) for m in plan}
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    before = {k: v.detach().clone() for k, v in adapter_state_dict(model, name).items()} if existing else {}
    try:
        if not existing:
            _inject_modules(model, config, name, plan)
        load_adapter_state_dict(model, state, strict=True)
    except Exception:
        if existing:
            load_adapter_state_dict(model, before, strict=False)
        else:
            for module_name, original in originals.items():
                if isinstance(original, AdapterLayer):
                    for table in (original.adapters, original.slices, original.configs):
                        if name in table:
                            del table[name]
                else:
                    parent, _, child = module_name.rpartition(".")
                    setattr(model.get_submodule(parent), child, original)
        named = dict(model.named_parameters())
        for n, flag in flags.items():
            if n in named:
                named[n].requires_grad_(flag)
        raise
    if not existing:
        set_active_adapter(model, name)
    return config


def _read_safetensors(file: Path) -> dict[str, Tensor]:
    """``safetensors.torch.load_file`` with errors that name the file."""
    if not file.is_file():
        raise FileNotFoundError(f"adapter weights file missing: {file}")
    try:
        return load_file(str(file))
    except Exception as e:  # safetensors raises SafetensorError (not exported under one stable name) or OSError
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CorruptFileError(f"{file} is not a readable safetensors file ({first}); it may be truncated or "
                               "corrupt: save or download it again") from None


# --- low-rank view for the exchange formats ------------------------------------------------------------------------


def _lowrank(layer: AdapterLayer, name: str) -> tuple[Tensor, Tensor, float]:
    """The layer's ``(A, B, scale)`` for adapter ``name``, detached; a clear error for non-low-rank variants."""
    try:
        with torch.no_grad():
            a, b, scale = layer.lowrank(name)
    except NotImplementedError as err:
        raise NotImplementedError(f"{err}: it cannot be exported as a LoRA") from None
    return a.detach(), b.detach(), scale


def _as_layer_shape(layer: AdapterLayer, a: Tensor, b: Tensor) -> tuple[Tensor, Tensor]:
    if layer.kind == "conv":
        return a[:, :, None, None], b[:, :, None, None]
    return a, b


def _is_plain_lora(layer: AdapterLayer, name: str) -> bool:
    return layer.slices[name] is None and type(layer.adapters[name]).peft_native


# --- PEFT format -----------------------------------------------------------------------------------------------------


def export_peft(
    model: nn.Module, path_dir: str | Path, name: str = "default", base_model_name_or_path: str | None = None
) -> Path:
    """Write adapter ``name`` as a PEFT LoRA directory that ``PeftModel.from_pretrained(model, path_dir)`` loads.

    Keys are relative to ``model``; pass the same (unwrapped) model to PEFT. The output is exact (up to float
    rounding of the folded factors). Raises ``NotImplementedError`` for a variant without a low-rank form.

    Loading the result needs ``peft``, which visadapt does not depend on (``pip install peft``, or the ``dev``
    extra); ``base`` is a fresh copy of the model without adapters::

        from peft import PeftModel
        peft_model = PeftModel.from_pretrained(base, path_dir)  # outputs equal the adapted model's

    visadapt reads the directory back without peft: ``import_peft(base, path_dir)``.
    """
    path = Path(path_dir)
    path.mkdir(parents=True, exist_ok=True)
    layers = _layers_with(model, name)
    config = layers[0][1].configs[name]
    rslora = bool(getattr(config, "rslora", False))
    tensors, ranks, alphas = {}, {}, {}
    for module_name, layer in layers:
        a, b, scale = _lowrank(layer, name)
        rank = a.shape[0]
        if _is_plain_lora(layer, name):
            alpha = layer.adapters[name].config.alpha  # exact: PEFT computes the same scale from the same numbers
        else:
            alpha = scale * (math.sqrt(rank) if rslora else rank)
        a, b = _as_layer_shape(layer, a, b)
        tensors[f"{_PEFT_PREFIX}{module_name}.lora_A.weight"] = a
        tensors[f"{_PEFT_PREFIX}{module_name}.lora_B.weight"] = b
        ranks[module_name], alphas[module_name] = rank, alpha
    r = getattr(config, "r", None)
    if r not in ranks.values():
        r = Counter(ranks.values()).most_common(1)[0][0]
    alpha_values = [alphas[m] for m in ranks if ranks[m] == r]
    lora_alpha = Counter(alpha_values).most_common(1)[0][0]
    peft_config = {
        "peft_type": "LORA",
        "task_type": None,
        "base_model_name_or_path": base_model_name_or_path,
        "inference_mode": True,
        "r": int(r),
        "lora_alpha": float(lora_alpha),
        "lora_dropout": float(getattr(config, "dropout", 0.0)),
        "target_modules": list(ranks),
        "rank_pattern": {m: int(v) for m, v in ranks.items() if v != r},
        "alpha_pattern": {m: float(v) for m, v in alphas.items() if v != lora_alpha},
        "use_rslora": rslora,
        "fan_in_fan_out": False,
        "bias": "none",
        "use_dora": False,
        "init_lora_weights": True,
        "modules_to_save": None,
        "layers_to_transform": None,
        "layers_pattern": None,
    }
    (path / PEFT_CONFIG_FILE).write_text(json.dumps(peft_config, indent=2) + "\n")
    save_file(_tensors_for_file(tensors), str(path / PEFT_WEIGHTS_FILE), metadata={"format": "pt"})
    return path


def _peft_pattern_value(patterns: dict, module_name: str, default):
    """PEFT's rule (``peft.utils.other.get_pattern_key``): the first key matching a dotted suffix of the name."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", module_name):
            return value
    return default


def import_peft(model: nn.Module, path_dir: str | Path, name: str = "default") -> LoRAConfig:
    """Inject a PEFT LoRA directory (``save_pretrained`` output) into ``model`` as adapter ``name``.

    Supports LoRA on ``nn.Linear`` and 1x1 ``nn.Conv2d`` layers, with ``r``/``lora_alpha``, ``rank_pattern``,
    ``alpha_pattern``, ``use_rslora`` and ``lora_dropout``. Raises ``NotImplementedError`` naming the feature for
    anything else (DoRA, biases, ``modules_to_save``, embeddings, ...). Returns the config that was injected.
    """
    path = Path(path_dir)
    config_file, weights_file = path / PEFT_CONFIG_FILE, path / PEFT_WEIGHTS_FILE
    if not config_file.is_file():
        raise FileNotFoundError(f"{path} has no {PEFT_CONFIG_FILE}")
    if not weights_file.is_file():
        other = (
            " (only the pickle-based adapter_model.bin, which visadapt does not read)"
            if (path / "adapter_model.bin").is_file()
            else ""
        )
        raise FileNotFoundError(f"{path} has no {PEFT_WEIGHTS_FILE}{other}")
    cfg = json.loads(config_file.read_text())
    if cfg.get("peft_type") != "LORA":
        raise NotImplementedError(f"only PEFT LoRA adapters can be imported, this one is {cfg.get('peft_type')!r}")
    for key, ok in [
        ("use_dora", False),
        ("fan_in_fan_out", False),
        ("bias", "none"),
        ("modules_to_save", None),
        ("lora_bias", False),
        ("target_parameters", None),
        ("layer_replication", None),
    ]:
        value = cfg.get(key, ok)
        if value not in (ok, None, [], {}):
            raise NotImplementedError(f"PEFT option {key}={value!r} is not supported by import_peft")
    modules: dict[str, dict[str, Tensor]] = {}
    for key, value in _read_safetensors(weights_file).items():
        match = re.fullmatch(r"(?:base_model\.model\.)?(.+)\.lora_([AB])\.weight", key)
        if match is None:
            raise NotImplementedError(f"PEFT tensor {key!r} is not a LoRA A/B weight; cannot import it")
        modules.setdefault(match.group(1), {})[match.group(2)] = value
    ranks, alphas = {}, {}
    for module_name, pair in modules.items():
        if set(pair) != {"A", "B"}:
            raise ValueError(f"PEFT file lacks lora_{'B' if 'A' in pair else 'A'} for {module_name!r}")
        ranks[module_name] = int(pair["A"].shape[0])
        alphas[module_name] = float(
            _peft_pattern_value(cfg.get("alpha_pattern") or {}, module_name, cfg.get("lora_alpha", 8))
        )
    r = int(cfg.get("r", 8))
    alpha = float(cfg.get("lora_alpha", 8))
    config = LoRAConfig(
        target="|".join(re.escape(m) for m in modules),
        r=r,
        alpha=alpha,
        dropout=float(cfg.get("lora_dropout", 0.0)),
        rslora=bool(cfg.get("use_rslora", False)),
        rank_pattern={re.escape(m): v for m, v in ranks.items() if v != r},
        alpha_pattern={re.escape(m): v for m, v in alphas.items() if v != alpha},
    )
    for module_name in modules:
        try:
            model.get_submodule(module_name)
        except AttributeError:
            raise ValueError(f"PEFT adapter layer {module_name!r} does not exist in this model") from None
    if name in adapter_names(model):
        raise ValueError(f"adapter {name!r} is already injected in this model; choose another name")
    _inject_modules(model, config, name, dict.fromkeys(modules))
    set_active_adapter(model, name)
    state = {}
    for module_name, pair in modules.items():
        layer = model.get_submodule(module_name)
        a, b = pair["A"].reshape(pair["A"].shape[0], -1), pair["B"].reshape(pair["B"].shape[0], -1)
        state[f"{module_name}.{ADAPTER_CONTAINER}.{name}.lora_A"] = a
        state[f"{module_name}.{ADAPTER_CONTAINER}.{name}.lora_B"] = b
        if layer.kind == "linear" and pair["A"].dim() != 2:
            raise ValueError(f"PEFT tensor for {module_name!r} has a conv shape but the layer is a Linear")
    load_adapter_state_dict(model, state, strict=True)
    return config


# --- diffusers format ----------------------------------------------------------------------------------------------

DIFFUSERS_COMPONENTS = ("unet", "transformer", "text_encoder", "text_encoder_2", "text_encoder_3")


def export_diffusers(
    path_dir: str | Path, name: str = "default", weight_name: str = DIFFUSERS_WEIGHTS_FILE, **components: nn.Module
) -> Path:
    """Write adapter ``name`` of pipeline components as a diffusers LoRA file; returns the file path.

    ``components`` maps a diffusers component name (``unet``, ``transformer``, ``text_encoder``,
    ``text_encoder_2``, ``text_encoder_3``) to the adapted module, e.g.
    ``export_diffusers(out, unet=pipe.unet, text_encoder=pipe.text_encoder)``. Load with
    ``pipe.load_lora_weights(out, weight_name="pytorch_lora_weights.safetensors")`` (the weight name is
    required offline).
    """
    unknown = [c for c in components if c not in DIFFUSERS_COMPONENTS]
    if unknown or not components:
        raise ValueError(f"components must be among {DIFFUSERS_COMPONENTS}, got {sorted(components) or 'none'}")
    tensors = {}
    for component, module in components.items():
        for module_name, layer in _layers_with(module, name):
            a, b, scale = _lowrank(layer, name)
            a, b = _as_layer_shape(layer, a, b * scale)  # alpha = r is assumed by diffusers: fold the scale into B
            tensors[f"{component}.{module_name}.lora_A.weight"] = a
            tensors[f"{component}.{module_name}.lora_B.weight"] = b
    path = Path(path_dir)
    path.mkdir(parents=True, exist_ok=True)
    save_file(_tensors_for_file(tensors), str(path / weight_name), metadata={"format": "pt"})
    return path / weight_name


__all__ = [
    "CONFIG_FILE",
    "DIFFUSERS_WEIGHTS_FILE",
    "PEFT_CONFIG_FILE",
    "PEFT_WEIGHTS_FILE",
    "WEIGHTS_FILE",
    "export_diffusers",
    "export_peft",
    "import_peft",
    "load_adapter",
    "save_adapter",
]
