"""The "bagel" ModelSpec: everything BAGEL-specific the model-agnostic trainer calls."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable, Mapping

import torch
from torch import nn

from bagel_titan.config.fields import ConfigError
from bagel_titan.errors import UserError
from bagel_titan.lora import LoRAExport, LoRAGroups
from bagel_titan.protocols import (
    GeneratedSamples,
    LossComponent,
    LossTerm,
    ModelOutputs,
    ModelSpec,
)

from . import weights
from .batch import BagelPackedBatch
from .config import FLAVORS, BagelArchitecture, BagelConfig, architecture_for
from .flops import training_flops
from .modeling import AttentionFactory, Bagel, BagelForwardResult
from .modeling_qwen2_mot import Qwen2MoTDecoderLayer

if TYPE_CHECKING:
    from bagel_titan.config.job_config import JobConfig
    from bagel_titan.metrics.memory_estimate import ActivationEstimate
    from bagel_titan.plugins import PluginManager

    from .collator import BagelCollator
    from .processor import BagelProcessor
    from .sampling import BagelSampler
    from .sampling_config import SamplingConfig

FREEZE_GROUPS = ("llm", "vit", "connector", "und", "gen")
"""`[model] freeze` names: the whole LLM, the ViT, the connector, the understanding experts
(+ embeddings, lm_head, final norm), the generation experts (+ latent projections, timestep MLP)."""

UND_ATTN = ("q_proj", "k_proj", "v_proj", "o_proj", "q_norm", "k_norm")

EXPERT_PROJECTIONS = {
    "und": {
        "q_proj": "self_attn.q_proj",
        "k_proj": "self_attn.k_proj",
        "v_proj": "self_attn.v_proj",
        "o_proj": "self_attn.o_proj",
        "gate_proj": "mlp.gate_proj",
        "up_proj": "mlp.up_proj",
        "down_proj": "mlp.down_proj",
    },
    "gen": {
        "q_proj": "self_attn.q_proj_moe_gen",
        "k_proj": "self_attn.k_proj_moe_gen",
        "v_proj": "self_attn.v_proj_moe_gen",
        "o_proj": "self_attn.o_proj_moe_gen",
        "gate_proj": "mlp_moe_gen.gate_proj",
        "up_proj": "mlp_moe_gen.up_proj",
        "down_proj": "mlp_moe_gen.down_proj",
    },
}
"""`[lora] targets` of the LLM: expert group -> projection -> module path inside a decoder layer."""
VIT_PROJECTIONS = {
    "q_proj": "self_attn.q_proj",
    "k_proj": "self_attn.k_proj",
    "v_proj": "self_attn.v_proj",
    "out_proj": "self_attn.out_proj",
    "fc1": "mlp.fc1",
    "fc2": "mlp.fc2",
}
GEN_MODULES = ("vae2llm", "llm2vae", "time_embedder")
"""Generation-only modules `[lora] train_also` names one by one, beside the freeze groups."""


def attention_factories(
    job_config: JobConfig, plugins: PluginManager
) -> tuple[AttentionFactory, AttentionFactory]:
    """(LLM, ViT) attention-module factories from `[attention]`; the ViT uses `[bagel] vit_backend`, else
    the LLM backend's `encoder_fallback` (nsa), else the LLM backend."""
    llm_name = job_config.attention.backend
    llm_backend = plugins.attention_backends.get(llm_name)
    vit_name = BagelSpec.bagel_config(job_config).vit_backend or llm_backend.encoder_fallback or llm_name
    vit_backend = plugins.attention_backends.get(vit_name)
    llm_config = job_config.section_or_none(f"attention.{llm_name}")
    vit_config = job_config.section_or_none(f"attention.{vit_name}")
    return (lambda spec: llm_backend.build(spec, llm_config)), (
        lambda spec: vit_backend.build(spec, vit_config)
    )


def build_bagel(
    arch: BagelArchitecture,
    options: BagelConfig | None = None,
    *,
    backend: Any = None,
    vit_backend: Any = None,
) -> Bagel:
    """A Bagel with explicit backends (objects with `build(spec, options)`); eager by default.

    For tests and tools that do not go through a JobConfig; materialises nothing itself (call it
    under `torch.device("meta")` for a shape-only model)."""
    if backend is None:
        from bagel_titan_plugins.attention.eager import EagerBackend

        backend = EagerBackend()
    vit_backend = vit_backend or backend
    return Bagel(
        arch, options or BagelConfig(), lambda s: backend.build(s, None), lambda s: vit_backend.build(s, None)
    )


class BagelSpec(ModelSpec[Bagel, BagelPackedBatch]):
    """ModelSpec "bagel" (see `bagel_titan.protocols.ModelSpec`)."""

    name = "bagel"
    flavors: Mapping[str, BagelArchitecture] = FLAVORS

    def __init__(self) -> None:
        self._built: Bagel | None = None

    # -- build / weights -------------------------------------------------------------------------

    @staticmethod
    def bagel_config(job_config: JobConfig) -> BagelConfig:
        """`[bagel]`, or its defaults when the config has none."""
        return job_config.section("bagel") if job_config.has_section("bagel") else BagelConfig()

    def attention_backends(self, job_config: JobConfig) -> dict[str, str]:
        """The ViT's own backend, for the config-time check that it trains where the run does."""
        return {"[bagel] vit_backend": self.bagel_config(job_config).vit_backend}

    def architecture(self, job_config: JobConfig) -> BagelArchitecture:
        """The shapes to build: the `[model] flavor`'s, with the LLM and ViT of `[bagel] llm_path`
        / `vit_path` when set (a subclass may derive its own)."""
        options = self.bagel_config(job_config)
        if options.llm_path or options.vit_path:
            from .hf_init import architecture

            return architecture(architecture_for(job_config.model.flavor), options)
        return architecture_for(job_config.model.flavor)

    def build(self, job_config: JobConfig, plugins: PluginManager) -> Bagel:
        options = self.bagel_config(job_config)
        if (options.llm_path or options.vit_path) and job_config.model.pretrained_path:
            raise UserError(
                f"[bagel] llm_path / vit_path start a new BAGEL from Qwen2.5 + SigLIP, [model] "
                f"pretrained_path loads a BAGEL ({job_config.model.pretrained_path!r}); set one of them"
            )
        arch = self.architecture(job_config)
        llm_attention, vit_attention = attention_factories(job_config, plugins)
        model = Bagel(arch, self.bagel_config(job_config), llm_attention, vit_attention)
        model.tokenizer_path = self.tokenizer_path(job_config)
        self._built = model
        return model

    def init_weights(self, model: Bagel) -> None:
        """A fresh model; the frozen VAE from `[bagel] vae_path` when set (it must not stay random:
        a random VAE's latents carry no picture)."""
        model.init_weights()
        if model.options.vae_path:
            weights.load_vae_file(model, model.options.vae_path)
        if model.options.llm_path or model.options.vit_path:
            from .hf_init import load_hf_start

            load_hf_start(model)

    def load_weights(self, model: Bagel, path: str) -> None:
        weights.load_weights(model, path)

    def export(
        self,
        model: Bagel,
        path: str,
        dtype: torch.dtype,
        state_dict: Mapping[str, torch.Tensor] | None = None,
        *,
        ema: bool = False,
        lora: LoRAExport | None = None,
    ) -> None:
        write = not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0
        weights.export(model, path, dtype, state_dict, ema=ema, write=write, lora=lora)

    def activation_memory(
        self,
        model: Bagel,
        job_config: JobConfig,
        tokens: int,
        compute_bytes: int,
        activation_checkpointing: bool,
    ) -> ActivationEstimate:
        """Activation bytes of one pack of `tokens` (for `bagel-titan-estimate`)."""
        from .memory import activation_memory

        attention = job_config.attention
        vit_backend = self.bagel_config(job_config).vit_backend or (
            "sdpa" if attention.backend == "nsa" else attention.backend
        )
        return activation_memory(
            model.arch,
            model.options,
            tokens,
            compute_bytes,
            activation_checkpointing,
            llm_backend=attention.backend,
            vit_backend=vit_backend,
        )

    def tokenizer_path(self, job_config: JobConfig) -> str:
        return (
            job_config.model.tokenizer_path
            or job_config.model.pretrained_path
            or self.bagel_config(job_config).llm_path
        )

    # -- parallelism / freezing ------------------------------------------------------------------

    def sharding_units(self, model: Bagel) -> list[nn.Module]:
        units: list[nn.Module] = []
        if model.options.visual_und:
            units += list(model.vit_model.vision_model.encoder.layers)
        return units + list(model.language_model.model.layers)

    def separate_shards(self, model: Bagel) -> list[nn.Module]:
        """The token embedding and the output head (a billion parameters at 7B): sharded on
        their own so they are not held gathered with the root through the whole step."""
        return [model.language_model.model.embed_tokens, model.language_model.lm_head]

    def frozen_modules(self, model: Bagel, job_config: JobConfig) -> list[nn.Module]:
        groups = list(job_config.model.freeze)
        unknown = sorted(set(groups) - set(FREEZE_GROUPS))
        if unknown:
            raise ConfigError(f"unknown group(s) {unknown} in [model] freeze; known: {list(FREEZE_GROUPS)}")
        return [m for g in groups for m in self.group_modules(model, g)]

    @staticmethod
    def group_modules(model: Bagel, group: str) -> list[nn.Module]:
        """The modules of one freeze group (empty for a modality that is off)."""
        lm = model.language_model.model
        if group == "llm":
            return [model.language_model]
        if group == "vit":
            return [model.vit_model] if model.options.visual_und else []
        if group == "connector":
            return [model.connector] if model.options.visual_und else []
        if group == "und":
            mods: list[nn.Module] = [lm.embed_tokens, lm.norm, model.language_model.lm_head]
            for layer in lm.layers:
                assert isinstance(layer, Qwen2MoTDecoderLayer)
                mods += [getattr(layer.self_attn, n) for n in UND_ATTN]
                mods += [layer.mlp, layer.input_layernorm, layer.post_attention_layernorm]
            return mods
        if group == "gen":
            mods = [lm.norm_moe_gen]
            for layer in lm.layers:
                assert isinstance(layer, Qwen2MoTDecoderLayer)
                mods += [getattr(layer.self_attn, f"{n}_moe_gen") for n in UND_ATTN]
                mods += [
                    layer.mlp_moe_gen,
                    layer.input_layernorm_moe_gen,
                    layer.post_attention_layernorm_moe_gen,
                ]
            if model.options.visual_gen:
                mods += [model.time_embedder, model.vae2llm, model.llm2vae]
            return mods
        raise ValueError(f"unknown freeze group {group!r}; known: {list(FREEZE_GROUPS)}")

    def lora_groups(self, model: Bagel) -> LoRAGroups:
        """`[lora] targets`: "und" / "gen" (the two LLM experts' q/k/v/o and gate/up/down), "vit"
        (its attention and MLP linears), "connector" (fc1, fc2), "vae2llm", "llm2vae"; groups of a
        modality that is off hold no module; empty targets adapt "und" and "gen". `train_also`:
        the freeze groups and `GEN_MODULES`."""
        layers = [f"language_model.model.layers.{i}" for i in range(len(model.language_model.model.layers))]
        targets: dict[str, dict[str, list[str]]] = {
            group: {p: [f"{layer}.{path}" for layer in layers] for p, path in projections.items()}
            for group, projections in EXPERT_PROJECTIONS.items()
        }
        vit_layers = []
        if model.options.visual_und:
            vit_layers = [
                f"vit_model.vision_model.encoder.layers.{i}"
                for i in range(len(model.vit_model.vision_model.encoder.layers))
            ]
        targets["vit"] = {
            p: [f"{layer}.{path}" for layer in vit_layers] for p, path in VIT_PROJECTIONS.items()
        }
        targets["connector"] = {
            p: [f"connector.{p}"] if model.options.visual_und else [] for p in ("fc1", "fc2")
        }
        for name in ("vae2llm", "llm2vae"):
            targets[name] = {name: [name] if model.options.visual_gen else []}
        names = {id(module): name for name, module in model.named_modules()}
        full = {group: [names[id(m)] for m in self.group_modules(model, group)] for group in FREEZE_GROUPS}
        for name in GEN_MODULES:
            full[name] = [name] if model.options.visual_gen else []
        return LoRAGroups(targets=targets, full=full, default_targets=["und", "gen"])

    # -- data / compute --------------------------------------------------------------------------

    def loss_counts(self, batch: BagelPackedBatch) -> Mapping[str, float]:
        return bagel_loss_counts(batch)

    def flops(self, batch: BagelPackedBatch) -> float:
        if self._built is None:
            raise RuntimeError("BagelSpec.flops needs the architecture: call build() first")
        return float(training_flops(batch, self._built.arch, self._built.options))

    def _data_kwargs(self, job_config: JobConfig) -> dict[str, Any]:
        arch = self.architecture(job_config)
        return {"vit_patch_size": arch.vit.patch_size, "vae_downsample": arch.vae.downsample}

    def build_processor(self, job_config: JobConfig) -> BagelProcessor:
        from .processor import BagelProcessor

        tokenizer_path = self.tokenizer_path(job_config)
        return BagelProcessor(
            job_config, self.bagel_config(job_config), tokenizer_path, **self._data_kwargs(job_config)
        )

    def build_collator(self, job_config: JobConfig) -> BagelCollator:
        from .collator import BagelCollator

        options = self.bagel_config(job_config)
        cache = None
        if options.latent_cache and self._built is not None:  # the model's VAE names the entries
            from .latent_cache import for_model

            cache = for_model(options.latent_cache, self._built, job_config.training.device)
        return BagelCollator(
            job_config,
            options,
            tokenizer_path=self.tokenizer_path(job_config),
            latent_cache=cache,
            **self._data_kwargs(job_config),
        )

    def generate_samples(self, model: Bagel, job_config: JobConfig, step: int) -> GeneratedSamples:
        """Images for `[bagel.sampling] prompts` and answers to its `questions` from the model being
        trained (see `sampling.py`). Runs on every rank, the same forwards everywhere; the noise is
        the same at every `step`, so successive validations are comparable."""
        from .sampling import generate_samples
        from .sampling_config import SamplingConfig

        config = (
            job_config.section("bagel.sampling")
            if job_config.has_section("bagel.sampling")
            else SamplingConfig()
        )
        if not config.prompts and not config.questions:
            return GeneratedSamples()
        return generate_samples(self.sampler(model, job_config, config))

    def sampler(self, model: Bagel, job_config: JobConfig, config: SamplingConfig) -> BagelSampler:
        """Image sampling and greedy answering with `model`, through the processor and collator
        `job_config` trains with."""
        from .collator import BagelCollator
        from .sampling import BagelSampler

        processor = self.build_processor(job_config)
        collator = BagelCollator(
            job_config,
            self.bagel_config(job_config),
            special_tokens=processor.special,
            **self._data_kwargs(job_config),
        )
        return BagelSampler(model, processor, collator, config)

    def forward(
        self, model: Bagel, batch: BagelPackedBatch, generator: torch.Generator | None
    ) -> ModelOutputs:
        result = model(batch, generator)
        return bagel_outputs(result, batch)


def bagel_outputs(result: BagelForwardResult, batch: BagelPackedBatch) -> ModelOutputs:
    """The loss components' view of one forward: CE logits and labels, and by name the label
    weights (`ce` with reweight) and, with visual generation, the velocities (`flow_mse`)."""
    extras = {"label_weights": batch.ce_loss_weights}
    if result.pred_velocity is not None:
        extras["pred_velocity"] = result.pred_velocity
    if result.target_velocity is not None:
        extras["target_velocity"] = result.target_velocity
    return ModelOutputs(logits=result.ce_logits, labels=batch.packed_label_ids, extras=extras)


class _LossCounts(Mapping[str, float]):
    """The batch's loss counts, each computed when a loss component asks for it (the weight sum
    reads a device value back to the host; a run without `[loss.ce] reweight` never pays that)."""

    def __init__(self, batch: BagelPackedBatch):
        self._compute: dict[str, Callable[[], float]] = {
            "labels": lambda: int(batch.packed_label_ids.shape[0]),
            "label_weight_sum": lambda: float(batch.ce_loss_weights.sum()),
            "noised_tokens": lambda: int(batch.mse_loss_indexes.shape[0]),
        }

    def __getitem__(self, name: str) -> float:
        return self._compute[name]()

    def __contains__(self, name: object) -> bool:
        return name in self._compute

    def __iter__(self):
        return iter(self._compute)

    def __len__(self) -> int:
        return len(self._compute)


def bagel_loss_counts(batch: BagelPackedBatch) -> Mapping[str, float]:
    """ "labels" and "label_weight_sum" (for `ce`), "noised_tokens" (for `flow_mse`)."""
    return _LossCounts(batch)


def bagel_loss_term(component: LossComponent, outputs: ModelOutputs, batch: BagelPackedBatch) -> LossTerm:
    """One component's term of one batch, outside the trainer (parity checks, tests)."""
    return component(outputs, bagel_loss_counts(batch)[component.count_name])
