"""The trainer's own overhead: our training step against the plainest forward / backward / step
of the same tiny BAGEL on the same packs, interleaved in one process.

The trainer (`Trainer.train()`, built from a JobConfig) runs the debug model on synthetic full
packs (`synthetic_plugin.py`) with metrics logging (console, metrics.jsonl, TensorBoard) every
`--log-freq` steps, checkpointing enabled (bookkeeping every step; the interval is beyond the
run, so no save falls inside the measurement) and its step-end hook. After every trainer step,
the hook runs one plain step of a second, identical model:

    loss = CE + flow MSE; loss.backward(); clip_grad_norm_(1.0); AdamW.step(); zero_grad()

on synthetic packs, on the very pack the trainer just used (both sides meet the 4 distinct packs
again and again); on the example data, on the same pack taken from a loader of its own, built
from the same config (same seed, same stream; checked pack by pack), as a bare `for batch in
loader` loop would: fresh from a loader worker, its fetch timed with the step. Before the trainer
starts, the plain step runs once over the stream's packs from a third such loader, untimed:
oneDNN builds its kernels per shape, and whichever side met a shape first paid for it. (Earlier
versions ran the plain step on the trainer's next pack, untimed fetch, no warm pass: the spread
of pack sizes and shapes met first moved the ratio from -2% to +16% between runs of the same
code; a copy of the pack taken just before the plain step sat in the CPU's cache and made the
plain step 1-2% faster.) The two measurements alternate (A B A B ...) and share the machine's
noise. A trainer step is the time from the hook's return to its next call (data, forward, loss,
backward, clip, step, metrics, checkpoint bookkeeping, hook dispatch). Reported: median step
times, the median over pairs of trainer / plain - 1 (the verdict: both sides ran the same pack,
moments apart), the same per round, and the overhead of the summed times (which also carries
the logging steps), in fp32 and in bf16 (the trainer: fp32 master weights, forward and loss under
bf16 autocast, as `[training] dtype = "bfloat16"` runs on one rank; the plain step: the same
autocast), each on synthetic packs and on the example data through the real packed loader. On
one rank the trainer never wraps with FSDP2 (it would shard nothing). Target: under 5%.

    python benchmarks/bench_overhead.py [--steps 40] [--rounds 2] [--packing-length 512] [--clock wall|cpu]
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import tempfile
import time
from typing import Any, Callable, cast

import torch
import torch.nn.functional as F

import common
from bagel_titan.cli import setup_logging
from bagel_titan.hookspec import hookimpl
from bench_train_step import TrainSetting, job_argv

TARGET = 0.05

CLOCKS = {"wall": time.perf_counter, "cpu": time.thread_time}
"""`--clock`: wall time, or the main thread's CPU time (waits excluded; steady on a loaded machine)."""
clock = time.perf_counter


class PlainStep:
    """forward / backward / clip / AdamW step of a bare model, the plainest possible."""

    def __init__(
        self,
        model: torch.nn.Module,
        lr: float,
        betas: tuple[float, float],
        eps: float,
        max_norm: float,
        dtype: str = "float32",
    ):
        self.model = model
        self.dtype = dtype
        self.params = [p for p in model.parameters() if p.requires_grad]
        # The same kernel as the trainer's `[optimizer] implementation = "auto"` on CPU.
        self.optimizer = torch.optim.AdamW(self.params, lr=lr, betas=betas, eps=eps, fused=True)
        self.max_norm = max_norm

    def __call__(self, batch: Any, seed: int) -> None:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.dtype == "bfloat16"):
            out = self.model(batch, torch.Generator().manual_seed(seed))
            loss = F.cross_entropy(out.ce_logits.float(), batch.packed_label_ids)
            if out.pred_velocity is not None and out.pred_velocity.numel():
                loss = loss + F.mse_loss(out.pred_velocity.float(), out.target_velocity.float())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.params, self.max_norm, foreach=True)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)


class Interleaver:
    """Step-end hook: closes the trainer step's timing, runs and times one plain step (fetching
    its batch with `fetch(trainer, step)`, then training on it), then reopens the trainer's
    timing."""

    def __init__(self, plain: PlainStep, fetch: Callable[[Any, int], Any], warmup: int):
        self.plain, self.fetch, self.warmup = plain, fetch, warmup
        self.trainer_s: list[float] = []
        self.plain_s: list[float] = []
        self.plain_fetch_s: list[float] = []
        self._resumed: float | None = None

    @hookimpl
    def bagel_titan_on_step_end(self, trainer: Any, step: int, metrics: dict[str, float]) -> None:
        now = clock()
        if self._resumed is not None and step > self.warmup:
            self.trainer_s.append(now - self._resumed)
        start = clock()
        batch = self.fetch(trainer, step)
        fetched = clock()
        self.plain(batch, step)
        if step > self.warmup:
            self.plain_s.append(clock() - start)
            self.plain_fetch_s.append(fetched - start)
        self._resumed = clock()


def synthetic_pack_of(trainer: Any, step: int) -> Any:
    """The pack step `step` trained on ("synthetic" loader: pre-built packs in turn)."""
    packs = trainer.dataloader.packs
    return packs[(step - 1) % len(packs)]


class PlainLoader:
    """The plain loop's own loader, built from the trainer's config (same seed, same stream): the
    plain step of step `n` takes pack `n` from it as a bare `for batch in loader` loop would,
    fresh from a loader worker, and that fetch is timed with the step."""

    def __init__(self, trainer: Any):
        self.loader = trainer._build_dataloader(trainer.job_config)
        self.stream = iter(self.loader)

    def __call__(self, trainer: Any, step: int) -> Any:
        batch = next(self.stream)
        served = trainer.dataloader.last  # the "packed-recorded" loader's batch of this step
        if not torch.equal(served.packed_text_ids, batch.packed_text_ids):
            raise RuntimeError(
                f"step {step}: the plain loader's pack is not the trainer's; the stream is not reproducible"
            )
        return batch

    def close(self) -> None:
        self.loader.close()


def warm_up_shapes(trainer: Any, plain: PlainStep, count: int) -> None:
    """The plain step over the stream's first `count` packs (from a loader of its own), untimed:
    oneDNN builds its kernels per shape, and without this pass whichever side met a shape first
    paid for it."""
    loader = trainer._build_dataloader(trainer.job_config)
    try:
        for seed, batch in zip(range(count), loader):
            plain(batch, 1_000_000 + seed)
    finally:
        loader.close()


def example_data_argv(folder: str) -> list[str]:
    """Overrides that train on the bundled example data through the real "packed" loader (one
    worker); the plain step takes the same packs from a loader of its own (`PlainLoader`)."""
    from bagel_titan_plugins.data.example_data import write_example_data

    example = write_example_data(os.path.join(folder, "example"), num_samples=256)
    toml = os.path.join(folder, "example_data.toml")
    with open(toml, "w") as f:
        f.write(
            f'[[data.datasets]]\npath = "{example["data"]}"\n\n'
            "[bagel.processor]\nvit_min_size = 56\nvit_max_size = 112\nvae_min_size = 32\nvae_max_size = 64\n"
        )
    return [
        "--job.config_file",
        toml,
        "--data.loader",
        "packed-recorded",
        "--model.tokenizer_path",
        example["tokenizer"],
        "--data.num_workers",
        "1",
        "--data.packing_strategy",
        "best_fit_decreasing",
        "--data.packing_window",
        "64",
    ]


def _time_data_wait(trainer: Any) -> list[float]:
    """Time every `trainer._next_batches()` (the step's wait for the loader, part of the trainer
    step), to set beside the plain loop's own fetch."""
    waits: list[float] = []
    fetch = trainer._next_batches

    def timed() -> Any:
        start = clock()
        batches = fetch()
        waits.append(clock() - start)
        return batches

    trainer._next_batches = timed
    return waits


def measure(setting: TrainSetting, log_freq: int, real_data: bool) -> Pairs:
    """Run the trainer with the plain loop interleaved; the timed pairs."""
    from bagel_titan.config.manager import load_job_config
    from bagel_titan.distributed.utils import destroy_distributed
    from bagel_titan.trainer import Trainer
    from bagel_titan_plugins.bagel.spec import BagelSpec, build_bagel
    from synthetic_plugin import architecture_of

    with tempfile.TemporaryDirectory() as tmp:
        argv = job_argv(setting, tmp) + [
            "--metrics.log_freq",
            str(log_freq),
            "--metrics.enable_tensorboard",
            "true",
            "--checkpoint.enable",
            "true",
            "--checkpoint.interval",
            "1000000",
        ]
        if real_data:
            argv += example_data_argv(tmp)
        job_config, plugins = load_job_config(argv)
        trainer = Trainer(job_config, plugins)
        data_wait_s = _time_data_wait(trainer)
        torch.manual_seed(job_config.training.seed)
        model = build_bagel(
            architecture_of(job_config),
            cast(BagelSpec, trainer.model_spec).bagel_config(job_config),  # the bagel-bench spec
            backend=plugins.attention_backends.get(setting.backend),
        )
        model.init_weights()
        model.train()
        opt = job_config.optimizer
        plain = PlainStep(
            model,
            opt.lr,
            (opt.betas[0], opt.betas[1]),
            opt.eps,
            job_config.training.max_norm,
            job_config.training.dtype,
        )
        plain_loader = None
        fetch: Callable[[Any, int], Any] = synthetic_pack_of
        if real_data:
            warm_up_shapes(trainer, plain, setting.warmup + setting.steps)
            fetch = plain_loader = PlainLoader(trainer)
        interleaver = Interleaver(plain, fetch, setting.warmup)
        plugins.pm.register(interleaver, name="bench-overhead-interleaver")
        try:
            trainer.train()
        finally:
            plugins.pm.unregister(interleaver)
            if plain_loader is not None:
                plain_loader.close()
            trainer.close()
            destroy_distributed()
    return Pairs(
        interleaver.trainer_s,
        interleaver.plain_s,
        data_wait_s[setting.warmup :],  # the fetches of the timed steps (step n fetches batch n)
        interleaver.plain_fetch_s,
    )


@dataclasses.dataclass
class Pairs:
    """The timed pairs of one row (seconds), pooled over rounds by `+`."""

    trainer_s: list[float]
    plain_s: list[float]
    data_wait_s: list[float]
    """The trainer's time fetching its batch, part of `trainer_s`."""
    plain_fetch_s: list[float]
    """The plain loop's time fetching its batch, part of `plain_s`."""

    def __add__(self, other: Pairs) -> Pairs:
        return Pairs(
            *(mine + theirs for mine, theirs in zip(dataclasses.astuple(self), dataclasses.astuple(other)))
        )

    @property
    def paired(self) -> float:
        """Median over pairs of trainer / plain - 1: both ran the same pack, moments apart."""
        return statistics.median(t / p - 1 for t, p in zip(self.trainer_s, self.plain_s))

    @property
    def summed(self) -> float:
        """Summed trainer time over summed plain time - 1: carries the logging steps too."""
        return sum(self.trainer_s) / sum(self.plain_s) - 1


ROWS = (
    ("fp32, synthetic packs", "float32", False),
    ("fp32, example data through the packed loader (1 worker)", "float32", True),
    ("bf16 autocast, synthetic packs", "bfloat16", False),
    ("bf16 autocast, example data through the packed loader (1 worker)", "bfloat16", True),
)
"""(label, [training] dtype, real data) of every row; one rank, so never FSDP2-wrapped."""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=40, help="interleaved pairs measured")
    parser.add_argument(
        "--warmup", type=int, default=4, help="untimed pairs first (synthetic: 4 distinct packs)"
    )
    parser.add_argument("--rounds", type=int, default=2, help="times every row runs, in turn; pairs pooled")
    parser.add_argument("--packing-length", type=int, default=512)
    parser.add_argument("--backend", default="sdpa")
    parser.add_argument("--log-freq", type=int, default=10, help="trainer metrics logging interval")
    parser.add_argument(
        "--threads", type=int, default=1, help="torch intra-op threads (1: stable on a shared CPU)"
    )
    parser.add_argument(
        "--clock",
        choices=sorted(CLOCKS),
        default="wall",
        help="wall time, or the main thread's CPU time (leaves out waits and other processes' load)",
    )
    parser.add_argument("--smoke", action="store_true", help="CI size: 4 pairs of 256-token packs")
    common.add_results_option(parser)
    args = parser.parse_args()
    if args.smoke:
        args.steps, args.warmup, args.packing_length, args.rounds = 4, 1, 256, 1
    torch.set_num_threads(args.threads)
    global clock
    clock = CLOCKS[args.clock]
    setup_logging()  # the trainer's console metrics are printed, as in a real run
    base = TrainSetting(
        backend=args.backend,
        packing_length=args.packing_length,
        steps=args.steps,
        warmup=args.warmup,
        device="cpu",
        dtype="float32",
    )
    pooled: dict[str, Pairs] = {}
    by_round: dict[str, list[str]] = {}
    for _ in range(args.rounds):  # rounds interleave the rows: a slow spell of the machine hits all
        for label, dtype, real_data in ROWS:
            pairs = measure(dataclasses.replace(base, dtype=dtype), args.log_freq, real_data)
            pooled[label] = pooled[label] + pairs if label in pooled else pairs
            by_round.setdefault(label, []).append(f"{pairs.paired:+.1%}")
            print(label, by_round[label][-1], flush=True)
    rows = []
    for label, pairs in pooled.items():
        rows.append(
            (
                label,
                len(pairs.trainer_s),
                f"{statistics.median(pairs.trainer_s) * 1e3:.1f}",
                f"{statistics.median(pairs.plain_s) * 1e3:.1f}",
                f"{pairs.paired:+.1%}",
                ", ".join(by_round[label]),
                f"{pairs.summed:+.1%}",
                f"{statistics.median(pairs.data_wait_s) * 1e3:.2f} / {statistics.median(pairs.plain_fetch_s) * 1e3:.2f}",
                "yes" if pairs.paired < TARGET else "NO",
            )
        )
    table = common.markdown_table(
        (
            "trainer",
            "pairs",
            "trainer step ms (median)",
            "plain step ms (median)",
            "overhead (median paired)",
            "by round",
            "overhead of summed times",
            "of which fetching the batch ms (median, trainer / plain)",
            f"under {TARGET:.0%}",
        ),
        rows,
    )
    notes = [
        f"model: bagel flavor debug, fp32 master weights, attention {args.backend}; packs of {args.packing_length} tokens: synthetic "
        f"(full, 4 distinct, cycled) or the example data (best_fit_decreasing); the plain step runs right after "
        f"each trainer step on the same pack",
        f"trainer: metrics every {args.log_freq} steps (console, jsonl, TensorBoard), checkpointing on (no save "
        f"inside the window), EMA off; both sides clip at 1.0 and use fused AdamW",
        f"{args.rounds} round(s) of the rows in turn, each {args.warmup} warm-up pairs, then {args.steps}; torch {args.threads} intra-op thread(s); "
        f"clock: {'wall time' if args.clock == 'wall' else 'CPU time of the main thread (waits left out)'}",
        "fetching the batch: the trainer's `_next_batches` and the plain loop's `next(loader)`, both inside the "
        "step times",
        "example data: the plain step takes the same pack from a loader of its own (same config and stream, checked "
        "pack by pack); before the trainer started, the plain step ran over every pack of the window once from a third "
        "such loader (oneDNN's per-shape kernels built for both sides)",
    ]
    print(table)
    common.append_section(args.results, "bench_overhead", common.device_description("cpu"), notes, table)


if __name__ == "__main__":
    main()
