"""What the converter knows of LMMS and HF Trainer names: shared reasons, defaults and maps."""

from __future__ import annotations

import os
from typing import Any

NO_EFFECT_HF = "a Hugging Face Trainer option that has no counterpart or effect in bagel-titan"
NO_VIDEO = "the BAGEL processor takes images only (no video)"
HF_DEFAULT = "HF Trainer default; bagel-titan's own default differs"

HF_TRAINER_DEFAULTS: dict[str, Any] = {
    # The TrainingArguments defaults an LMMS run gets when its YAML omits them, where
    # bagel-titan's default would train differently.
    "learning_rate": 5e-5,
    "adam_beta1": 0.9,
    "adam_beta2": 0.999,
    "adam_epsilon": 1e-8,
    "lr_scheduler_type": "linear",
    "seed": 42,
    "per_device_train_batch_size": 8,
    "save_steps": 500,
}

IGNORED_TRAINER_ARGS = frozenset(
    """
    overwrite_output_dir do_train do_eval do_predict prediction_loss_only per_device_eval_batch_size
    eval_accumulation_steps eval_delay torch_empty_cache_steps log_level log_level_replica
    log_on_each_node logging_dir logging_strategy logging_first_step logging_nan_inf_filter
    save_on_each_node save_safetensors restore_callback_states_from_checkpoint no_cuda use_cpu
    use_mps_device jit_mode_eval half_precision_backend bf16_full_eval fp16_full_eval fp16_opt_level
    local_rank ddp_backend tpu_num_cores tpu_metrics_debug debug past_index disable_tqdm
    remove_unused_columns label_names load_best_model_at_end metric_for_best_model greater_is_better
    ignore_data_skip fsdp_min_num_params accelerator_config parallelism_config deepspeed
    label_smoothing_factor optim_args adafactor length_column_name project trackio_space_id
    ddp_find_unused_parameters ddp_bucket_cap_mb ddp_broadcast_buffers dataloader_pin_memory
    dataloader_persistent_workers dataloader_drop_last skip_memory_metrics use_legacy_prediction_loop
    push_to_hub hub_model_id hub_strategy hub_token hub_private_repo hub_always_push hub_revision
    include_inputs_for_metrics include_for_metrics eval_do_concat_batches fp16_backend
    push_to_hub_model_id push_to_hub_organization mp_parameters auto_find_batch_size torchdynamo
    ray_scope ddp_timeout include_tokens_per_second include_num_input_tokens_seen neftune_noise_alpha
    optim_target_modules batch_eval_metrics eval_on_start liger_kernel_config eval_use_gather_object
    average_tokens_across_devices print_batch_input_steps save_total_limit_per_node
""".split()
)

MODEL_CLASSES = ("Qwen2MoTDecoderLayer", "SiglipEncoderLayer")
"""Module classes of bagel-titan's BAGEL that `transformer_layer_cls_to_wrap` may name."""

ATTENTION_BACKENDS = {
    "eager": ("eager", ""),
    "sdpa": ("sdpa", ""),
    "flash_attention_2": (
        "sdpa",
        "flash_attention_2 cannot express BAGEL's packed mask with noise segments; "
        "bagel-titan's sdpa backend runs SDPA calls per document on long packs, "
        "unmasked (the flash kernel) for causal text, ViT images and t2i samples "
        "(flex is the block-sparse alternative on GPU)",
    ),
    "flash_attention_3": ("sdpa", "no flash_attention_3 backend; sdpa (per-document flash kernels) is used"),
    "flex_attention": ("flex", ""),
}

NSA_KEYS = (
    "block_size",
    "compress_type",
    "kernel_size",
    "kernel_stride",
    "topk",
    "init_blocks",
    "local_blocks",
    "window_size",
)

FREEZE_GROUPS = {
    "visual": "vit",
    "vit_model": "vit",
    "vit": "vit",
    "connector": "connector",
    "language_model": "llm",
    "llm": "llm",
}

OPTIMIZERS = {"adamw_torch_fused": "fused", "adamw_torch": "auto", "adamw_hf": "auto", "adamw": "auto"}

LR_SCHEDULES = {
    "linear": "linear",
    "cosine": "cosine",
    "constant": "constant",
    "constant_with_warmup": "constant",
    "cosine_with_min_lr": "cosine",
}


def is_local(path: str) -> bool:
    return bool(path) and os.path.exists(path)


def looks_like_hub_id(path: str) -> bool:
    return (
        not is_local(path)
        and path.count("/") == 1
        and not path.startswith((".", "/", "~"))
        and not path.endswith((".json", ".jsonl", ".parquet", ".arrow", ".yaml", ".yml"))
    )


def hub_note(path: str, what: str) -> str:
    return (
        f"{path!r} looks like a Hugging Face Hub id and bagel-titan reads local files only: download it "
        f"(`huggingface-cli download {'--repo-type dataset ' if what == 'dataset' else ''}{path} "
        f"--local-dir DIR`) and set this path to DIR"
    )


def as_list(value: Any) -> list[Any]:
    return list(value) if isinstance(value, (list, tuple)) else [value]
