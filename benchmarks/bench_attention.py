"""Time and peak memory of every attention backend against pack length, on packed BAGEL-like batches.

Each pack holds documents of about `--doc-tokens` tokens made of text (causal), image (full) and
generated-image (noise) segments (`synthetic_attention`), plus 1% padding.
Every (backend, length) runs in its own subprocess so that peak memory is its own: on CUDA the
allocator's peak (`max_memory_allocated`), on CPU the growth of the process's peak RSS over its
state just before the first call. Each timed iteration is one new batch: its first layer call
(which also builds the batch's cached masks / BlockMask / NSA plan) and a second call (what every
further layer of the same batch costs). Reported: the median second call ("ms / layer call") and
the median difference ("per-batch setup ms"), over `--iters` iterations after `--warmup` (the
first flex call compiles). A backend that fails (out of memory, no CPU backward)
is reported with the reason instead of numbers.

    python benchmarks/bench_attention.py                                  # CPU, 1k-8k, forward
    python benchmarks/bench_attention.py --device cuda --dtype bfloat16 --backward \\
        --seq-lens 1024,2048,4096,8192,16384,32768 --heads 28 --kv-heads 4 --head-dim 128 \\
        --backends eager,sdpa,flex,nsa,nsa-torch

`nsa` uses the Triton kernels when `native-sparse-attention-triton` is installed (CUDA,
bf16/fp16); `nsa-torch` forces our PyTorch implementation.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import random
import resource
import statistics
import subprocess
import sys
import time
from typing import Callable

BACKENDS = {
    "eager": ("eager", {}),
    "sdpa": ("sdpa", {}),
    "sdpa-dense": ("sdpa", {"strategy": "dense"}),
    "sdpa-per-doc": ("sdpa", {"strategy": "per_document"}),
    "flex": ("flex", {}),
    "nsa": ("nsa", {}),
    "nsa-torch": ("nsa", {"implementation": "torch"}),
}


def _peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def run_one(args: argparse.Namespace, name: str, seq_len: int) -> dict:
    """Measure one backend at one length in this process; returns the row as a dict."""
    import torch

    from bagel_titan.protocols import AttentionLayerSpec
    from bagel_titan_plugins.attention.nsa.triton_path import triton_unusable_reason
    from bagel_titan_plugins.attention.nsa.config import NSAConfig
    from bagel_titan.plugins import PluginManager
    from synthetic_attention import random_inputs, random_pack

    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    backend_name, options = BACKENDS[name]
    spec = AttentionLayerSpec(args.heads, args.kv_heads, args.head_dim, args.hidden, 0, "llm")
    plugins = PluginManager()
    backend = plugins.attention_backends.get(backend_name)
    # The backend's [attention.<name>] section from these options (eager has none).
    config = (
        plugins.config_sections.get(f"attention.{backend_name}")(**options)
        if backend_name != "eager"
        else None
    )
    module = backend.build(spec, config).to(device)
    if backend_name == "nsa":
        module.to(dtype)
    rng = random.Random(0)
    pad = seq_len // 100
    docs = random_pack(rng, seq_len - pad, max(1, round((seq_len - pad) / args.doc_tokens)))
    inputs = random_inputs(
        docs,
        num_heads=args.heads,
        num_kv_heads=args.kv_heads,
        head_dim=args.head_dim,
        hidden_size=args.hidden,
        pad=pad,
        dtype=dtype,
        device=device,
        requires_grad=args.backward,
    )
    note = ""
    if name == "nsa":
        reason = triton_unusable_reason(NSAConfig(), device, dtype)
        note = "triton" if reason is None else "torch (no triton)"

    def call() -> None:
        out = module(inputs.q_THD, inputs.k_THD, inputs.v_THD, inputs.meta, inputs.hidden_TD)
        if args.backward:
            out.float().square().sum().backward()

    def timed(fn: Callable[[], None]) -> float:
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - start

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        base = _peak_rss_bytes()
    layer_times, setup_times = [], []
    for i in range(args.warmup + args.iters):
        inputs.meta._cache.clear()  # a new batch: masks and plans are rebuilt by the first layer
        first = timed(call)
        again = timed(call)  # every further layer of the same batch
        if i >= args.warmup:
            layer_times.append(again)
            setup_times.append(max(0.0, first - again))
    peak = (torch.cuda.max_memory_allocated() - base) if device.type == "cuda" else (_peak_rss_bytes() - base)
    return {
        "backend": name,
        "seq_len": seq_len,
        "docs": len(docs),
        "ms": statistics.median(layer_times) * 1e3,
        "setup_ms": statistics.median(setup_times) * 1e3,
        "peak_mib": peak / 2**20,
        "note": note,
    }


def run_isolated(args: argparse.Namespace, name: str, seq_len: int) -> dict:
    cmd = [sys.executable, __file__, "--single", f"{name}:{seq_len}"] + args.passthrough
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr.strip().splitlines() or ["exit code %d" % proc.returncode])[-1]
        return {"backend": name, "seq_len": seq_len, "error": tail[:120]}
    return json.loads(lines[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seq-lens", default="1024,2048,4096,8192")
    parser.add_argument("--backends", default="eager,sdpa,flex,nsa")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--kv-heads", type=int, default=2)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--doc-tokens", type=int, default=2048, help="average document length in a pack")
    parser.add_argument("--backward", action="store_true", help="time forward + backward")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--iters", type=int, default=3)
    parser.add_argument("--timeout", type=int, default=900, help="seconds per (backend, length)")
    parser.add_argument("--no-record", action="store_true", help="do not append to benchmarks/RESULTS.md")
    parser.add_argument(
        "--results",
        default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "RESULTS.md"),
        help="markdown file the run's section is appended to",
    )
    parser.add_argument("--single", default="", help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.passthrough = [a for a in sys.argv[1:] if a != "--single"]
    if "--results" in args.passthrough:  # where to record is not a measurement option
        at = args.passthrough.index("--results")
        del args.passthrough[at : at + 2]

    if args.single:
        name, seq_len = args.single.split(":")
        print(json.dumps(run_one(args, name, int(seq_len))))
        return

    unknown = set(args.backends.split(",")) - set(BACKENDS)
    if unknown:
        parser.error(f"unknown backend(s) {sorted(unknown)}; known: {sorted(BACKENDS)}")
    rows = []
    header = (
        "| backend | tokens | docs | ms / layer call | per-batch setup ms | peak MiB | note |\n"
        "|---|---:|---:|---:|---:|---:|---|"
    )
    print(header, flush=True)
    for seq_len in (int(s) for s in args.seq_lens.split(",")):
        for name in args.backends.split(","):
            row = run_isolated(args, name, seq_len)
            if "error" in row:
                line = f"| {name} | {seq_len} | | | | | failed: {row['error']} |"
            else:
                line = (
                    f"| {name} | {seq_len} | {row['docs']} | {row['ms']:.1f} | {row['setup_ms']:.1f} | {row['peak_mib']:.0f} | "
                    f"{row['note']} |"
                )
            rows.append(line)
            print(line, flush=True)

    if args.no_record:
        return
    import torch

    device = (
        torch.cuda.get_device_name()
        if args.device.startswith("cuda")
        else f"{platform.machine()} CPU, {os.cpu_count()} cores"
    )
    what = "forward + backward" if args.backward else "forward"
    section = [
        "",
        f"## bench_attention ({datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC)",
        "",
        f"- device: {device}; torch {torch.__version__}; {args.dtype}",
        f"- command: `python benchmarks/bench_attention.py {' '.join(args.passthrough)}`",
        f"- {what}; heads {args.heads}/{args.kv_heads} (q/kv), head_dim {args.head_dim}; documents of about "
        f"{args.doc_tokens} tokens with causal/full/noise segments, 1% padding; median of {args.iters} after "
        f"{args.warmup} warm-up; peak = CUDA allocator peak or CPU peak-RSS growth",
        "",
        header,
        *rows,
    ]
    with open(args.results, "a") as f:
        f.write("\n".join(section) + "\n")


if __name__ == "__main__":
    main()
