"""Host memory of the weight I/O at BAGEL-7B width on 2 gloo ranks: sharded load, one training
step, streamed export.

Run: `python benchmarks/bench_weights_io.py [--llm-layers 1 --vit-layers 2]` (it launches
torchrun itself). An official-layout folder with random bf16 weights is written at full 7B
width (hidden 3584, MLP 18944, vocab 152064, 28/4 heads, SigLIP 1152, the full FLUX VAE) with
few layers; then each rank builds the job on the meta device, loads its shard, trains one step
with the LLM frozen (`[model] freeze = ["llm"]`, EMA on; bf16 compute, full AC, units resharded
after forward, so that the step
fits a shared 24 GiB machine) and exports. Each phase's peak RSS (Linux VmHWM, reset between
phases) is compared with M, the model's parameters in fp32 (what a naive full load holds). A
reload check compares every exported tensor with the trained EMA / frozen weights in bf16.
The last line: `weights_io: ranks=2 model_gib=M load_peak_rss_gib=L export_peak_rss_gib=E`.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import tempfile
from contextlib import AbstractContextManager
from typing import Any

import torch

import common

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FLAVOR = "bench-7b-width"
GIB = 2**30


def register_flavor(llm_layers: int, vit_layers: int) -> None:
    """BAGEL-7B-MoT's widths with few layers, as a `[model] flavor` of this process."""
    from bagel_titan_plugins.bagel.config import FLAVORS

    arch = FLAVORS["7b-mot"]
    FLAVORS[FLAVOR] = dataclasses.replace(
        arch,
        llm=dataclasses.replace(arch.llm, num_layers=llm_layers),
        vit=dataclasses.replace(arch.vit, num_layers=vit_layers),
    )


def job_args(args: argparse.Namespace, folder: str, data: dict[str, str], run: str) -> list[str]:
    return [
        "--job.config_file",
        os.path.join(REPO, "train_configs", "debug_model.toml"),
        "--job.dump_folder",
        run,
        "--job.run_name",
        "bench",
        "--model.flavor",
        FLAVOR,
        "--model.pretrained_path",
        folder,
        "--model.tokenizer_path",
        data["tokenizer"],
        "--model.freeze",
        '["llm"]',
        "--data.datasets",
        f'[{{path = "{data["data"]}"}}]',
        "--data.num_workers",
        "0",
        "--data.packing_length",
        str(args.packing_length),
        "--training.steps",
        "1",
        "--training.device",
        "cpu",
        "--training.dtype",
        "bfloat16",
        "--activation_checkpoint.mode",
        "full",
        "--attention.backend",
        "sdpa",
        "--parallelism.reshard_after_forward",
        "always",
        "--ema.enable",
        "true",
        "--checkpoint.enable",
        "false",
        "--checkpoint.export_at_end",
        "false",
        "--validation.enable",
        "false",
        "--bagel.vae_path",
        "",
        "--metrics.enable_tensorboard",
        "false",
    ]


def _reset_peak() -> None:
    with open("/proc/self/clear_refs", "w") as f:  # "5": reset the resident-set high-water mark
        f.write("5")


def _peak_gib() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024 / GIB
    raise RuntimeError("no VmHWM in /proc/self/status")


def worker(args: argparse.Namespace) -> None:
    import torch.distributed as dist
    from safetensors import safe_open

    from bagel_titan.config.manager import load_job_config
    from bagel_titan.distributed.tensor_io import gather_full
    from bagel_titan.distributed.utils import destroy_distributed
    from bagel_titan.trainer import Trainer

    torch.set_num_threads(1)
    register_flavor(args.llm_layers, args.vit_layers)
    job_config, plugins = load_job_config(job_args(args, args.folder, json.loads(args.data), args.work_dir))
    peaks = {}
    trainer = Trainer(job_config, plugins)  # meta build -> FSDP2 -> to_empty -> sharded load -> EMA
    peaks["load"] = _peak_gib()
    _reset_peak()
    trainer.train()
    peaks["step"] = _peak_gib()
    _reset_peak()
    peaks["before_export"] = _peak_gib()  # the resident set the export starts from
    export = os.path.join(args.work_dir, "export")
    trainer.export(export)
    peaks["export"] = _peak_gib()
    rank = dist.get_rank()

    # The export reloads to the trained weights: EMA shadow for trainable tensors, else the model's.
    expected = dict(trainer.model.state_dict())
    assert trainer.ema is not None  # job_args: --ema.enable true
    expected.update(trainer.ema.state_dict())
    mismatched = []
    # Rank 0 reads the export; the other ranks only join gather_full's collectives.
    reader: AbstractContextManager[Any] = (
        safe_open(os.path.join(export, "ema.safetensors"), "pt") if rank == 0 else open(os.devnull)
    )
    with reader as f:
        for key, value in expected.items():
            full = gather_full(value, torch.bfloat16)
            if rank == 0 and not torch.equal(f.get_tensor(key), full):
                mismatched.append(key)
    with open(os.path.join(args.work_dir, f"rank{rank}.json"), "w") as out:
        json.dump(
            {
                "peaks": peaks,
                "mismatched": mismatched,
                "exported": sorted(os.listdir(export)),
                "trainable": sum(p.numel() for p in trainer.trainable_params),
            },
            out,
        )
    destroy_distributed()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--llm-layers", type=int, default=1)
    p.add_argument("--vit-layers", type=int, default=2)
    p.add_argument("--packing-length", type=int, default=512)
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--folder", help=argparse.SUPPRESS)
    p.add_argument("--work-dir", help=argparse.SUPPRESS)
    p.add_argument("--data", help=argparse.SUPPRESS)
    common.add_results_option(p)
    args = p.parse_args()
    if args.worker:
        return worker(args)

    from bagel_titan.config.manager import load_job_config
    from bagel_titan_plugins.bagel import weights
    from bagel_titan_plugins.data.example_data import ensure_example_data

    register_flavor(args.llm_layers, args.vit_layers)
    with tempfile.TemporaryDirectory(prefix="bench_weights_io.") as tmp:
        data = ensure_example_data(os.path.join(tmp, "data"))
        folder, run = os.path.join(tmp, "folder"), os.path.join(tmp, "run")
        job_config, plugins = load_job_config(job_args(args, folder, data, run))
        spec = plugins.model_specs.get("bagel")
        with torch.device("meta"):
            model = spec.build(job_config, plugins)
        n_model = sum(t.numel() for t in model.state_dict().values())
        n_vae = sum(t.numel() for t in model.vae.module.state_dict().values())
        model_gib = 4 * (n_model + n_vae) / GIB
        weights.write_random_weights(model, folder, torch.bfloat16)
        del model
        cmd = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node",
            "2",
            os.path.abspath(__file__),
            "--worker",
            "--folder",
            folder,
            "--work-dir",
            run,
            "--data",
            json.dumps(data),
            "--llm-layers",
            str(args.llm_layers),
            "--vit-layers",
            str(args.vit_layers),
            "--packing-length",
            str(args.packing_length),
        ]
        subprocess.run(cmd, check=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
        ranks = []
        for r in range(2):
            with open(os.path.join(run, f"rank{r}.json")) as f:
                ranks.append(json.load(f))
    if ranks[0]["mismatched"]:
        raise SystemExit(f"the export does not reload to the trained weights: {ranks[0]['mismatched'][:5]}")
    target = 0.75 * model_gib + 2
    rows = [
        [f"rank {r}", f"{d['peaks']['load']:.2f}", f"{d['peaks']['step']:.2f}", f"{d['peaks']['export']:.2f}"]
        for r, d in enumerate(ranks)
    ]
    load = max(d["peaks"]["load"] for d in ranks)
    export = max(d["peaks"]["export"] for d in ranks)
    body = common.markdown_table(
        ["rank", "load peak RSS GiB", "step peak RSS GiB", "export peak RSS GiB"], rows
    )
    notes = [
        f"7B width (hidden 3584, MLP 18944, vocab 152064, SigLIP 1152, full FLUX VAE), {args.llm_layers} LLM "
        f"layer(s), {args.vit_layers} ViT layer(s): M = {model_gib:.2f} GiB of fp32 parameters "
        f"({(n_model + n_vae) / 1e9:.2f} B, VAE included); {ranks[0]['trainable'] / 1e6:.0f} M trainable (LLM frozen), EMA on",
        f"target: load and export peaks below 0.75 x M + 2 GiB = {target:.2f} GiB per rank: "
        f"load {'met' if load < target else 'MISSED'} ({load / model_gib:.2f} x M), "
        f"export {'met' if export < target else 'MISSED'} ({export / model_gib:.2f} x M)",
        f"exported files: {', '.join(ranks[0]['exported'])}; every exported tensor equals the trained EMA / "
        f"frozen weights in bf16",
        "peak RSS = Linux VmHWM of each rank, reset between phases; load includes the process start-up; "
        "resident when the export starts (after the step): "
        + ", ".join(f"rank {r} {d['peaks']['before_export']:.2f} GiB" for r, d in enumerate(ranks)),
    ]
    print(
        common.append_section(
            args.results, "Weight I/O at 7B width, 2 gloo ranks", common.device_description(), notes, body
        )
    )
    print(
        f"weights_io: ranks=2 model_gib={model_gib:.2f} load_peak_rss_gib={load:.2f} "
        f"export_peak_rss_gib={export:.2f}"
    )


if __name__ == "__main__":
    main()
