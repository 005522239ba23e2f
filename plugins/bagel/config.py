"""BAGEL configuration: the `[bagel]` options section and the named architectures (flavors).

Two kinds of settings live here and are kept apart on purpose:

- `BagelArchitecture` (LLM, ViT and VAE shapes) is chosen by `[model] flavor` ("debug", "7b-mot")
  or read from a release folder's `config.json`; it decides parameter shapes and key names.
- `BagelConfig` (the `[bagel]` TOML table) holds the options that do not change which weights exist:
  which modalities are on, the flow-matching shift, the position-table sizes, the VAE dtype.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Literal, Mapping


@dataclass(frozen=True)
class LLMArgs:
    """Qwen2 decoder with Mixture-of-Transformers experts (every layer has a `_moe_gen` twin)."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 1_000_000.0
    qk_norm: bool = True
    tie_word_embeddings: bool = False
    max_position_embeddings: int = 32768

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads


@dataclass(frozen=True)
class ViTArgs:
    """SigLIP NaViT encoder; `num_layers` is the number of layers actually built."""

    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    image_size: int
    patch_size: int
    num_channels: int = 3
    layer_norm_eps: float = 1e-6

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def patches_per_side(self) -> int:
        return self.image_size // self.patch_size


@dataclass(frozen=True)
class VAEArgs:
    """FLUX autoencoder parameters (`AutoEncoderParams` of the release)."""

    ch: int = 128
    ch_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    z_channels: int = 16
    in_channels: int = 3
    out_ch: int = 3
    resolution: int = 256
    scale_factor: float = 0.3611
    shift_factor: float = 0.1159

    @property
    def downsample(self) -> int:
        """Spatial reduction of the encoder (one 2x step per level but the last)."""
        return 2 ** (len(self.ch_mult) - 1)


@dataclass(frozen=True)
class BagelArchitecture:
    """The three networks' shapes: what a flavor names."""

    llm: LLMArgs
    vit: ViTArgs
    vae: VAEArgs


FLAVORS: dict[str, BagelArchitecture] = {
    # Tiny: a few seconds per step on a CPU. The ViT keeps the release's 14 px patches and
    # 70 patches per side so that the `[bagel]` defaults fit both flavors.
    "debug": BagelArchitecture(
        llm=LLMArgs(
            vocab_size=512,
            hidden_size=64,
            intermediate_size=128,
            num_layers=2,
            num_heads=4,
            num_kv_heads=2,
            rope_theta=10000.0,
            max_position_embeddings=4096,
        ),
        vit=ViTArgs(
            hidden_size=32, intermediate_size=64, num_layers=2, num_heads=2, image_size=980, patch_size=14
        ),
        vae=VAEArgs(ch=32, ch_mult=(1, 2), num_res_blocks=1, z_channels=16, resolution=32),
    ),
    # BAGEL-7B-MoT as released (Qwen2.5-7B doubled by MoT, SigLIP-so400m with 26 layers built).
    "7b-mot": BagelArchitecture(
        llm=LLMArgs(
            vocab_size=152064,
            hidden_size=3584,
            intermediate_size=18944,
            num_layers=28,
            num_heads=28,
            num_kv_heads=4,
            rope_theta=1_000_000.0,
        ),
        vit=ViTArgs(
            hidden_size=1152,
            intermediate_size=4304,
            num_layers=26,
            num_heads=16,
            image_size=980,
            patch_size=14,
        ),
        vae=VAEArgs(),
    ),
}


@dataclass
class BagelConfig:
    """`[bagel]`: BAGEL options that do not change which weights exist."""

    visual_und: bool = True
    """Feed understanding images through the ViT + connector (off: ViT tokens are an error)."""
    visual_gen: bool = True
    """Train image generation: VAE latents, timestep embedder, flow-matching velocity."""
    timestep_shift: float = 1.0
    """Flow-matching shift s: t = s*sigma / (1 + (s-1)*sigma), sigma = sigmoid(N(0,1))."""
    latent_patch_size: int = 2
    """Latent pixels per side folded into one generation token."""
    max_latent_size: int = 64
    """Latent patches per side the latent sin-cos table covers (images up to
    max_latent_size * latent_patch_size * vae downsample pixels per side)."""
    vit_max_num_patch_per_side: int = 70
    """ViT patches per side: the row stride of ViT position ids; must equal the ViT's
    image_size // patch_size (70 for SigLIP-so400m at 980/14)."""
    connector_act: Literal["gelu_pytorch_tanh"] = "gelu_pytorch_tanh"
    """Activation of the ViT-to-LLM MLP connector."""
    interpolate_pos: bool = False
    """ViT position ids interpolated to the full grid instead of extrapolated (processor side)."""
    vit_backend: str = ""
    """Attention backend of the ViT's per-image attention (options in [attention.<name>]); empty:
    the same as [attention] backend, or that backend's ViT fallback (nsa: sdpa)."""
    vae_dtype: Literal["auto", "float32", "bfloat16"] = "auto"
    """Dtype of the frozen VAE: "auto" is bfloat16 on GPU and float32 on CPU."""
    vae_path: str = ""
    """An `ae.safetensors` (FLUX key layout) loaded into the frozen VAE, e.g. the debug VAE that
    `bagel-titan-example-data data/example --vae` fits and writes to `data/example/ae.safetensors`.
    It wins over both the random init of a fresh model and the `ae.safetensors` of `[model]
    pretrained_path`. Empty: the pretrained folder's VAE, or a random one without a folder.
    A relative path is relative to the working directory."""
    latent_cache: str = ""
    """A folder of cached VAE latents (`bagel-titan-encode-latents` with this run's config fills it,
    e.g. `data/example/latents`): the loader serves each VAE image's stored posterior moments and
    the model skips the VAE encoder; the posterior is still sampled every step, so training is
    bitwise the same as without it. Empty: encode every step."""
    latent_cache_miss: Literal["error", "encode"] = "error"
    """An image without a valid cache entry (new data, another resolution, processor or VAE):
    "error" stops the run naming the image and `bagel-titan-encode-latents`; "encode" encodes it
    in the step (the same bits) and logs how many it encoded."""
    init_std: float = 0.02
    """Std of the normal init of linear and embedding weights in a fresh model."""
    llm_path: str = ""
    """Start a fresh model from this Hugging Face Qwen2 / Qwen2.5 folder (the release's
    `llm_path`: config.json + safetensors): its LLM shapes, weights and tokenizer. Instead of
    `[model] pretrained_path`, not with it."""
    vit_path: str = ""
    """Start the ViT from this Hugging Face SigLIP folder (the release's `vit_path`)."""
    copy_init_moe: bool = True
    """With llm_path: copy every understanding weight into its `_moe_gen` twin (the release's
    `copy_init_moe`); off: the generation experts start fresh."""
    vit_select_layer: int = -2
    """With vit_path: the SigLIP layer whose output BAGEL uses (-2: the penultimate; the layers
    after it are not built), as the release's `vit_select_layer`."""
    freeze_und: bool = False
    """The release's `freeze_und`: detach the understanding tokens' activations in every layer,
    so only the generation path (and the lm_head, through the CE) learns; the ViT and the connector
    get no gradient either. Unlike `[model] freeze = ["und"]`, which stops updating the
    understanding weights but still backpropagates through them into the ViT, the connector and
    the embeddings, this cuts the graph (less backward compute)."""

    def validate(self, arch: BagelArchitecture) -> None:
        """Raise a clear error when an option contradicts the architecture."""
        if self.visual_und and self.vit_max_num_patch_per_side != arch.vit.patches_per_side:
            raise ValueError(
                f"[bagel] vit_max_num_patch_per_side = {self.vit_max_num_patch_per_side} does not match "
                f"the ViT's position table ({arch.vit.image_size} px / {arch.vit.patch_size} px patches = "
                f"{arch.vit.patches_per_side} per side); set vit_max_num_patch_per_side = "
                f"{arch.vit.patches_per_side}"
            )
        if self.latent_patch_size < 1 or self.max_latent_size < 1:
            raise ValueError("[bagel] latent_patch_size and max_latent_size must be >= 1")
        if self.timestep_shift <= 0:
            raise ValueError(f"[bagel] timestep_shift must be > 0, got {self.timestep_shift}")


def architecture_for(flavor: str) -> BagelArchitecture:
    """The architecture of a named flavor; an unknown name lists the known ones."""
    if flavor not in FLAVORS:
        raise KeyError(f"unknown bagel flavor {flavor!r} in [model] flavor; known: {sorted(FLAVORS)}")
    return FLAVORS[flavor]


# -- release config files ---------------------------------------------------------------------


def architecture_from_release(
    config: Mapping[str, Any], *, vit_config_counts_extra_layer: bool
) -> BagelArchitecture:
    """Read a release-style `config.json` (with `llm_config`, `vit_config`, `vae_config`).

    The official `vit_config.json` states one ViT layer more than the weights hold (the release
    builds `num_hidden_layers - 1`): pass `vit_config_counts_extra_layer=True` for such files; the
    reference fixture states the built count.
    """
    llm, vit = config["llm_config"], config["vit_config"]
    vae = config.get("vae_config") or {}
    unsupported = {
        "llm_config.rope_scaling": (llm.get("rope_scaling"), None),
        "llm_config.hidden_act": (llm.get("hidden_act", "silu"), "silu"),
        "vit_config.hidden_act": (vit.get("hidden_act", "gelu_pytorch_tanh"), "gelu_pytorch_tanh"),
        "vit_config.rope": (vit.get("rope", False), False),
    }
    for key, (value, supported) in unsupported.items():
        if value != supported:
            raise ValueError(
                f"{key} = {value!r} is not supported (only {supported!r}, as in the BAGEL release)"
            )
    vit_layers = int(vit["num_hidden_layers"]) - (1 if vit_config_counts_extra_layer else 0)
    vae_args: dict[str, Any] = {
        f.name: (tuple(vae[f.name]) if f.name == "ch_mult" else vae[f.name])
        for f in dataclasses.fields(VAEArgs)
        if f.name in vae
    }
    return BagelArchitecture(
        llm=LLMArgs(
            vocab_size=llm["vocab_size"],
            hidden_size=llm["hidden_size"],
            intermediate_size=llm["intermediate_size"],
            num_layers=llm["num_hidden_layers"],
            num_heads=llm["num_attention_heads"],
            num_kv_heads=llm["num_key_value_heads"],
            rms_norm_eps=llm.get("rms_norm_eps", 1e-6),
            rope_theta=llm.get("rope_theta", 1e6),
            qk_norm=llm.get("qk_norm", True),
            tie_word_embeddings=llm.get("tie_word_embeddings", False),
            max_position_embeddings=llm.get("max_position_embeddings", 32768),
        ),
        vit=ViTArgs(
            hidden_size=vit["hidden_size"],
            intermediate_size=vit["intermediate_size"],
            num_layers=vit_layers,
            num_heads=vit["num_attention_heads"],
            image_size=vit["image_size"],
            patch_size=vit["patch_size"],
            num_channels=vit.get("num_channels", 3),
            layer_norm_eps=vit.get("layer_norm_eps", 1e-6),
        ),
        vae=VAEArgs(**vae_args),
    )


def bagel_config_from_release(config: Mapping[str, Any]) -> BagelConfig:
    """The `[bagel]` options a release `config.json` records (others keep their defaults)."""
    names = {f.name for f in dataclasses.fields(BagelConfig)}
    return BagelConfig(**{k: v for k, v in config.items() if k in names})


def llm_config_dict(arch: BagelArchitecture, torch_dtype: str) -> dict[str, Any]:
    """`llm_config.json` as the release ships it (a Qwen2Config plus BAGEL's MoT keys)."""
    llm = arch.llm
    return {
        "architectures": ["Qwen2ForCausalLM"],
        "model_type": "qwen2",
        "hidden_act": "silu",
        "attention_dropout": 0.0,
        "bos_token_id": 151643,
        "eos_token_id": 151645,
        "vocab_size": llm.vocab_size,
        "hidden_size": llm.hidden_size,
        "intermediate_size": llm.intermediate_size,
        "num_hidden_layers": llm.num_layers,
        "num_attention_heads": llm.num_heads,
        "num_key_value_heads": llm.num_kv_heads,
        "rms_norm_eps": llm.rms_norm_eps,
        "rope_theta": llm.rope_theta,
        "rope_scaling": None,
        "max_position_embeddings": llm.max_position_embeddings,
        "tie_word_embeddings": llm.tie_word_embeddings,
        "qk_norm": llm.qk_norm,
        "layer_module": "Qwen2MoTDecoderLayer",
        "freeze_und": False,
        "is_causal": True,
        "use_cache": True,
        "use_sliding_window": False,
        "torch_dtype": torch_dtype,
    }


def vit_config_dict(arch: BagelArchitecture, torch_dtype: str) -> dict[str, Any]:
    """`vit_config.json` as the release ships it: one layer MORE than built (the release's
    loader builds `num_hidden_layers - 1`)."""
    vit = arch.vit
    return {
        "architectures": ["SiglipVisionModel"],
        "model_type": "siglip_vision_model",
        "hidden_act": "gelu_pytorch_tanh",
        "attention_dropout": 0.0,
        "hidden_size": vit.hidden_size,
        "intermediate_size": vit.intermediate_size,
        "num_hidden_layers": vit.num_layers + 1,
        "num_attention_heads": vit.num_heads,
        "num_channels": vit.num_channels,
        "image_size": vit.image_size,
        "patch_size": vit.patch_size,
        "layer_norm_eps": vit.layer_norm_eps,
        "rope": False,
        "torch_dtype": torch_dtype,
    }


def release_config_dict(arch: BagelArchitecture, options: BagelConfig, torch_dtype: str) -> dict[str, Any]:
    """`config.json`: the BagelConfig fields of the release plus the three sub-configs.

    Its `vit_config` states the same count as `vit_config.json` (built + 1)."""
    vae = dataclasses.asdict(arch.vae)
    vae["ch_mult"] = list(arch.vae.ch_mult)
    vae["downsample"] = arch.vae.downsample
    return {
        "model_type": "bagel",
        "visual_gen": options.visual_gen,
        "visual_und": options.visual_und,
        "latent_patch_size": options.latent_patch_size,
        "max_latent_size": options.max_latent_size,
        "vit_max_num_patch_per_side": options.vit_max_num_patch_per_side,
        "connector_act": options.connector_act,
        "interpolate_pos": options.interpolate_pos,
        "timestep_shift": options.timestep_shift,
        "llm_config": llm_config_dict(arch, torch_dtype),
        "vit_config": vit_config_dict(arch, torch_dtype),
        "vae_config": vae,
    }
