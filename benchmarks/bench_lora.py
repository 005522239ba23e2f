"""LoRA against the full fine-tune: step time, peak memory and trainable parameters through the
real trainer, on the debug model and a mid-size one.

Each row trains `bagel_titan.trainer.Trainer` in its own interpreter (so peak memory is its own)
on the synthetic full packs of `synthetic_plugin.py` and times the last `--steps` steps from the
step-end hook (as `bench_train_step.py`). The rows of a model differ only in `[lora]`: the
full fine-tune trains every parameter with AdamW; LoRA trains rank-`--rank` adapters on every
LLM projection of both experts ("und", "gen"), everything else frozen.

"mid" is the debug layout (same vocabulary, ViT patches and VAE, so the same synthetic packs
fit) widened to an 8-layer, 512-wide LLM with a 4-layer, 256-wide ViT: about 50M parameters.

    python benchmarks/bench_lora.py                    # CPU: debug and mid, full vs LoRA
    python benchmarks/bench_lora.py --device cuda --dtype bfloat16 --models 7b-mot --llm-layers 4 \\
        --vit-layers 2 --packing-length 16384
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import tempfile
from typing import Any

import common
from bench_train_step import TrainSetting, failure_reason, job_argv, train_timed

SCRIPT = os.path.abspath(__file__)


def register_mid_flavor() -> None:
    """Add the "mid" flavor (module docstring) to the BAGEL flavors of this process."""
    from bagel_titan_plugins.bagel.config import FLAVORS

    debug = FLAVORS["debug"]
    llm = dataclasses.replace(
        debug.llm, hidden_size=512, intermediate_size=1408, num_layers=8, num_heads=8, num_kv_heads=2
    )
    vit = dataclasses.replace(debug.vit, hidden_size=256, intermediate_size=1024, num_layers=4, num_heads=4)
    FLAVORS.setdefault("mid", dataclasses.replace(debug, llm=llm, vit=vit))


def lora_argv(rank: int) -> list[str]:
    """`[lora]` overrides of a LoRA row; rank 0: the full fine-tune."""
    if not rank:
        return []
    return ["--lora.enable", "true", "--lora.rank", str(rank), "--lora.alpha", str(2 * rank)]


def run_setting(s: TrainSetting, rank: int) -> dict[str, Any]:
    """Train one row in this process; returns its figures."""
    import torch

    from bagel_titan.distributed.utils import destroy_distributed

    register_mid_flavor()
    if s.device == "cpu" and s.threads > 0:
        torch.set_num_threads(s.threads)
    with tempfile.TemporaryDirectory() as tmp:
        trainer, clock = train_timed(job_argv(s, tmp) + lora_argv(rank), torch.device(s.device).type)
        seconds = clock.times[s.warmup + s.steps] - clock.times[s.warmup]
        params = list(trainer.model.parameters())
        result = {
            "step_ms": seconds / s.steps * 1e3,
            "peak_gib": common.peak_memory_bytes(trainer.device) / 2**30,
            "params_m": sum(p.numel() for p in params) / 1e6,
            "trainable_m": sum(p.numel() for p in params if p.requires_grad) / 1e6,
            "device": common.device_description(trainer.device),
        }
    destroy_distributed()
    return result


def run_isolated(s: TrainSetting, rank: int, timeout_s: float) -> dict[str, Any]:
    cmd = [sys.executable, SCRIPT, "--single", json.dumps({"setting": dataclasses.asdict(s), "rank": rank})]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout_s:.0f} s"}
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode != 0 or not lines:
        return {"error": failure_reason(proc.stderr, proc.returncode)}
    return json.loads(lines[-1])


HEADER = (
    "model",
    "parameters",
    "training",
    "trainable",
    "step ms",
    "peak GiB",
    "step time vs full",
    "peak vs full",
    "note",
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="debug,mid", help='flavors, comma separated ("mid": see above)')
    parser.add_argument("--rank", type=int, default=16, help="LoRA rank")
    parser.add_argument("--llm-layers", type=int, default=0, help="LLM layers to build (0: the flavor's)")
    parser.add_argument("--vit-layers", type=int, default=0, help="ViT layers to build (0: the flavor's)")
    parser.add_argument("--packing-length", type=int, default=1024)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--steps", type=int, default=3, help="timed steps per row")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps first")
    parser.add_argument(
        "--threads", type=int, default=1, help="torch intra-op threads on CPU (0: torch's default)"
    )
    parser.add_argument("--ac", default="none", help="activation checkpointing mode of every row")
    parser.add_argument("--timeout", type=float, default=900.0, help="seconds per row")
    parser.add_argument("--single", default="", help=argparse.SUPPRESS)
    common.add_results_option(parser)
    args = parser.parse_args()

    if args.single:
        row = json.loads(args.single)
        print(json.dumps(run_setting(TrainSetting(**row["setting"]), row["rank"])), flush=True)
        return
    rows, device = [], args.device
    for flavor in args.models.split(","):
        s = TrainSetting(
            backend="sdpa",
            ac=args.ac,
            flavor=flavor,
            llm_layers=args.llm_layers,
            vit_layers=args.vit_layers,
            packing_length=args.packing_length,
            dtype=args.dtype,
            device=args.device,
            steps=args.steps,
            warmup=args.warmup,
            threads=args.threads,
            vit_side=[4, 8],
            vae_side=[2, 4],
            text_ids=[16, 128],
        )
        full = run_isolated(s, 0, args.timeout)
        lora = run_isolated(s, args.rank, args.timeout)
        for name, r in (("full fine-tune", full), (f"LoRA r={args.rank} (und+gen)", lora)):
            if "error" in r:
                rows.append((flavor, "", name, "", "", "", "", "", f"skipped: {r['error']}"))
                continue
            device = r["device"]
            ratio = lambda key: f"{r[key] / full[key]:.2f}x" if "error" not in full else ""  # noqa: E731
            rows.append(
                (
                    flavor,
                    f"{r['params_m']:,.1f}M",
                    name,
                    f"{r['trainable_m']:,.2f}M",
                    f"{r['step_ms']:,.1f}",
                    f"{r['peak_gib']:.2f}",
                    ratio("step_ms"),
                    ratio("peak_gib"),
                    "",
                )
            )
            print(common.markdown_table(HEADER, [rows[-1]]).splitlines()[-1], flush=True)
    table = common.markdown_table(HEADER, rows, "lrlrrrrrl")
    notes = [
        f"synthetic full packs of {args.packing_length} tokens (understanding / generation / text mix of "
        f"`synthetic_plugin.py`), {args.dtype}, activation checkpointing {args.ac}, AdamW, one rank; "
        f"{args.warmup} warm-up + {args.steps} timed steps through `Trainer.train()`",
        "peak memory: CUDA max allocated, or the process RSS high-water mark on CPU (one process per row: "
        "includes the interpreter, torch and the data)",
    ]
    if args.device == "cpu":
        notes.append(f"torch {args.threads} intra-op thread(s)")
    print(table)
    common.append_section(args.results, "bench_lora", device, notes, table)


if __name__ == "__main__":
    main()
