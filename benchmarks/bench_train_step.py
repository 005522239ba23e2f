"""Training-step tokens/s, MFU and peak memory through the real trainer, across attention
backends, activation checkpointing and compile.

Every row builds `bagel_titan.trainer.Trainer` from a JobConfig (`load_job_config`) in its own
subprocess (so peak memory, compile caches and failures are its own), trains `--warmup` +
`--steps` steps on full synthetic packs (`synthetic_plugin.py`: understanding / generation /
text samples filling exactly `--packing-length` tokens) and times the last `--steps` from the
trainer's step-end hook (CUDA synchronised): data, forward, loss, backward, clip, optimizer,
metrics and hooks all included.

`--ac` takes the `[activation_checkpoint]` settings by name (`AC_MODES`): none, full,
selective (every `selective_every`-th unit) and op (every unit, matmul and attention outputs
kept). With compile on, the "graphs" column counts dynamo's graphs compiled in the warm-up steps
and in the timed steps: the packs differ in their understanding / generation / ViT token counts,
so a timed-step graph is a recompile. A row the config refuses (e.g. a backend without a CPU
backward) says "refused" with the one-line reason; any other error is a failed cell.

MFU uses two FLOP counts per packed batch:

- ours ("honest"): `BagelSpec.flops` = 3x forward matmuls: LLM dense (one MoT expert per token),
  attention over the query/key pairs each document's segment rule allows, ViT + connector,
  latent projections; the frozen VAE is not counted;
- anchor-style: the Qwen2 counter used for the published BAGEL figure (LMMS Engine, after
  verl's `FlopsCounter`): 6 x (LLM linear + embedding + lm_head weights) per token plus
  12 x T^2 x heads x head_dim x layers over the whole pack as one sequence, ViT excluded.

Peak FLOP/s come from `bagel_titan/metrics/device_flops.py` (or `--peak-tflops`); the CPU has
no entry, so MFU is "n/a" there unless `--peak-tflops` is given. Published anchors, for scale:
torchtitan Llama 3 8B on H100 in bf16, 33-39% MFU; LMMS Engine BAGEL on 32 H100s, "25-30%"
(counted anchor-style).

    python benchmarks/bench_train_step.py                       # CPU, debug flavor
    python benchmarks/bench_train_step.py --device cuda --dtype bfloat16 --flavor 7b-mot \\
        --llm-layers 4 --vit-layers 4 --packing-length 16384 --backends sdpa,flex \\
        --ac none,full --compile off,on
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from typing import Any

import common
from bagel_titan.hookspec import hookimpl

SCRIPT = os.path.abspath(__file__)

ANCHORS = (
    "published anchors: torchtitan Llama 3 8B on H100, bf16: 33-39% MFU; LMMS Engine BAGEL on 32 H100s: "
    '"25-30%" (ViT excluded, attention over whole packs: compare with the anchor-style column)'
)


@dataclass
class TrainSetting:
    """One row: everything that decides what the trainer runs."""

    backend: str = "sdpa"
    ac: str = "none"
    compile: bool = False
    flavor: str = "debug"
    llm_layers: int = 0
    vit_layers: int = 0
    packing_length: int = 1024
    dtype: str = "float32"
    device: str = "cpu"
    steps: int = 3
    warmup: int = 1
    peak_tflops: float = 0.0
    fsdp: bool = True
    vit_side: list[int] = field(default_factory=lambda: [4, 8])
    """[min, max] ViT patches per image side of the synthetic understanding samples."""
    vae_side: list[int] = field(default_factory=lambda: [2, 4])
    """[min, max] latent patches per image side of the synthetic generation samples."""
    text_ids: list[int] = field(default_factory=lambda: [16, 128])
    """[min, max] ids per answer (prompts are a quarter)."""
    distinct_packs: int = 4
    """Synthetic packs cycled through (each a different mix of samples)."""
    threads: int = 1
    """torch intra-op threads on CPU (1 is stable on a shared machine; 0 keeps torch's default)."""
    profile_dir: str = ""
    """Record the timed steps with `[profiling]` into this folder (the timings then include the
    profiler's own cost); empty: no profiler."""


AC_MODES = {
    "none": ("none", "layer"),
    "full": ("full", "layer"),
    "selective": ("selective", "layer"),
    "op": ("selective", "op"),
}
"""`--ac` names -> ([activation_checkpoint] mode, selective_granularity)."""


def job_argv(s: TrainSetting, dump_folder: str) -> list[str]:
    """The `bagel-titan` command-line overrides of one row."""
    if s.ac not in AC_MODES:
        raise ValueError(f"unknown activation checkpointing {s.ac!r}; use one of {', '.join(AC_MODES)}")
    ac_mode, ac_granularity = AC_MODES[s.ac]

    def ints(values: list[int]) -> str:
        return ",".join(str(v) for v in values)

    return [
        "--job.plugins",
        "synthetic_plugin",
        "--job.dump_folder",
        dump_folder,
        "--job.run_name",
        "bench",
        "--model.name",
        "bagel-bench",
        "--model.flavor",
        s.flavor,
        "--loss.components",
        "ce,flow_mse",
        "--bench.llm_layers",
        str(s.llm_layers),
        "--bench.vit_layers",
        str(s.vit_layers),
        "--bench.vit_side",
        ints(s.vit_side),
        "--bench.vae_side",
        ints(s.vae_side),
        "--bench.text_ids",
        ints(s.text_ids),
        "--bench.distinct_packs",
        str(s.distinct_packs),
        "--data.loader",
        "synthetic",
        "--data.packing_length",
        str(s.packing_length),
        "--attention.backend",
        s.backend,
        "--activation_checkpoint.mode",
        ac_mode,
        "--activation_checkpoint.selective_granularity",
        ac_granularity,
        "--compile.enable",
        str(s.compile).lower(),
        "--parallelism.fsdp",
        str(s.fsdp).lower(),
        "--training.device",
        s.device,
        "--training.dtype",
        s.dtype,
        "--training.steps",
        str(s.warmup + s.steps),
        "--metrics.log_freq",
        str(s.warmup + s.steps),
        "--metrics.enable_tensorboard",
        "false",
        "--metrics.peak_tflops",
        str(s.peak_tflops),
        "--checkpoint.enable",
        "false",
        "--checkpoint.export_at_end",
        "false",
        "--ema.enable",
        "false",
        *(
            [
                "--profiling.enable",
                "true",
                "--profiling.start_step",
                str(s.warmup + 1),
                "--profiling.steps",
                str(s.steps),
                "--profiling.folder",
                os.path.abspath(s.profile_dir),
            ]
            if s.profile_dir
            else []
        ),
    ]


def anchor_style_flops(num_tokens: int, llm: Any) -> float:
    """Training FLOPs of one pack the way the published BAGEL MFU counts them (see the module
    docstring): dense Qwen2 weights incl. embedding and lm_head on every token, and full T x T
    attention over the pack; no ViT."""
    d, hd = llm.hidden_size, llm.head_dim
    attn_linear = d * (llm.num_heads * hd + 2 * llm.num_kv_heads * hd + llm.num_heads * hd)
    dense = (attn_linear + 3 * d * llm.intermediate_size) * llm.num_layers + 2 * llm.vocab_size * d
    return 6.0 * dense * num_tokens + 12.0 * num_tokens**2 * hd * llm.num_heads * llm.num_layers


def unique_graphs() -> int:
    """Graphs dynamo has compiled in this process so far (each recompile adds one)."""
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


class StepClock:
    """A plugin that timestamps the start of training and the end of every step (after a CUDA
    synchronise): `times[k]` is the end of step k, `times[0]` the start; `graphs[k]` is the
    number of graphs compiled by then."""

    def __init__(self, device_type: str):
        self.device_type = device_type
        self.times: list[float] = []
        self.graphs: list[int] = []

    def _stamp(self) -> None:
        if self.device_type == "cuda":
            import torch

            torch.cuda.synchronize()
        self.times.append(time.perf_counter())
        self.graphs.append(unique_graphs())

    @hookimpl
    def bagel_titan_on_train_start(self, trainer: Any) -> None:
        self._stamp()

    @hookimpl
    def bagel_titan_on_step_end(self, trainer: Any, step: int, metrics: dict[str, float]) -> None:
        self._stamp()


def train_timed(argv: list[str], device_type: str) -> tuple[Any, StepClock]:
    """Run `bagel-titan argv` in this process with a `StepClock`; returns the closed trainer and
    its clock (the state of the run stays readable on the trainer)."""
    from bagel_titan.config.manager import load_job_config
    from bagel_titan.trainer import Trainer

    job_config, plugins = load_job_config(argv)
    clock = StepClock(device_type)
    plugins.pm.register(clock, name="bench-step-clock")
    try:
        trainer = Trainer(job_config, plugins)
        try:
            trainer.train()
        finally:
            trainer.close()
    finally:
        plugins.pm.unregister(clock)
    return trainer, clock


def run_setting(s: TrainSetting) -> dict[str, Any]:
    """Train one row in this process; returns its figures."""
    import torch
    from torch.distributed.fsdp import FSDPModule

    from bagel_titan.distributed.utils import destroy_distributed
    from bagel_titan.metrics.device_flops import peak_flops_per_second
    from bagel_titan.trainer import DTYPES

    if s.steps < 1 or s.warmup < 0:
        raise ValueError(f"--steps must be >= 1 and --warmup >= 0, got {s.steps} and {s.warmup}")
    if s.device == "cpu" and s.threads > 0:
        torch.set_num_threads(s.threads)
    with tempfile.TemporaryDirectory() as tmp:
        trainer, clock = train_timed(job_argv(s, tmp), torch.device(s.device).type)
        job_config = trainer.job_config
        device = trainer.device
        packs = trainer.dataloader.packs
        accum = job_config.training.grad_accum_steps
        measured = [packs[i % len(packs)] for i in range(s.warmup * accum, (s.warmup + s.steps) * accum)]
        seconds = clock.times[s.warmup + s.steps] - clock.times[s.warmup]
        end = s.warmup + s.steps
        new_graphs = [clock.graphs[k + 1] - clock.graphs[k] for k in range(s.warmup, end)]
        flops = sum(trainer.model_spec.flops(b) for b in measured)
        llm = trainer.model.arch.llm
        anchor = sum(anchor_style_flops(b.num_tokens, llm) for b in measured)
        tokens = sum(b.num_tokens for b in measured)
        peak = peak_flops_per_second(device, DTYPES[s.dtype], s.peak_tflops)
        result = {
            "tokens_per_step": tokens / s.steps,
            "step_ms": seconds / s.steps * 1e3,
            "tokens_per_s": tokens / seconds,
            "tflops": flops / seconds / 1e12,
            "gflop_per_token": flops / tokens / 1e9,
            "anchor_gflop_per_token": anchor / tokens / 1e9,
            "mfu": 100.0 * flops / seconds / peak if peak else None,
            "anchor_mfu": 100.0 * anchor / seconds / peak if peak else None,
            "peak_gib": common.peak_memory_bytes(device) / 2**30,
            "params_m": sum(p.numel() for p in trainer.model.parameters()) / 1e6,
            "device": common.device_description(device),
            "fsdp_wrapped": isinstance(trainer.model, FSDPModule),
            "graphs_warmup": clock.graphs[s.warmup] - clock.graphs[0],
            "recompiles": sum(new_graphs),
            "last_recompile": max((i + 1 for i, n in enumerate(new_graphs) if n), default=0),
        }
    destroy_distributed()
    return result


def run_in_process(s: TrainSetting) -> dict[str, Any]:
    """`run_setting` here (CI smoke runs: no interpreter start per row; peak memory is then the
    process's); a failure comes back as {"error": ...}."""
    from bagel_titan.distributed.utils import destroy_distributed

    from bagel_titan.errors import UserError

    try:
        return run_setting(s)
    except UserError as exc:  # the config refuses the row: its reason, not a failure
        destroy_distributed()
        return {"error": str(exc).splitlines()[0], "refused": True}
    except Exception as exc:  # a row that cannot run is reported, the others go on
        destroy_distributed()
        return {"error": f"{type(exc).__name__}: {str(exc).splitlines()[0]}"[:200]}


def run_row(s: TrainSetting, timeout_s: float, isolated: bool = True) -> dict[str, Any]:
    return run_isolated(s, timeout_s) if isolated else run_in_process(s)


EXCEPTION_LINE = re.compile(r"^(?:\[rank\d+\]:\s*)?((?:[\w.]+\.)?\w*(?:Error|Exception)\b.*)$")


def failure_reason(stderr: str, returncode: int) -> str:
    """The last "SomeError: message" line of a traceback (short), else the last line."""
    lines = [line.strip() for line in stderr.splitlines() if line.strip()]
    matches = [m.group(1) for m in map(EXCEPTION_LINE.match, lines) if m]
    reason = matches[-1] if matches else (lines[-1] if lines else f"exit code {returncode}")
    return reason[:200]


def run_isolated(s: TrainSetting, timeout_s: float) -> dict[str, Any]:
    """`run_setting` in a fresh interpreter; a failure or timeout comes back as {"error": ...}."""
    cmd = [sys.executable, SCRIPT, "--single", json.dumps(dataclasses.asdict(s))]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout_s:.0f} s"}
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if lines:  # the result, or a refusal (`--single` prints it and exits 0)
        return json.loads(lines[-1])
    return {"error": failure_reason(proc.stderr, proc.returncode)}


def torch_threads() -> int:
    import torch

    return torch.get_num_threads()


def pct(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.1f}%"


TABLE_HEADER = (
    "backend",
    "AC",
    "compile",
    "tokens/step",
    "step ms",
    "tokens/s",
    "TFLOP/s",
    "MFU",
    "anchor-style MFU",
    "peak GiB",
    "graphs warm-up / timed",
    "note",
)
TABLE_ALIGN = "lllrrrrrrrrl"


def table_row(s: TrainSetting, r: dict[str, Any], extra: tuple = ()) -> tuple:
    """One table row (the failure reason in "note" when the row could not run)."""
    head = (*extra, s.backend, s.ac, "on" if s.compile else "off")
    if "error" in r:
        kind = "refused at config load" if r.get("refused") else "FAILED"
        return (*head, "", "", "", "", "", "", "", "", f"{kind}: {r['error']}")
    graphs = f"{r['graphs_warmup']} / {r['recompiles']}" if s.compile else "-"
    return (
        *head,
        f"{r['tokens_per_step']:,.0f}",
        f"{r['step_ms']:,.1f}",
        f"{r['tokens_per_s']:,.0f}",
        f"{r['tflops']:.3f}",
        pct(r["mfu"]),
        pct(r["anchor_mfu"]),
        f"{r['peak_gib']:.2f}",
        graphs,
        f"profiled into {s.profile_dir} (timings include the profiler)" if s.profile_dir else "",
    )


def full_depth_ratio(s: TrainSetting) -> float:
    """Anchor-style over our FLOPs for the flavor at full depth on this row's packs (with few
    layers the embedding and lm_head, which anchor-style counts on every token, dominate)."""
    from bagel_titan_plugins.bagel.config import BagelConfig, architecture_for
    from bagel_titan_plugins.bagel.flops import training_flops
    from synthetic_plugin import BenchSection, build_packs

    arch, options = architecture_for(s.flavor), BagelConfig()
    mix = BenchSection(
        vit_side=s.vit_side, vae_side=s.vae_side, text_ids=s.text_ids, distinct_packs=s.distinct_packs
    )
    packs = build_packs(arch, options, s.packing_length, mix)
    ours = sum(training_flops(p, arch, options) for p in packs)
    return sum(anchor_style_flops(p.num_tokens, arch.llm) for p in packs) / ours


def flops_note(results: list[dict[str, Any]]) -> str:
    ok = [r for r in results if "error" not in r]
    if not ok:
        return "FLOPs per token: no row ran"
    r = ok[0]
    return (
        f"FLOPs per token (training): ours {r['gflop_per_token']:.4f} GFLOP (ViT included, attention per "
        f"document and segment), anchor-style {r['anchor_gflop_per_token']:.4f} GFLOP "
        f"({r['anchor_gflop_per_token'] / r['gflop_per_token']:.2f}x ours)"
    )


def grid_note(results: list[dict[str, Any]]) -> str:
    """How many cells ran, were refused by the config, failed; the recompiles in timed steps."""
    refused = sum(1 for r in results if r.get("refused"))
    failed = sum(1 for r in results if "error" in r and not r.get("refused"))
    recompiles = sum(r.get("recompiles", 0) for r in results)
    return (
        f"cells: {len(results) - refused - failed} ran, {refused} refused at config load, {failed} failed; "
        f"graphs compiled in timed steps (recompiles), all cells: {recompiles}"
    )


def parse_grid(args: argparse.Namespace) -> list[TrainSetting]:
    base = dict(
        flavor=args.flavor,
        llm_layers=args.llm_layers,
        vit_layers=args.vit_layers,
        packing_length=args.packing_length,
        dtype=args.dtype,
        device=args.device,
        steps=args.steps,
        warmup=args.warmup,
        peak_tflops=args.peak_tflops,
        fsdp=not args.no_fsdp,
        threads=args.threads,
        profile_dir=args.profile_dir,
        vit_side=args.vit_side,
        vae_side=args.vae_side,
        text_ids=args.text_ids,
        distinct_packs=args.distinct_packs,
    )
    compile_values = {"off": False, "on": True}
    unknown = set(args.compile.split(",")) - set(compile_values)
    if unknown:
        raise SystemExit(f"--compile takes off and/or on, got {sorted(unknown)}")
    return [
        TrainSetting(backend=b, ac=ac, compile=compile_values[c], **base)
        for b in args.backends.split(",")
        for ac in args.ac.split(",")
        for c in args.compile.split(",")
    ]


def add_model_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--flavor", default="debug")
    parser.add_argument("--llm-layers", type=int, default=0, help="LLM layers to build (0: the flavor's)")
    parser.add_argument("--vit-layers", type=int, default=0, help="ViT layers to build (0: the flavor's)")
    parser.add_argument("--packing-length", type=int, default=1024)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--steps", type=int, default=3, help="timed steps per row")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps first (compile happens here)")
    parser.add_argument(
        "--peak-tflops", type=float, default=0.0, help="peak TFLOP/s of one device (0: table)"
    )
    parser.add_argument("--no-fsdp", action="store_true", help="train without FSDP2 (single rank only)")
    parser.add_argument(
        "--profile-dir",
        default="",
        help="record the timed steps with torch.profiler into DIR/rank0 (a trace and a summary of the top ops)",
    )
    parser.add_argument(
        "--threads", type=int, default=1, help="torch intra-op threads on CPU (0: torch's default)"
    )
    parser.add_argument(
        "--vit-side",
        type=int,
        nargs=2,
        default=[4, 8],
        metavar=("MIN", "MAX"),
        help="ViT patches per image side (7b-mot realistic: 27 70)",
    )
    parser.add_argument(
        "--vae-side",
        type=int,
        nargs=2,
        default=[2, 4],
        metavar=("MIN", "MAX"),
        help="latent patches per generated image side (7b-mot realistic: 32 64)",
    )
    parser.add_argument(
        "--distinct-packs",
        type=int,
        default=4,
        help="synthetic packs cycled through: warm-up steps >= this time every pack with its shapes seen before",
    )
    parser.add_argument(
        "--text-ids",
        type=int,
        nargs=2,
        default=[16, 128],
        metavar=("MIN", "MAX"),
        help="ids per answer (prompts are a quarter)",
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_model_options(parser)
    parser.add_argument("--backends", default="eager,sdpa")
    parser.add_argument(
        "--ac",
        default="none,full",
        help=f"activation checkpointing, comma-separated: {','.join(AC_MODES)} (op: selective at op granularity)",
    )
    parser.add_argument("--compile", default="off", help="off, on or off,on")
    parser.add_argument("--timeout", type=float, default=900.0, help="seconds per row")
    parser.add_argument(
        "--smoke", action="store_true", help="CI size: 256-token packs, one timed step, rows in this process"
    )
    parser.add_argument("--single", default="", help=argparse.SUPPRESS)
    common.add_results_option(parser)
    args = parser.parse_args()

    if args.single:
        from bagel_titan.errors import UserError

        try:
            result = run_setting(TrainSetting(**json.loads(args.single)))
        except UserError as exc:  # refused by the config: the reason is the row's result
            result = {"error": str(exc).splitlines()[0], "refused": True}
        print(json.dumps(result), flush=True)
        return
    if args.smoke:
        args.packing_length, args.steps, args.warmup = 256, 1, 1
        args.vit_side, args.vae_side, args.text_ids = [2, 4], [2, 2], [8, 32]

    settings = parse_grid(args)
    rows, results = [], []
    for s in settings:
        r = run_row(s, args.timeout, isolated=not args.smoke)
        results.append(r)
        rows.append(table_row(s, r))
        print(common.markdown_table(TABLE_HEADER, [rows[-1]]).splitlines()[-1], flush=True)
    table = common.markdown_table(TABLE_HEADER, rows, TABLE_ALIGN)
    ok = [r for r in results if "error" not in r]
    device = ok[0]["device"] if ok else args.device
    s0 = settings[0]
    notes = [
        f"model: bagel flavor {s0.flavor}"
        + (f", LLM {s0.llm_layers} layers" if s0.llm_layers else "")
        + (f", ViT {s0.vit_layers} layers" if s0.vit_layers else "")
        + (f" ({ok[0]['params_m']:,.1f}M parameters)" if ok else "")
        + f", {s0.dtype}, [parallelism] fsdp = {str(s0.fsdp).lower()}"
        + (f" (model wrapped with FSDP2: {'yes' if ok[0]['fsdp_wrapped'] else 'no'})" if ok else ""),
        f"data: synthetic full packs of {s0.packing_length} tokens (60% understanding ViT {s0.vit_side[0]}-{s0.vit_side[1]} "
        f"patches/side, 30% generation VAE {s0.vae_side[0]}-{s0.vae_side[1]} latent patches/side, 10% text); "
        f"{s0.distinct_packs} distinct packs cycled; {s0.warmup} warm-up + {s0.steps} timed steps through "
        f"`Trainer.train()`",
        flops_note(results),
        *(
            [
                f"at full depth on the same packs, anchor-style counts {full_depth_ratio(s0):.2f}x ours (with few "
                f"layers the embedding and lm_head it counts on every token dominate)"
            ]
            if s0.llm_layers
            else []
        ),
        "MFU: n/a without a peak for the device (pass --peak-tflops)"
        if ok and ok[0]["mfu"] is None
        else "MFU = FLOPs / time / peak dense FLOP/s of one device",
        ANCHORS,
        "peak memory: CUDA max allocated, or the process RSS high-water mark on CPU"
        + (" (smoke: rows share one process)" if args.smoke else ", one process per row"),
    ]
    if s0.device == "cpu":
        notes.append(f"torch {s0.threads or torch_threads()} intra-op thread(s)")
    notes.append(grid_note(results))
    print(table)
    for note in notes[2:]:
        print(note)
    common.append_section(args.results, "bench_train_step", device, notes, table)
    if any("error" in r and not r.get("refused") for r in results):
        raise SystemExit("some cells failed (see the note column)")


if __name__ == "__main__":
    main()
