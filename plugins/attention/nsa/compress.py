"""NSA's compression: every `kernel_size` keys (values) every `kernel_stride` tokens -> one token.

Weight layouts match `native-sparse-attention-triton` (so the same parameters drive its kernels):
weightedpool [Hkv, kernel_size], linear [Hkv, kernel_size * D, D], intra-block position
encoding [Hkv, kernel_size, D] added to the keys of a window before compression.

Every compress type is initialised to the plain mean of the window (weights 1/kernel_size,
position encoding 0): compressed keys are then the average key of their window, which is what
makes the compressed scores a good guide for block selection in a pretrained model.
"""

from __future__ import annotations

import torch
from torch.distributed.tensor import DTensor, distribute_tensor


def num_compressed(length: int, kernel_size: int, kernel_stride: int) -> int:
    """Compressed tokens of a document of `length` tokens (0 when shorter than one window)."""
    return 0 if length < kernel_size else (length - kernel_size) // kernel_stride + 1


def weight_shape(
    compress_type: str, num_kv_heads: int, kernel_size: int, head_dim: int
) -> tuple[int, ...] | None:
    """Shape of one compression weight (keys and values have one each); None for avgpool."""
    shapes = {
        "weightedpool": (num_kv_heads, kernel_size),
        "linear": (num_kv_heads, kernel_size * head_dim, head_dim),
        "avgpool": None,
    }
    return shapes[compress_type]


@torch.no_grad()
def init_mean_pool_(weight: torch.Tensor, compress_type: str, kernel_size: int) -> None:
    """Set a compression weight so that it computes the mean of its window."""
    if compress_type == "weightedpool":
        weight.fill_(1.0 / kernel_size)
    elif compress_type == "linear":
        num_kv_heads, _, head_dim = weight.shape
        eye = torch.eye(head_dim, dtype=weight.dtype, device=weight.device) / kernel_size
        _copy_into(weight, eye.repeat(kernel_size, 1).expand(num_kv_heads, -1, -1))
    else:
        raise ValueError(f"compress_type {compress_type!r} has no weight")


def _copy_into(param: torch.Tensor, value: torch.Tensor) -> None:
    """`param.copy_(value)` for a plain or an FSDP-sharded (DTensor) parameter."""
    if isinstance(param, DTensor):
        value = distribute_tensor(value.to(param.device), param.device_mesh, param.placements)
    param.copy_(value)


def compress(
    x_LKD: torch.Tensor,
    weight: torch.Tensor | None,
    compress_type: str,
    kernel_size: int,
    kernel_stride: int,
    pe_KkD: torch.Tensor | None = None,
) -> torch.Tensor:
    """Compress one document's keys or values [L, Hkv, D] -> [N, Hkv, D].

    `pe_KkD` ([Hkv, kernel_size, D]) is added to every window before compression (keys only).
    """
    L, num_kv_heads, head_dim = x_LKD.shape
    n = num_compressed(L, kernel_size, kernel_stride)
    if n == 0:
        return x_LKD.new_zeros(0, num_kv_heads, head_dim)
    windows_NKDk = x_LKD[: (n - 1) * kernel_stride + kernel_size].unfold(0, kernel_size, kernel_stride)
    if pe_KkD is not None:
        windows_NKDk = windows_NKDk + pe_KkD.transpose(1, 2).to(x_LKD.dtype)
    if compress_type == "avgpool":
        return windows_NKDk.mean(dim=-1)
    if weight is None:
        raise ValueError(f"compress_type {compress_type!r} needs a compression weight")
    if compress_type == "weightedpool":
        return torch.einsum("nhdk,hk->nhd", windows_NKDk, weight.to(x_LKD.dtype))
    if compress_type == "linear":
        w_KkDD = weight.to(x_LKD.dtype).view(num_kv_heads, kernel_size, head_dim, head_dim)
        return torch.einsum("nhdk,hkdD->nhD", windows_NKDk, w_KkDD)
    raise ValueError(f"unknown compress_type {compress_type!r}")
