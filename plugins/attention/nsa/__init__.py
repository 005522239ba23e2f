"""Native sparse attention for packed multimodal batches (the `nsa` backend).

`config` ([attention.nsa]), `compress` (compression ops and their near-dense init), `plan`
(how a packed batch maps onto causal NSA), `reference` (the algorithm in PyTorch),
`triton_path` (the native-sparse-attention-triton kernels), `module` (parameters, backend).
"""

from .config import NSAConfig
from .module import NSAAttention, NSABackend

__all__ = ["NSAConfig", "NSAAttention", "NSABackend"]
