"""Benchmark plugin: a "synthetic" dataloader of full BAGEL packs, a "bagel-bench" model spec
whose layer counts can be cut without touching `plugins/bagel/config.py`, and a
"packed-recorded" dataloader (the real "packed" one, remembering the batch it served last).

Loaded by the benchmark scripts with ``--job.plugins synthetic_plugin`` (the scripts' folder is
first on `sys.path` when they run as ``python benchmarks/<script>.py``). Adds the config section
``[bench]``:

- `llm_layers` / `vit_layers` replace the flavor's layer counts (``dataclasses.replace`` on the
  architecture), e.g. BAGEL at 7B width with 2 layers, to fit one GPU;
- the pack mix: understanding (ViT image + prompt + answer), generation (prompt + noised VAE
  image) and text samples, drawn until the pack is full and topped off with one text sample,
  so every pack holds exactly `packing_length` tokens (no padding, one shape for compile).

The loader pre-builds `distinct_packs` packs from `seed` and cycles through them, so its own
cost per step is a list lookup, and every run (and `bench_overhead.py`'s plain loop) sees the
same sequence of packs.
"""

from __future__ import annotations

import dataclasses
import random
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Iterator, Sequence

import torch

from bagel_titan.hookspec import hookimpl
from bagel_titan_plugins.bagel.batch import BagelPackedBatch
from bagel_titan_plugins.bagel.config import BagelArchitecture, BagelConfig, architecture_for
from bagel_titan_plugins.bagel.spec import BagelSpec
from synthetic_bagel import Segment, Text, VaeImage, VitImage, synthetic_batch

if TYPE_CHECKING:
    from bagel_titan.config.job_config import JobConfig
    from bagel_titan.plugins import PluginManager
    from bagel_titan.protocols import ModelSpec


@dataclass
class BenchSection:
    """`[bench]`: benchmark-only model cuts and the synthetic pack mix."""

    llm_layers: int = 0
    """LLM decoder layers to build; 0: the flavor's."""
    vit_layers: int = 0
    """ViT layers to build; 0: the flavor's."""
    seed: int = 0
    """Seed of the synthetic packs."""
    distinct_packs: int = 4
    """Packs pre-built and cycled through."""
    understanding_share: float = 0.6
    """Share of understanding samples (ViT image, prompt, answer)."""
    generation_share: float = 0.3
    """Share of generation samples (prompt, noised VAE image); the rest is text."""
    vit_side: list[int] = dataclasses.field(default_factory=lambda: [27, 70])
    """[min, max] ViT patches per image side (the release's 378-980 px at 14 px patches)."""
    vae_side: list[int] = dataclasses.field(default_factory=lambda: [32, 64])
    """[min, max] latent patches per image side (the release's 512-1024 px at 8x VAE x 2x2 patches)."""
    text_ids: list[int] = dataclasses.field(default_factory=lambda: [16, 256])
    """[min, max] ids of an answer; prompts are a quarter of that."""

    def __post_init__(self) -> None:
        for key in ("vit_side", "vae_side", "text_ids"):
            low_high = getattr(self, key)
            if len(low_high) != 2 or not 0 < low_high[0] <= low_high[1]:
                raise ValueError(f"[bench] {key} must be [min, max] with 0 < min <= max, got {low_high}")
        if self.llm_layers < 0 or self.vit_layers < 0:
            raise ValueError("[bench] llm_layers and vit_layers must be >= 0 (0: the flavor's)")
        if self.distinct_packs < 1:
            raise ValueError(f"[bench] distinct_packs must be >= 1, got {self.distinct_packs}")
        if not 0 <= self.understanding_share + self.generation_share <= 1:
            raise ValueError("[bench] understanding_share + generation_share must lie in [0, 1]")


def bench_section(job_config: JobConfig) -> BenchSection:
    return job_config.section("bench") if job_config.has_section("bench") else BenchSection()


def bench_architecture(flavor: str, llm_layers: int = 0, vit_layers: int = 0) -> BagelArchitecture:
    """The flavor's architecture with its layer counts replaced where > 0."""
    arch = architecture_for(flavor)
    llm = dataclasses.replace(arch.llm, num_layers=llm_layers) if llm_layers else arch.llm
    vit = dataclasses.replace(arch.vit, num_layers=vit_layers) if vit_layers else arch.vit
    return dataclasses.replace(arch, llm=llm, vit=vit)


def architecture_of(job_config: JobConfig) -> BagelArchitecture:
    bench = bench_section(job_config)
    return bench_architecture(job_config.model.flavor, bench.llm_layers, bench.vit_layers)


class BagelBenchSpec(BagelSpec):
    """The "bagel" spec with `[bench] llm_layers / vit_layers` applied to the flavor."""

    name = "bagel-bench"

    def architecture(self, job_config: JobConfig) -> BagelArchitecture:
        return architecture_of(job_config)


# -- packs -------------------------------------------------------------------------------------


def _tokens(sample: Sequence[Segment]) -> int:
    return sum(s.num_ids + 2 if isinstance(s, Text) else s.h * s.w + 2 for s in sample)


def draw_sample(rng: random.Random, mix: BenchSection) -> list[Segment]:
    def side(low_high: list[int]) -> int:
        return rng.randint(*low_high)

    answer = rng.randint(*mix.text_ids)
    prompt = max(1, answer // 4)
    u = rng.random()
    if u < mix.understanding_share:
        return [VitImage(side(mix.vit_side), side(mix.vit_side)), Text(prompt, loss=False), Text(answer)]
    if u < mix.understanding_share + mix.generation_share:
        return [Text(prompt, loss=False), VaeImage(side(mix.vae_side), side(mix.vae_side))]
    return [Text(prompt, loss=False), Text(answer)]


def full_pack_samples(rng: random.Random, packing_length: int, mix: BenchSection) -> list[list[Segment]]:
    """Samples drawn from the mix until the next one does not fit (8 tries), then one text
    sample (at least its 2 framing tokens) that fills the pack to exactly `packing_length`."""
    samples: list[list[Segment]] = []
    total, misses = 0, 0
    while misses < 8:
        sample = draw_sample(rng, mix)
        size = _tokens(sample)
        if total + size > packing_length or packing_length - (total + size) == 1:  # 1 token: no filler fits
            misses += 1
            continue
        samples.append(sample)
        total += size
    left = packing_length - total
    if left >= 2:
        samples.append([Text(left - 2)])
    if not samples:
        raise ValueError(
            f"[data] packing_length = {packing_length} is too short for any sample of the [bench] mix; "
            f"raise it or lower [bench] vit_side / vae_side / text_ids"
        )
    return samples


def build_packs(
    arch: BagelArchitecture, options: BagelConfig, packing_length: int, mix: BenchSection
) -> list[BagelPackedBatch]:
    """`mix.distinct_packs` full packs (deterministic in `mix.seed`)."""
    rng = random.Random(mix.seed)
    generator = torch.Generator().manual_seed(mix.seed)
    return [
        synthetic_batch(arch, options, full_pack_samples(rng, packing_length, mix), generator)
        for _ in range(mix.distinct_packs)
    ]


def packs_for(job_config: JobConfig) -> list[BagelPackedBatch]:
    """The packs the "synthetic" loader of `job_config` cycles through."""
    options = BagelSpec.bagel_config(job_config)
    return build_packs(
        architecture_of(job_config), options, job_config.data.packing_length, bench_section(job_config)
    )


class SyntheticPacks:
    """An endless, stateful iterator over pre-built packs (`TrainDataloader`); data-parallel
    ranks start at different packs."""

    def __init__(self, packs: list[BagelPackedBatch], packing_length: int, dp_rank: int = 0):
        self.packs = packs
        self.packing_length = packing_length
        self.position = dp_rank
        self.served = 0
        self.tokens = 0
        self.samples = 0

    def __iter__(self) -> Iterator[BagelPackedBatch]:
        while True:
            pack = self.packs[self.position % len(self.packs)]
            self.position += 1
            self.served += 1
            self.tokens += pack.num_tokens
            self.samples += pack.num_samples
            yield pack

    def state_dict(self) -> dict[str, Any]:
        return {
            "position": self.position,
            "served": self.served,
            "tokens": self.tokens,
            "samples": self.samples,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.position, self.served = int(state["position"]), int(state["served"])
        self.tokens, self.samples = int(state["tokens"]), int(state["samples"])

    def data_stats(self) -> dict[str, float]:
        stats = {
            "data/packs": float(self.served),
            "data/tokens": float(self.tokens),
            "data/samples": float(self.samples),
        }
        if self.served:
            stats["data/fill_rate"] = self.tokens / (self.served * self.packing_length)
        return stats

    def close(self) -> None:
        """Nothing to stop: no worker processes."""


class SyntheticLoaderBuilder:
    """`[data] loader = "synthetic"`: full synthetic packs, no dataset, no tokenizer."""

    name = "synthetic"

    def build(
        self,
        job_config: JobConfig,
        plugins: PluginManager,
        model_spec: ModelSpec[Any, Any],
        *,
        dp_rank: int,
        dp_world_size: int,
        datasets: Sequence[Any] | None = None,
        infinite: bool = True,
    ) -> SyntheticPacks:
        if not infinite:
            raise ValueError("the synthetic loader is endless; it cannot serve one-pass (validation) data")
        return SyntheticPacks(packs_for(job_config), job_config.data.packing_length, dp_rank)


class RecordingLoader:
    """A dataloader that keeps the batch it served last (`last`), so that a benchmark can check
    which batch the trainer just trained on; everything else is the wrapped loader's."""

    def __init__(self, inner: Any):
        self.inner = inner
        self.last: Any = None

    def __iter__(self) -> Iterator[Any]:
        for batch in self.inner:
            self.last = batch
            yield batch

    def state_dict(self) -> dict[str, Any]:
        return self.inner.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.inner.load_state_dict(state)

    def data_stats(self) -> dict[str, float]:
        return self.inner.data_stats()

    def close(self) -> None:
        self.inner.close()


class RecordingPackedLoaderBuilder:
    """`[data] loader = "packed-recorded"`: the first-party "packed" loader in a `RecordingLoader`."""

    name = "packed-recorded"

    def build(
        self, job_config: JobConfig, plugins: PluginManager, model_spec: ModelSpec[Any, Any], **kwargs: Any
    ) -> RecordingLoader:
        return RecordingLoader(
            plugins.dataloaders.get("packed").build(job_config, plugins, model_spec, **kwargs)
        )


@hookimpl
def bagel_titan_model_specs():
    return [BagelBenchSpec()]


@hookimpl
def bagel_titan_dataloaders():
    return [SyntheticLoaderBuilder(), RecordingPackedLoaderBuilder()]


@hookimpl
def bagel_titan_config_sections():
    return {"bench": BenchSection}
