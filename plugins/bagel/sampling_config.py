"""`[bagel.sampling]`: what BAGEL generates for inspection at every validation.

Registered as a config section by the bagel plugin; `BagelSpec.generate_samples` reads it. With
no `prompts` and no `questions` (the default) nothing is generated. The guidance defaults are the
public release's text-to-image inference defaults (`InterleaveInferencer.gen_image`:
cfg_text_scale 4.0, cfg_interval (0.4, 1.0), cfg_renorm "global" with min 0.0,
timestep_shift 3.0, 1024 x 1024 px).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal


@dataclass
class SamplingQuestion:
    """One fixed image question (`[[bagel.sampling.questions]]`)."""

    image: str = ""
    """Image file; a relative path resolves against `[bagel.sampling] data_folder` (like the
    images of a dataset against its `data_folder`)."""
    question: str = ""
    """The user's question about the image; the model answers it greedily."""

    def __post_init__(self) -> None:
        if not self.image or not self.question:
            raise ValueError(
                f"a questions entry needs both `image` and `question`, got image={self.image!r}, "
                f"question={self.question!r}"
            )


@dataclass
class SamplingConfig:
    """`[bagel.sampling]`: fixed prompts and image questions, and the sampler's settings."""

    prompts: list[str] = field(default_factory=list)
    """Text-to-image prompts; one image each, written as `gen_<i>_<prompt words>.png`."""
    questions: list[SamplingQuestion] = field(default_factory=list)
    """Image questions (`[[bagel.sampling.questions]]` tables with `image` and `question`); each
    answer is logged as text (`qa_<i>`)."""
    data_folder: str = ""
    """Where relative question image paths resolve; empty: the working directory."""
    num_steps: int = 50
    """Euler steps (model evaluations per image, doubled where guidance is on) from t = 1 (noise)
    to t = 0. The release's `num_timesteps` counts schedule points: its 50 are 49 steps."""
    cfg_scale: float = 4.0
    """Classifier-free text guidance: v = v_uncond + cfg_scale * (v_cond - v_uncond), the
    unconditional pass without the prompt (as text dropout trains it). 1.0 turns guidance off
    (one pass per step)."""
    cfg_interval: list[float] = field(default_factory=lambda: [0.4, 1.0])
    """[low, high]: guidance applies at the steps whose (shifted) t satisfies low < t <= high."""
    cfg_renorm: Literal["global", "channel", "none"] = "global"
    """CFG renormalisation of the release: scale the guided velocity down so that its norm (over
    the whole image: "global"; per token: "channel") does not exceed the conditional one's."""
    cfg_renorm_min: float = 0.0
    """Lower bound of that scale (1.0 disables the renormalisation)."""
    timestep_shift: float = 3.0
    """Shift s of the sampling schedule t = s*u / (1 + (s-1)*u), u uniform from 1 to 0: more
    steps at high noise for s > 1 (independent of `[bagel] timestep_shift`, the training one)."""
    image_size: list[int] = field(default_factory=lambda: [1024, 1024])
    """[height, width] of generated images in pixels; multiples of the VAE downsampling times
    `[bagel] latent_patch_size` (16 for the release), at most `max_latent_size` patches a side."""
    max_new_tokens: int = 64
    """Most tokens of one answer (it ends earlier at <|im_end|>)."""
    seed: int = 0
    """Seed of the initial noise (prompt i uses seed + i): the same every validation, so the
    images of successive steps are comparable."""

    def __post_init__(self) -> None:
        checks = [
            (self.num_steps >= 1, f"num_steps must be >= 1, got {self.num_steps}"),
            (self.cfg_scale >= 1.0, f"cfg_scale must be >= 1.0 (1.0 = no guidance), got {self.cfg_scale}"),
            (
                len(self.cfg_interval) == 2 and 0.0 <= self.cfg_interval[0] <= self.cfg_interval[1] <= 1.0,
                f"cfg_interval must be [low, high] with 0 <= low <= high <= 1, got {self.cfg_interval}",
            ),
            (
                0.0 <= self.cfg_renorm_min <= 1.0,
                f"cfg_renorm_min must be in [0, 1], got {self.cfg_renorm_min}",
            ),
            (self.timestep_shift > 0, f"timestep_shift must be > 0, got {self.timestep_shift}"),
            (
                len(self.image_size) == 2 and min(self.image_size) > 0,
                f"image_size must be [height, width] in pixels, got {self.image_size}",
            ),
            (self.max_new_tokens >= 1, f"max_new_tokens must be >= 1, got {self.max_new_tokens}"),
            (all(p.strip() for p in self.prompts), "prompts must not be empty strings"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)
