"""The GPU suite: one command, one H100, under 10 minutes (`benchmarks/gpu_suite.sh`).

0. The matrix-product rate of the device as found (an 8192^3 product in bf16): the ceiling the
   rows' MFU is read against.
1. Correctness of the fast attention paths at BAGEL-7B's head shapes (28 query / 4 KV heads of
   128, bf16) on a packed batch with causal / full / noise segments: `flex` against `eager`
   (outputs and q/k/v gradients), and NSA's Triton path against its PyTorch path (outputs and
   gradients, with top-k covering every block so that both select the same keys).
2. Training steps through the real trainer (`bench_train_step.py`, one subprocess per row): BAGEL
   at 7B width with few layers (`--llm-layers`, `--vit-layers`, default 2 + 2; the flavor's
   widths, vocabulary, ViT and VAE unchanged), bf16, attention sdpa and flex, compile off and
   on, activation checkpointing none and full, `packing_length` 8192 and 16384; tokens/s, MFU
   (ours and anchor-style) and peak memory per row.

Whatever cannot run (no GPU, no Triton NSA package, out of memory, the time budget spent) is a
row that says why instead of a number. `--smoke` runs the CPU-capable parts at CI size on CPU
(debug flavor, 256-token packs, rows in one process, the checks in fp32 without backward for
flex).

    bash benchmarks/gpu_suite.sh                  # on the GPU machine
    python benchmarks/gpu_suite.py --smoke        # dry run on a CPU
"""

from __future__ import annotations

import argparse
import dataclasses
import random
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

import torch

import common
from bench_train_step import (
    ANCHORS,
    TABLE_ALIGN,
    TABLE_HEADER,
    TrainSetting,
    flops_note,
    full_depth_ratio,
    run_row,
    table_row,
)

if TYPE_CHECKING:
    from synthetic_attention import AttentionInputs


@dataclass
class CheckShape:
    """Attention shapes of one correctness check."""

    heads: int
    kv_heads: int
    head_dim: int
    hidden: int
    tokens: int
    docs: int
    dtype: torch.dtype
    device: str
    backward: bool


GPU_SHAPE = CheckShape(28, 4, 128, 3584, 4096, 3, torch.bfloat16, "cuda", True)
SMOKE_SHAPE = CheckShape(4, 2, 16, 32, 300, 3, torch.float32, "cpu", False)
TOLERANCE = {torch.bfloat16: 2e-2, torch.float32: 1e-4}


def _inputs(shape: CheckShape, seed: int) -> AttentionInputs:
    from synthetic_attention import random_inputs, random_pack

    docs = random_pack(random.Random(seed), shape.tokens, shape.docs)
    return random_inputs(
        docs,
        num_heads=shape.heads,
        num_kv_heads=shape.kv_heads,
        head_dim=shape.head_dim,
        hidden_size=shape.hidden,
        dtype=shape.dtype,
        device=shape.device,
        seed=seed,
        requires_grad=shape.backward,
    )


def _run(module: torch.nn.Module, inputs: AttentionInputs, backward: bool) -> list[torch.Tensor]:
    """Output, and the q/k/v gradients of a fixed random projection of it when `backward`."""
    for t in (inputs.q_THD, inputs.k_THD, inputs.v_THD):
        t.grad = None
    with torch.set_grad_enabled(backward):
        out = module(inputs.q_THD, inputs.k_THD, inputs.v_THD, inputs.meta, inputs.hidden_TD)
    if not backward:
        return [out.detach().float()]
    weight = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(out.device, out.dtype)
    (out * weight).float().sum().backward()
    grads = []
    for t in (inputs.q_THD, inputs.k_THD, inputs.v_THD):
        assert t.grad is not None  # q/k/v require grad when `backward` (`_inputs`)
        grads.append(t.grad.float())
    return [out.detach().float()] + grads


def _compare(
    names: list[str], actual: list[torch.Tensor], expected: list[torch.Tensor], tol: float
) -> tuple[bool, str]:
    """Largest error relative to each tensor's scale; passes when all are within `tol`."""
    parts, ok = [], True
    for name, a, e in zip(names, actual, expected):
        err = ((a - e).abs().max() / e.abs().max().clamp_min(1e-6)).item()
        ok &= err <= tol
        parts.append(f"{name} {err:.1e}")
    return ok, "max error / max value: " + ", ".join(parts) + f" (tolerance {tol:.0e})"


def check_flex(shape: CheckShape) -> tuple[str, str]:
    from bagel_titan.protocols import AttentionLayerSpec
    from bagel_titan_plugins.attention.eager import EagerBackend
    from bagel_titan_plugins.attention.flex import FlexBackend, FlexConfig

    spec = AttentionLayerSpec(shape.heads, shape.kv_heads, shape.head_dim, shape.hidden, 0, "llm")
    inputs = _inputs(shape, seed=0)
    options = FlexConfig(compile=shape.device == "cuda")  # compiled flex needs a C++ toolchain on CPU
    expected = _run(EagerBackend().build(spec, None), inputs, shape.backward)
    actual = _run(FlexBackend().build(spec, options), inputs, shape.backward)
    ok, detail = _compare(["out", "dq", "dk", "dv"], actual, expected, TOLERANCE[shape.dtype])
    if not shape.backward:
        detail += "; forward only (FlexAttention has no CPU backward)"
    return ("pass" if ok else "FAIL"), detail


def check_nsa_triton(shape: CheckShape) -> tuple[str, str]:
    from bagel_titan.protocols import AttentionLayerSpec
    from bagel_titan_plugins.attention.nsa import NSABackend, NSAConfig
    from bagel_titan_plugins.attention.nsa.triton_path import triton_unusable_reason

    base = NSAConfig()
    reason = triton_unusable_reason(base, torch.device(shape.device), shape.dtype)
    if reason is not None:
        return "skipped", f"the Triton path cannot run here: {reason}"
    spec = AttentionLayerSpec(shape.heads, shape.kv_heads, shape.head_dim, shape.hidden, 0, "decoder")
    all_blocks = -(-shape.tokens // base.block_size)
    modules = {
        impl: NSABackend()
        .build(spec, NSAConfig(topk=all_blocks, implementation=impl))
        .to(shape.device, shape.dtype)
        for impl in ("triton", "torch")
    }
    with torch.no_grad():  # leave the near-dense start so that every branch and gate matters
        generator = torch.Generator().manual_seed(2)
        for p in modules["torch"].parameters():
            p.add_(torch.randn(p.shape, generator=generator).to(p.device, p.dtype) * 0.05)
    modules["triton"].load_state_dict(modules["torch"].state_dict())
    inputs = _inputs(shape, seed=1)
    expected = _run(modules["torch"], inputs, shape.backward)
    actual = _run(modules["triton"], inputs, shape.backward)
    ok, detail = _compare(["out", "dq", "dk", "dv"], actual, expected, TOLERANCE[shape.dtype])
    return ("pass" if ok else "FAIL"), f"top-k {all_blocks} (every block); " + detail


def check_matmul_ceiling(shape: CheckShape) -> tuple[str, str]:
    """The device's matrix rate as found (clocks, neighbours): what the rows' MFU is read against.
    An 8192^3 product in the checks' dtype on a GPU (1024^3 on a CPU), median of 10 after 3."""
    n = 8192 if shape.device == "cuda" else 1024
    a, b = (torch.randn(n, n, device=shape.device, dtype=shape.dtype) for _ in range(2))
    for _ in range(3):
        a @ b
    times = []
    for _ in range(10):
        if shape.device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        a @ b
        if shape.device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    tflops = 2 * n**3 / sorted(times)[len(times) // 2] / 1e12
    return "measured", f"{n}^3 {str(shape.dtype).replace('torch.', '')} matrix product: {tflops:,.1f} TFLOP/s"


CHECKS: dict[str, Callable[[CheckShape], tuple[str, str]]] = {
    "matrix-product ceiling": check_matmul_ceiling,
    "flex vs eager": check_flex,
    "NSA Triton vs NSA PyTorch": check_nsa_triton,
}


def run_checks(shape: CheckShape) -> list[tuple[str, str, str]]:
    rows = []
    for name, check in CHECKS.items():
        try:
            status, detail = check(shape)
        except Exception as exc:  # a check that cannot run is reported, the suite goes on
            status, detail = "error", f"{type(exc).__name__}: {str(exc).splitlines()[0][:160]}"
        rows.append((name, status, detail))
        print(f"{name}: {status} ({detail})", flush=True)
    return rows


def grid(args: argparse.Namespace) -> list[TrainSetting]:
    """Rows in order of importance (`PRIORITY`), the first one profiled with `--profile-dir`."""
    if args.smoke:
        base = TrainSetting(
            flavor="debug",
            packing_length=256,
            dtype="float32",
            device="cpu",
            steps=1,
            warmup=1,
            vit_side=[2, 4],
            vae_side=[2, 2],
            text_ids=[8, 32],
            distinct_packs=2,
        )
        rows = [dataclasses.replace(base, backend=b) for b in ("sdpa", "flex")]
    else:
        rows = [
            dataclasses.replace(gpu_base(args), packing_length=n, backend=b, ac=ac, compile=c)
            for n, ac, c in PRIORITY
            for b in ("sdpa", "flex")
        ]
    if args.profile_dir:  # where a step's time goes
        rows[0] = dataclasses.replace(rows[0], profile_dir=args.profile_dir)
    return rows


def gpu_base(args: argparse.Namespace) -> TrainSetting:
    """BAGEL at 7B width with few layers, bf16, on the GPU, realistic image sizes."""
    return TrainSetting(
        flavor="7b-mot",
        llm_layers=args.llm_layers,
        vit_layers=args.vit_layers,
        dtype="bfloat16",
        device="cuda",
        steps=args.steps,
        warmup=args.warmup,
        peak_tflops=args.peak_tflops,
        vit_side=[27, 70],
        vae_side=[32, 64],
        text_ids=[16, 256],
        distinct_packs=2,
    )


PRIORITY = (
    (16384, "none", False),
    (16384, "full", False),
    (16384, "none", True),
    (8192, "none", False),
    (16384, "full", True),
    (8192, "full", False),
    (8192, "none", True),
    (8192, "full", True),
)
"""(packing_length, AC, compile) in the order the rows run (sdpa then flex each), so that a spent
time budget drops the least telling rows."""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--llm-layers", type=int, default=2)
    parser.add_argument("--vit-layers", type=int, default=2)
    parser.add_argument("--steps", type=int, default=3, help="timed steps per row")
    parser.add_argument(
        "--warmup", type=int, default=2, help="untimed steps per row (compiles, both pack shapes)"
    )
    parser.add_argument("--peak-tflops", type=float, default=0.0, help="peak TFLOP/s of the GPU (0: table)")
    parser.add_argument("--budget-s", type=float, default=570.0, help="wall-clock budget of the whole suite")
    parser.add_argument("--row-timeout-s", type=float, default=240.0, help="seconds one row may take")
    parser.add_argument("--smoke", action="store_true", help="the CPU-capable parts at CI size, on CPU")
    parser.add_argument(
        "--profile-dir",
        default="",
        help="record the first row's timed steps with torch.profiler into DIR/rank0 (trace and top-op summary)",
    )
    common.add_results_option(parser)
    args = parser.parse_args()
    start = time.perf_counter()

    gpu = torch.cuda.is_available() and not args.smoke
    if not gpu and not args.smoke:
        print("no CUDA device: the training rows will say so; use --smoke for a CPU dry run", flush=True)
    check_rows = run_checks(GPU_SHAPE if gpu else SMOKE_SHAPE)
    if gpu:
        torch.cuda.empty_cache()  # the rows' subprocesses get the memory the checks held

    settings = grid(args)
    rows, results = [], []
    for s in settings:
        left = args.budget_s - (time.perf_counter() - start)
        needed = 60.0 if s.compile else 25.0  # a row's start-up, build and steps, roughly
        if s.device == "cuda" and not gpu:
            r = {"error": "no CUDA device"}
        elif left < needed:
            r = {"error": f"suite time budget ({args.budget_s:.0f} s) spent"}
        else:
            r = run_row(s, min(args.row_timeout_s, left), isolated=not args.smoke)
        results.append(r)
        rows.append(table_row(s, r, extra=(s.packing_length,)))
        print(
            common.markdown_table(("packing_length", *TABLE_HEADER), [rows[-1]]).splitlines()[-1], flush=True
        )

    ok = [r for r in results if "error" not in r]
    device = ok[0]["device"] if ok else common.device_description("cuda" if gpu else "cpu")
    s0 = settings[0]
    checks = common.markdown_table(("check", "result", "detail"), check_rows, "lll")
    table = common.markdown_table(("packing_length", *TABLE_HEADER), rows, "r" + TABLE_ALIGN)
    shape = GPU_SHAPE if gpu else SMOKE_SHAPE
    notes = [
        f"checks: {shape.heads}/{shape.kv_heads} heads of {shape.head_dim}, {shape.tokens}-token pack of {shape.docs} "
        f"documents, {str(shape.dtype).replace('torch.', '')}",
        f"model: bagel {s0.flavor}"
        + (f" at full width with LLM {s0.llm_layers} + ViT {s0.vit_layers} layers" if s0.llm_layers else "")
        + (f" ({ok[0]['params_m']:,.0f}M parameters)" if ok else "")
        + f", {s0.dtype}, FSDP2 on one rank",
        f"data: synthetic full packs (60% understanding ViT {s0.vit_side[0]}-{s0.vit_side[1]} patches/side, "
        f"30% generation VAE {s0.vae_side[0]}-{s0.vae_side[1]} latent patches/side, 10% text), {s0.distinct_packs} "
        f"distinct packs; {s0.warmup} warm-up + {s0.steps} timed steps per row",
        flops_note(results),
        "at full depth on the same packs, anchor-style counts "
        + ", ".join(
            f"{full_depth_ratio(dataclasses.replace(s0, packing_length=n)):.2f}x ours at {n}"
            for n in sorted({s.packing_length for s in settings})
        ),
        ANCHORS,
        f"suite wall time {time.perf_counter() - start:.0f} s",
    ]
    print(checks)
    print(table)
    title = "gpu_suite (smoke, CPU)" if args.smoke else "gpu_suite"
    common.append_section(args.results, title, device, notes, checks + "\n\n" + table)


if __name__ == "__main__":
    main()
