"""A small model + stateful data + training loop run under torchrun by the distributed,
checkpoint and EMA tests (no tests of its own live here).

Run: `torchrun --standalone --nproc_per_node 2 tests/toy/dist_toy_job.py --run-folder R --out L`.
Rank 0 appends one JSON line per optimizer step to `--out`: the loss as a hex float (bitwise
comparisons), every rank's data position, and a checksum of the model's parameters.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor

TOY = Path(__file__).resolve()
PYTHON = sys.executable


class Block(nn.Module):
    """Residual MLP block: the sharding / checkpointing / compile unit."""

    def __init__(self, dim: int):
        super().__init__()
        self.up = nn.Linear(dim, 2 * dim)
        self.down = nn.Linear(2 * dim, dim)
        self.drop = nn.Dropout(0.1)

    def forward(self, x_BD: torch.Tensor) -> torch.Tensor:
        return x_BD + self.down(self.drop(torch.relu(self.up(x_BD))))


class ToyModel(nn.Module):
    """Blocks + head, plus a frozen `encoder` kept outside FSDP (like BAGEL's VAE)."""

    def __init__(self, dim: int = 16, depth: int = 3):
        super().__init__()
        self.encoder = nn.Linear(dim, dim)
        self.encoder.requires_grad_(False)
        self.blocks = nn.ModuleList(Block(dim) for _ in range(depth))
        self.head = nn.Linear(dim, 1)

    def forward(self, x_BD: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():  # FSDP casts forward inputs to the compute dtype: cast back
            h = self.encoder(x_BD.to(self.encoder.weight.dtype)).to(x_BD.dtype)
        for block in self.blocks:
            h = block(h)
        return self.head(h).sum(-1)  # [B]; a reduction, not a view (FSDP warns on views)


class ToySpec:
    """The export half of a model spec: writes `model.safetensors` in `dtype`."""

    def export(self, model, path, dtype, state_dict=None, *, ema=False):
        import torch.distributed as dist
        from safetensors.torch import save_file

        from bagel_titan.distributed.tensor_io import gather_full

        overrides = dict(state_dict or {})
        state = {k: gather_full(overrides.get(k, v), dtype) for k, v in model.state_dict().items()}
        if dist.get_rank() == 0:
            save_file(state, f"{path}/model.safetensors")


class ToyLoader:
    """An endless stateful stream of (x, y) batches for one data-parallel rank."""

    def __init__(self, seed: int, dp_rank: int, batch: int = 4, dim: int = 16):
        self.gen = torch.Generator().manual_seed(seed * 1000 + dp_rank)
        self.position = 0
        self.batch, self.dim = batch, dim

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor]:
        x = torch.randn(self.batch, self.dim, generator=self.gen)
        self.position += 1
        return x, x.sum(-1).sin()

    def state_dict(self) -> dict[str, Any]:
        return {"position": self.position, "gen": self.gen.get_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.position = state["position"]
        self.gen.set_state(state["gen"])


def checksum(tensors) -> float:
    """Sum over all ranks of every parameter shard (float64): equal weights give (nearly)
    equal checksums whatever the sharding."""
    total = torch.zeros((), dtype=torch.float64)
    for t in tensors:
        local = t.to_local() if isinstance(t, DTensor) else t
        total += local.detach().double().sum()
    dist.all_reduce(total)
    return total.item()


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser()
    p.add_argument("--run-folder", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--stop-at", type=int, default=0, help="exit after this step (force a save)")
    p.add_argument("--interval", type=int, default=2)
    p.add_argument("--keep", type=int, default=0)
    p.add_argument("--async-save", action="store_true")
    p.add_argument("--accum", type=int, default=2)
    p.add_argument("--ac", default="none")
    p.add_argument("--compile-backend", default="")
    p.add_argument("--reshard", default="default")
    p.add_argument("--dp-replicate", type=int, default=1)
    p.add_argument("--dtype", default="float32", help="FSDP compute dtype (mixed precision)")
    p.add_argument("--ema-decay", type=float, default=0.9)
    p.add_argument("--ema-start", type=int, default=2)
    p.add_argument("--no-checkpoint", action="store_true")
    p.add_argument("--initial-load-path", default="")
    p.add_argument("--load-step", type=int, default=-1)
    p.add_argument("--export", default="", help="export folder written at the end (EMA weights)")
    p.add_argument("--sleep-per-step", type=float, default=0.0)
    p.add_argument("--pid-dir", default="")
    return p.parse_args(argv)


def main(argv=None) -> None:
    from bagel_titan.checkpoint.export import export_weights
    from bagel_titan.checkpoint.manager import CheckpointManager
    from bagel_titan.checkpoint.states import ModelState, OptimizerState
    from bagel_titan.train_state import TrainState
    from bagel_titan.config.job_config import JobConfig
    from bagel_titan.distributed.parallel_dims import ParallelDims
    from bagel_titan.distributed.parallelize import parallelize
    from bagel_titan.distributed.utils import (
        destroy_distributed,
        init_distributed,
        select_device,
        set_deterministic,
        set_seed,
    )
    from bagel_titan.optim.ema import EMA

    args = parse_args(argv)
    device = select_device("cpu")
    init_distributed(device)
    rank = dist.get_rank()
    if args.pid_dir:
        Path(args.pid_dir, f"rank{rank}.pid").write_text(str(os.getpid()))
    set_deterministic(True)
    set_seed(0)

    cfg = JobConfig()
    cfg.parallelism.dp_replicate = args.dp_replicate
    cfg.parallelism.reshard_after_forward = args.reshard
    cfg.training.dtype = args.dtype
    cfg.activation_checkpoint.mode = args.ac
    cfg.compile.enable = bool(args.compile_backend)
    ck = cfg.checkpoint
    ck.enable = not args.no_checkpoint
    ck.interval, ck.keep_latest_k = args.interval, args.keep
    ck.async_mode = "async" if args.async_save else "disabled"
    ck.initial_load_path, ck.load_step = args.initial_load_path, args.load_step

    dims = ParallelDims(cfg.parallelism.dp_replicate, cfg.parallelism.dp_shard, dist.get_world_size())
    mesh = dims.build_mesh(device.type)
    model = ToyModel()
    parallelize(
        model, list(model.blocks), cfg, mesh, ignored_modules=[model.encoder],
        compile_backend=args.compile_backend or "inductor",
    )
    optimizer = torch.optim.AdamW(
        [p for p in model.parameters() if p.requires_grad], lr=1e-2, foreach=True
    )
    total = args.steps
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1.0, (s + 1) / 2) * (1 - s / (total + 1))
    )
    ema = EMA(model, decay=args.ema_decay, start_step=args.ema_start)
    train_state = TrainState()
    loader = ToyLoader(seed=0, dp_rank=dims.dp_rank)
    manager = CheckpointManager(
        ck, args.run_folder,
        {
            "model": ModelState(model), "optimizer": OptimizerState(model, optimizer),
            "lr_scheduler": scheduler, "train_state": train_state, "ema": ema,
            "dataloader": loader,
        },
        dp_rank=dims.dp_rank, dp_world_size=dims.dp_world_size,
    )
    start = manager.load()
    params = [p for p in model.parameters() if p.requires_grad]
    if rank == 0:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    out = open(args.out, "a") if rank == 0 else None

    def record(kind: str, **fields) -> None:
        if out is not None:
            out.write(json.dumps({"kind": kind, **fields}) + "\n")
            out.flush()

    record(
        "start", step=start, restored_data=manager.restored_data_state,
        model=checksum(params), ema=checksum(ema.shadow.values()), world_size=dist.get_world_size(),
    )
    for step in range(start + 1, total + 1):
        losses = []
        for _ in range(args.accum):
            x, y = next(loader)
            loss = nn.functional.mse_loss(model(x), y) / args.accum
            loss.backward()
            losses.append(loss.detach())
        torch.nn.utils.clip_grad_norm_(params, 1.0, foreach=True)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        ema.update(step)
        train_state.step = step
        step_loss = torch.stack(losses).sum()
        dist.all_reduce(step_loss)
        positions = [None] * dist.get_world_size()
        dist.all_gather_object(positions, loader.position)
        record(
            "step", step=step, loss=float(step_loss).hex(), positions=positions,
            model=checksum(params), ema=checksum(ema.shadow.values()),
        )
        stop = step == args.stop_at
        manager.maybe_save(step, force=stop or step == total)
        if stop:
            break
        time.sleep(args.sleep_per_step)
    manager.close()
    if args.export:
        export_weights(ToySpec(), model, args.export, torch.bfloat16, ema=ema)
    record("end", step=train_state.step)
    destroy_distributed()


# ---------------------------------------------------------------------------------------------
# Helpers for the tests that launch this script


def torchrun_cmd(nproc: int, *args: str) -> list[str]:
    return [PYTHON, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
            "--max-restarts=0", str(TOY), *args]


def toy_env(**extra: str) -> dict[str, str]:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", **extra)
    env.pop("BAGEL_TITAN_TEST_SAVE_PAUSE", None)
    env.update(extra)
    return env


def run_toy(nproc: int, *args: str, timeout: float = 120, **env: str) -> None:
    """Run the toy job to completion; fail with its output if it fails."""
    proc = subprocess.run(torchrun_cmd(nproc, *args), env=toy_env(**env), capture_output=True,
                          text=True, timeout=timeout)
    if proc.returncode:
        raise AssertionError(f"toy run failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")


def start_toy(nproc: int, *args: str, log: Path, **env: str) -> subprocess.Popen:
    """Start the toy job in its own session (so the test can kill all of it)."""
    return subprocess.Popen(torchrun_cmd(nproc, *args), env=toy_env(**env), stdout=open(log, "w"),
                            stderr=subprocess.STDOUT, start_new_session=True)


def kill_job(proc: subprocess.Popen) -> None:
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)


def wait_for(predicate, timeout: float, what: str, proc: subprocess.Popen | None = None, log: Path | None = None) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"job exited ({proc.returncode}) before {what}:\n"
                                 + (log.read_text()[-4000:] if log else ""))
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.1)


def read_records(path: Path, kind: str) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    lines = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [r for r in lines if r["kind"] == kind]


if __name__ == "__main__":
    main()
