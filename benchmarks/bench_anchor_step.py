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
steps (10 by default, each on a pack of its own) are left out of the medians: compiling and
oneDNN's per-shape bf16 kernels happen there, as in the first steps of a long run. Graphs
compiled during each timed step (recompiles: dynamo's `unique_graphs`) are counted, and the
table says in which timed step the last one happened.

    python benchmarks/bench_anchor_step.py                        # fp32, default backend
    python benchmarks/bench_anchor_step.py --dtype bf16 --backend sdpa,eager --compile off,on
    python benchmarks/bench_anchor_step.py --baseline /tmp/old    # interleave a checkout of another commit

`--baseline DIR` runs the same rows with DIR's `bagel_titan` and `plugins` (a `git worktree` of
another commit) in alternation with this tree's, round by round, so that both share the
machine's load; the table then gives their ratio.

`--release DIR` interleaves the BAGEL release code the same way: DIR is a checkout of
ByteDance-Seed/Bagel (written against commit 056b5fd), imported at run time in its own worker
process; nothing of it is in this repository. One release row per dtype runs after the first row
of that dtype in every round, on the same packs (this tree's collated packs, converted to the
release's `Bagel.forward` arguments by `release_inputs`: nested per-sample attention masks from
its `prepare_attention_mask_per_sample`, raw timesteps drawn per noised image on the data side
as its `PackedDataset` does). The model is built from tiny_bagel.json with their `Qwen2Config`,
`Qwen2ForCausalLM` (`Qwen2MoTDecoderLayer`), `BagelConfig`, `Bagel` and `AutoEncoder`, and
loaded with this tree's initial weights (our `state_dict()` uses the release's key names) and
VAE weights. Timed per step, as its `train/pretrain_unified_navit.py` does it: VAE encode of
the padded images (no grad) -> `Bagel.forward` in train mode (per-sample SDPA, no flex) -> CE
(mean over CE tokens) + MSE (per-token mean over the latent dims, mean over MSE tokens) ->
backward -> clip 1.0 -> AdamW (lr 1e-4, wd 0). fp32: fp32 parameters, no autocast; bf16: a bf16
compute copy of the fp32 master weights (FSDP `MixedPrecision(param_dtype=bf16)`), fp32 AdamW
state, bf16 autocast. Stubs and shims in the release worker only (see `import_release`): a
`flash_attn` module whose functions raise (imported at module level, used only by inference
and the SigLIP-NaViT), a no-op `sdpa_kernel` on CPU (the release pins the CUDA-only efficient
kernel), fp32 SDPA on its bf16-rounded q/k/v in fp32 mode (its code feeds SDPA's bf16 output
to the fp32 `o_proj`, which needs its autocast), and transformers 5's missing "default" RoPE
initialiser. The release needs `einops` importable (e.g. `pip install --target /tmp/rdeps einops`
and `PYTHONPATH=/tmp/rdeps`). Its ViT has no CPU path (flash_attn only), so mixes with `und` are
refused. Before its timed steps each harness runs one untimed check step on the first pack with
the same latents, timesteps and noise (`check_inputs`); the two losses and grad norms are
printed and noted side by side (a relative loss difference above 1e-3 in fp32 is flagged).

    python benchmarks/bench_anchor_step.py --release /tmp/bagel-release --dtype fp32,bf16 --threads 1
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any, Callable, Iterator, cast

import numpy as np

import common

if TYPE_CHECKING:  # the parent process imports this module with numpy only
    import torch

    from bagel_titan.config.job_config import JobConfig
    from bagel_titan.plugins import PluginManager
    from bagel_titan.protocols import ModelSpec
    from bagel_titan_plugins.bagel.batch import BagelPackedBatch
    from bagel_titan_plugins.bagel.config import BagelArchitecture, BagelConfig
    from bagel_titan_plugins.bagel.modeling import Bagel
    from bagel_titan_plugins.bagel.processor import BagelSample, SpecialTokens
    from bagel_titan_plugins.bagel.spec import BagelSpec

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


def image_pixels(row: dict[str, Any]) -> torch.Tensor:
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


def anchor_section(job_config: JobConfig) -> AnchorSection:
    return job_config.section("anchor") if job_config.has_section("anchor") else AnchorSection()


def anchor_architecture(cfg: dict[str, Any], vae: str = "tiny") -> BagelArchitecture:
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


def special_tokens(cfg: dict[str, Any]) -> SpecialTokens:
    from bagel_titan_plugins.bagel.processor import SpecialTokens

    s = cfg["special_tokens"]
    return SpecialTokens(
        bos=s["bos_token_id"],
        eos=s["eos_token_id"],
        vision_start=s["start_of_image"],
        vision_end=s["end_of_image"],
    )


def bagel_sample(row: dict[str, Any], cfg: dict[str, Any]) -> BagelSample:
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


def anchor_bagel_config(cfg: dict[str, Any], mix: str) -> BagelConfig:
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

    def close(self) -> None:
        """Nothing to stop: no worker processes."""


def _spec_class() -> type[BagelSpec]:
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

    def build(
        self, job_config: JobConfig, plugins: PluginManager, model_spec: ModelSpec[Any, Any], **kwargs: Any
    ) -> AnchorPacks:
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
    release: str = ""
    """Checkout of the BAGEL release code: the row runs its step instead of a bagel-titan tree's."""
    check: bool = False
    """First run one untimed check step on the first pack with fixed latents, timesteps and noise
    (`check_inputs`) and report its loss and grad norm (compared with the release's)."""


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
        check: dict[str, float] = {}
        try:
            batches = iter(trainer.dataloader)
            if row.check:  # the first pack (not taken from the stream) with check_inputs' overrides
                first = trainer.dataloader.batches[0]
                cfg = load_config()
                fixed = check_inputs(
                    first, cfg["vae"][row.vae]["z_channels"], cfg["bagel"]["latent_patch_size"]
                )
                trainer.train_step([dataclasses.replace(first, **fixed).to(trainer.device)])
                metrics = trainer._step_metrics()
                check = {
                    "loss": metrics["loss"],
                    "ce": metrics["loss/ce"],
                    "mse": metrics["loss/flow_mse"],
                    "grad_norm": metrics["grad_norm"],
                }
                print(f"CHECK {json.dumps(check)}", flush=True)
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
        "check": check,
    }


# -- the BAGEL release code's step (in its own worker process; `--release DIR`) ------------------

CHECK_SEED = 20
"""Seed of `check_inputs`: the latents, timesteps and noise of the check step."""


def check_inputs(batch: BagelPackedBatch, z_channels: int, latent_patch_size: int) -> dict[str, Any]:
    """Fixed `padded_latent` [n, z, h, w], raw `packed_timesteps` [Nz] (one N(0, 1) draw per noised
    image, -inf for a clean one) and flow `noise` [Nz, p*p*z] of a batch's VAE images, drawn from
    `CHECK_SEED`: fed to both harnesses in the check step, so that its loss is the same function."""
    import torch

    gen = torch.Generator().manual_seed(CHECK_SEED)
    p = latent_patch_size
    shapes = list(batch.patchified_vae_latent_shapes)
    h_max, w_max = max(h for h, _ in shapes), max(w for _, w in shapes)
    latent = torch.randn(len(shapes), z_channels, h_max * p, w_max * p, generator=gen)
    draws = torch.randn(len(shapes), generator=gen)
    draws = draws.masked_fill(~torch.tensor(batch.vae_image_noised), float("-inf"))
    counts = torch.tensor([h * w for h, w in shapes])
    timesteps = torch.repeat_interleave(draws, counts)
    noise = torch.randn(int(counts.sum()), p * p * z_channels, generator=gen)
    return {"padded_latent": latent, "packed_timesteps": timesteps, "noise": noise}


def draw_timesteps(batch: BagelPackedBatch, rng: np.random.Generator) -> torch.Tensor:
    """Raw timesteps [Nz] as the release's `PackedDataset.pack_sequence` draws them (data side):
    one `randn` per noised image, repeated over its tokens; -inf for a clean image."""
    import torch

    values = []
    for (h, w), noised in zip(batch.patchified_vae_latent_shapes, batch.vae_image_noised):
        values += [float(rng.standard_normal()) if noised else float("-inf")] * (h * w)
    return torch.tensor(values, dtype=torch.float32)


def release_inputs(
    batch: BagelPackedBatch, mask_fn: Callable[[list[int], list[str]], Any], packed_timesteps: torch.Tensor
) -> dict[str, Any]:
    """The keyword arguments of the release's `Bagel.forward` for one of our packs, as its
    `PackedDataset.to_tensor` lays them out without flex attention (`nested_attention_masks`: one
    mask per sample, `mask_fn(split_lens, attn_modes)` of that sample's splits), plus
    `padded_images` (VAE-encoded in the step) and `ce_loss_weights` (popped by its train loop).
    Our collator builds the release's layout, so the index tensors carry over as they are."""
    from bagel_titan_plugins.bagel.batch import documents_of

    docs = documents_of(batch.sample_lens, batch.split_lens, batch.attn_modes)
    data: dict[str, Any] = dict(
        sequence_length=batch.sequence_length,
        sample_lens=list(batch.sample_lens),
        packed_text_ids=batch.packed_text_ids,
        packed_text_indexes=batch.packed_text_indexes,
        packed_position_ids=batch.packed_position_ids,
        nested_attention_masks=[mask_fn([n for n, _ in doc], [m for _, m in doc]) for doc in docs],
    )
    if batch.patchified_vae_latent_shapes:
        data.update(
            padded_images=batch.padded_images,
            patchified_vae_latent_shapes=[tuple(s) for s in batch.patchified_vae_latent_shapes],
            packed_latent_position_ids=batch.packed_latent_position_ids,
            packed_vae_token_indexes=batch.packed_vae_token_indexes,
            packed_timesteps=packed_timesteps,
            mse_loss_indexes=batch.mse_loss_indexes,
        )
    if batch.packed_vit_tokens.shape[0]:
        data.update(
            packed_vit_tokens=batch.packed_vit_tokens,
            packed_vit_position_ids=batch.packed_vit_position_ids,
            packed_vit_token_indexes=batch.packed_vit_token_indexes,
            vit_token_seqlens=batch.vit_token_seqlens,
        )
    if batch.num_ce_tokens:
        data.update(
            packed_label_ids=batch.packed_label_ids,
            ce_loss_indexes=batch.ce_loss_indexes,
            ce_loss_weights=batch.ce_loss_weights,
        )
    return data


def import_release(release_dir: str, fp32: bool) -> Any:
    """Import the release's modules from `release_dir` (this process only) and return them.

    Stubs and shims, all in this worker process only:
    * `flash_attn`: its `qwen2_navit.py` and `siglip_navit.py` import `flash_attn_varlen_func` at
      module import (used by the inference paths and the SigLIP-NaViT); a stub module whose
      function raises if called stands in for it.
    * `sdpa_kernel` in `qwen2_navit`: the nested-mask training path pins SDPA to
      `EFFICIENT_ATTENTION`, a CUDA-only kernel; on CPU it is replaced by a no-op context, so
      that SDPA picks its CPU kernel (the q/k/v and mask casts to bf16 stay as the release has them).
    * with `fp32` (no autocast), `scaled_dot_product_attention` in `qwen2_navit`: that path
      casts q/k/v and the mask to bf16 and hands SDPA's bf16 output to the fp32 `o_proj`, which
      only works under the bf16 autocast of its train loop; here SDPA gets those bf16-rounded
      values back as fp32 and returns fp32 (the release's rounding stays, the dtype error goes).
    * transformers >= 5 dropped the "default" RoPE initialiser the release's Qwen2 rotary
      embedding looks up: it is registered (inv_freq = 1 / theta^(2i/d), scaling 1).
    The release also needs `einops` importable (its requirements.txt).
    """
    import contextlib
    import importlib
    import importlib.machinery
    import types

    import torch

    def flash_attn_stub(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("flash_attn is stubbed in the release worker (CPU): this path is not benchmarked")

    stub = types.ModuleType("flash_attn")
    stub.__spec__ = importlib.machinery.ModuleSpec("flash_attn", None)
    stub.flash_attn_varlen_func = flash_attn_stub  # type: ignore[attr-defined]
    stub.flash_attn_func = flash_attn_stub  # type: ignore[attr-defined]
    sys.modules.setdefault("flash_attn", stub)

    from transformers import modeling_rope_utils

    def default_rope(
        config: Any = None,
        device: torch.device | str | None = None,
        seq_len: int | None = None,
        **kwargs: Any,
    ) -> tuple[torch.Tensor, float]:
        base = kwargs.get("base") or config.rope_theta
        dim = kwargs.get("dim") or config.hidden_size // config.num_attention_heads
        inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.int64).float().to(device) / dim))
        return inv_freq, 1.0

    modeling_rope_utils.ROPE_INIT_FUNCTIONS.setdefault("default", default_rope)
    sys.path.insert(0, os.path.abspath(release_dir))
    navit: Any = importlib.import_module("modeling.bagel.qwen2_navit")  # the release's, untyped
    if not torch.cuda.is_available():
        navit.sdpa_kernel = lambda *args, **kwargs: contextlib.nullcontext()
    if fp32:
        sdpa = navit.scaled_dot_product_attention
        navit.scaled_dot_product_attention = lambda q, k, v, mask, **kw: sdpa(
            q.float(), k.float(), v.float(), mask.float(), **kw
        )
    return types.SimpleNamespace(
        bagel=importlib.import_module("modeling.bagel"),
        autoencoder=importlib.import_module("modeling.autoencoder"),
        data_utils=importlib.import_module("data.data_utils"),
    )


def build_release_model(rel: Any, cfg: dict[str, Any], vae: str, visual_und: bool) -> tuple[Any, Any]:
    """The release's `Bagel` (their Qwen2ForCausalLM with `Qwen2MoTDecoderLayer`) and their
    `AutoEncoder`, with tiny_bagel.json's shapes, as `pretrain_unified_navit.py` assembles them."""
    if visual_und:
        raise SystemExit(
            "--release: the release's SigLIP-NaViT attention is flash_attn only (no CPU path); "
            "use a mix without und"
        )
    llm = cfg["llm"]
    llm_config = rel.bagel.Qwen2Config(
        **{k: v for k, v in llm.items()}, pad_token_id=None, _attn_implementation="eager"
    )
    ae = cfg["vae"][vae]
    vae_params = rel.autoencoder.AutoEncoderParams(
        **{k: ae[k] for k in ("resolution", "in_channels", "downsample", "ch", "out_ch")},
        ch_mult=list(ae["ch_mult"]),
        **{k: ae[k] for k in ("num_res_blocks", "z_channels", "scale_factor", "shift_factor")},
    )
    b = cfg["bagel"]
    config = rel.bagel.BagelConfig(
        visual_gen=True,
        visual_und=False,
        llm_config=llm_config,
        vit_config=None,
        vae_config=vae_params,
        latent_patch_size=b["latent_patch_size"],
        max_latent_size=b["max_latent_size"],
        vit_max_num_patch_per_side=b["vit_max_num_patch_per_side"],
        connector_act=b["connector_act"],
        interpolate_pos=b["interpolate_pos"],
        timestep_shift=b["timestep_shift"],
    )
    model = rel.bagel.Bagel(rel.bagel.Qwen2ForCausalLM(llm_config), None, config)
    return model, rel.autoencoder.AutoEncoder(vae_params)


def our_weights_and_packs(row: Row) -> tuple[dict[str, Any], dict[str, Any], list[Any]]:
    """This tree's initial weights (official key layout), its VAE weights and its collated packs,
    from a Trainer built exactly as `run_row` builds it (same seed, same loader)."""
    from bagel_titan.config.manager import load_job_config
    from bagel_titan.distributed.utils import destroy_distributed
    from bagel_titan.trainer import Trainer

    plain = Row(**{**asdict(row), "release": "", "compile": False, "backend": "", "ac": "none"})
    with tempfile.TemporaryDirectory() as tmp:
        trainer = Trainer(*load_job_config(job_argv(plain, tmp)))
        try:
            state = {k: v.detach().float().clone() for k, v in trainer.model.state_dict().items()}
            vae = cast("Bagel", trainer.model).vae
            assert vae is not None  # anchor_bagel_config: visual_gen=True
            vae_state = {k: v.detach().float().clone() for k, v in vae.module.state_dict().items()}
            batches = list(trainer.dataloader.batches)
        finally:
            trainer.close()
            destroy_distributed()
    return state, vae_state, batches


def run_release_row(row: Row) -> dict[str, Any]:
    """The release's training step on the same packs: VAE encode of the padded images (no grad)
    -> `Bagel.forward` (train mode, nested per-sample masks) -> CE (mean over CE tokens) + MSE
    (per-token mean over the latent dims, mean over MSE tokens) -> backward -> clip 1.0 -> AdamW.

    fp32: fp32 parameters, no autocast. bf16: a bf16 copy of the parameters for compute (refreshed
    from the fp32 master weights at each step, as FSDP's `MixedPrecision(param_dtype=bf16)`), fp32
    master weights and AdamW state, bf16 autocast; the gradients are cast to fp32 onto the master
    weights before the clip."""
    import contextlib

    import torch

    if row.threads > 0:
        torch.set_num_threads(row.threads)
    cfg = load_config()
    state, vae_state, batches = our_weights_and_packs(row)
    rel = import_release(row.release, fp32=row.dtype == "fp32")
    model, vae = build_release_model(rel, cfg, row.vae, "und" in parse_mix(row.mix))
    model.load_state_dict(state, strict=True)
    vae.load_state_dict(vae_state, strict=True)
    vae.requires_grad_(False).eval()
    model.train()
    master = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(master, lr=1e-4, betas=(0.9, 0.999), eps=1e-8, weight_decay=0)
    bf16 = row.dtype == "bf16"
    compute = model
    if bf16:
        import copy

        compute = copy.deepcopy(model).to(torch.bfloat16)
        compute.train()
    compute_params = [p for p in compute.parameters() if p.requires_grad]
    autocast = (
        (lambda: torch.autocast("cpu", dtype=torch.bfloat16)) if bf16 else (lambda: contextlib.nullcontext())
    )
    mask_fn = rel.data_utils.prepare_attention_mask_per_sample
    rng = np.random.default_rng(0)
    inputs = [release_inputs(b, mask_fn, draw_timesteps(b, rng)) for b in batches]  # untimed

    def step(
        data: dict[str, Any], latent: torch.Tensor | None = None, noise: torch.Tensor | None = None
    ) -> dict[str, float]:
        data = dict(data)
        data.pop("ce_loss_weights", None)
        images = data.pop("padded_images", None)
        if bf16:
            with torch.no_grad():
                torch._foreach_copy_(compute_params, master)
        with autocast():
            if latent is None:
                with torch.no_grad():
                    data["padded_latent"] = vae.encode(images)
            else:
                data["padded_latent"] = latent
            if noise is None:
                out = compute(**data)
            else:  # the forward's `torch.randn_like` draw, replaced by the check's noise
                randn_like = torch.randn_like
                # A stand-in for the release's `randn_like(t)` calls only, narrower than torch's
                # overloads: patched by name.
                setattr(torch, "randn_like", lambda t, **kw: noise.to(t.dtype))
                try:
                    out = compute(**data)
                finally:
                    torch.randn_like = randn_like
        ce = out["ce"].sum() / len(data["ce_loss_indexes"]) if out["ce"] is not None else 0.0
        mse = out["mse"].mean(dim=-1).sum() / len(data["mse_loss_indexes"]) if out["mse"] is not None else 0.0
        loss = ce + mse
        assert isinstance(loss, torch.Tensor)  # the release's forward returns a CE or an MSE term
        loss.backward()
        loss, ce, mse = (x.detach() if isinstance(x, torch.Tensor) else x for x in (loss, ce, mse))
        if bf16:
            for m, c in zip(master, compute_params):
                m.grad = None if c.grad is None else c.grad.float()
                c.grad = None
        norm = torch.nn.utils.clip_grad_norm_(master, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return {
            name: float(value)
            for name, value in (("loss", loss), ("ce", ce), ("mse", mse), ("grad_norm", norm))
        }

    check: dict[str, float] = {}
    if row.check:
        z, p = cfg["vae"][row.vae]["z_channels"], cfg["bagel"]["latent_patch_size"]
        fixed = check_inputs(batches[0], z, p)
        data = {**inputs[0], "packed_timesteps": fixed["packed_timesteps"]}
        check = step(data, latent=fixed["padded_latent"], noise=fixed["noise"])
        print(f"CHECK {json.dumps(check)}", flush=True)
    times, cpu_times, tokens = [], [], []
    for i in range(row.warmup + row.steps):
        data, n = inputs[i % len(inputs)], batches[i % len(batches)].num_tokens
        start, cpu_start = time.perf_counter(), time.process_time()
        step(data)
        seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu_start
        if i >= row.warmup:
            times.append(seconds)
            cpu_times.append(cpu_seconds)
            tokens.append(n)
        print(
            f"STEP {i + 1} tokens={n} ms={seconds * 1e3:.1f} cpu_ms={cpu_seconds * 1e3:.1f} "
            f"tok_s={n / seconds:.0f}{' (warm-up)' if i < row.warmup else ''}",
            flush=True,
        )
    tok_s = [n / t for n, t in zip(tokens, times)]
    cpu_tok_s = [n / t for n, t in zip(tokens, cpu_times)]
    return {
        "backend": "release per-sample SDPA",
        "median_tok_s": statistics.median(tok_s),
        "median_ms": statistics.median(times) * 1e3,
        "median_cpu_tok_s": statistics.median(cpu_tok_s),
        "tokens": tokens,
        "recompiles": 0,
        "last_recompile": 0,
        "threads": torch.get_num_threads(),
        "device": common.device_description("cpu"),
        "check": check,
    }


@contextlib.contextmanager
def worker_env(tree: str) -> Iterator[dict[str, str]]:
    """Environment of a worker: with `tree`, its `bagel_titan` and `plugins` (as
    `bagel_titan_plugins`) come first on the path, ahead of this checkout's editable install,
    through a folder of links removed afterwards."""
    env = dict(os.environ)
    with tempfile.TemporaryDirectory(prefix="anchor-tree-") as shim:
        paths = [HERE]
        if tree:
            os.symlink(os.path.join(tree, "bagel_titan"), os.path.join(shim, "bagel_titan"))
            os.symlink(os.path.join(tree, "plugins"), os.path.join(shim, "bagel_titan_plugins"))
            paths.insert(0, shim)
        env["PYTHONPATH"] = os.pathsep.join(paths + [p for p in [env.get("PYTHONPATH", "")] if p])
        yield env


def run_isolated(row: Row, timeout_s: float) -> dict[str, Any]:
    cmd = [sys.executable, SCRIPT, "--single", json.dumps(asdict(row))]
    try:
        with worker_env(row.tree) as env:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s, env=env)
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


RELEASE = "release"
"""Results key of the release's rows."""


def label(row: Row) -> str:
    if row.release:
        return f"release {row.dtype} per-sample SDPA"
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
    parser.add_argument(
        "--warmup",
        type=int,
        default=10,
        help="untimed steps first, on packs of their own (compiling, oneDNN's per-shape kernels)",
    )
    parser.add_argument("--pack-len", type=int, default=2048)
    parser.add_argument("--mix", default="t2i=3,text=1")
    parser.add_argument("--vae", default="tiny", choices=["tiny", "full"])
    parser.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: torch's default)")
    parser.add_argument(
        "--baseline", default="", help="root of another bagel-titan checkout to interleave with"
    )
    parser.add_argument(
        "--release",
        default="",
        help="checkout of the BAGEL release code (ByteDance-Seed/Bagel) to interleave with, one row per dtype",
    )
    parser.add_argument(
        "--rounds", type=int, default=1, help="rounds of (this tree, baseline, release) per row"
    )
    parser.add_argument("--timeout", type=float, default=900.0, help="seconds per row")
    parser.add_argument(
        "--list-packs", action="store_true", help="print the first packs' token counts and exit"
    )
    parser.add_argument("--single", default="", help=argparse.SUPPRESS)
    common.add_results_option(parser)
    args = parser.parse_args()

    if args.single:
        single = Row(**json.loads(args.single))
        print(json.dumps(run_release_row(single) if single.release else run_row(single)), flush=True)
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
    release = os.path.abspath(args.release) if args.release else ""
    if release and not os.path.isfile(os.path.join(release, "modeling", "bagel", "bagel.py")):
        raise SystemExit(
            f"--release {args.release}: no modeling/bagel/bagel.py there (a ByteDance-Seed/Bagel checkout?)"
        )
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
            check=bool(release),
        )
        for d in args.dtype.split(",")
        for b in args.backend.split(",")
        for c in args.compile.split(",")
        for ac in args.ac.split(",")
    ]
    # The release has one row per dtype (its step has no backend, compile or AC options); it runs
    # right after the first grid row of its dtype, in every round.
    first_of_dtype: dict[str, int] = {}
    for i, base in enumerate(grid):
        first_of_dtype.setdefault(base.dtype, i)
    results: dict[tuple[int, str], list[dict[str, Any]]] = {}
    for _ in range(args.rounds):
        for i, base in enumerate(grid):
            rows = [Row(**{**asdict(base), "tree": tree, "check": base.check and not tree}) for tree in trees]
            if release and first_of_dtype[base.dtype] == i:
                rows.append(
                    Row(**{**asdict(base), "release": release, "backend": "", "compile": False, "ac": "none"})
                )
            for row in rows:
                print(label(row), flush=True)
                r = run_isolated(row, args.timeout)
                results.setdefault((i, RELEASE if row.release else row.tree), []).append(r)
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

    def versus(rs: list[dict[str, Any]], ref_rs: list[dict[str, Any]]) -> str:
        wall, cpu = summary(rs, "median_tok_s"), summary(rs, "median_cpu_tok_s")
        ref_wall, ref_cpu = summary(ref_rs, "median_tok_s"), summary(ref_rs, "median_cpu_tok_s")
        return f"{ratio(wall, ref_wall)}, {ratio(cpu, ref_cpu)}" if wall and ref_wall else ""

    header = ["tree", "dtype", "backend", "compile", "AC", "median tokens/s", "CPU-time tokens/s"]
    header += ["recompiles (timed)"]
    header += ["vs baseline (wall, CPU time)"] if args.baseline else []
    header += ["vs release (wall, CPU time)"] if release else []
    header += ["note"]
    table_rows = []
    for i, base in enumerate(grid):
        ref_rs = results[(i, trees[-1])] if args.baseline else []
        release_rs = results.get((first_of_dtype[base.dtype], RELEASE), [])
        keys = trees + ([RELEASE] if release and first_of_dtype[base.dtype] == i else [])
        for tree in keys:
            rs = results[(i, tree)]
            ok = [r for r in rs if "error" not in r]
            wall, cpu = summary(rs, "median_tok_s"), summary(rs, "median_cpu_tok_s")
            cells = [
                "release" if tree == RELEASE else "baseline" if tree else "this tree",
                base.dtype,
                ok[0]["backend"] if ok else (base.backend or "default"),
                "off" if tree == RELEASE else "on" if base.compile else "off",
                "none" if tree == RELEASE else base.ac,
                f"{wall:,.0f}" if wall else "",
                f"{cpu:,.0f}" if cpu else "",
                "" if tree == RELEASE else recompile_note(ok),
            ]
            if args.baseline:
                cells.append(versus(rs, ref_rs) if tree not in (trees[-1], RELEASE) else "")
            if release:
                cells.append(versus(rs, release_rs) if tree != RELEASE else "")
            cells.append("" if ok else f"failed: {rs[0]['error']}")
            table_rows.append(tuple(cells))
    align = "lllllrrr" + "r" * (bool(args.baseline) + bool(release)) + "l"
    table = common.markdown_table(header, table_rows, align)
    ok_any = [r for rs in results.values() for r in rs if "error" not in r]
    notes = [
        f"anchor configuration (tiny_bagel.json, VAE {args.vae}), mix {args.mix}, first-fit packs of {args.pack_len}: "
        f"{', '.join(map(str, pack_tokens))} tokens; {args.warmup} warm-up + {args.steps} timed steps per row, "
        f"one process per row; timed: `Trainer.train_step` (VAE encode, forward, loss, backward, clip, AdamW)",
        f"{args.rounds} round(s)"
        + (f", rows of this tree and of the baseline `{args.baseline}` interleaved" if args.baseline else "")
        + (f", rows of this tree and of the release code `{args.release}` interleaved" if release else ""),
        f"torch intra-op threads: {ok_any[0]['threads'] if ok_any else '?'}; the machine was shared with other jobs "
        f"(compare ratios within this run, not absolute figures across runs); CPU-time tokens/s divide by the "
        f"process's CPU time (with 1 thread: the work, less sensitive to the other jobs)",
    ]
    if release:
        notes.append(
            f"release: ByteDance-Seed/Bagel {release_commit(release)} imported from `{args.release}` in its own "
            "process (nothing of it is in this repository), built from tiny_bagel.json's shapes with this tree's "
            "initial weights, on the same packs; timed: VAE encode of the padded images -> `Bagel.forward` "
            "(train mode, per-sample SDPA with `nested_attention_masks`) -> CE + MSE -> backward -> clip 1.0 -> "
            "AdamW; fp32: no autocast, bf16: bf16 compute copy of fp32 master weights, bf16 autocast"
        )
        for dtype, i in first_of_dtype.items():
            notes.append(check_note(dtype, results[(i, "")], results.get((i, RELEASE), [])))
    print(table)
    for note in notes[3:]:
        print(note)
    common.append_section(
        args.results, "bench_anchor_step", ok_any[0]["device"] if ok_any else "cpu", notes, table
    )


def release_commit(path: str) -> str:
    """The checkout's commit (short), or "at an unknown commit" when it is not a git checkout."""
    try:
        out = subprocess.run(
            ["git", "-C", path, "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=30
        )
    except (OSError, subprocess.TimeoutExpired):
        return "at an unknown commit"
    return (
        f"at {out.stdout.strip()}" if out.returncode == 0 and out.stdout.strip() else "at an unknown commit"
    )


def check_note(dtype: str, ours: list[dict[str, Any]], theirs: list[dict[str, Any]]) -> str:
    """The check step's loss (and grad norm) of both harnesses, and their relative difference."""
    mine = next((r["check"] for r in ours if r.get("check")), None)
    other = next((r["check"] for r in theirs if r.get("check")), None)
    if not mine or not other:
        return f"{dtype} check step: no result from {'this tree' if not mine else 'the release'}"
    rel = {k: abs(mine[k] - other[k]) / max(abs(other[k]), 1e-12) for k in ("loss", "ce", "mse", "grad_norm")}
    text = (
        f"{dtype} check step (first pack, same initial weights, latents, timesteps and noise, untimed): loss this "
        f"tree {mine['loss']:.6f} (ce {mine['ce']:.6f}, mse {mine['mse']:.6f}), release {other['loss']:.6f} "
        f"(ce {other['ce']:.6f}, mse {other['mse']:.6f}): relative difference {rel['loss']:.1e}; grad norm "
        f"{mine['grad_norm']:.4f} vs {other['grad_norm']:.4f} ({rel['grad_norm']:.1e})"
    )
    if dtype == "fp32" and rel["loss"] > 1e-3:
        text += " -- MORE THAN 1e-3: not the same computation?"
        print(f"WARNING: {text}", flush=True)
    return text


if __name__ == "__main__":
    main()
