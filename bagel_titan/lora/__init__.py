"""LoRA fine-tuning: adapters on the linears a model spec names, merged or saved in peft's format on export."""

from bagel_titan.lora.export import LoRAExport
from bagel_titan.lora.inject import LoRAGroups, adapter_state_keys, apply_lora, init_adapters, lora_modules
from bagel_titan.lora.layer import LoRALinear, merge_lora_weight

__all__ = [
    "LoRAExport",
    "LoRAGroups",
    "LoRALinear",
    "adapter_state_keys",
    "apply_lora",
    "init_adapters",
    "lora_modules",
    "merge_lora_weight",
]
