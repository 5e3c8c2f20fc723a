"""The shared adapter-layer library: pure PyTorch (no Lightning), imports nothing else from visadapt but the registry.

Quick tour::

    from visadapt.adapters import LoRAConfig, inject, merge_adapters, save_adapter

    report = inject(model, LoRAConfig(target=r"blocks\\.\\d+\\.attn\\.qkv[q,v]", r=16, alpha=16))
    ...  # train: only adapter parameters require grad
    save_adapter(model, "out/adapter", base_identity="timm:vit_base_patch16_224")
    merge_adapters(model)  # zero-overhead inference

Variants are registered in ``ADAPTERS`` (``ADAPTERS.describe()`` lists them); each lives in one file with its
config dataclass. See ``docs/adapters.md`` for the contract, the file formats and the benchmark.
"""

from visadapt.adapters._registry import (
    ADAPTERS,
    INITIALISERS,
    OPTIMISERS,
    REGULARISERS,
    SCHEDULES,
    adapter_class,
    register_adapter,
    variant_name,
)
from visadapt.adapters.base import (
    Adapter,
    AdapterConfig,
    AdapterLayer,
    cast_frozen_base,
    upcast_trainable,
)
from visadapt.adapters.block_lora import BlockLoRA, BlockLoRAConfig
from visadapt.adapters.comp_lora import CompLoRA, CompLoRAConfig
from visadapt.adapters.inject import (
    InjectionReport,
    adapter_layers,
    adapter_names,
    adapter_state_dict,
    count_parameters,
    disable_adapters,
    inject,
    is_adapter_param,
    load_adapter_state_dict,
    merge_adapters,
    set_active_adapter,
    set_adapters_enabled,
    unmerge_adapters,
)
from visadapt.adapters.diffusers_io import import_diffusers, read_diffusers_lora
from visadapt.adapters.io import export_diffusers, export_peft, import_peft, load_adapter, save_adapter
from visadapt.adapters.kasa import KaSA, KaSAConfig
from visadapt.adapters.lamda import LaMDA, LaMDAConfig
from visadapt.adapters.lofit import LoFiT, LoFiTConfig
from visadapt.adapters.loldu import LoLDU, LoLDUConfig
from visadapt.adapters.lora import LoRA, LoRAConfig
from visadapt.adapters.lora_sb import LoRASB, LoRASBConfig
from visadapt.adapters.nlora import NLoRA, NLoRAConfig
from visadapt.adapters.mixlora import MixLoRA, MixLoRAConfig
from visadapt.adapters.randlora import RandLoRA, RandLoRAConfig
from visadapt.adapters.sora import SoRA, SoRAConfig, prune_sora

__all__ = [
    "ADAPTERS",
    "INITIALISERS",
    "OPTIMISERS",
    "REGULARISERS",
    "SCHEDULES",
    "Adapter",
    "AdapterConfig",
    "AdapterLayer",
    "BlockLoRA",
    "BlockLoRAConfig",
    "CompLoRA",
    "CompLoRAConfig",
    "InjectionReport",
    "KaSA",
    "KaSAConfig",
    "LaMDA",
    "LaMDAConfig",
    "LoFiT",
    "LoFiTConfig",
    "LoLDU",
    "LoLDUConfig",
    "LoRA",
    "LoRAConfig",
    "LoRASB",
    "LoRASBConfig",
    "NLoRA",
    "NLoRAConfig",
    "MixLoRA",
    "MixLoRAConfig",
    "RandLoRA",
    "RandLoRAConfig",
    "SoRA",
    "SoRAConfig",
    "adapter_class",
    "adapter_layers",
    "adapter_names",
    "adapter_state_dict",
    "cast_frozen_base",
    "count_parameters",
    "disable_adapters",
    "export_diffusers",
    "export_peft",
    "import_diffusers",
    "import_peft",
    "inject",
    "is_adapter_param",
    "load_adapter",
    "load_adapter_state_dict",
    "merge_adapters",
    "prune_sora",
    "read_diffusers_lora",
    "register_adapter",
    "save_adapter",
    "set_active_adapter",
    "set_adapters_enabled",
    "unmerge_adapters",
    "upcast_trainable",
    "variant_name",
]
