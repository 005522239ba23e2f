"""Which state-dict keys belong to attention modules with parameters of their own.

A backend's per-layer module may own parameters that a pretrained dense checkpoint lacks (NSA's
gates, compression weights, position encodings). Such a module lists them, relative to itself,
in ``AttentionModule.optional_state_keys``; a weight loader asks here for the full keys to
accept as missing, and leaves those parameters at their ``reset_parameters()`` values.
"""

from __future__ import annotations

from torch import nn

from bagel_titan.protocols import AttentionModule


def optional_attention_state_keys(model: nn.Module) -> set[str]:
    """Full state-dict keys of `model` that belong to attention modules with parameters a
    dense checkpoint lacks (NSA's gates, compression weights, position encodings).

    A weight loader subtracts these from its missing keys; the modules keep the values of
    `reset_parameters()` (call it after materialising, before or instead of loading them).
    """
    keys: set[str] = set()
    for prefix, module in model.named_modules():
        if isinstance(module, AttentionModule):
            keys.update(f"{prefix}.{name}" if prefix else name for name in module.optional_state_keys)
    return keys
