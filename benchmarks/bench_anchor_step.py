"""The anchors' tiny-BAGEL training step through bagel-titan: tokens/s on the same packs as the
BAGEL release code and LMMS Engine measured them (issue 20, item 2).

Configuration (the anchors' `config.md`, shapes in `tiny_bagel.json` beside this script): a tiny
BAGEL-MoT (Qwen2 LLM 256 wide, 1024 MLP, 4 layers, 4/2 heads, vocab 269; tiny FLUX-architecture
VAE, frozen), random init, world size 1, one pack per step. The sample stream is generated here
exactly as the anchors' `synth.py` does (200 rows, seed 0, mix "t2i=3,text=1", byte-level tokens)
and packed first-fit into 2048-token bins: the first packs hold 1921, 1695, 1859, 2027, 1989,
1964, 1999, 2011 tokens.

Each pack goes through bagel-titan's own pieces: `BagelSample`s -> `BagelCollator` (in the
loader, untimed, as the anchors leave data loading out) -> `Trainer.train_step` (timed: VAE
encode, forward, CE + flow-MSE loss, backward, clip 1.0, AdamW lr 1e-4). The first `--warmup`
steps are left out of the medians; graphs compiled during each timed step (recompiles: dynamo's
`unique_graphs`) are counted, and the table says in which timed step the last one happened.

    python benchmarks/bench_anchor_step.py                        # fp32, default backend
    python benchmarks/bench_anchor_step.py --dtype bf16 --backend sdpa,eager --compile off,on
    python benchmarks/bench_anchor_step.py --baseline /tmp/old    # interleave a checkout of another commit

`--baseline DIR` runs the same rows with DIR's `bagel_titan` and `plugins` (a `git worktree` of
another commit) in alternation with this tree's, round by round, so that both share the
machine's load; the table then gives their ratio.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from typing import Any, Iterator

import numpy as np

import common

HERE = os.path.dirname(os.path.abspath(__file__))
CONFIG_PATH = os.path.join(HERE, "tiny_bagel.json")
SCRIPT = os.path.abspath(__file__)
KINDS = ("t2i", "text", "und")
DTYPES = {"fp32": "float32", "bf16": "bfloat16"}


def load_config(path: str = CONFIG_PATH) -> dict[str, Any]:
    with open(path) as f:
        return json.load(f)


# -- the anchors' sample stream (same draws, same order as their synth.py) ------------------------


def _byte_ids() -> dict[int, int]:
    """Byte value -> token id: the position in GPT-2's `bytes_to_unicode` order."""
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    order = printable + [b for b in range(256) if b not in printable]
    return {b: i for i, b in enumerate(order)}


BYTE_ID = _byte_ids()


def text_to_ids(text: str) -> list[int]:
    """One token per UTF-8 byte (the anchors' byte-level tokenizer without merges)."""
    return [BYTE_ID[b] for b in text.encode("utf-8")]


def parse_mix(mix: str) -> dict[str, float]:
    """ "t2i=3,text=1" -> {"t2i": 0.75, "text": 0.25} (order kept)."""
    weights: dict[str, float] = {}
    for part in filter(None, (p.strip() for p in mix.split(","))):
        kind, _, value = part.partition("=")
        if kind.strip() not in KINDS:
            raise SystemExit(f"--mix: unknown sample kind {kind.strip()!r}; known: {', '.join(KINDS)}")
        weights[kind.strip()] = float(value) if value else 1.0
    total = sum(weights.values())
    if total <= 0:
        raise SystemExit(f"--mix {mix!r} has no positive weight")
    return {k: v / total for k, v in weights.items()}


def make_rows(cfg: dict[str, Any], mix: str) -> list[dict[str, Any]]:
    """The stream's rows in order (deterministic in the mix and the config's seed)."""
    d = cfg["data"]
    weights = parse_mix(mix)
    rng = np.random.default_rng(int(d["seed"]))
    kinds, probs = list(weights), np.array(list(weights.values()))
    words = d["words"]

    def phrase(lo: int, hi: int) -> str:
        n = int(rng.integers(lo, hi))
        return " ".join(words[int(i)] for i in rng.integers(0, len(words), n))

    rows = []
    for index in range(int(d["n_rows"])):
        kind = kinds[int(rng.choice(len(kinds), p=probs))]
        seed = int(rng.integers(0, 2**31 - 1))
        if kind == "t2i":
            sides = d["t2i_image_sides"]
            row = dict(
                kind=kind,
                caption=phrase(*d["caption_words"]),
                height=int(rng.choice(sides)),
                width=int(rng.choice(sides)),
                image_seed=seed,
            )
        elif kind == "text":
            row = dict(kind=kind, prompt=phrase(*d["prompt_words"]), answer=phrase(*d["answer_words"]))
        else:
            sides = d["und_image_sides"]
            row = dict(
                kind=kind,
                question=phrase(*d["prompt_words"]),
                answer=phrase(*d["answer_words"]),
                height=int(rng.choice(sides)),
                width=int(rng.choice(sides)),
                image_seed=seed,
            )
        row["index"] = index
        rows.append(row)
    return rows


def num_tokens(row: dict[str, Any], cfg: dict[str, Any]) -> int:
    """Packed length of a row (the same in both anchors and here)."""
    vae_stride = cfg["vae"]["tiny"]["downsample"] * cfg["bagel"]["latent_patch_size"]
    patch = cfg["vit"]["patch_size"]
    if row["kind"] == "t2i":
        return (
            len(row["caption"].encode())
            + 2
            + (row["height"] // vae_stride) * (row["width"] // vae_stride)
            + 2
        )
    if row["kind"] == "text":
        return len(row["prompt"].encode()) + 2 + len(row["answer"].encode()) + 2
    return (
        (row["height"] // patch) * (row["width"] // patch)
        + 2
        + len(row["question"].encode())
        + 2
        + len(row["answer"].encode())
        + 2
    )


def first_fit_packs(
    rows: list[dict[str, Any]], cfg: dict[str, Any], pack_len: int, n_packs: int
) -> list[list[dict]]:
    """LMMS Engine's first-fit packing (one open bin, emitted when the next row does not fit;
    over-long rows dropped; the bin flushed at the end of every pass over the stream)."""
    packs: list[list[dict]] = []
    buf: list[dict] = []
    buf_len, i = 0, 0
    if min(num_tokens(r, cfg) for r in rows) > pack_len:
        raise SystemExit(f"--pack-len {pack_len}: no row of the stream fits")
    while len(packs) < n_packs:
        row = rows[i % len(rows)]
        i += 1
        n = num_tokens(row, cfg)
        if n <= pack_len:
            if buf_len and buf_len + n > pack_len:
                packs.append(buf)
                buf, buf_len = [], 0
            buf.append(row)
            buf_len += n
        if i % len(rows) == 0 and buf:
            packs.append(buf)
            buf, buf_len = [], 0
    return packs[:n_packs]


def image_pixels(row: dict[str, Any]):
    """[3, H, W] float32 in [-1, 1]: the row's uint8 noise image."""
    import torch

    pixels = np.random.default_rng(row["image_seed"]).integers(
        0, 256, (row["height"], row["width"], 3), dtype=np.uint8
    )
    return torch.from_numpy(pixels).permute(2, 0, 1).float().div(127.5).sub(1.0)


# -- bagel-titan's side: the model spec, the samples, the loader -----------------------------------


@dataclass
class AnchorSection:
    """`[anchor]`: which anchor stream the benchmark's loader serves."""

    mix: str = "t2i=3,text=1"
    """Sample mix of the stream (kinds t2i, text, und)."""
    vae: str = "tiny"
    """VAE of tiny_bagel.json: "tiny" or "full"."""
    packs: int = 8
    """Packs the loader serves (cycled)."""


def anchor_section(job_config) -> AnchorSection:
    return job_config.section("anchor") if job_config.has_section("anchor") else AnchorSection()


def anchor_architecture(cfg: dict[str, Any], vae: str = "tiny"):
    from bagel_titan_plugins.bagel.config import BagelArchitecture, LLMArgs, VAEArgs, ViTArgs

    llm, vit, ae = cfg["llm"], cfg["vit"], cfg["vae"][vae]
    return BagelArchitecture(
        llm=LLMArgs(
            vocab_size=llm["vocab_size"],
            hidden_size=llm["hidden_size"],
            intermediate_size=llm["intermediate_size"],
            num_layers=llm["num_hidden_layers"],
            num_heads=llm["num_attention_heads"],
            num_kv_heads=llm["num_key_value_heads"],
            rms_norm_eps=llm["rms_norm_eps"],
            rope_theta=llm["rope_theta"],
            qk_norm=llm["qk_norm"],
            tie_word_embeddings=llm["tie_word_embeddings"],
            max_position_embeddings=llm["max_position_embeddings"],
        ),
        vit=ViTArgs(
            hidden_size=vit["hidden_size"],
            intermediate_size=vit["intermediate_size"],
            num_layers=vit["num_hidden_layers"],
            num_heads=vit["num_attention_heads"],
            image_size=vit["image_size"],
            patch_size=vit["patch_size"],
            num_channels=vit["num_channels"],
            layer_norm_eps=vit["layer_norm_eps"],
        ),
        vae=VAEArgs(
            ch=ae["ch"],
            ch_mult=tuple(ae["ch_mult"]),
            num_res_blocks=ae["num_res_blocks"],
            z_channels=ae["z_channels"],
            in_channels=ae["in_channels"],
            out_ch=ae["out_ch"],
            resolution=ae["resolution"],
            scale_factor=ae["scale_factor"],
            shift_factor=ae["shift_factor"],
        ),
    )


def special_tokens(cfg: dict[str, Any]):
    from bagel_titan_plugins.bagel.processor import SpecialTokens

    s = cfg["special_tokens"]
    return SpecialTokens(
        bos=s["bos_token_id"],
        eos=s["eos_token_id"],
        vision_start=s["start_of_image"],
        vision_end=s["end_of_image"],
    )


def bagel_sample(row: dict[str, Any], cfg: dict[str, Any]):
    """A row as the `BagelSample` BAGEL's processor makes of it (t2i: caption, causal, no loss +
    noised VAE image; text: prompt, no loss + answer with CE on it and on <|im_end|>; und: ViT
    image + question + answer)."""
    from bagel_titan_plugins.bagel.processor import BagelSample, TextSegment, VaeSegment, VitSegment

    key = ("anchor", row["index"])
    if row["kind"] == "t2i":
        stride = cfg["vae"]["tiny"]["downsample"] * cfg["bagel"]["latent_patch_size"]
        return BagelSample(
            [
                TextSegment(text_to_ids(row["caption"]), loss=False),
                VaeSegment(image_pixels(row), stride, noised=True),
            ],
            key,
        )
    if row["kind"] == "text":
        return BagelSample(
            [
                TextSegment(text_to_ids(row["prompt"]), loss=False),
                TextSegment(text_to_ids(row["answer"]), loss=True),
            ],
            key,
        )
    return BagelSample(
        [
            VitSegment(image_pixels(row), cfg["vit"]["patch_size"]),
            TextSegment(text_to_ids(row["question"]), loss=False),
            TextSegment(text_to_ids(row["answer"]), loss=True),
        ],
        key,
    )


def anchor_bagel_config(cfg: dict[str, Any], mix: str):
    from bagel_titan_plugins.bagel.config import BagelConfig

    b = cfg["bagel"]
    return BagelConfig(
        visual_und="und" in parse_mix(mix),
        visual_gen=True,
        timestep_shift=b["timestep_shift"],
        latent_patch_size=b["latent_patch_size"],
        max_latent_size=b["max_latent_size"],
        vit_max_num_patch_per_side=b["vit_max_num_patch_per_side"],
        interpolate_pos=b["interpolate_pos"],
    )


class AnchorPacks:
    """The collated anchor packs in stream order, cycled (`TrainDataloader`)."""

    def __init__(self, batches: list[Any]):
        self.batches = batches
        self.position = 0

    def __iter__(self) -> Iterator[Any]:
        while True:
            batch = self.batches[self.position % len(self.batches)]
            self.position += 1
            yield batch

    def state_dict(self) -> dict[str, Any]:
        return {"position": self.position}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.position = int(state["position"])

    def data_stats(self) -> dict[str, float]:
        return {}


def _spec_class():
    from bagel_titan_plugins.bagel.spec import BagelSpec

    class AnchorSpec(BagelSpec):
        """BAGEL with the anchors' shapes (tiny_bagel.json) and `[bagel]` options."""

        name = "bagel-anchor"

        def architecture(self, job_config):
            return anchor_architecture(load_config(), anchor_section(job_config).vae)

        @staticmethod
        def bagel_config(job_config):
            return anchor_bagel_config(load_config(), anchor_section(job_config).mix)

        def build_collator(self, job_config):
            from bagel_titan_plugins.bagel.collator import BagelCollator

            arch = self.architecture(job_config)
            return BagelCollator(
                job_config,
                self.bagel_config(job_config),
                special_tokens=special_tokens(load_config()),
                vit_patch_size=arch.vit.patch_size,
                vae_downsample=arch.vae.downsample,
            )

    return AnchorSpec


class AnchorLoaderBuilder:
    """`[data] loader = "anchor"`: the anchor packs, collated by the model spec's collator."""

    name = "anchor"

    def build(self, job_config, plugins, model_spec, **kwargs: Any) -> AnchorPacks:
        cfg, section = load_config(), anchor_section(job_config)
        rows = make_rows(cfg, section.mix)
        collate = model_spec.build_collator(job_config)
        packs = first_fit_packs(rows, cfg, job_config.data.packing_length, section.packs)
        return AnchorPacks([collate([bagel_sample(r, cfg) for r in pack]) for pack in packs])


try:  # hooks for `--job.plugins bench_anchor_step` (the worker loads this module as a plugin)
    from bagel_titan.hookspec import hookimpl

    @hookimpl
    def bagel_titan_model_specs():
        return [_spec_class()()]

    @hookimpl
    def bagel_titan_dataloaders():
        return [AnchorLoaderBuilder()]

    @hookimpl
    def bagel_titan_config_sections():
        return {"anchor": AnchorSection}
except ImportError:  # the parent process only needs numpy
    pass


# -- one row (in a worker process) --------------------------------------------------------------


@dataclass
class Row:
    backend: str = ""
    """"" = the trainer's default `[attention] backend`."""
    compile: bool = False
    dtype: str = "fp32"
    ac: str = "none"
    steps: int = 8
    warmup: int = 1
    pack_len: int = 2048
    mix: str = "t2i=3,text=1"
    vae: str = "tiny"
    threads: int = 0
    tree: str = ""
    """Root of the bagel-titan checkout that runs the row ("" = this one)."""


def job_argv(row: Row, folder: str) -> list[str]:
    argv = [
        "--job.plugins",
        "bench_anchor_step",
        "--job.dump_folder",
        folder,
        "--job.run_name",
        "anchor",
        "--model.name",
        "bagel-anchor",
        "--data.loader",
        "anchor",
        "--data.packing_length",
        str(row.pack_len),
        "--anchor.mix",
        row.mix,
        "--anchor.vae",
        row.vae,
        "--anchor.packs",
        str(row.warmup + row.steps),
        "--training.device",
        "cpu",
        "--training.dtype",
        DTYPES[row.dtype],
        "--training.max_norm",
        "1.0",
        "--training.steps",
        str(row.warmup + row.steps),
        "--optimizer.lr",
        "1e-4",
        "--optimizer.weight_decay",
        "0",
        "--optimizer.betas",
        "0.9,0.999",
        "--optimizer.eps",
        "1e-8",
        "--loss.components",
        "ce,flow_mse",
        "--activation_checkpoint.mode",
        row.ac,
        "--compile.enable",
        str(row.compile).lower(),
        "--metrics.enable_tensorboard",
        "false",
        "--checkpoint.enable",
        "false",
        "--checkpoint.export_at_end",
        "false",
        "--ema.enable",
        "false",
    ]
    if row.backend:
        argv += ["--attention.backend", row.backend]
    return argv


def unique_graphs() -> int:
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


def run_row(row: Row) -> dict[str, Any]:
    """Build the trainer, run warm-up + timed steps; prints STEP lines."""
    import torch

    from bagel_titan.config.manager import load_job_config
    from bagel_titan.distributed.utils import destroy_distributed
    from bagel_titan.trainer import Trainer

    if row.threads > 0:
        torch.set_num_threads(row.threads)
    with tempfile.TemporaryDirectory() as tmp:
        job_config, plugins = load_job_config(job_argv(row, tmp))
        trainer = Trainer(job_config, plugins)
        try:
            batches = iter(trainer.dataloader)
            times, cpu_times, tokens = [], [], []
            new_graphs: list[int] = []  # graphs compiled during each timed step (recompiles)
            for step in range(row.warmup + row.steps):
                batch = next(batches).to(trainer.device)
                graphs = unique_graphs()
                start, cpu_start = time.perf_counter(), time.process_time()
                trainer.train_step([batch])
                seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu_start
                compiled = unique_graphs() - graphs
                if step >= row.warmup:
                    times.append(seconds)
                    cpu_times.append(cpu_seconds)
                    tokens.append(batch.num_tokens)
                    new_graphs.append(compiled)
                print(
                    f"STEP {step + 1} tokens={batch.num_tokens} ms={seconds * 1e3:.1f} cpu_ms={cpu_seconds * 1e3:.1f} "
                    f"tok_s={batch.num_tokens / seconds:.0f} new_graphs={compiled}"
                    f"{' (warm-up)' if step < row.warmup else ''}",
                    flush=True,
                )
            backend = job_config.attention.backend
        finally:
            trainer.close()
            destroy_distributed()
    tok_s = [n / t for n, t in zip(tokens, times)]
    cpu_tok_s = [n / t for n, t in zip(tokens, cpu_times)]
    return {
        "backend": backend,
        "median_tok_s": statistics.median(tok_s),
        "median_ms": statistics.median(times) * 1e3,
        "median_cpu_tok_s": statistics.median(cpu_tok_s),
        "tokens": tokens,
        "recompiles": sum(new_graphs),
        "last_recompile": max((i + 1 for i, n in enumerate(new_graphs) if n), default=0),
        "threads": torch.get_num_threads(),
        "device": common.device_description("cpu"),
    }


def worker_env(tree: str) -> dict[str, str]:
    """Environment of a worker: with `tree`, its `bagel_titan` and `plugins` (as
    `bagel_titan_plugins`) come first on the path, ahead of this checkout's editable install."""
    env = dict(os.environ)
    paths = [HERE]
    if tree:
        shim = tempfile.mkdtemp(prefix="anchor-tree-")
        os.symlink(os.path.join(tree, "bagel_titan"), os.path.join(shim, "bagel_titan"))
        os.symlink(os.path.join(tree, "plugins"), os.path.join(shim, "bagel_titan_plugins"))
        paths.insert(0, shim)
    env["PYTHONPATH"] = os.pathsep.join(paths + [p for p in [env.get("PYTHONPATH", "")] if p])
    return env


def run_isolated(row: Row, timeout_s: float) -> dict[str, Any]:
    cmd = [sys.executable, SCRIPT, "--single", json.dumps(asdict(row))]
    try:
        proc = subprocess.run(
            cmd, capture_output=True, text=True, timeout=timeout_s, env=worker_env(row.tree)
        )
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout_s:.0f} s"}
    for line in proc.stdout.splitlines():
        if line.startswith("STEP"):
            print(f"  {line}", flush=True)
    results = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode != 0 or not results:
        lines = [line.strip() for line in proc.stderr.splitlines() if line.strip()]
        errors = [line for line in lines if "Error" in line.split(":")[0]]
        return {"error": ((errors or lines or [f"exit code {proc.returncode}"])[-1])[:200]}
    return json.loads(results[-1])


def label(row: Row) -> str:
    return (
        f"{row.tree and 'baseline' or 'this tree'} {row.dtype} backend={row.backend or 'default'} "
        f"compile={'on' if row.compile else 'off'} ac={row.ac}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--dtype", default="fp32", help="fp32, bf16 or fp32,bf16 (bf16: mixed precision, fp32 master weights)"
    )
    parser.add_argument(
        "--backend", default="", help="attention backend(s), comma separated; empty: the default"
    )
    parser.add_argument("--compile", default="off", help="off, on or off,on")
    parser.add_argument("--ac", default="none", help="activation checkpointing mode(s): none,full,selective")
    parser.add_argument("--steps", type=int, default=8, help="timed steps per row")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps first (compile happens here)")
    parser.add_argument("--pack-len", type=int, default=2048)
    parser.add_argument("--mix", default="t2i=3,text=1")
    parser.add_argument("--vae", default="tiny", choices=["tiny", "full"])
    parser.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: torch's default)")
    parser.add_argument(
        "--baseline", default="", help="root of another bagel-titan checkout to interleave with"
    )
    parser.add_argument("--rounds", type=int, default=1, help="rounds of (this tree, baseline) per row")
    parser.add_argument("--timeout", type=float, default=900.0, help="seconds per row")
    parser.add_argument(
        "--list-packs", action="store_true", help="print the first packs' token counts and exit"
    )
    parser.add_argument("--single", default="", help=argparse.SUPPRESS)
    common.add_results_option(parser)
    args = parser.parse_args()

    if args.single:
        print(json.dumps(run_row(Row(**json.loads(args.single)))), flush=True)
        return
    cfg = load_config()
    packs = first_fit_packs(make_rows(cfg, args.mix), cfg, args.pack_len, args.warmup + args.steps)
    pack_tokens = [sum(num_tokens(r, cfg) for r in p) for p in packs]
    print("packs (tokens):", pack_tokens, flush=True)
    if args.list_packs:
        return
    unknown = set(args.dtype.split(",")) - set(DTYPES) or set(args.compile.split(",")) - {"off", "on"}
    if unknown:
        raise SystemExit(f"unknown --dtype or --compile value(s): {sorted(unknown)}")
    trees = [""] + ([os.path.abspath(args.baseline)] if args.baseline else [])
    grid = [
        Row(
            backend=b,
            compile=c == "on",
            dtype=d,
            ac=ac,
            steps=args.steps,
            warmup=args.warmup,
            pack_len=args.pack_len,
            mix=args.mix,
            vae=args.vae,
            threads=args.threads,
        )
        for d in args.dtype.split(",")
        for b in args.backend.split(",")
        for c in args.compile.split(",")
        for ac in args.ac.split(",")
    ]
    results: dict[tuple[int, str], list[dict[str, Any]]] = {}
    for _ in range(args.rounds):
        for i, base in enumerate(grid):
            for tree in trees:
                row = Row(**{**asdict(base), "tree": tree})
                print(label(row), flush=True)
                r = run_isolated(row, args.timeout)
                results.setdefault((i, tree), []).append(r)
                if "error" in r:
                    print(f"TOTAL {label(row)} error={r['error']}", flush=True)
                else:
                    print(
                        f"TOTAL {label(row)} median_ms={r['median_ms']:.1f} median_tok_s={r['median_tok_s']:.0f} "
                        f"median_cpu_tok_s={r['median_cpu_tok_s']:.0f} recompiles={r['recompiles']}",
                        flush=True,
                    )

    def summary(rs: list[dict[str, Any]], key: str) -> float | None:
        ok = [r for r in rs if "error" not in r]
        return statistics.median(r[key] for r in ok) if ok else None

    def recompile_note(ok: list[dict[str, Any]]) -> str:
        if not ok:
            return ""
        worst = max(ok, key=lambda r: r["recompiles"])
        last = worst.get("last_recompile", 0)
        return f"{worst['recompiles']}" + (f" (last in timed step {last} of {args.steps})" if last else "")

    def ratio(value: float | None, ref: float | None) -> str:
        return f"{value / ref:.2f}x" if value and ref else ""

    header = [
        "tree",
        "dtype",
        "backend",
        "compile",
        "AC",
        "median tokens/s",
        "CPU-time tokens/s",
        "recompiles (timed)",
        "vs baseline (wall, CPU time)",
        "note",
    ]
    table_rows = []
    for i, base in enumerate(grid):
        ref_rs = results[(i, trees[-1])] if args.baseline else []
        for tree in trees:
            rs = results[(i, tree)]
            ok = [r for r in rs if "error" not in r]
            wall, cpu = summary(rs, "median_tok_s"), summary(rs, "median_cpu_tok_s")
            versus = ""
            if ref_rs and tree != trees[-1]:
                versus = f"{ratio(wall, summary(ref_rs, 'median_tok_s'))}, {ratio(cpu, summary(ref_rs, 'median_cpu_tok_s'))}"
            backend = ok[0]["backend"] if ok else (base.backend or "default")
            table_rows.append(
                (
                    "baseline" if tree else "this tree",
                    base.dtype,
                    backend,
                    "on" if base.compile else "off",
                    base.ac,
                    f"{wall:,.0f}" if wall else "",
                    f"{cpu:,.0f}" if cpu else "",
                    recompile_note(ok),
                    versus,
                    "" if ok else f"failed: {rs[0]['error']}",
                )
            )
    table = common.markdown_table(header, table_rows, "lllllrrrrl")
    ok_any = [r for rs in results.values() for r in rs if "error" not in r]
    notes = [
        f"anchor configuration (tiny_bagel.json, VAE {args.vae}), mix {args.mix}, first-fit packs of {args.pack_len}: "
        f"{', '.join(map(str, pack_tokens))} tokens; {args.warmup} warm-up + {args.steps} timed steps per row, "
        f"one process per row; timed: `Trainer.train_step` (VAE encode, forward, loss, backward, clip, AdamW)",
        f"{args.rounds} round(s)"
        + (f", rows of this tree and of the baseline `{args.baseline}` interleaved" if args.baseline else ""),
        f"torch intra-op threads: {ok_any[0]['threads'] if ok_any else '?'}; the machine was shared with other jobs "
        f"(compare ratios within this run, not absolute figures across runs); CPU-time tokens/s divide by the "
        f"process's CPU time (with 1 thread: the work, less sensitive to the other jobs)",
    ]
    print(table)
    common.append_section(
        args.results, "bench_anchor_step", ok_any[0]["device"] if ok_any else "cpu", notes, table
    )


if __name__ == "__main__":
    main()
