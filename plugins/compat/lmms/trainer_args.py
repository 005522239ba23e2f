"""Training arguments (HF TrainingArguments / LMMS trainer_args): one handler per key, in
`TRAINER_HANDLERS`."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

from .record import Conversion
from .tables import (
    FREEZE_GROUPS,
    HF_DEFAULT,
    HF_TRAINER_DEFAULTS,
    IGNORED_TRAINER_ARGS,
    LR_SCHEDULES,
    MODEL_CLASSES,
    NO_EFFECT_HF,
    OPTIMIZERS,
    as_list,
)


@dataclass
class TrainerContext:
    """The training arguments with the HF defaults filled in, and which ones the YAML set."""

    args: dict[str, Any]
    given: set[str]
    prefix: str
    model: Mapping[str, Any]
    consumed: set[str] = field(default_factory=set)
    """Given keys some handler turned into a setting or a note."""

    def source(self, key: str) -> str:
        """How `key` is cited in the output; citing it marks it as accounted for."""
        self.consumed.add(key)
        return f"{self.prefix}{key}" if key in self.given else f"{key} (HF default)"


TrainerHandler = Callable[[Conversion, str, Any, TrainerContext], None]
"""(conversion, LMMS key, value, context): maps one training argument."""


def _steps(conv: Conversion, key: str, _: Any, ctx: TrainerContext) -> None:
    max_steps = ctx.args.get("max_steps")
    if isinstance(max_steps, int) and max_steps > 0:
        conv.set("training", "steps", max_steps, ctx.source("max_steps"))
        if "num_train_epochs" in ctx.given:
            conv.skip(
                ctx.source("num_train_epochs"),
                ctx.args["num_train_epochs"],
                "max_steps takes precedence (as in the HF Trainer)",
            )
        return
    epochs = ctx.args.get("num_train_epochs", 3.0)
    conv.skip(
        ctx.source("num_train_epochs"),
        epochs,
        "CHECK: bagel-titan counts optimizer steps, not epochs; set [training] steps to about epochs x "
        "samples / (samples per pack x grad_accum_steps x data-parallel ranks) (the data repeats "
        "endlessly); [training] steps keeps its default until then",
    )


def _batch(conv: Conversion, key: str, _: Any, ctx: TrainerContext) -> None:
    per_device = int(ctx.args.get("per_device_train_batch_size") or 1)
    accum = int(ctx.args.get("gradient_accumulation_steps") or 1)
    packing = bool(conv.get("data", "packing", True))
    unit = "pack" if packing else "sample"
    note = ""
    if per_device != 1:
        note = (
            f"a microbatch is one {unit} in bagel-titan: per_device_train_batch_size ({per_device}) x "
            f"gradient_accumulation_steps ({accum}) microbatches per optimizer step keep the {unit}s per step"
        )
    conv.set(
        "training",
        "grad_accum_steps",
        per_device * accum,
        " x ".join(
            ctx.source(k)
            for k in ("per_device_train_batch_size", "gradient_accumulation_steps")
            if k in ctx.given or k in HF_TRAINER_DEFAULTS
        ),
        note,
    )


def _precision(conv: Conversion, key: str, _: Any, ctx: TrainerContext) -> None:
    bf16, fp16 = bool(ctx.args.get("bf16")), bool(ctx.args.get("fp16"))
    torch_dtype = str(ctx.model.get("torch_dtype") or "")
    source = " + ".join(
        s
        for s in (
            ctx.source("bf16"),
            ctx.source("fp16") if "fp16" in ctx.given else "",
            "model_config.torch_dtype" if torch_dtype else "",
        )
        if s
    )
    if not (bf16 or fp16 or torch_dtype in ("bfloat16", "float16")):
        conv.set("training", "dtype", "float32", source)
        return
    note = (
        (
            "LMMS Engine loads the parameters in bf16 (torch_dtype bfloat16) and updates them in bf16 (pure "
            "bf16: AdamW state in bf16, updates below bf16's resolution are lost). bagel-titan computes in bf16 "
            "(FSDP2 mixed precision) but keeps fp32 master weights and optimizer state and reduces gradients in "
            "fp32: the same forward numerics, more exact updates, about 8 more bytes per parameter of sharded "
            "state"
        )
        if torch_dtype in ("bfloat16", "") and (bf16 or torch_dtype == "bfloat16")
        else ("bf16 autocast over fp32 parameters: bagel-titan's bfloat16 mixed precision does the same")
    )
    if fp16 or torch_dtype == "float16":
        note = (
            "bagel-titan has no fp16 (no loss scaling): bf16 mixed precision with fp32 master weights is used "
            "instead"
        )
    conv.set("training", "dtype", "bfloat16", source, note)


def _lr_schedule(conv: Conversion, key: str, value: Any, ctx: TrainerContext) -> None:
    source = ctx.source("lr_scheduler_type")
    kwargs = ctx.args.get("lr_scheduler_kwargs") or {}
    if kwargs:
        ctx.consumed.add("lr_scheduler_kwargs")
    schedule = LR_SCHEDULES.get(str(value))
    if schedule is None:
        closest = {"cosine_with_restarts": "cosine", "polynomial": "linear"}.get(str(value))
        if closest is None:
            conv.skip(
                source,
                value,
                "no such schedule in bagel-titan (constant, linear, cosine); "
                "[lr_scheduler] decay_type keeps its default",
            )
            return
        conv.set(
            "lr_scheduler",
            "decay_type",
            closest,
            source,
            f"no {value} schedule: {closest} is the closest (one decay to min_lr at [training] steps)",
        )
    else:
        conv.set(
            "lr_scheduler",
            "decay_type",
            schedule,
            source,
            "the HF Trainer's default schedule is linear decay to 0; bagel-titan's default is constant"
            if "lr_scheduler_type" not in ctx.given
            else "",
        )
    if value == "cosine_with_min_lr":
        if "min_lr" in kwargs:
            conv.set(
                "lr_scheduler", "min_lr", float(kwargs["min_lr"]), f"{ctx.prefix}lr_scheduler_kwargs.min_lr"
            )
        elif "min_lr_rate" in kwargs:
            lr = float(ctx.args.get("learning_rate", HF_TRAINER_DEFAULTS["learning_rate"]))
            conv.set(
                "lr_scheduler",
                "min_lr",
                float(kwargs["min_lr_rate"]) * lr,
                f"{ctx.prefix}lr_scheduler_kwargs.min_lr_rate x learning_rate",
            )
    for key, kw_value in kwargs.items():
        if not (value == "cosine_with_min_lr" and key in ("min_lr", "min_lr_rate")):
            conv.skip(f"{ctx.prefix}lr_scheduler_kwargs.{key}", kw_value, "no such [lr_scheduler] option")


def _warmup(conv: Conversion, key: str, _: Any, ctx: TrainerContext) -> None:
    steps = int(ctx.args.get("warmup_steps") or 0)
    ratio = float(ctx.args.get("warmup_ratio") or 0.0)
    if ctx.args.get("lr_scheduler_type") == "constant" and (steps or ratio):
        conv.set(
            "lr_scheduler",
            "warmup_steps",
            0,
            ctx.source("lr_scheduler_type"),
            "the HF `constant` schedule ignores warm-up (constant_with_warmup uses it)",
        )
        return
    if steps > 0:
        conv.set("lr_scheduler", "warmup_steps", steps, ctx.source("warmup_steps"))
        if "warmup_ratio" not in ctx.given:
            return
        if ratio:
            conv.skip(
                ctx.source("warmup_ratio"), ratio, "warmup_steps takes precedence (as in the HF Trainer)"
            )
    elif ratio > 0:
        total = conv.get("training", "steps")
        if total is None:
            conv.skip(
                ctx.source("warmup_ratio"),
                ratio,
                "CHECK: a ratio of the total steps, which are not known "
                "(epochs); set [lr_scheduler] warmup_steps",
            )
        else:
            conv.set(
                "lr_scheduler",
                "warmup_steps",
                math.ceil(ratio * total),
                ctx.source("warmup_ratio"),
                f"warmup_ratio {ratio} x {total} steps, rounded up as the HF Trainer does",
            )
        if "warmup_steps" in ctx.given:
            conv.skip(ctx.source("warmup_steps"), ctx.args["warmup_steps"], "0: warmup_ratio applies")
    elif "warmup_steps" in ctx.given or "warmup_ratio" in ctx.given:
        conv.set(
            "lr_scheduler",
            "warmup_steps",
            0,
            ctx.source("warmup_steps" if "warmup_steps" in ctx.given else "warmup_ratio"),
        )


def _checkpointing(conv: Conversion, key: str, _: Any, ctx: TrainerContext) -> None:
    strategy = ctx.args.get("save_strategy", "steps")
    if strategy == "no":
        conv.set("checkpoint", "enable", False, ctx.source("save_strategy"))
        return
    if strategy == "epoch":
        conv.skip(
            ctx.source("save_strategy"),
            strategy,
            "bagel-titan saves every N steps: see [checkpoint] interval",
        )
    conv.set(
        "checkpoint",
        "enable",
        True,
        ", ".join(
            ctx.source(k) for k in ("save_steps", "save_strategy") if k in ctx.given or k == "save_steps"
        ),
        "the HF Trainer saves every 500 steps by default; bagel-titan's checkpoints are off by default"
        if "save_steps" not in ctx.given
        else "",
    )
    conv.set("checkpoint", "interval", int(ctx.args.get("save_steps") or 500), ctx.source("save_steps"))
    if ctx.args.get("save_total_limit"):
        conv.set(
            "checkpoint", "keep_latest_k", int(ctx.args["save_total_limit"]), ctx.source("save_total_limit")
        )


def _output_dir(conv: Conversion, key: str, value: Any, ctx: TrainerContext) -> None:
    path = os.path.normpath(str(value))
    conv.set("job", "dump_folder", os.path.dirname(path) or ".", ctx.source("output_dir"))
    conv.set("job", "run_name", os.path.basename(path), ctx.source("output_dir"))


def _report_to(conv: Conversion, key: str, value: Any, ctx: TrainerContext) -> None:
    targets = set(as_list(value)) - {"none", None}
    conv.set(
        "metrics",
        "enable_tensorboard",
        bool(targets),
        ctx.source("report_to"),
        "no wandb: metrics go to the console, TensorBoard (<run>/tb) and <run>/metrics.jsonl"
        if targets - {"tensorboard"}
        else "",
    )


def _fsdp(conv: Conversion, key: str, value: Any, ctx: TrainerContext) -> None:
    conv.set(
        "parallelism",
        "fsdp",
        True,
        ctx.source("fsdp2"),
        ""
        if value
        else "LMMS fsdp2: false replicates the model; bagel-titan shards it with FSDP2 "
        "(same math, less memory per GPU)",
    )


def _fsdp_config(conv: Conversion, key: str, value: Any, ctx: TrainerContext) -> None:
    ctx.consumed.add(key)  # each sub-key is mapped or noted on its own
    for key, sub in (value or {}).items():
        source = f"{ctx.prefix}fsdp_config.{key}"
        if key == "transformer_layer_cls_to_wrap" and sub:
            _wrap_classes(conv, sub, source)
        elif key == "reshard_after_forward":
            conv.set(
                "parallelism",
                "reshard_after_forward",
                "always" if sub else "never",
                source,
                'bagel-titan\'s default ("default") reshards every unit but the last',
            )
        elif key in ("offload_params", "cpu_offload") and sub:
            conv.set("parallelism", "cpu_offload", True, source)
        else:
            conv.skip(source, sub, "no FSDP2 option of that name in [parallelism]")


def _wrap_classes(conv: Conversion, names: Any, source: str) -> None:
    names = as_list(names)
    unknown = [n for n in names if n not in MODEL_CLASSES]
    if unknown:
        conv.skip(
            source,
            names,
            f"{unknown} are not module classes of bagel-titan's BAGEL (it has "
            f"{list(MODEL_CLASSES)}); the spec's units (every decoder and ViT layer) are used",
        )
        return
    conv.set(
        "parallelism",
        "transformer_layer_cls_to_wrap",
        names,
        source,
        "the same FSDP units as the LMMS run; leave it empty to also shard every SigLIP layer on its own"
        if "SiglipEncoderLayer" not in names
        else "",
    )


def _freeze(conv: Conversion, key: str, value: Any, ctx: TrainerContext) -> None:
    groups = set(conv.get("model", "freeze", []))
    for name in as_list(value or []):
        if name in FREEZE_GROUPS:
            groups.add(FREEZE_GROUPS[name])
        elif name in ("vae", "vae_model"):
            conv.skip(ctx.source("freeze_modules"), name, "the VAE is always frozen")
        else:
            conv.skip(
                ctx.source("freeze_modules"),
                name,
                "no such module group; [model] freeze takes llm, vit, connector, und, gen",
            )
    if groups:
        conv.set("model", "freeze", sorted(groups), ctx.source("freeze_modules"))


def _validation(conv: Conversion, key: str, value: Any, ctx: TrainerContext) -> None:
    if value in ("no", None):
        conv.set("validation", "enable", False, ctx.source("eval_strategy"))
        return
    conv.set(
        "validation",
        "enable",
        True,
        ctx.source("eval_strategy"),
        "" if value == "steps" else f"eval_strategy {value!r}: bagel-titan validates every N steps",
    )
    if ctx.args.get("eval_steps"):
        conv.set("validation", "interval", int(ctx.args["eval_steps"]), ctx.source("eval_steps"))


def _optim(conv: Conversion, key: str, value: Any, ctx: TrainerContext) -> None:
    if value in OPTIMIZERS:
        conv.set("optimizer", "implementation", OPTIMIZERS[value], ctx.source("optim"))
    else:
        conv.skip(ctx.source("optim"), value, "bagel-titan trains with AdamW only")


def _simple(section: str, name: str, cast: Callable[[Any], Any] = lambda v: v) -> TrainerHandler:
    """A training argument that maps one to one onto `[section] name`."""

    def handler(conv: Conversion, key: str, value: Any, ctx: TrainerContext) -> None:
        if value is not None:
            conv.set(section, name, cast(value), ctx.source(key), "" if key in ctx.given else HF_DEFAULT)

    return handler


def _betas(conv: Conversion, key: str, _: Any, ctx: TrainerContext) -> None:
    conv.set(
        "optimizer",
        "betas",
        [float(ctx.args["adam_beta1"]), float(ctx.args["adam_beta2"])],
        f"{ctx.source('adam_beta1')}, {ctx.source('adam_beta2')}",
        "HF AdamW defaults (0.9, 0.999); bagel-titan's default is (0.9, 0.95)"
        if not {"adam_beta1", "adam_beta2"} <= ctx.given
        else "",
    )


def _skip_reason(reason: str) -> TrainerHandler:
    """A training argument with no equivalent, whatever its value."""

    def handler(conv: Conversion, key: str, value: Any, ctx: TrainerContext) -> None:
        conv.skip(ctx.source(key), value, reason)

    return handler


@dataclass(frozen=True)
class _ReadBy:
    """A training argument that `other`'s handler reads; noted only if that handler never runs."""

    other: str

    def __call__(self, conv: Conversion, key: str, value: Any, ctx: TrainerContext) -> None:
        return None


def _read_by(other: str) -> TrainerHandler:
    return _ReadBy(other)


def _skip_if_set(reason: str, off: tuple[Any, ...] = (None, False, "", [], {})) -> TrainerHandler:
    """An option whose `off` values are what bagel-titan does; any other value has no equivalent."""

    def handler(conv: Conversion, key: str, value: Any, ctx: TrainerContext) -> None:
        is_off = any(type(value) is type(o) and value == o for o in off if o is not None) or value is None
        conv.skip(ctx.source(key), value, "off, as in bagel-titan" if is_off else reason)

    return handler


TRAINER_HANDLERS: dict[str, TrainerHandler] = {
    "max_steps": _steps,
    "num_train_epochs": _read_by("max_steps"),
    "per_device_train_batch_size": _batch,
    "gradient_accumulation_steps": _read_by("per_device_train_batch_size"),
    "learning_rate": _simple("optimizer", "lr", float),
    "weight_decay": _simple("optimizer", "weight_decay", float),
    "adam_beta1": _betas,
    "adam_beta2": _read_by("adam_beta1"),
    "adam_epsilon": _simple("optimizer", "eps", float),
    "max_grad_norm": _simple("training", "max_norm", float),
    "optim": _optim,
    "lr_scheduler_type": _lr_schedule,
    "lr_scheduler_kwargs": _read_by("lr_scheduler_type"),
    "warmup_ratio": _warmup,
    "warmup_steps": _read_by("warmup_ratio"),
    "seed": _simple("training", "seed", int),
    "data_seed": _simple("data", "seed", int),
    "full_determinism": _simple("training", "deterministic", bool),
    "gradient_checkpointing": lambda conv, key, value, ctx: conv.set(
        "activation_checkpoint", "mode", "full" if value else "none", ctx.source("gradient_checkpointing")
    ),
    "gradient_checkpointing_kwargs": _skip_if_set(
        "activation checkpointing has no kwargs here; [activation_checkpoint] mode = full or selective"
    ),
    "bf16": _precision,
    "fp16": _read_by("bf16"),
    "tf32": _skip_reason("TF32 matmuls follow PyTorch's defaults"),
    "reduce_dtype": lambda conv, key, value, ctx: conv.skip(
        ctx.source("reduce_dtype"),
        value,
        "gradients are always reduced in fp32 here (more exact than a bf16 reduce, twice its traffic)"
        if value != "float32"
        else "fp32, as here",
    ),
    "output_dtype": lambda conv, key, value, ctx: conv.set(
        "checkpoint",
        "export_dtype",
        "float32" if value == "float32" else "bfloat16",
        ctx.source("output_dtype"),
    ),
    "fsdp2": _fsdp,
    "fsdp_config": _fsdp_config,
    "fsdp": _skip_if_set("HF FSDP1 options: bagel-titan always uses FSDP2 ([parallelism])"),
    "fsdp_transformer_layer_cls_to_wrap": lambda conv, key, value, ctx: (
        _wrap_classes(conv, value, ctx.source(key)) if value else None
    ),
    "sp_ulysses_degree": _skip_if_set("no sequence parallelism in bagel-titan", off=(None, 1)),
    "use_muon": _skip_if_set("bagel-titan trains with AdamW only"),
    "save_steps": _checkpointing,
    "save_strategy": _read_by("save_steps"),
    "save_total_limit": _read_by("save_steps"),
    "save_only_model": _skip_reason(
        "checkpoints always hold model, optimizer and data position (exact resume); "
        "the weights-only copy is the export (checkpoint.export_*)"
    ),
    "resume_from_checkpoint": _skip_if_set(
        "a run resumes from its own latest checkpoint when [checkpoint] "
        "enable = true; to start from another run's step-N folder set "
        "[checkpoint] initial_load_path"
    ),
    "output_dir": _output_dir,
    "run_name": _skip_reason("the run folder name comes from output_dir; run_name named the tracker run"),
    "report_to": _report_to,
    "logging_steps": _simple("metrics", "log_freq", int),
    "dataloader_num_workers": _simple("data", "num_workers", int),
    "dataloader_prefetch_factor": _simple("data", "prefetch_factor", int),
    "freeze_modules": _freeze,
    "eval_strategy": _validation,
    "evaluation_strategy": _validation,
    "eval_steps": _read_by("eval_strategy"),
    "torch_compile": _simple("compile", "enable", bool),
    "torch_compile_backend": _skip_if_set("torch.compile uses inductor here"),
    "torch_compile_mode": _skip_if_set("torch.compile uses the default mode here"),
    "group_by_length": _skip_reason("the packing strategy decides what goes together"),
    "use_liger_kernel": _skip_if_set(
        "no Liger kernels; the losses run in PyTorch ([compile] enable compiles them)"
    ),
    "use_rmpad": _skip_reason("batches are always packed without padding"),
    "enable_profiler": _skip_if_set("no built-in profiler; use torch.profiler around a few steps"),
    "profiler_config": _skip_reason("no built-in profiler"),
}


def convert_trainer_args(
    conv: Conversion, args: Mapping[str, Any], prefix: str, model: Mapping[str, Any]
) -> None:
    effective = {**HF_TRAINER_DEFAULTS, **args}
    ctx = TrainerContext(effective, set(args), prefix, model)
    always = ("max_steps", "bf16", "adam_beta1", "warmup_ratio")  # they also read keys that may be absent
    for key in ["max_steps"] + [
        k for k in TRAINER_HANDLERS if k != "max_steps"
    ]:  # steps first: warm-up needs them
        if key in always or key in effective and effective[key] is not None:
            TRAINER_HANDLERS[key](conv, key, effective.get(key), ctx)
    skipped = {item.key for item in conv.skipped}
    for key, value in args.items():
        if key in ctx.consumed or f"{prefix}{key}" in skipped:
            continue
        handler = TRAINER_HANDLERS.get(key)
        if value is None or value == {}:
            conv.skip(f"{prefix}{key}", value, "unset")
        elif handler is not None:
            other = handler.other if isinstance(handler, _ReadBy) else ""
            conv.skip(
                f"{prefix}{key}",
                value,
                f"no effect with these settings (read together with {other})"
                if other
                else "no effect with these settings",
            )
        elif key in IGNORED_TRAINER_ARGS:
            conv.skip(f"{prefix}{key}", value, NO_EFFECT_HF)
        else:
            conv.skip(
                f"{prefix}{key}",
                value,
                "not an LMMS/HF training argument this converter knows; not converted",
            )


def convert_top(conv: Conversion, top: Mapping[str, Any]) -> None:
    for key, value in top.items():
        if key == "trainer_type":
            conv.skip(key, value, "bagel-titan has one trainer (FSDP2, torchtitan style): nothing to choose")
        else:
            conv.skip(key, value, "unset" if value in (None, {}) else "no equivalent")
