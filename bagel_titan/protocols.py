"""The typed contracts that plugins implement.

The core (trainer, parallelism, checkpointing, metrics) only ever talks to these objects; it never
imports a plugin by name. A plugin returns instances of them from its hooks (see `hookspec.py`).
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Iterator, Mapping, Protocol, Sequence, runtime_checkable

import torch
from torch import nn

if TYPE_CHECKING:
    from bagel_titan.config.job_config import JobConfig
    from bagel_titan.lora import LoRAGroups


# ---------------------------------------------------------------------------------------------
# Batches and model outputs
# ---------------------------------------------------------------------------------------------


@runtime_checkable
class Batch(Protocol):
    """One packed microbatch as the collator of a model spec emits it.

    The core treats it as opaque apart from these members.
    """

    num_tokens: int
    """Real (non-padding) tokens in the pack; used for tokens/s."""

    def to(self, device: torch.device) -> "Batch":
        """The same batch with every tensor on `device` (non-blocking where possible)."""
        ...


@dataclass
class ModelOutputs:
    """What a model's forward returns to the loss components.

    `logits`/`labels` serve a plain next-token loss; anything else a model's losses need travels
    by name in `extras` (the model spec and its loss components agree on the names). A field or
    name a model cannot produce is absent; a loss component that needs it raises a clear error.
    """

    logits: torch.Tensor | None = None
    """[N, V] next-token logits at the positions that carry a label."""
    labels: torch.Tensor | None = None
    """[N] int64 targets, aligned with `logits`."""
    extras: dict[str, torch.Tensor] = field(default_factory=dict)
    """Model specific tensors by name, e.g. a model's per-label weights or regression outputs."""

    def extra(self, name: str, component: str) -> torch.Tensor:
        """`extras[name]`, or a clear error naming the loss component that needs it."""
        if name not in self.extras:
            raise ValueError(
                f"loss component {component!r} needs the model output {name!r}; the model produced "
                f"only {sorted(self.extras) or 'none'} (use a loss component this model supports)"
            )
        return self.extras[name]


# ---------------------------------------------------------------------------------------------
# Losses
# ---------------------------------------------------------------------------------------------


@dataclass
class LossTerm:
    """One loss component's contribution from one microbatch: a sum and the count it sums over.

    The trainer divides `sum` by the count summed over every microbatch of the step and every
    data-parallel rank (global normalisation), then multiplies by the component's weight.
    """

    sum: torch.Tensor
    count: float
    """Elements summed (a float: a weighted loss counts the sum of its weights)."""


class LossComponent(Protocol):
    """A named loss term. Registered through `bagel_titan_loss_components`."""

    name: str
    count_name: str
    """Which of the model spec's `loss_counts` this term sums over (and is normalised by)."""

    def __call__(self, outputs: ModelOutputs, count: float) -> LossTerm:
        """The term's (sum, count) for one microbatch; `count` is this microbatch's
        `loss_counts(batch)[count_name]`, known before the forward (the trainer all-reduces the
        counts before any backward so that every microbatch is scaled by the global count)."""
        ...


def loss_counts(spec: "ModelSpec", components: Sequence[LossComponent], batch: Batch) -> list[float]:
    """Each component's count in `batch`, from the model spec's `loss_counts`."""
    counts = spec.loss_counts(batch)
    missing = [c.name for c in components if c.count_name not in counts]
    if missing:
        raise ValueError(
            f"loss components {missing} need counts the model spec does not give "
            f"(it gives {sorted(counts)}); choose [loss] components this model supports"
        )
    return [float(counts[c.count_name]) for c in components]


class LossComponentFactory(Protocol):
    """Builds a loss component from its `[loss.<name>]` section: the dataclass instance the
    plugin registered for it (`bagel_titan_config_sections`), None when it registered none."""

    name: str

    def __call__(self, config: Any) -> LossComponent: ...


# ---------------------------------------------------------------------------------------------
# Attention
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class AttentionLayerSpec:
    """Shapes of one attention layer, given to a backend when the model is built."""

    num_heads: int
    num_kv_heads: int
    head_dim: int
    hidden_size: int
    layer_index: int
    role: str
    """"decoder" (a language model's causal, mixed-mask attention) or "encoder" (full attention
    inside each document, e.g. a model's image encoder): a backend may serve only one of them."""


@runtime_checkable
class AttentionMeta(Protocol):
    """The attention metadata of one packed batch: what a backend may read (built once per batch,
    by the model's collator, and shared by all layers).

    A pack holds documents (samples) that never see each other; a document is a run of segments.
    Which (query, key) pairs of one document may attend is the model's mask rule, applied by
    `allowed`; a backend needs nothing else to derive its masks, so it imports only the core.
    Tokens after the last document are padding (document -1): they see nothing and give zeros.
    """

    doc_ids: torch.Tensor
    """[T] int64 document of every token; -1 for padding."""
    segment_ids: torch.Tensor
    """[T] int64 global segment index of every token (non-decreasing)."""
    token_modes: torch.Tensor
    """[T] int64 mode of the token's segment (codes defined by the model's mask rule)."""
    cu_seqlens: torch.Tensor
    """[num_docs + 1] int32 cumulative document offsets (padding excluded)."""
    doc_lengths: list[int]
    """Host copy of the document lengths (no device sync needed to plan per-document work)."""
    segment_bounds: list[tuple[int, int, int, int]]
    """Per segment, on the host: (start, end, mode, document)."""
    position_ids: torch.Tensor | None
    """[T] RoPE positions, when the model has them."""

    @property
    def num_tokens(self) -> int: ...

    @property
    def has_padding(self) -> bool: ...

    def allowed(self, q_idx: torch.Tensor, kv_idx: torch.Tensor) -> torch.Tensor:
        """The mask rule for (broadcastable) query and key indices; True = may attend. Tensor ops
        only, so it also serves as a flex-attention `mask_mod`."""
        ...

    def dense_mask(self) -> torch.Tensor:
        """[T, T] bool `allowed` over the whole pack, cached."""
        ...

    def cached(self, key: str, build: Any) -> Any:
        """`build()` computed once per batch under `key` (masks, plans)."""
        ...


class AttentionBackend(Protocol):
    """A named attention implementation for packed sequences.

    `build(spec)` returns the per-layer module the model calls as
    `module(q_THD, k_THD, v_THD, meta, hidden_TD) -> out_THD` where `q` is [T, Hq, D], `k`/`v` are
    [T, Hkv, D] and `meta` is the batch's `AttentionMeta` (above; the first-party one, with its
    mask rule, is `bagel_titan_plugins.attention.meta.AttentionMeta`). The module
    may own parameters (NSA gates and compression weights); they then live in the model's
    state dict under the attention layer. It may define `prepare(meta)`, which the model calls
    once per batch before its layers (`meta.prepare_for(module)`) to build masks and plans
    outside checkpointed and compiled regions.
    """

    name: str

    def build(self, spec: AttentionLayerSpec, config: Any) -> nn.Module:
        """`config`: the backend's `[attention.<name>]` section object (registered through
        `bagel_titan_config_sections`), None when it registered none."""
        ...


# ---------------------------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------------------------


@dataclass
class RawSample:
    """A sample as a reader yields it, before any processing."""

    dataset: str
    """Name of the dataset it came from (the path or the name given in the config)."""
    index: int
    """Stable index inside that dataset: the same sample always has the same index."""
    data: dict[str, Any]
    """The record (messages, caption + image, ...); the processor interprets it."""
    data_folder: str = ""
    """Where relative image paths resolve."""
    epoch: int = 0
    """Which pass over its dataset this read belongs to (set by the loader): random choices made
    while processing (conditioning dropout) depend on it, so they differ between epochs but are
    the same whenever the same read is repeated (resume)."""
    processor_options: dict[str, Any] = field(default_factory=dict)
    """The dataset's `[[data.datasets]] processor` overrides (set by the loader)."""


@dataclass(frozen=True)
class ReadPass:
    """Which pass over a dataset a reader is asked for.

    A reader's output must be a pure function of (path, shard, `start`, this): resuming re-reads
    the same pass from a later `start` and must see the same samples in the same order.
    """

    epoch: int = 0
    """The pass number (0 for the first)."""
    seed: int = 0
    """The run's data seed (`[data] seed`)."""
    shuffle: bool = False
    """Permute the order of the reader's decoding units (row groups, record batches) for this
    epoch, the same way on every shard so that each unit still belongs to exactly one shard. The
    loader shuffles samples inside a window on top of this (`[data] shuffle_window`)."""

    def rng(self, *key: Any) -> random.Random:
        """A generator for the random choices of this pass about `key` (e.g. a row index):
        different every epoch, identical whenever the same read is repeated."""
        return random.Random(":".join(map(str, (self.seed, self.epoch, *key))))


class DatasetReader(Protocol):
    """Streams raw samples of one format. Registered through `bagel_titan_dataset_readers`."""

    format: str
    extensions: tuple[str, ...]
    """File extensions that select this reader when `format` is omitted (e.g. (".parquet",))."""

    def iter_samples(
        self, path: str, *, shard_index: int, num_shards: int, start: int, read_pass: ReadPass = ReadPass()
    ) -> Iterator[RawSample]:
        """Yield the samples of shard `shard_index` of `num_shards` in the order of `read_pass`,
        skipping the first `start` samples of that shard (for exact resume). Must never load a
        whole large file at once. A reader without decoding units may ignore `read_pass.shuffle`
        (the loader's window shuffle still applies)."""
        ...


class PackingStrategy(Protocol):
    """Turns a stream of token lengths into packs. A pure function of lengths: no tensors.

    `new_packer(capacity, options)` returns a stateful `Packer`.
    """

    name: str

    def new_packer(self, capacity: int, options: Mapping[str, Any]) -> "Packer": ...


class Packer(Protocol):
    """Streaming packer over (key, length) items; its state is part of every checkpoint."""

    def add(self, key: Any, length: int) -> list[list[Any]]:
        """Offer one item; returns the packs (lists of keys) that are complete now."""
        ...

    def flush(self) -> list[list[Any]]:
        """Every open pack, at the end of the data."""
        ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


class Processor(Protocol):
    """Model-specific: raw sample -> processed sample (tokenised, images transformed)."""

    def __call__(self, sample: RawSample) -> "ProcessedSample": ...


@runtime_checkable
class ProcessedSample(Protocol):
    num_tokens: int
    """Length of the sample in the packed sequence."""


class Collator(Protocol):
    """Model-specific: a list of processed samples -> one packed batch."""

    def __call__(self, samples: Sequence[ProcessedSample]) -> Batch: ...


# ---------------------------------------------------------------------------------------------
# Model spec
# ---------------------------------------------------------------------------------------------


@dataclass
class GeneratedSamples:
    """What a model spec generates for inspection during validation; the core writes it out
    (PNG files under `<run>/samples/step-N/`, TensorBoard images and text)."""

    images: dict[str, Any] = field(default_factory=dict)
    """{name: uint8 array [H, W, 3]} e.g. images generated from fixed prompts."""
    texts: dict[str, str] = field(default_factory=dict)
    """{name: text} e.g. the prompt/question and the model's answer."""


class ModelSpec(Protocol):
    """Everything model specific the trainer needs. Registered through `bagel_titan_model_specs`."""

    name: str
    flavors: Mapping[str, Any]
    """Named model arguments, e.g. "debug" and "7b-mot"."""

    def build(self, job_config: "JobConfig", plugins: Any) -> nn.Module:
        """Build the model for `[model] flavor` (called under the meta device; no allocation).
        `plugins` is the PluginManager: attention backends come from
        `plugins.attention_backends.get(job_config.attention.backend)`."""
        ...

    def init_weights(self, model: nn.Module) -> None:
        """Random initialisation after materialisation (`to_empty`), including buffers."""
        ...

    def load_weights(self, model: nn.Module, path: str) -> None:
        """Load a pretrained folder (format detected) into a materialised, maybe sharded model."""
        ...

    def export(
        self,
        model: nn.Module,
        path: str,
        dtype: torch.dtype,
        state_dict: Mapping[str, torch.Tensor] | None = None,
        *,
        ema: bool = False,
        **options: Any,
    ) -> None:
        """Write an inference-ready folder into the existing folder `path`. Collective: every
        rank calls it with the model as it is (maybe sharded), and rank 0 writes. `state_dict`
        overrides the model's own tensors by name, sharded like them (the EMA shadow); `ema`
        says it holds EMA weights, so the files can say which weights they are.
        `bagel_titan.distributed.tensor_io` gathers one tensor at a time and streams it to disk.
        A model with LoRA adapters receives `lora=` a `bagel_titan.lora.LoRAExport`: each
        adapted weight is written merged (`lora.adapts`, `lora.merged`), adapters are left out."""
        ...

    def sharding_units(self, model: nn.Module) -> list[nn.Module]:
        """Modules to wrap with `fully_shard` (transformer blocks), in forward order."""
        ...

    def separate_shards(self, model: nn.Module) -> list[nn.Module]:
        """Optional. Large modules outside the units (token embedding, output head), in forward
        order, that FSDP2 shards on their own (without AC) so the root does not hold them
        gathered through the step. A spec without this method shards them with the root."""
        ...

    def frozen_modules(self, model: nn.Module, job_config: "JobConfig") -> list[nn.Module]:
        """Modules whose parameters are frozen by the freeze policy of the config."""
        ...

    def attention_backends(self, job_config: "JobConfig") -> dict[str, str]:
        """Optional. Attention backends the model uses beyond `[attention] backend`, by the config
        key that names them (e.g. a model's encoder backend), so that the config check refuses
        one that cannot train where the run does."""
        ...

    def lora_groups(self, model: nn.Module) -> "LoRAGroups":
        """Optional (needed for `[lora] enable`): the module groups `[lora] targets` and
        `train_also` name, with the linears / modules behind each (`bagel_titan.lora.LoRAGroups`).
        Called on the meta-device model, before parallelisation."""
        ...

    def loss_counts(self, batch: Batch) -> Mapping[str, float]:
        """What the loss terms of `batch` sum over, by count name (e.g. a model's label count),
        known before the forward; a loss component picks one by its `count_name` (a lazy
        Mapping lets a count that costs a host sync be computed only when asked)."""
        ...

    def flops(self, batch: Batch) -> float:
        """Training FLOPs (forward + backward) of one packed batch."""
        ...

    def build_processor(self, job_config: "JobConfig") -> Processor: ...

    def build_collator(self, job_config: "JobConfig") -> Collator: ...

    def generate_samples(self, model: nn.Module, job_config: "JobConfig", step: int) -> GeneratedSamples:
        """Optional: images and texts to look at during validation (called on every rank, since
        the model may be sharded; only rank 0's result is written)."""
        ...

    def forward(self, model: nn.Module, batch: Batch, generator: torch.Generator | None) -> ModelOutputs:
        """Run the model on one packed batch. `generator` seeds the flow-matching noise (differs
        per step and per rank)."""
        ...


# ---------------------------------------------------------------------------------------------
# Dataloader
# ---------------------------------------------------------------------------------------------


class TrainDataloader(Protocol):
    """An endless, stateful iterator of packed batches for one data-parallel rank."""

    def __iter__(self) -> Iterator[Batch]: ...

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue with exactly the next batch: reader positions, mixing
        RNG, packing buffer, per-worker state."""
        ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...

    def data_stats(self) -> dict[str, float]:
        """Counters for the metrics (e.g. ``data/skipped/<reason>``, ``data/samples``), cumulative
        since the start of the run (restored on resume)."""
        ...


class DataloaderBuilder(Protocol):
    """Builds the dataloader of one rank. Registered through `bagel_titan_dataloaders`,
    selected with ``[data] loader``."""

    name: str

    def build(
        self,
        job_config: "JobConfig",
        plugins: Any,
        model_spec: ModelSpec,
        *,
        dp_rank: int,
        dp_world_size: int,
        datasets: Sequence[Any] | None = None,
        infinite: bool = True,
    ) -> TrainDataloader:
        """`datasets` overrides `[data] datasets` (validation passes its own); `infinite=False`
        ends after one pass (validation)."""
        ...
