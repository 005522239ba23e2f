"""Peak dense FLOP/s per device, for MFU. Overridable with `[metrics] peak_tflops`."""

from __future__ import annotations

import torch

# Dense (no sparsity) tensor-core peaks in TFLOP/s from the vendors' data sheets:
# (bf16, tf32). Matched by substring of `torch.cuda.get_device_name()`, most specific first.
PEAK_TFLOPS: list[tuple[str, float, float]] = [
    ("H200", 989.4, 494.7),
    ("H100 PCIe", 756.0, 378.0),
    ("H100 NVL", 835.0, 417.5),
    ("H100", 989.4, 494.7),  # SXM
    ("H800", 989.4, 494.7),
    ("B200", 2250.0, 1100.0),
    ("GB200", 2500.0, 1250.0),
    ("A100", 312.0, 156.0),
    ("A800", 312.0, 156.0),
    ("L40S", 362.1, 183.0),
    ("L4", 121.0, 60.0),
    ("A10G", 70.0, 35.0),
    ("RTX 4090", 165.2, 82.6),
]


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return device.type


def peak_flops_per_second(
    device: torch.device, dtype: torch.dtype, override_tflops: float = 0.0
) -> float | None:
    """Peak FLOP/s of one device, or None when unknown (MFU is then not reported)."""
    if override_tflops > 0:
        return override_tflops * 1e12
    if device.type != "cuda":
        return None
    name = device_name(device)
    for key, bf16, tf32 in PEAK_TFLOPS:
        if key in name:
            return (bf16 if dtype in (torch.bfloat16, torch.float16) else tf32) * 1e12
    return None
