"""The typed contracts that plugins implement.

The core (trainer, parallelism, checkpointing, metrics) only ever talks to these objects; it never
imports a plugin by name. A plugin returns instances of them from its hooks (see `hookspec.py`).

A plugin's class subclasses its contract (`class MySpec(ModelSpec): ...`, as PEP 544 allows):
it then inherits the defaults of the optional members, each documented below where it is
declared, and the core calls every member without probing for it. The plugin manager refuses an
object that lacks a member, naming the plugin (`bagel_titan.plugins.Registry`).
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import (
    TYPE_CHECKING,
    Any,
    Generic,
    Iterator,
    Mapping,
    Protocol,
    Sequence,
    TypeVar,
    runtime_checkable,
)

import torch
from torch import nn

if TYPE_CHECKING:
    from bagel_titan.config.job_config import DatasetEntry, JobConfig
    from bagel_titan.lora import LoRAExport, LoRAGroups
    from bagel_titan.metrics.memory_estimate import ActivationEstimate
    from bagel_titan.plugins import PluginManager


# ---------------------------------------------------------------------------------------------
# Batches and model outputs
# ---------------------------------------------------------------------------------------------


@runtime_checkable
class Batch(Protocol):
    """One packed microbatch as the collator of a model spec emits it.

    The core treats it as opaque apart from these members.
    """

    @property
    def num_tokens(self) -> int:
        """Real (non-padding) tokens in the pack; used for tokens/s."""
        ...

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


def loss_counts(
    spec: "ModelSpec[Any, Any]", components: Sequence[LossComponent], batch: Batch
) -> list[float]:
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


MetaT = TypeVar("MetaT", bound=AttentionMeta)


class AttentionModule(nn.Module, Generic[MetaT]):
    """The per-layer module an attention backend builds; the model calls it as
    `module(q_THD, k_THD, v_THD, meta, hidden_TD) -> out_THD` where `q` is [T, Hq, D], `k`/`v`
    are [T, Hkv, D], `meta` is the batch's attention metadata (`MetaT`: the model's own
    `AttentionMeta` class; the first-party one is `bagel_titan_plugins.attention.meta.AttentionMeta`)
    and `hidden_TD` the layer input (for backends with gates). It may own parameters (NSA gates
    and compression weights); they then live in the model's state dict under the attention layer.
    """

    uses_hidden: bool = False
    """Whether `forward` reads `hidden_TD`; when False the model passes None and saves building
    it. Default: False."""

    def prepare(self, meta: MetaT) -> None:
        """Build what this module needs for the batch (masks, plans): the model calls it once per
        batch before its layers, outside checkpointed and compiled regions (built lazily inside
        them, a cache would differ between the forward and its recomputation). Default: nothing."""

    @property
    def optional_state_keys(self) -> tuple[str, ...]:
        """State-dict keys, relative to this module, that a pretrained dense checkpoint lacks
        (its own parameters); a weight loader accepts them as missing and leaves them at their
        `reset_parameters()` values. Default: none."""
        return ()

    def reset_parameters(self) -> None:
        """Initialise the parameters `optional_state_keys` names (after materialisation).
        Default: nothing (a module without parameters)."""


class AttentionBackend(Protocol):
    """A named attention implementation for packed sequences. Registered through
    `bagel_titan_attention_backends`, selected with `[attention] backend`."""

    name: str
    trains_on_cpu: bool = True
    """Whether it has a CPU backward; False makes the config check refuse it for a CPU run
    (e.g. flex attention). Default: True."""
    encoder_fallback: str | None = None
    """The backend that serves this one's encoder layers (`AttentionLayerSpec.role == "encoder"`)
    when it serves only decoders, unless the model's config names one; None: it serves both."""

    def build(self, spec: AttentionLayerSpec, config: Any) -> AttentionModule[Any]:
        """The module of one attention layer (`AttentionModule`). `config`: the backend's
        `[attention.<name>]` section object (registered through `bagel_titan_config_sections`),
        None when it registered none."""
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
    extensions: tuple[str, ...] = ()
    """File extensions that select this reader when `format` is omitted (e.g. (".parquet",)).
    Default: none (the reader is selected by `format` only)."""

    def expand(self, path: str) -> "list[DatasetEntry] | None":
        """The datasets `path` lists, when it is a list of datasets (a mixture file) rather than
        one: the loader then reads those entries instead (weights multiply, `processor` options
        merge). Default: None (`path` is one dataset, read with `iter_samples`)."""
        return None

    def iter_samples(
        self, path: str, *, shard_index: int, num_shards: int, start: int, read_pass: ReadPass
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

    def wanted_source(self) -> int | None:
        """The source (index into the loader's datasets) the next item must come from, for a
        packer that starts each pack with given datasets (the release's mandatory ones); the
        loader then draws from it. Default: None (any source)."""
        return None

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


class Processor(Protocol):
    """Model-specific: raw sample -> processed sample (tokenised, images transformed)."""

    def __call__(self, sample: RawSample) -> "ProcessedSample": ...


class ProcessedSample(Protocol):
    """A sample ready to pack, as a model's processor returns it."""

    num_tokens: int
    """Length of the sample in the packed sequence."""

    def truncated(self, max_tokens: int) -> "ProcessedSample | None":
        """This sample cut to `max_tokens` (`[data] oversize_policy = "truncate"`), or None when it
        cannot be cut (e.g. it holds images). Default: None."""
        return None


SampleT = TypeVar("SampleT", bound=ProcessedSample, contravariant=True)


class Collator(Protocol[SampleT]):
    """Model-specific: a list of processed samples (`SampleT`: those its processor makes) -> one
    packed batch."""

    def __call__(self, samples: Sequence[SampleT]) -> Batch: ...


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


ModelT = TypeVar("ModelT", bound=nn.Module)
BatchT = TypeVar("BatchT", bound=Batch, contravariant=True)


class ModelSpec(Protocol[ModelT, BatchT]):
    """Everything model specific the trainer needs. Registered through `bagel_titan_model_specs`.

    Generic over the spec's model class (`ModelT`) and packed batch class (`BatchT`), so that a
    spec's methods take its own types (`class MySpec(ModelSpec[MyModel, MyBatch])`); the core
    holds a `ModelSpec[Any, Any]`.
    """

    name: str
    flavors: Mapping[str, Any] = MappingProxyType({})
    """Named model arguments, e.g. "debug" and "7b-mot"; the config check refuses a `[model]
    flavor` outside them. Default: none (the spec reads no flavor, any is accepted)."""

    def build(self, job_config: "JobConfig", plugins: "PluginManager") -> ModelT:
        """Build the model for `[model] flavor` (called under the meta device; no allocation).
        `plugins` is the PluginManager: attention backends come from
        `plugins.attention_backends.get(job_config.attention.backend)`."""
        ...

    def init_weights(self, model: ModelT) -> None:
        """Random initialisation after materialisation (`to_empty`), including buffers."""
        ...

    def load_weights(self, model: ModelT, path: str) -> None:
        """Load a pretrained folder (format detected) into a materialised, maybe sharded model."""
        ...

    def export(
        self,
        model: ModelT,
        path: str,
        dtype: torch.dtype,
        state_dict: Mapping[str, torch.Tensor] | None = None,
        *,
        ema: bool = False,
        lora: "LoRAExport | None" = None,
    ) -> None:
        """Write an inference-ready folder into the existing folder `path`. Collective: every
        rank calls it with the model as it is (maybe sharded), and rank 0 writes. `state_dict`
        overrides the model's own tensors by name, sharded like them (the EMA shadow); `ema`
        says it holds EMA weights, so the files can say which weights they are.
        `bagel_titan.distributed.tensor_io` gathers one tensor at a time and streams it to disk.
        A model with LoRA adapters receives `lora` (`bagel_titan.lora.LoRAExport`): each
        adapted weight is written merged (`lora.adapts`, `lora.merged`), adapters are left out."""
        ...

    def sharding_units(self, model: ModelT) -> list[nn.Module]:
        """Modules to wrap with `fully_shard` (transformer blocks), in forward order."""
        ...

    def separate_shards(self, model: ModelT) -> list[nn.Module]:
        """Large modules outside the units (token embedding, output head), in forward order, that
        FSDP2 shards on their own (without AC) so the root does not hold them gathered through
        the step. Default: none (they are sharded with the root)."""
        return []

    def frozen_modules(self, model: ModelT, job_config: "JobConfig") -> list[nn.Module]:
        """Modules whose parameters are frozen by the freeze policy of the config."""
        ...

    def attention_backends(self, job_config: "JobConfig") -> dict[str, str]:
        """Attention backends the model uses beyond `[attention] backend`, by the config key that
        names them (e.g. a model's encoder backend), so that the config check refuses one that
        cannot train where the run does. Default: none."""
        return {}

    def lora_groups(self, model: ModelT) -> "LoRAGroups | None":
        """The module groups `[lora] targets` and `train_also` name, with the linears / modules
        behind each (`bagel_titan.lora.LoRAGroups`); called on the meta-device model, before
        parallelisation. Default: None (no LoRA: `[lora] enable` is refused)."""
        return None

    def activation_memory(
        self,
        model: ModelT,
        job_config: "JobConfig",
        tokens: int,
        compute_bytes: int,
        activation_checkpointing: bool,
    ) -> "ActivationEstimate | None":
        """Activation bytes of one pack of `tokens` tokens, for the memory planner
        (`bagel-titan-estimate`). Default: None (the planner's generic per-unit estimate)."""
        return None

    def loss_counts(self, batch: BatchT) -> Mapping[str, float]:
        """What the loss terms of `batch` sum over, by count name (e.g. a model's label count),
        known before the forward; a loss component picks one by its `count_name` (a lazy
        Mapping lets a count that costs a host sync be computed only when asked)."""
        ...

    def flops(self, batch: BatchT) -> float:
        """Training FLOPs (forward + backward) of one packed batch."""
        ...

    def build_processor(self, job_config: "JobConfig") -> Processor:
        """The processor the `packed` dataloader runs on every raw sample."""
        ...

    def build_collator(self, job_config: "JobConfig") -> Collator[Any]:
        """The collator the `packed` dataloader runs on every pack."""
        ...

    def generate_samples(self, model: ModelT, job_config: "JobConfig", step: int) -> GeneratedSamples | None:
        """Images and texts to look at during validation (called on every rank, since the model
        may be sharded; only rank 0's result is written). Default: None (nothing to look at)."""
        return None

    def forward(self, model: ModelT, batch: BatchT, generator: torch.Generator | None) -> ModelOutputs:
        """Run the model on one packed batch. `generator` seeds the model's random choices, e.g.
        diffusion noise (differs per step and per rank)."""
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

    def close(self) -> None:
        """Stop the loader's worker processes now (the trainer calls it when the run ends; a
        wrapper passes it on to the loader it wraps). Default: nothing (no workers)."""


class DataloaderBuilder(Protocol):
    """Builds the dataloader of one rank. Registered through `bagel_titan_dataloaders`,
    selected with ``[data] loader``."""

    name: str

    def build(
        self,
        job_config: "JobConfig",
        plugins: "PluginManager",
        model_spec: ModelSpec[Any, Any],
        *,
        dp_rank: int,
        dp_world_size: int,
        datasets: Sequence[Any] | None = None,
        infinite: bool = True,
    ) -> TrainDataloader:
        """`datasets` overrides `[data] datasets` (validation passes its own); `infinite=False`
        ends after one pass (validation)."""
        ...
