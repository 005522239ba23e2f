"""`bagel-titan-estimate`: the per-rank peak accelerator memory of a training step, before
renting the GPUs. Same config and overrides as `bagel-titan`, plus `--world-size N`.

    bagel-titan-estimate --job.config_file train_configs/bagel_7b.toml --world-size 8

The model is built on the meta device (nothing is allocated, no process group is needed); the
plan (`bagel_titan.metrics.memory_estimate.plan_memory`) counts the sharded states exactly and
takes the activations of one pack from the model spec.
"""

from __future__ import annotations

import sys
from typing import Sequence

import torch

from bagel_titan.config.job_config import JobConfig
from bagel_titan.distributed.parallel_dims import ParallelDims
from bagel_titan.distributed.units import resolve_units
from bagel_titan.errors import UserError
from bagel_titan.lora import apply_lora
from bagel_titan.metrics.memory_estimate import MemoryPlan, generic_activations, plan_memory
from bagel_titan.plugins import PluginManager

_COMPUTE_BYTES = {"float32": 4, "bfloat16": 2}


def plan_for(job_config: JobConfig, plugins: PluginManager, world_size: int) -> MemoryPlan:
    """The memory plan of `job_config` on `world_size` ranks."""
    spec = plugins.model_specs.get(job_config.model.name)
    with torch.device("meta"):
        model = spec.build(job_config, plugins)
    for module in spec.frozen_modules(model, job_config):
        module.requires_grad_(False)
    if job_config.lora.enable:  # as the trainer builds it: adapters trainable, the base frozen in base_dtype
        apply_lora(model, spec, job_config.lora)
    par = job_config.parallelism
    dims = ParallelDims(dp_replicate=par.dp_replicate, dp_shard=par.dp_shard, world_size=world_size)
    units = resolve_units(model, spec.sharding_units(model), par.transformer_layer_cls_to_wrap)
    dtype = job_config.training.dtype
    ac = job_config.activation_checkpoint.mode != "none"
    tokens = job_config.data.packing_length
    activations = spec.activation_memory(model, job_config, tokens, _COMPUTE_BYTES[dtype], ac)
    if activations is None:
        hidden = max((p.shape[-1] for p in model.parameters() if p.dim() == 2), default=0)
        activations = generic_activations(units, tokens, hidden, _COMPUTE_BYTES[dtype], ac)
    separate = spec.separate_shards(model)
    return plan_memory(
        model,
        units,
        separate=separate,
        world_size=world_size,
        dp_shard=dims.dp_shard if par.fsdp else 1,
        dtype=dtype,
        cpu_offload=par.cpu_offload,
        ema=job_config.ema.enable,
        ema_on_host=job_config.ema.device == "cpu",
        activations=activations,
    )


def _world_size(argv: list[str]) -> tuple[int, list[str]]:
    rest, world = [], None
    it = iter(argv)
    for arg in it:
        if arg == "--world-size" or arg.startswith("--world-size="):
            value = arg.split("=", 1)[1] if "=" in arg else next(it, "")
            if not value.isdigit() or int(value) < 1:
                raise UserError(
                    f"--world-size must be a positive integer (the number of GPUs), got {value!r}"
                )
            world = int(value)
        else:
            rest.append(arg)
    if world is None:
        raise UserError("--world-size N is required: the number of GPUs (ranks) to plan for")
    return world, rest


def main(argv: Sequence[str] | None = None) -> int:
    from bagel_titan.config.manager import load_job_config, main_help

    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        if "-h" in argv or "--help" in argv:
            sys.stdout.write(__doc__ + "\n" + main_help(argv))
            return 0
        world, rest = _world_size(argv)
        job_config, plugins = load_job_config(rest)
        plan = plan_for(job_config, plugins, world)
    except UserError as err:
        sys.stderr.write(f"bagel-titan-estimate: error: {err}\n")
        return 2
    cfg = job_config
    sys.stdout.write(
        f"{cfg.model.name}/{cfg.model.flavor} on {world} rank(s): {cfg.training.dtype}, AC {cfg.activation_checkpoint.mode}, "
        f"cpu_offload {str(cfg.parallelism.cpu_offload).lower()}, EMA "
        f"{('on ' + cfg.ema.device) if cfg.ema.enable else 'off'}, packing_length {cfg.data.packing_length}\n"
        + plan.table()
        + "\n"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
