"""One document's attention on a CPU with bf16 inputs, forward + backward: computed in bf16
against computed in fp32 (inputs cast up, output cast back), per document length and mask.

This is what sets `bagel_titan_plugins.attention.sdpa.CPU_FP32_ATTENTION_TOKENS`: PyTorch's
CPU flash-attention backward in bf16 costs a multiple of the fp32 one on short documents. Each
call is `scaled_dot_product_attention` itself (grouped-query, as the `sdpa` backend calls it),
so that both columns time the kernel they name; the two precisions alternate call by call (the
same load on both), and the table gives the medians, their ratio and each precision's largest
error in the output and the query gradient against an fp64 computation.

    python benchmarks/bench_sdpa_cpu_precision.py
    python benchmarks/bench_sdpa_cpu_precision.py --lengths 128,256,512 --heads 28 --kv-heads 4 --head-dim 128
"""

from __future__ import annotations

import argparse
import statistics
import time
import torch
import torch.nn.functional as F

import common

MASKS = ("causal", "text+image")
"""causal: a text document (`is_causal`); text+image: a causal text quarter, then an image block
that sees all of it and itself (a boolean mask), as a BAGEL t2i sample."""
HEADER = [
    "tokens",
    "mask",
    "bf16 ms",
    "fp32 compute ms",
    "bf16 / fp32 time",
    "bf16 max error (out, dq)",
    "fp32 max error (out, dq)",
]


def document_mask(length: int) -> torch.Tensor:
    mask = torch.ones(length, length, dtype=torch.bool).tril()
    text = length // 4
    mask[text:, text:] = True
    return mask


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor | None,
    grad_out: torch.Tensor,
    compute: torch.dtype,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Output and query gradient of one call in `compute` precision (inputs and outputs stay in
    their own dtype)."""
    q, k, v = (x.detach().requires_grad_() for x in (q, k, v))
    out = F.scaled_dot_product_attention(
        q.to(compute), k.to(compute), v.to(compute), mask, is_causal=mask is None, enable_gqa=True
    ).to(q.dtype)
    out.backward(grad_out)
    assert q.grad is not None
    return out.detach(), q.grad


def time_length(
    length: int, mask_kind: str, heads: int, kv_heads: int, head_dim: int, calls: int
) -> list[str]:
    torch.manual_seed(length)
    q = torch.randn(1, heads, length, head_dim, dtype=torch.bfloat16)
    k = torch.randn(1, kv_heads, length, head_dim, dtype=torch.bfloat16)
    v = torch.randn(1, kv_heads, length, head_dim, dtype=torch.bfloat16)
    grad_out = torch.randn(1, heads, length, head_dim, dtype=torch.bfloat16)
    mask = document_mask(length) if mask_kind == "text+image" else None
    precisions = {"bf16": torch.bfloat16, "fp32": torch.float32}
    times: dict[str, list[float]] = {name: [] for name in precisions}
    results: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    for call in range(calls + 1):  # the first call of each precision is a warm-up
        for name, dtype in precisions.items():
            start = time.perf_counter()
            results[name] = attention(q, k, v, mask, grad_out, dtype)
            if call:
                times[name].append(time.perf_counter() - start)
    reference = attention(q.double(), k.double(), v.double(), mask, grad_out.double(), torch.float64)

    def errors(name: str) -> str:
        out, dq = results[name]
        return f"{(out.double() - reference[0]).abs().max().item():.1e}, {(dq.double() - reference[1]).abs().max().item():.1e}"

    bf16_ms, fp32_ms = (statistics.median(times[name]) * 1e3 for name in precisions)
    return [
        str(length),
        mask_kind,
        f"{bf16_ms:.2f}",
        f"{fp32_ms:.2f}",
        f"{bf16_ms / fp32_ms:.2f}x",
        errors("bf16"),
        errors("fp32"),
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", default="64,128,256,384,512,768,1024,2048", help="document lengths")
    parser.add_argument("--masks", default=",".join(MASKS))
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--kv-heads", type=int, default=2)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--calls", type=int, default=5, help="timed calls per precision (after one warm-up)")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (0: torch's default)")
    common.add_results_option(parser)
    args = parser.parse_args()
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    rows = []
    for length in (int(n) for n in args.lengths.split(",")):
        for mask_kind in args.masks.split(","):
            if mask_kind not in MASKS:
                parser.error(f"--masks: {mask_kind!r} is not one of {list(MASKS)}")
            rows.append(time_length(length, mask_kind, args.heads, args.kv_heads, args.head_dim, args.calls))
            print(common.markdown_table(HEADER, [rows[-1]]).splitlines()[-1], flush=True)
    table = common.markdown_table(HEADER, rows, "ll" + "r" * 5)
    print(table)
    notes = [
        f"one document, {args.heads} query / {args.kv_heads} KV heads of {args.head_dim}, bf16 inputs, "
        "`scaled_dot_product_attention` forward + backward; fp32 compute: inputs cast up, output cast back "
        "(the casts are timed)",
        f"the precisions alternate call by call; 1 warm-up + {args.calls} timed calls each, medians; "
        f"torch intra-op threads: {torch.get_num_threads()}",
        "max error: against the same call in fp64, over the output and the query gradient",
    ]
    common.append_section(
        args.results, "bench_sdpa_cpu_precision", common.device_description("cpu"), notes, table
    )


if __name__ == "__main__":
    main()
