"""Reading diffusers LoRA files (``pytorch_lora_weights.safetensors``) into visadapt adapters. Safetensors only.

:func:`~visadapt.adapters.io.export_diffusers` writes the file; :func:`import_diffusers` reads one, written by
visadapt or trained elsewhere (diffusers' DreamBooth-LoRA scripts, ``save_lora_weights``), and injects it as a
plain LoRA into the given pipeline components. Accepted key spellings, per component prefix (``unet.``,
``text_encoder.``, ``text_encoder_2.``, ``transformer.``):

* PEFT's: ``<module>.lora_A.weight`` / ``<module>.lora_B.weight``;
* diffusers' converted: ``<module>.lora.down.weight`` / ``<module>.lora.up.weight`` (UNet) and
  ``<module>.lora_linear_layer.down.weight`` / ``.up.weight`` (text encoders);
* the older attention-processor layout without prefix (``...attn1.processor.to_q_lora.down.weight``, read as UNet);
* an optional ``<module>.alpha`` scalar ("network alpha"): the update is then scaled by ``alpha / r``; without it
  the scale is 1 (``alpha = r``), as diffusers assumes.

Kohya-style files (``lora_unet_...``) are refused with a message: convert them with diffusers first.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch
from torch import Tensor, nn

from visadapt.adapters.base import ADAPTER_CONTAINER
from visadapt.adapters.inject import _inject_modules, adapter_names, load_adapter_state_dict, set_active_adapter
from visadapt.adapters.io import DIFFUSERS_COMPONENTS, DIFFUSERS_WEIGHTS_FILE, _read_safetensors
from visadapt.adapters.lora import LoRAConfig

_FACTOR = re.compile(r"(.+?)\.(lora_A\.weight|lora_B\.weight|lora\.down\.weight|lora\.up\.weight|"
                     r"lora_linear_layer\.down\.weight|lora_linear_layer\.up\.weight|alpha)")
_PROCESSOR = re.compile(r"(.+)\.processor\.(to_q|to_k|to_v|to_out)_lora\.(down|up)\.weight")


def _split_key(key: str) -> tuple[str, str, str]:
    """``key`` -> (component, module name inside it, ``A`` / ``B`` / ``alpha``)."""
    proc = _PROCESSOR.fullmatch(key)
    if proc is not None:  # the attention-processor layout of older diffusers (UNet keys without prefix)
        module, proj, kind = proc.groups()
        module = module.removeprefix("unet.")
        return "unet", f"{module}.{'to_out.0' if proj == 'to_out' else proj}", "A" if kind == "down" else "B"
    component, _, rest = key.partition(".")
    if component not in DIFFUSERS_COMPONENTS:
        if key.startswith(("lora_unet_", "lora_te")):
            raise NotImplementedError(
                f"{key!r} is a Kohya-style LoRA key; convert the file to the diffusers format first (e.g. load it "
                "with pipe.load_lora_weights and save it with save_lora_weights)")
        raise ValueError(f"LoRA key {key!r} does not start with a diffusers component ({', '.join(DIFFUSERS_COMPONENTS)})")
    match = _FACTOR.fullmatch(rest)
    if match is None:
        raise NotImplementedError(f"LoRA key {key!r} is not a LoRA down/up (A/B) weight or alpha; cannot import it")
    module, suffix = match.groups()
    kind = "alpha" if suffix == "alpha" else ("A" if ("lora_A" in suffix or "down" in suffix) else "B")
    return component, module, kind


def read_diffusers_lora(file: str | Path) -> dict[str, dict[str, dict[str, Tensor]]]:
    """``{component: {module: {"A": down, "B": up[, "alpha": scalar]}}}`` from a diffusers LoRA file or folder."""
    path = Path(file)
    if path.is_dir():
        path = path / DIFFUSERS_WEIGHTS_FILE
    out: dict[str, dict[str, dict[str, Tensor]]] = {}
    for key, value in _read_safetensors(path).items():
        component, module, kind = _split_key(key)
        out.setdefault(component, {}).setdefault(module, {})[kind] = value
    for component, modules in out.items():
        for module, parts in modules.items():
            if not {"A", "B"} <= set(parts):
                raise ValueError(f"{path}: {component}.{module} lacks its LoRA {'up (B)' if 'A' in parts else 'down (A)'}"
                                 " weight")
    if not out:
        raise ValueError(f"{path} holds no LoRA weight")
    return out


def import_diffusers(file: str | Path, name: str = "default", strict_components: bool = True,
                     **components: nn.Module) -> dict[str, LoRAConfig]:
    """Inject the LoRA of a diffusers file into pipeline components (``unet=...``, ``text_encoder=...``).

    Each component gets a plain LoRA named ``name`` on exactly the layers the file names, with the file's ranks and
    alphas (``alpha = r`` when the file has none), activated. Returns the injected config per component.

    Args:
        file: ``pytorch_lora_weights.safetensors`` or the folder holding it.
        name: Adapter name in the components.
        strict_components: The file's components must all be given (else ``ValueError`` names the missing ones);
            ``False`` skips the ones not given.
        components: Component name -> module.

    Raises:
        ValueError: a layer of the file is missing from the component or has another shape (nothing is changed
            then), or ``name`` already exists.
    """
    lora = read_diffusers_lora(file)
    missing = sorted(c for c in lora if c not in components)
    if missing and strict_components:
        raise ValueError(f"{file} holds LoRA weights for {', '.join(missing)}, which were not given "
                         f"(given: {', '.join(sorted(components)) or 'none'}); pass them or strict_components=False")
    unknown = [c for c in components if c not in DIFFUSERS_COMPONENTS]
    if unknown:
        raise ValueError(f"components must be among {DIFFUSERS_COMPONENTS}, got {unknown}")
    plans: dict[str, tuple[LoRAConfig, dict[str, Tensor]]] = {}
    for component, model in components.items():
        modules = lora.get(component)
        if not modules:
            continue
        if name in adapter_names(model):
            raise ValueError(f"adapter {name!r} is already injected in {component}; choose another name")
        ranks, alphas, state = {}, {}, {}
        for module_name, parts in modules.items():
            try:
                layer = model.get_submodule(module_name)
            except AttributeError:
                raise ValueError(f"{file}: layer {component}.{module_name} does not exist in the given {component}") \
                    from None
            a, b = parts["A"], parts["B"]
            weight = getattr(layer, "base_weight", getattr(layer, "weight", None))
            a2, b2 = a.reshape(a.shape[0], -1), b.reshape(b.shape[0], -1)
            if weight is None or b2.shape[0] != weight.shape[0] or a2.shape[1] != weight[0].numel() \
                    or a2.shape[0] != b2.shape[1]:
                got = None if weight is None else tuple(weight.shape)
                raise ValueError(f"{file}: {component}.{module_name} has LoRA shapes down {tuple(a.shape)} / up "
                                 f"{tuple(b.shape)}, which do not fit the layer's weight {got}")
            rank = int(a2.shape[0])
            ranks[module_name] = rank
            alphas[module_name] = float(parts["alpha"]) if "alpha" in parts else float(rank)
            state[f"{module_name}.{ADAPTER_CONTAINER}.{name}.lora_A"] = a2
            state[f"{module_name}.{ADAPTER_CONTAINER}.{name}.lora_B"] = b2
        r = max(set(ranks.values()), key=list(ranks.values()).count)
        alpha = max(set(alphas.values()), key=list(alphas.values()).count)
        config = LoRAConfig(
            target="|".join(re.escape(m) for m in modules), r=r, alpha=alpha,
            rank_pattern={re.escape(m): v for m, v in ranks.items() if v != r},
            alpha_pattern={re.escape(m): v for m, v in alphas.items() if v != alpha},
        )
        plans[component] = (config, state)
    configs = {}
    for component, (config, state) in plans.items():
        model = components[component]
        _inject_modules(model, config, name, dict.fromkeys(lora[component]))
        set_active_adapter(model, name)
        with torch.no_grad():
            load_adapter_state_dict(model, state, strict=True)
        configs[component] = config
    return configs


__all__ = ["import_diffusers", "read_diffusers_lora"]
