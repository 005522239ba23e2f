"""How long a DCP checkpoint save blocks training, synchronous vs asynchronous.

Run: `torchrun --standalone --nproc_per_node 2 benchmarks/bench_checkpoint.py [--dim 1024 --depth 8]`
(CPU, gloo; on CUDA the model lives on the GPU and async saves stage to the CPU). An FSDP2
MLP stack with AdamW state is saved `--repeats` times per mode; "blocked" is the time
`maybe_save` keeps the training loop waiting, "complete" until the COMPLETE marker exists.
Rank 0 prints a table and appends it to benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import datetime
import os
import shlex
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from bagel_titan.checkpoint.manager import CheckpointManager
from bagel_titan.checkpoint.states import ModelState, OptimizerState
from bagel_titan.config.job_config import Checkpoint, JobConfig
from bagel_titan.distributed.parallel_dims import ParallelDims
from bagel_titan.distributed.parallelize import parallelize
from bagel_titan.distributed.utils import destroy_distributed, init_distributed, select_device

RESULTS = Path(__file__).resolve().parent / "RESULTS.md"


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--dim", type=int, default=1024)
    p.add_argument("--depth", type=int, default=8)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--device", default="auto")
    p.add_argument("--results", default=str(RESULTS), help="markdown file the run's section is appended to")
    args = p.parse_args()
    device = select_device(args.device)
    init_distributed(device)
    rank, world = dist.get_rank(), dist.get_world_size()
    dims = ParallelDims(1, -1, world)
    mesh = dims.build_mesh(device.type)

    model = nn.Sequential(
        *[
            nn.Sequential(nn.Linear(args.dim, 4 * args.dim), nn.Linear(4 * args.dim, args.dim))
            for _ in range(args.depth)
        ]
    ).to(device)
    parallelize(model, list(model), JobConfig(), mesh)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    model(torch.randn(2, args.dim, device=device)).sum().backward()
    opt.step()
    n_params = sum(p.numel() for p in model.parameters())
    state_gb = n_params * 4 * 3 / 1e9  # fp32 weights + two Adam moments

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp_list = [tmp]
        dist.broadcast_object_list(tmp_list)
        for mode in ("disabled", "async"):
            cfg = Checkpoint(enable=True, interval=1, keep_latest_k=1, async_mode=mode)
            manager = CheckpointManager(
                cfg,
                os.path.join(tmp_list[0], mode),
                {"model": ModelState(model), "optimizer": OptimizerState(model, opt)},
                dims.dp_rank,
                dims.dp_world_size,
            )
            blocked, complete = [], []
            for step in range(1, args.repeats + 1):
                dist.barrier()
                t0 = time.perf_counter()
                manager.maybe_save(step)
                blocked.append(time.perf_counter() - t0)
                manager.wait()
                dist.barrier()
                complete.append(time.perf_counter() - t0)
            manager.close()
            rows.append((mode, min(blocked), min(complete)))
    if rank == 0:
        header = f"| mode | blocked s (min of {args.repeats}) | complete s | state GB |\n|---|---|---|---|\n"
        body = "".join(f"| {m} | {b:.3f} | {c:.3f} | {state_gb:.2f} |\n" for m, b, c in rows)
        table = header + body
        print(table)
        dev = torch.cuda.get_device_name() if device.type == "cuda" else f"CPU ({os.cpu_count()} cores)"
        cmd = f"torchrun --standalone --nproc_per_node {world} benchmarks/bench_checkpoint.py " + shlex.join(
            sys.argv[1:]
        )
        stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
        with open(args.results, "a") as f:
            f.write(
                f"\n## bench_checkpoint: DCP save blocking time, sync vs async\n\n{stamp}; device: {dev}, "
                f"{world} ranks, gloo; {n_params / 1e6:.1f}M params\n\n`{cmd}`\n\n{table}"
            )
    destroy_distributed()


if __name__ == "__main__":
    main()
