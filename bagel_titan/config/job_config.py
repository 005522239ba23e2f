"""The job configuration: one dataclass per TOML section, a docstring per field.

The docstring under each field is what `bagel-titan --help` prints for it. Plugins add their own
sections (`bagel_titan_config_sections`); those are reached through `JobConfig.section(name)`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from bagel_titan.config.fields import FieldValueError


def _require(ok: bool, key: str, rule: str, value: Any, fix: str = "") -> None:
    """Raise the one-line error of a section field whose value breaks `rule` (the section name is
    added by the loader: "training.steps must be > 0, got 0")."""
    if not ok:
        raise FieldValueError(f"{key} must be {rule}, got {value!r}" + (f"; {fix}" if fix else ""))


@dataclass
class Job:
    config_file: str = ""
    """TOML file to read; CLI overrides take precedence over it."""
    dump_folder: str = "./outputs"
    """Folder under which the run folder is created."""
    run_name: str = "run"
    """Name of the run folder inside `dump_folder` (checkpoints, logs, exports, samples)."""
    description: str = ""
    """Free text, recorded in the resolved config."""
    plugins: list[str] = field(default_factory=list)
    """Extra plugin modules to load, beside the installed `bagel_titan` entry points."""
    print_config: bool = False
    """Print the resolved config as TOML and exit."""


@dataclass
class Model:
    name: str = ""
    """Model spec to train (registered by a plugin; `--help` and the error list them); required."""
    flavor: str = "debug"
    """Named size of the model spec (e.g. "debug", "7b-mot")."""
    pretrained_path: str = ""
    """Folder with pretrained weights to start from (format detected); empty: random init."""
    tokenizer_path: str = ""
    """Folder with tokenizer files; empty: `pretrained_path`, or the spec's bundled tokenizer."""
    freeze: list[str] = field(default_factory=list)
    """Module groups whose parameters are frozen (names defined by the model spec)."""


@dataclass
class Training:
    steps: int = 100
    """Optimizer steps to train for."""
    grad_accum_steps: int = 1
    """Microbatches (packs) per optimizer step on each data-parallel rank."""
    grad_accum_weighting: Literal["tokens", "microbatches"] = "tokens"
    """How a step's microbatches are weighted: "tokens" divides each loss by its count over the
    whole step (every loss token weighs the same); "microbatches" is the release's rule (each
    microbatch's loss is a mean over its own tokens on all ranks, divided by grad_accum_steps,
    so a token of a sparse microbatch weighs more)."""
    max_norm: float = 1.0
    """Gradient-norm clipping threshold; 0 disables clipping (the norm is still logged)."""
    seed: int = 0
    """Seed for model init, data order and flow-matching noise."""
    deterministic: bool = False
    """Use deterministic algorithms (bitwise-reproducible runs; slower)."""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    """Device type; "auto" picks cuda when available."""
    dtype: Literal["float32", "bfloat16"] = "float32"
    """Compute dtype; master weights and optimizer state stay fp32. With FSDP2 (several ranks
    or CPU offload) its mixed precision gathers bf16 parameters; a single rank runs the forward
    and loss under `torch.autocast` instead (no per-step parameter copies)."""
    max_consecutive_nonfinite: int = 10
    """Stop the run after this many consecutive steps with a non-finite loss or gradient."""

    def __post_init__(self) -> None:
        _require(self.steps > 0, "steps", "> 0", self.steps)
        _require(self.grad_accum_steps > 0, "grad_accum_steps", "> 0", self.grad_accum_steps)
        _require(self.max_norm >= 0, "max_norm", ">= 0 (0 disables clipping)", self.max_norm)
        _require(
            self.max_consecutive_nonfinite >= 1,
            "max_consecutive_nonfinite",
            ">= 1",
            self.max_consecutive_nonfinite,
            "1 stops at the first non-finite step",
        )


@dataclass
class Optimizer:
    name: Literal["AdamW"] = "AdamW"
    """Optimizer class."""
    lr: float = 1e-4
    """Peak learning rate."""
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    """Adam betas."""
    eps: float = 1e-15
    """Adam epsilon."""
    weight_decay: float = 0.0
    """Decoupled weight decay."""
    implementation: Literal["auto", "fused", "foreach", "for-loop"] = "auto"
    """Kernel: "auto" takes fused (one vectorised kernel over all parameters) on GPU and CPU,
    foreach on other devices."""

    def __post_init__(self) -> None:
        _require(self.lr >= 0, "lr", ">= 0", self.lr)
        _require(
            len(self.betas) == 2 and all(0 <= b < 1 for b in self.betas),
            "betas",
            "two numbers in [0, 1)",
            self.betas,
        )
        _require(self.eps >= 0, "eps", ">= 0", self.eps)
        _require(self.weight_decay >= 0, "weight_decay", ">= 0", self.weight_decay)


@dataclass
class LRScheduler:
    warmup_steps: int = 0
    """Linear warm-up steps from 0 to the peak lr."""
    decay_type: Literal["constant", "linear", "cosine"] = "constant"
    """Schedule after warm-up."""
    min_lr: float = 0.0
    """Floor of the linear and cosine decays (absolute lr)."""

    def __post_init__(self) -> None:
        _require(self.warmup_steps >= 0, "warmup_steps", ">= 0", self.warmup_steps)
        _require(self.min_lr >= 0, "min_lr", ">= 0", self.min_lr)


@dataclass
class Parallelism:
    dp_shard: int = -1
    """FSDP sharding degree; -1: the world size divided by `dp_replicate`."""
    dp_replicate: int = 1
    """Replication degree (HSDP when > 1 together with dp_shard > 1)."""
    reshard_after_forward: Literal["default", "always", "never"] = "default"
    """Free gathered parameters after forward: "default" reshards all but the last unit."""
    cpu_offload: bool = False
    """FSDP2 CPU offload: sharded parameters, gradients and optimizer state live in host memory
    (the optimizer steps on the CPU); units are copied to the accelerator to compute. On a CPU
    job nothing moves, but the same code path runs."""
    transformer_layer_cls_to_wrap: list[str] = field(default_factory=list)
    """Class names to shard as units; empty: the model spec's sharding units."""
    fsdp: bool = True
    """Wrap the model with FSDP2. A single rank without CPU offload runs unwrapped either way:
    there FSDP would shard nothing and only add per-layer hooks and parameter copies (bf16
    computes under autocast there, see [training] dtype)."""

    def __post_init__(self) -> None:
        _require(self.dp_shard == -1 or self.dp_shard >= 1, "dp_shard", ">= 1 or -1 (auto)", self.dp_shard)
        _require(self.dp_replicate >= 1, "dp_replicate", ">= 1", self.dp_replicate)


@dataclass
class ActivationCheckpoint:
    mode: Literal["none", "full", "selective"] = "none"
    """Recompute activations in backward: every unit ("full") or every Nth ("selective")."""
    selective_every: int = 2
    """With "selective" and granularity "layer": checkpoint every Nth sharding unit."""
    selective_granularity: Literal["layer", "op"] = "layer"
    """With "selective": "layer" checkpoints every Nth unit; "op" checkpoints every unit but keeps
    matmul and attention outputs (recomputes only the cheap ops)."""

    def __post_init__(self) -> None:
        _require(self.selective_every >= 1, "selective_every", ">= 1", self.selective_every)


@dataclass
class Compile:
    enable: bool = False
    """torch.compile each sharding unit and the loss."""
    components: list[str] = field(default_factory=lambda: ["model", "loss"])
    """What to compile: "model" (per unit) and/or "loss"."""

    def __post_init__(self) -> None:
        unknown = sorted(set(self.components) - {"model", "loss"})
        _require(not unknown, "components", 'a list of "model" and "loss"', self.components)


@dataclass
class Checkpoint:
    enable: bool = False
    """Save DCP checkpoints and resume from the latest complete one."""
    folder: str = "checkpoint"
    """Folder inside the run folder."""
    interval: int = 500
    """Save every N steps (and at the end of the run)."""
    keep_latest_k: int = 0
    """Keep only the newest K complete checkpoints; 0 keeps all."""
    async_mode: Literal["disabled", "async"] = "disabled"
    """"async": write in a background thread after a staging copy."""
    load_step: int = -1
    """Resume from this step; -1: the latest complete checkpoint."""
    initial_load_path: str = ""
    """A training checkpoint folder (step-N) to start from when the run has none of its own."""
    initial_load_model_only: bool = True
    """With `initial_load_path`: load only the model weights (fine-tuning from a checkpoint)."""
    export_interval: int = 0
    """Export inference weights every N steps (to exports/step-N/); 0: none during the run
    (`export_at_end` decides the final export)."""
    export_dtype: Literal["bfloat16", "float32"] = "bfloat16"
    """Dtype of exported weights."""
    export_at_end: bool = True
    """Export inference weights when the run ends."""

    def __post_init__(self) -> None:
        _require(self.interval >= 1, "interval", ">= 1", self.interval)
        _require(self.keep_latest_k >= 0, "keep_latest_k", ">= 0 (0 keeps all)", self.keep_latest_k)
        _require(self.load_step >= -1, "load_step", ">= 0, or -1 for the latest", self.load_step)
        _require(
            self.export_interval >= 0, "export_interval", ">= 0 (0: only at the end)", self.export_interval
        )
        _require(bool(self.folder), "folder", "a folder name", self.folder)


@dataclass
class Metrics:
    log_freq: int = 10
    """Log every N steps (console, TensorBoard, metrics.jsonl)."""
    enable_tensorboard: bool = True
    """Write TensorBoard event files into `<run>/tb`."""
    peak_tflops: float = 0.0
    """Peak dense TFLOP/s of one device for MFU; 0: look the device up in the table."""

    def __post_init__(self) -> None:
        _require(self.log_freq > 0, "log_freq", "> 0", self.log_freq)
        _require(self.peak_tflops >= 0, "peak_tflops", ">= 0 (0: look the device up)", self.peak_tflops)


@dataclass
class Profiling:
    enable: bool = False
    """Record a few steps with `torch.profiler` (CPU and GPU activity, the trainer's and the model's
    named ranges) into `<run>/<folder>/rank<r>/`: `trace_step<N>.json` (Chrome trace, opened in
    Perfetto or chrome://tracing) and `summary_step<N>.txt` (the ops that took the most time)."""
    start_step: int = 5
    """First recorded step; the step before it warms the profiler up. Leave room for compile and
    the first batches' set-up. A run resumed past it records the steps after its first instead."""
    steps: int = 2
    """Steps recorded (one trace file for all of them)."""
    folder: str = "profile"
    """Folder inside the run folder, or an absolute path."""

    def __post_init__(self) -> None:
        _require(self.start_step >= 2, "start_step", ">= 2 (step 1 warms the profiler up)", self.start_step)
        _require(self.steps >= 1, "steps", ">= 1", self.steps)
        _require(bool(self.folder), "folder", "a folder name", self.folder)


@dataclass
class DatasetEntry:
    path: str = ""
    """A file, a folder, or a .yaml list of datasets."""
    format: str = ""
    """Reader name (parquet, arrow, json, jsonl, yaml, ...); empty: inferred from the extension."""
    data_folder: str = ""
    """Where relative image paths resolve."""
    weight: float = 1.0
    """Sampling weight in a mixture."""
    name: str = ""
    """Name used in logs and metrics; empty: the path."""
    processor: dict[str, Any] = field(default_factory=dict)
    """Overrides of the model's processor options for this dataset only, as an inline table of
    keys of the model's processor section (its docs list them)."""
    is_mandatory: bool = False
    """With `[data] packing_strategy = "release"`: every pack starts with one sample of this
    dataset (the release's `is_mandatory`)."""

    def __post_init__(self) -> None:
        _require(self.weight >= 0, "weight", ">= 0", self.weight)


@dataclass
class Data:
    datasets: list[DatasetEntry] = field(default_factory=list)
    """The training mixture."""
    packing: bool = True
    """Pack several samples into one sequence."""
    packing_strategy: str = "first_fit"
    """Packing strategy (first_fit, best_fit, best_fit_decreasing, none, release, or from a
    plugin); "release" is a model release's packing, options in [data.release_packing]."""
    packing_length: int = 4096
    """Tokens per pack (its hard cap; with release packing, the release's max_num_tokens)."""
    packing_window: int = 256
    """Samples buffered by look-ahead strategies (first_fit open bins, best_fit_decreasing)."""
    shuffle: bool = True
    """Read every dataset in a new random order each epoch: its decoding units (parquet row
    groups, arrow record batches) permuted, then samples permuted within `shuffle_window`. The
    order is a function of the seed and the epoch, so resume stays exact."""
    shuffle_window: int = 1024
    """Consecutive samples permuted together when `shuffle` is on. Each loader worker holds one
    window of raw records (images still encoded) per dataset; 1 shuffles units only."""
    oversize_policy: Literal["skip", "truncate"] = "skip"
    """A sample longer than `packing_length`: skipped and counted, or truncated (text only)."""
    num_workers: int = 2
    """Dataloader worker processes per rank; 0 loads in the main process."""
    prefetch_factor: int = 2
    """Packs prefetched per worker."""
    seed: int = -1
    """Seed of the mixture and shuffling; -1: `training.seed`."""
    loader: str = "packed"
    """Dataloader builder (registered by a plugin)."""

    def __post_init__(self) -> None:
        _require(self.packing_length > 0, "packing_length", "> 0", self.packing_length)
        _require(self.packing_window >= 1, "packing_window", ">= 1", self.packing_window)
        _require(self.shuffle_window > 0, "shuffle_window", "> 0", self.shuffle_window)
        _require(self.num_workers >= 0, "num_workers", ">= 0 (0 loads in the main process)", self.num_workers)
        _require(self.prefetch_factor >= 1, "prefetch_factor", ">= 1", self.prefetch_factor)


@dataclass
class Validation:
    enable: bool = False
    """Run validation (held-out loss, samples) during training."""
    interval: int = 100
    """Every N steps (and at the end)."""
    steps: int = 4
    """Held-out packs per validation."""
    datasets: list[DatasetEntry] = field(default_factory=list)
    """Held-out data; empty: no held-out loss."""

    def __post_init__(self) -> None:
        _require(self.interval >= 1, "interval", ">= 1", self.interval)
        _require(self.steps >= 1, "steps", ">= 1", self.steps)


@dataclass
class Attention:
    backend: str = "sdpa"
    """Attention backend (eager, sdpa, flex, nsa, or from a plugin); options in [attention.<backend>]."""


@dataclass
class Loss:
    components: list[str] = field(default_factory=list)
    """Loss components to sum (registered by plugins, e.g. ["ce"]); options in [loss.<name>];
    required for training."""
    weights: dict[str, float] = field(default_factory=dict)
    """Weight per component name; a component not listed weighs 1.0."""


@dataclass
class EMA:
    enable: bool = False
    """Keep an fp32 exponential moving average of the trainable parameters."""
    decay: float = 0.9999
    """EMA decay per update."""
    start_step: int = 0
    """Copy the weights (no averaging) until this step."""
    update_interval: int = 1
    """Update every N steps."""
    device: Literal["param", "cpu"] = "param"
    """Where the sharded fp32 shadow lives: "param" (with the parameter shards, on the
    accelerator unless `[parallelism] cpu_offload`) or "cpu" (host memory: the accelerator holds
    no EMA; each update copies the parameter shards to the host)."""

    def __post_init__(self) -> None:
        _require(0.0 <= self.decay < 1.0, "decay", "in [0, 1)", self.decay)
        _require(self.start_step >= 0, "start_step", ">= 0", self.start_step)
        _require(self.update_interval >= 1, "update_interval", ">= 1", self.update_interval)


@dataclass
class LoRA:
    enable: bool = False
    """Fine-tune low-rank adapters (LoRA) instead of the whole model: every parameter is frozen
    except the adapters and the `train_also` groups. The export holds the merged weights in the
    model's own layout plus `adapter/` in peft's format."""
    rank: int = 16
    """Rank r of each adapter (A: r x in, B: out x r)."""
    alpha: float = 32.0
    """Scale numerator: the update is alpha / rank * B A."""
    dropout: float = 0.0
    """Dropout on the adapters' input during training (0: none; > 0 draws from the global RNG,
    so a resumed run is no longer bitwise identical to a straight one)."""
    targets: list[str] = field(default_factory=list)
    """Linear layers to adapt: a module group of the model spec (every projection of it) or
    "group.projection", e.g. "und.q_proj"; an unknown name lists the valid ones (the model's
    docs name its groups). Empty: the model spec's default groups."""
    train_also: list[str] = field(default_factory=list)
    """Module groups trained in full beside the adapters (groups of the model spec); exported
    inside `adapter/` as peft's `modules_to_save`."""
    dtype: Literal["float32", "bfloat16"] = "float32"
    """Dtype of the trainable parameters (adapters, `train_also`) and so of their optimizer state."""
    base_dtype: Literal["float32", "bfloat16"] = "float32"
    """Dtype the frozen base weights are kept in; "bfloat16" halves their memory (needs
    [training] dtype = "bfloat16")."""

    def __post_init__(self):
        if self.rank < 1:
            raise ValueError(f"rank must be >= 1, got {self.rank}")
        if self.alpha <= 0:
            raise ValueError(f"alpha must be > 0, got {self.alpha}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")


@dataclass
class JobConfig:
    job: Job = field(default_factory=Job)
    model: Model = field(default_factory=Model)
    training: Training = field(default_factory=Training)
    optimizer: Optimizer = field(default_factory=Optimizer)
    lr_scheduler: LRScheduler = field(default_factory=LRScheduler)
    parallelism: Parallelism = field(default_factory=Parallelism)
    activation_checkpoint: ActivationCheckpoint = field(default_factory=ActivationCheckpoint)
    compile: Compile = field(default_factory=Compile)
    checkpoint: Checkpoint = field(default_factory=Checkpoint)
    metrics: Metrics = field(default_factory=Metrics)
    profiling: Profiling = field(default_factory=Profiling)
    data: Data = field(default_factory=Data)
    validation: Validation = field(default_factory=Validation)
    attention: Attention = field(default_factory=Attention)
    loss: Loss = field(default_factory=Loss)
    ema: EMA = field(default_factory=EMA)
    lora: LoRA = field(default_factory=LoRA)
    plugin_sections: dict[str, Any] = field(default_factory=dict)
    """Sections contributed by plugins, by dotted name (not a TOML key itself)."""

    def section(self, name: str) -> Any:
        """A section by dotted name: a core one ("training") or a plugin's ("attention.nsa")."""
        if name in self.plugin_sections:
            return self.plugin_sections[name]
        if "." not in name and name in CORE_SECTIONS:
            return getattr(self, name)
        known = sorted(list(CORE_SECTIONS) + list(self.plugin_sections))
        raise KeyError(f"no config section {name!r}; known sections: {', '.join(known)}")

    def section_or_none(self, name: str) -> Any:
        """The section object `name` (what backends and loss factories take), or None when no
        plugin registered that section."""
        return self.section(name) if self.has_section(name) else None

    def has_section(self, name: str) -> bool:
        return name in self.plugin_sections or name in CORE_SECTIONS


CORE_SECTIONS: dict[str, type] = {
    "job": Job,
    "model": Model,
    "training": Training,
    "optimizer": Optimizer,
    "lr_scheduler": LRScheduler,
    "parallelism": Parallelism,
    "activation_checkpoint": ActivationCheckpoint,
    "compile": Compile,
    "checkpoint": Checkpoint,
    "metrics": Metrics,
    "profiling": Profiling,
    "data": Data,
    "validation": Validation,
    "attention": Attention,
    "loss": Loss,
    "ema": EMA,
    "lora": LoRA,
}
