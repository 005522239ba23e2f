"""Apply each config's whole parallelize plan to its model on the meta device and report.

    torchrun --nproc_per_node 2 tests/scripts/plan_7b.py OUT.json CONFIG.toml [CONFIG.toml ...]

For each config, one after the other in the same process group: builds the model spec's model
on the meta device (nothing allocated), freezes, applies activation checkpointing, compile and
FSDP2 on this world's mesh, and reports the parameter counts, the FSDP-wrapped units and a
memory estimate per rank for 8 GPUs. OUT.json maps each config's file name to its report.
"""

import json
import os
import sys

import torch
import torch.distributed as dist
from torch.distributed.fsdp import FSDPModule

from bagel_titan.config.manager import load_job_config
from bagel_titan.distributed.parallel_dims import ParallelDims
from bagel_titan.distributed.utils import destroy_distributed, init_distributed
from bagel_titan.metrics.memory_estimate import estimate_memory
from bagel_titan.trainer import build_parallel_model


def plan(config_path: str) -> dict:
    job_config, plugins = load_job_config(["--job.config_file", config_path, "--training.device", "cpu"])
    dims = ParallelDims(
        job_config.parallelism.dp_replicate, job_config.parallelism.dp_shard, dist.get_world_size()
    )
    mesh = dims.build_mesh("cpu")
    spec, model = build_parallel_model(job_config, plugins, mesh)
    units = spec.sharding_units(model)
    estimate = estimate_memory(
        model,
        units,
        dp_shard=8,
        tokens_per_rank=job_config.data.packing_length,
        hidden_size=spec.flavors[job_config.model.flavor].llm.hidden_size,
        activation_checkpointing=job_config.activation_checkpoint.mode != "none",
    )
    if dist.get_rank() == 0:
        print(f"{os.path.basename(config_path)}:\n{estimate.table()}")
    return {
        "params_total": estimate.params_total,
        "params_trainable": estimate.params_trainable,
        "fsdp_units": sum(isinstance(u, FSDPModule) for u in units),
        "units": len(units),
        "root_is_fsdp": isinstance(model, FSDPModule),
        "all_meta": all(p.device.type == "meta" for p in model.parameters()),
        "estimate_total_gib_8_gpus": estimate.total_gib,
        "estimate_states_gib_8_gpus": estimate.states_gib,
        "param_names": sorted(n for n, _ in model.named_parameters())[:3],
    }


out_path, *config_paths = sys.argv[1:]
init_distributed(torch.device("cpu"))
reports = {os.path.basename(path): plan(path) for path in config_paths}
if dist.get_rank() == 0:
    with open(out_path, "w") as f:
        json.dump(reports, f)
destroy_distributed()
