"""LoRA at export time: the merged weights for the official layout, the adapters in peft's format.

Per tensor, so a streaming export can use it key by key: `LoRAExport.skip(key)` says which keys
are adapters (left out of the merged file), `merged(key, base, full_of)` returns the tensor to
write under an official key (base + scaling * B A for an adapted weight, else `base`), and
`write_adapter(folder, full_of)` writes `adapter_model.safetensors` + `adapter_config.json` the
way `peft.PeftModel.save_pretrained` does (keys `base_model.model.<module>.lora_A.weight`,
`train_also` parameters as peft's `modules_to_save`), loadable with `PeftModel.from_pretrained`.
`full_of(key)` returns the full (gathered, EMA when kept) tensor of a model state-dict key.
"""

from __future__ import annotations

import json
import os
from typing import Callable

import torch
from safetensors.torch import save_file
from torch import nn

from bagel_titan.config.job_config import LoRA as LoRAConfig
from bagel_titan.lora.inject import lora_modules
from bagel_titan.lora.layer import merge_lora_weight

PEFT_PREFIX = "base_model.model."
ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"

FullOf = Callable[[str], torch.Tensor]


class LoRAExport:
    """What the export of a LoRA model needs to know about its adapters."""

    def __init__(self, model: nn.Module, config: LoRAConfig, base_model_name_or_path: str | None = None):
        modules = lora_modules(model)
        self.config = config
        self.base_model_name_or_path = base_model_name_or_path
        self.targets = list(modules)
        self.scaling = {f"{name}.weight": m.scaling for name, m in modules.items()}
        self.adapter_keys = {f"{name}.{p}" for name in modules for p in ("lora_A", "lora_B")}
        # Trained in full (`train_also`): every module outside the adapted ones with trainable
        # parameters of its own.
        self.full_modules = sorted(
            {
                name
                for name, m in model.named_modules()
                if name not in modules and any(p.requires_grad for p in m.parameters(recurse=False))
            }
        )
        self.full_keys = [
            f"{name}.{p}"
            for name in self.full_modules
            for p, param in model.get_submodule(name).named_parameters(recurse=False)
            if param.requires_grad
        ]

    @classmethod
    def of(
        cls, model: nn.Module, config: LoRAConfig, base_model_name_or_path: str | None = None
    ) -> "LoRAExport | None":
        """The export plan of `model`, or None when it has no adapters."""
        return cls(model, config, base_model_name_or_path) if lora_modules(model) else None

    def skip(self, key: str) -> bool:
        """An adapter tensor: not written under an official key."""
        return key in self.adapter_keys

    def adapts(self, key: str) -> bool:
        """An official weight with an adapter: exported merged."""
        return key in self.scaling

    def merged(self, key: str, base: torch.Tensor, full_of: FullOf) -> torch.Tensor:
        """The tensor to export under official `key`, given its full `base` value."""
        if key not in self.scaling:
            return base
        module = key.removesuffix(".weight")
        return merge_lora_weight(
            base, full_of(f"{module}.lora_A"), full_of(f"{module}.lora_B"), self.scaling[key]
        )

    def adapter_state(self, full_of: FullOf) -> dict[str, torch.Tensor]:
        """peft's saved keys -> tensors (fp32 adapters, `train_also` parameters as trained)."""
        state = {}
        for name in self.targets:
            for p in ("lora_A", "lora_B"):
                state[f"{PEFT_PREFIX}{name}.{p}.weight"] = full_of(f"{name}.{p}")
        for key in self.full_keys:
            state[f"{PEFT_PREFIX}{key}"] = full_of(key)
        return {k: v.detach().to("cpu").contiguous() for k, v in state.items()}

    def adapter_config(self) -> dict:
        """peft's `LoraConfig` fields for these adapters (exact module names as targets)."""
        return {
            "peft_type": "LORA",
            "task_type": None,
            "base_model_name_or_path": self.base_model_name_or_path,
            "r": self.config.rank,
            "lora_alpha": self.config.alpha,
            "lora_dropout": self.config.dropout,
            "target_modules": self.targets,
            "modules_to_save": self.full_modules or None,
            "bias": "none",
            "fan_in_fan_out": False,
            "init_lora_weights": True,
            "inference_mode": True,
            "use_rslora": False,
            "use_dora": False,
            "rank_pattern": {},
            "alpha_pattern": {},
            "layers_to_transform": None,
            "layers_pattern": None,
            "revision": None,
        }

    def write_adapter(self, folder: str, full_of: FullOf, write: bool = True) -> None:
        """Collective when `full_of` gathers: every rank calls it, ranks with `write` write."""
        state = self.adapter_state(full_of)
        if not write:
            return
        os.makedirs(folder, exist_ok=True)
        os.chmod(folder, 0o755)
        save_file(state, os.path.join(folder, ADAPTER_WEIGHTS), metadata={"format": "pt"})
        with open(os.path.join(folder, ADAPTER_CONFIG), "w") as f:
            json.dump(self.adapter_config(), f, indent=2)
        for file in (ADAPTER_WEIGHTS, ADAPTER_CONFIG):  # exports are readable by the group
            os.chmod(os.path.join(folder, file), 0o644)
