"""Samples from the model being trained: images from fixed prompts, answers to fixed questions.

Text to image is the release's sampler: a flow-matching Euler integration of the predicted
velocity v = noise - x0 from t = 1 (pure noise) to t = 0 on the shifted schedule
t = s*u / (1 + (s-1)*u), with classifier-free text guidance inside `cfg_interval` and the
release's CFG renormalisation; the final latent goes through the frozen VAE decoder. Answers are
greedy: the sequence is re-run with each new token (no KV cache; answers are short).

Both run `Bagel.forward`, the training forward, on packs built from the processor's segments by
the collator, so there is no second copy of the model. The conditional and unconditional passes
of a step share one pack (two samples that never see each other). Every rank runs the same
forwards in the same order (the model may be FSDP-sharded): the schedule is fixed by the config
and each answer token is broadcast from rank 0.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
import torch.distributed as dist
from PIL import Image
from torch import nn

from bagel_titan.protocols import GeneratedSamples
from bagel_titan_plugins.data.bad_samples import BadSampleError
from bagel_titan_plugins.data.images import load_rgb

from .batch import BagelPackedBatch
from .collator import BagelCollator
from .modeling import Bagel, patchify_latents
from .processor import BagelProcessor, BagelSample, Segment, TextSegment, VaeSegment
from .sampling_config import SamplingConfig, SamplingQuestion

Velocity = Callable[[torch.Tensor, float], torch.Tensor]
"""v(x_t [N, P], t) -> [N, P]: the velocity field an Euler sampler integrates."""


# ---------------------------------------------------------------------------------------------
# The sampler's mathematics (model independent)
# ---------------------------------------------------------------------------------------------


def sampling_schedule(num_steps: int, shift: float) -> list[float]:
    """num_steps + 1 times from 1 to 0: u uniform, t = shift*u / (1 + (shift-1)*u) (the release's)."""
    u = torch.linspace(1.0, 0.0, num_steps + 1, dtype=torch.float64)
    return (shift * u / (1 + (shift - 1) * u)).tolist()


def euler_sample(velocity: Velocity, x1_NP: torch.Tensor, schedule: list[float]) -> torch.Tensor:
    """Integrate dx/dt = v(x, t) from schedule[0] (noise x1) down to schedule[-1] (the sample).

    x_t = (1-t)*x0 + t*noise moves along v = noise - x0, so each step is x -= (t - t_next) * v.
    """
    x_NP = x1_NP
    for t, t_next in zip(schedule[:-1], schedule[1:]):
        x_NP = x_NP - (t - t_next) * velocity(x_NP, t)
    return x_NP


def guidance_active(t: float, cfg_scale: float, cfg_interval: list[float]) -> bool:
    """Whether the step at time t runs the unconditional pass (the release: low < t <= high)."""
    return cfg_scale > 1.0 and cfg_interval[0] < t <= cfg_interval[1]


def guided_velocity(
    v_cond_NP: torch.Tensor,
    v_uncond_NP: torch.Tensor,
    cfg_scale: float,
    renorm: str = "none",
    renorm_min: float = 0.0,
) -> torch.Tensor:
    """Classifier-free guidance v_u + scale*(v_c - v_u) for one image, then the release's
    renormalisation: scaled by clamp(|v_c| / |v_guided|, renorm_min, 1), the norms over the whole
    image ("global") or per token ("channel"); "none" skips it."""
    guided_NP = v_uncond_NP + cfg_scale * (v_cond_NP - v_uncond_NP)
    if renorm == "none":
        return guided_NP
    norm_dims = {"global": None, "channel": -1}
    if renorm not in norm_dims:
        raise ValueError(f"unknown cfg_renorm {renorm!r}; known: {['none', *norm_dims]}")
    dim = norm_dims[renorm]
    keep = dim is not None
    ratio = torch.linalg.vector_norm(v_cond_NP, dim=dim, keepdim=keep) / (
        torch.linalg.vector_norm(guided_NP, dim=dim, keepdim=keep) + 1e-8
    )
    return guided_NP * ratio.clamp(min=renorm_min, max=1.0)


def unpatchify_latents(tokens_NP: torch.Tensor, h: int, w: int, p: int, channels: int) -> torch.Tensor:
    """[h*w, p*p*C] latent tokens -> [1, C, h*p, w*p] latent image (inverse of `patchify_latents`)."""
    latent = tokens_NP.reshape(h, w, p, p, channels)
    return torch.einsum("hwpqc->chpwq", latent).reshape(1, channels, h * p, w * p)


def to_uint8_image(pixels_13HW: torch.Tensor) -> np.ndarray:
    """[1, 3, H, W] pixels in [-1, 1] -> uint8 [H, W, 3]."""
    image = ((pixels_13HW[0].float() * 0.5 + 0.5).clamp(0, 1) * 255).round().to(torch.uint8)
    return image.permute(1, 2, 0).cpu().numpy()


# ---------------------------------------------------------------------------------------------
# Running the model
# ---------------------------------------------------------------------------------------------


def model_device(model: nn.Module) -> torch.device:
    """Where the model computes: its parameters' device, or the mesh's for FSDP-sharded
    parameters (which may live on the CPU with offloading)."""
    from torch.distributed.tensor import DTensor

    param = next(model.parameters())
    if isinstance(param, DTensor) and param.device_mesh.device_type == "cuda":
        return torch.device("cuda", torch.cuda.current_device())
    return param.device


def broadcast_token(token: int, device: torch.device) -> int:
    """Rank 0's token on every rank, so that all ranks run the same number of forwards."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return token
    value = torch.tensor([token], dtype=torch.long, device=device)
    dist.broadcast(value, src=0)
    return int(value.item())


def slug(text: str, limit: int = 40) -> str:
    """Lower-case words joined by '-', for file names; whole words, at most `limit` characters."""
    words = re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")
    return words if len(words) <= limit else words[: limit + 1].rsplit("-", 1)[0]


@dataclass
class BagelSampler:
    """Text-to-image sampling and greedy answering with the training model (see module doc)."""

    model: Bagel
    processor: BagelProcessor
    collator: BagelCollator
    config: SamplingConfig

    def __post_init__(self) -> None:
        self.device = model_device(self.model)

    def _velocity(
        self, batch: BagelPackedBatch, x_NP: torch.Tensor, t: float, cleans: list[torch.Tensor] | None = None
    ) -> torch.Tensor:
        """The predicted velocity [N, P] at the noised tokens x_NP (the samples' targets in pack
        order, equal sizes) at time t. The model takes every VAE token's input when given x_t:
        `cleans` holds each sample's clean condition latents (editing), put before its target at
        t = 0."""
        if not cleans:
            t_N = torch.full((x_NP.shape[0],), t, dtype=torch.float32, device=x_NP.device)
            return self.model(batch, noised=(x_NP, t_N)).pred_velocity.float()
        xs, ts = [], []
        for clean_NP, target_NP in zip(cleans, x_NP.chunk(len(cleans))):
            xs += [clean_NP, target_NP]
            ts += [
                torch.zeros(len(clean_NP), device=x_NP.device),
                torch.full((len(target_NP),), t, device=x_NP.device),
            ]
        return self.model(batch, noised=(torch.cat(xs), torch.cat(ts))).pred_velocity.float()

    def _grid(self, size: tuple[int, int]) -> tuple[int, int]:
        """Latent patches (rows, cols) of an image of `size` (H, W), checked against the model."""
        height, width = size
        stride, side = self.processor.vae_stride, self.model.options.max_latent_size
        if height % stride or width % stride or max(height, width) > side * stride:
            raise ValueError(
                f"[bagel.sampling] image_size = {self.config.image_size}: both sides must be multiples of "
                f"{stride} px (VAE downsampling x latent_patch_size) and at most {side * stride} px "
                f"([bagel] max_latent_size = {side} patches)"
            )
        return height // stride, width // stride

    def generate_image(self, prompt: str, seed: int) -> np.ndarray:
        """One image for `prompt` as uint8 [H, W, 3]; the initial noise is drawn from `seed`."""
        height, width = self.config.image_size
        return self._sample(
            [TextSegment(self.processor.encode(prompt), loss=False)], [], (height, width), seed
        )

    def edit_image(self, image: Image.Image, instruction: str, seed: int) -> np.ndarray:
        """`image` (a PIL image) edited by `instruction`, as uint8 [H, W, 3] of the image's VAE size.

        The context is the training's editing sample: the image as a clean VAE condition and as
        ViT input, then the instruction; the guidance's unconditional pass drops the instruction
        (text guidance; the image conditions stay, as the release's cfg_text pass)."""
        if not self.model.options.visual_und:
            raise ValueError("editing needs the ViT: the model has [bagel] visual_und = false")
        source = self.processor.vae_segment(image, noised=False)
        images: list[Segment] = [source, self.processor.vit_segment(image)]
        text: list[Segment] = [TextSegment(self.processor.encode(instruction), loss=False)]
        size = (int(source.image.shape[1]), int(source.image.shape[2]))
        return self._sample(images + text, images, size, seed)

    def _sample(
        self, conditional: list[Segment], unconditional: list[Segment], size: tuple[int, int], seed: int
    ) -> np.ndarray:
        """Euler-sample an image of `size` (H, W) after the `conditional` segments, guided
        against the `unconditional` ones (see the module doc)."""
        if not self.model.options.visual_gen:
            raise ValueError(
                "[bagel.sampling] prompts need an image generator: set [bagel] visual_gen = true "
                "or remove the prompts"
            )
        cfg = self.config
        h, w = self._grid(size)
        # The collator only reads the target's shape: its pixels are never encoded (x_t is given).
        target = VaeSegment(torch.zeros(3, *size), self.processor.vae_stride, noised=True)
        cond_sample, uncond_sample = (
            BagelSample([*conditional, target]),
            BagelSample([*unconditional, target]),
        )
        cond_batch = self.collator([cond_sample]).to(self.device)
        pair_batch = self.collator([cond_sample, uncond_sample]).to(self.device)
        cond_clean_NP, uncond_clean_NP = self._clean_latents(conditional), self._clean_latents(unconditional)

        def velocity(x_NP: torch.Tensor, t: float) -> torch.Tensor:
            if not guidance_active(t, cfg.cfg_scale, cfg.cfg_interval):
                return self._velocity(cond_batch, x_NP, t, [cond_clean_NP])
            v_cond_NP, v_uncond_NP = self._velocity(
                pair_batch, torch.cat([x_NP, x_NP]), t, [cond_clean_NP, uncond_clean_NP]
            ).chunk(2)
            return guided_velocity(v_cond_NP, v_uncond_NP, cfg.cfg_scale, cfg.cfg_renorm, cfg.cfg_renorm_min)

        generator = torch.Generator().manual_seed(seed)  # on the CPU: the same noise on every device
        noise_NP = torch.randn(h * w, self.model.patch_latent_dim, generator=generator).to(self.device)
        x0_NP = euler_sample(velocity, noise_NP, sampling_schedule(cfg.num_steps, cfg.timestep_shift))
        latent = unpatchify_latents(
            x0_NP, h, w, self.model.options.latent_patch_size, self.model.latent_channels
        )
        assert self.model.vae is not None  # visual_gen is on (checked above)
        return to_uint8_image(self.model.vae.decode(latent))

    def _clean_latents(self, segments: list[Segment]) -> torch.Tensor:
        """The latent tokens [N, P] of the clean VAE conditions among `segments` (the posterior
        means: the same every call)."""
        parts = [torch.zeros(0, self.model.patch_latent_dim, device=self.device)]
        for segment in segments:
            if isinstance(segment, VaeSegment) and not segment.noised:
                assert self.model.vae is not None  # a VAE condition comes with visual_gen on
                pixels = segment.image[None].to(self.device)
                latent = self.model.vae.encode(pixels, eps=torch.zeros(()))
                parts.append(patchify_latents(latent, [segment.grid], self.model.options.latent_patch_size))
        return torch.cat(parts)

    def answer(self, question: SamplingQuestion) -> str:
        """The greedy answer to `question` (its image file resolved against `data_folder`)."""
        limits = self.processor.config
        try:
            image = load_rgb(
                question.image,
                self.config.data_folder,
                min_side=limits.min_image_side,
                max_pixels=limits.max_image_pixels,
            )
        except BadSampleError as exc:
            raise ValueError(
                f"[bagel.sampling] questions: image {question.image!r} cannot be used ({exc}); fix "
                f"the path or [bagel.sampling] data_folder"
            ) from exc
        return self.answer_image(image, question.question)

    def answer_image(self, image: Image.Image, question: str) -> str:
        """The greedy answer to `question` about `image` (a PIL image): at most `max_new_tokens`
        tokens, up to <|im_end|>."""
        if not self.model.options.visual_und:
            raise ValueError(
                "[bagel.sampling] questions need the ViT: set [bagel] visual_und = true or remove "
                "the questions"
            )
        context: list[Segment] = [
            self.processor.vit_segment(image),
            TextSegment(self.processor.encode(question), loss=False),
        ]
        # Ids past the tokenizer are padding rows of the embedding table: never predicted.
        vocab = len(self.processor.tokenizer)
        eos = self.processor.special.eos
        ids: list[int] = []
        for _ in range(self.config.max_new_tokens):
            # The open answer turn is <|im_start|> + ids (+ <|im_end|>, which earlier tokens do not
            # see): the last CE position, after the last id, predicts the next token.
            batch = self.collator([BagelSample([*context, TextSegment(ids, loss=True)])]).to(self.device)
            logits_V = self.model(batch).ce_logits[-1, :vocab]
            token = broadcast_token(int(logits_V.argmax()), self.device)
            if token == eos:
                break
            ids.append(token)
        return self.processor.tokenizer.decode(ids, skip_special_tokens=True).strip()


@torch.no_grad()
def generate_samples(sampler: BagelSampler) -> GeneratedSamples:
    """An image per prompt of `sampler.config` (`gen_<i>_<words>`, with its text "prompt: ...")
    and an answer per question (`qa_<i>`)."""
    config = sampler.config
    out = GeneratedSamples()
    for i, prompt in enumerate(config.prompts):
        name = f"gen_{i:02d}_{slug(prompt)}"
        out.images[name] = sampler.generate_image(prompt, config.seed + i)
        out.texts[name] = f"prompt: {prompt}"
    for i, question in enumerate(config.questions):
        out.texts[f"qa_{i:02d}"] = (
            f"image: {question.image}\n\nquestion: {question.question}\n\nanswer: {sampler.answer(question)}"
        )
    return out
