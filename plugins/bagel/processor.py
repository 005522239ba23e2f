"""The BAGEL processor: a raw record -> a `BagelSample` (a list of segments with its token length).

Record forms (see the README's data format section):

- chat: ``{"messages": [{"role": "user", "content": [{"type": "image_url", "image_url":
  {"url": ...}}, {"type": "text", "text": ...}]}, {"role": "assistant", "content": "..."}]}``.
  An image in a user turn is an understanding input (ViT tokens; when the sample also generates
  an image, it is first a clean VAE condition: editing); an image in an assistant turn is a
  generation target (noised VAE latents, MSE). `content` may be a plain string.
- text-to-image: ``{"caption": "...", "image": <source>}``.
- text only: ``{"text": "..."}`` (all of it is a CE target).

Every text turn is framed `<|im_start|>` + ids + `<|im_end|>`; every image `<|vision_start|>` +
tokens + `<|vision_end|>` (the collator adds the frame). Conditioning dropout (text, ViT, VAE)
applies to generation samples only and is drawn from (seed, dataset, index, epoch): a sample is
dropped differently in every epoch, and identically whenever the same read repeats (exact resume).
"""

from __future__ import annotations

import dataclasses
import json
import random
from dataclasses import dataclass, field
from typing import Any, Union

import torch
from PIL import Image
from transformers import AutoTokenizer

from bagel_titan.config.fields import build_dataclass
from bagel_titan.errors import UserError
from bagel_titan.protocols import ProcessedSample, RawSample
from bagel_titan_plugins.data.bad_samples import BadSampleError
from bagel_titan_plugins.data.images import fit_size, load_rgb, to_tensor

from .processor_config import ProcessorConfig

SPECIAL_TOKENS = ("<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>")


# ---------------------------------------------------------------------------------------------
# The processed sample
# ---------------------------------------------------------------------------------------------


@dataclass
class TextSegment:
    """`<|im_start|>` + ids + `<|im_end|>`, causal. With `loss`, the `<|im_start|>` position and
    every id position predict the next token (labels ids + [<|im_end|>]); `eos_label`, when set,
    is a CE label on the `<|im_end|>` position itself (the release's `special_token_label`)."""

    ids: list[int]
    loss: bool
    eos_label: int | None = None

    @property
    def num_tokens(self) -> int:
        return len(self.ids) + 2


@dataclass
class VitSegment:
    """An understanding image: [3, H, W] in [-1, 1], H and W multiples of `patch_size`."""

    image: torch.Tensor
    patch_size: int

    @property
    def grid(self) -> tuple[int, int]:
        return self.image.shape[1] // self.patch_size, self.image.shape[2] // self.patch_size

    @property
    def num_tokens(self) -> int:
        h, w = self.grid
        return h * w + 2


@dataclass
class VaeSegment:
    """A VAE image: [3, H, W] in [-1, 1], H and W multiples of `stride` (VAE downsample x latent
    patch). `noised`: a generation target (mode noise, MSE); else a clean condition (mode full)."""

    image: torch.Tensor
    stride: int
    noised: bool

    @property
    def grid(self) -> tuple[int, int]:
        return self.image.shape[1] // self.stride, self.image.shape[2] // self.stride

    @property
    def num_tokens(self) -> int:
        h, w = self.grid
        return h * w + 2


@dataclass
class DroppedImage:
    """A conditioning image removed by dropout: no tokens, but the RoPE position still moves by
    one (as in the release)."""

    num_tokens: int = 0


Segment = Union[TextSegment, VitSegment, VaeSegment, DroppedImage]


@dataclass
class BagelSample(ProcessedSample):
    """One processed sample: its segments in sequence order; `num_tokens` is its packed length."""

    segments: list[Segment]
    key: tuple[str, int] = ("", -1)
    """(dataset, index) of the raw sample."""
    num_tokens: int = field(init=False)

    def __post_init__(self) -> None:
        self.num_tokens = sum(s.num_tokens for s in self.segments)

    def truncated(self, max_tokens: int) -> "BagelSample | None":
        """A text-only sample cut to `max_tokens` (`oversize_policy = "truncate"`); None when the
        sample has images (an image cannot be cut)."""
        texts = [s for s in self.segments if isinstance(s, TextSegment)]
        if len(texts) < len(self.segments):
            return None
        kept: list[Segment] = []
        room = max_tokens
        for seg in texts:
            if room < 3:
                break
            ids = seg.ids[: room - 2]
            kept.append(TextSegment(ids, seg.loss, seg.eos_label))
            room -= len(ids) + 2
        return BagelSample(kept, self.key) if kept else None


# ---------------------------------------------------------------------------------------------
# The processor
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SpecialTokens:
    bos: int
    eos: int
    vision_start: int
    vision_end: int


class TokenizerNotFound(UserError, FileNotFoundError):
    """`[model] tokenizer_path` (or a pretrained folder) holds no loadable tokenizer."""


def load_tokenizer(path: str) -> tuple[Any, SpecialTokens]:
    """`AutoTokenizer` from `path`, with the Qwen2 chat and vision tokens added if missing."""
    try:
        tokenizer: Any = AutoTokenizer.from_pretrained(path)  # str in, int out: not what its stubs say
    except (OSError, ValueError) as exc:
        first_line = str(exc).strip().splitlines()[0].rstrip(": ") if str(exc).strip() else type(exc).__name__
        raise TokenizerNotFound(
            f"cannot load a tokenizer from {path!r} ({first_line}); set [model] "
            f"tokenizer_path to a folder with tokenizer.json"
        ) from exc
    missing = [t for t in SPECIAL_TOKENS if t not in tokenizer.get_vocab()]
    if missing:
        tokenizer.add_special_tokens({"additional_special_tokens": missing})
    ids = [tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS]
    return tokenizer, SpecialTokens(*ids)


class BagelProcessor:
    """Raw record -> `BagelSample` (tokenised text, transformed images, loss masks, dropout)."""

    def __init__(
        self,
        job_config: Any,
        bagel_config: Any,
        tokenizer_path: str,
        *,
        vit_patch_size: int,
        vae_downsample: int,
    ):
        self.config: ProcessorConfig = (
            job_config.section("bagel.processor")
            if job_config.has_section("bagel.processor")
            else ProcessorConfig()
        )
        self.visual_und = bool(bagel_config.visual_und)
        self.visual_gen = bool(bagel_config.visual_gen)
        self.vit_patch_size = vit_patch_size
        self.vit_max_side = bagel_config.vit_max_num_patch_per_side * vit_patch_size
        self.vae_stride = vae_downsample * bagel_config.latent_patch_size
        self.vae_max_side = bagel_config.max_latent_size * self.vae_stride
        seed = self.config.seed
        if seed < 0:
            seed = job_config.data.seed if job_config.data.seed >= 0 else job_config.training.seed
        self.seed = seed
        self.tokenizer, self.special = load_tokenizer(tokenizer_path)
        self._configs: dict[tuple, ProcessorConfig] = {}
        entries = list(job_config.data.datasets) + list(job_config.validation.datasets)
        for entry in entries:  # every override is checked at start, naming its dataset
            self.config_for(entry.processor, f"data.datasets {entry.name or entry.path!r} processor")

    def config_for(
        self, overrides: dict[str, Any], where: str = "data.datasets processor"
    ) -> ProcessorConfig:
        """`[bagel.processor]` with a dataset's `[[data.datasets]] processor` overrides applied."""
        key = tuple(sorted((k, repr(v)) for k, v in overrides.items()))
        if key not in self._configs:
            values = {**dataclasses.asdict(self.config), **overrides}
            self._configs[key] = build_dataclass(ProcessorConfig, values, where) if overrides else self.config
        return self._configs[key]

    # -- pieces -------------------------------------------------------------------------------
    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False)

    def _image(self, source: Any, data_folder: str, c: ProcessorConfig) -> Image.Image:
        return load_rgb(source, data_folder, min_side=c.min_image_side, max_pixels=c.max_image_pixels)

    def vit_segment(
        self, image: Image.Image, c: ProcessorConfig | None = None, num_images: int = 1
    ) -> VitSegment:
        """`num_images`: the understanding images of the sample; as in the release, they share
        the pixel budget (vit_max_pixels / num_images each)."""
        c = c or self.config
        size = fit_size(
            *image.size,
            min_size=c.vit_min_size,
            max_size=c.vit_max_size,
            stride=self.vit_patch_size,
            max_side=self.vit_max_side,
            max_pixels=c.vit_max_pixels // max(1, num_images),
        )
        return VitSegment(to_tensor(image, size, c.vit_image_mean, c.vit_image_std), self.vit_patch_size)

    def vae_segment(self, image: Image.Image, noised: bool, c: ProcessorConfig | None = None) -> VaeSegment:
        c = c or self.config
        size = fit_size(
            *image.size,
            min_size=c.vae_min_size,
            max_size=c.vae_max_size,
            stride=self.vae_stride,
            max_side=self.vae_max_side,
            max_pixels=c.vae_max_pixels,
        )
        return VaeSegment(to_tensor(image, size, 0.5, 0.5), self.vae_stride, noised)

    # -- record forms -------------------------------------------------------------------------
    def __call__(self, sample: RawSample) -> BagelSample:
        data = sample.data
        rng = random.Random(f"{self.seed}:{sample.dataset}:{sample.index}:{sample.epoch}")
        c = self.config_for(sample.processor_options)
        if "messages" in data and data["messages"] is not None:
            segments = self._chat(data["messages"], sample.data_folder, rng, c)
        elif "caption" in data and "image" in data:
            segments = self._text_to_image(data["caption"], data["image"], sample.data_folder, rng, c)
        elif isinstance(data.get("text"), str):
            if not data["text"].strip():
                raise BadSampleError("empty_messages", "empty `text`")
            segments = [TextSegment(self.encode(data["text"]), loss=True)]
        else:
            raise BadSampleError(
                "unknown_content",
                f"a record needs `messages`, `caption` + `image`, or `text`; got keys {sorted(data)}",
            )
        if not any(
            isinstance(s, TextSegment) and s.loss or isinstance(s, VaeSegment) and s.noised for s in segments
        ):
            raise BadSampleError("no_target", "the sample has no assistant text and no image to generate")
        return BagelSample(segments, (sample.dataset, sample.index))

    def _text_to_image(
        self, caption: Any, image: Any, data_folder: str, rng: random.Random, c: ProcessorConfig
    ) -> list[Segment]:
        if not isinstance(caption, str) or not caption.strip():
            raise BadSampleError("empty_messages", "empty `caption`")
        if not self.visual_gen:
            raise BadSampleError("unknown_content", "a text-to-image sample while [bagel] visual_gen is off")
        target = self.vae_segment(self._image(image, data_folder, c), noised=True, c=c)
        segments: list[Segment] = []
        if rng.random() >= c.text_dropout_prob:
            segments.append(TextSegment(self.encode(caption), loss=False))
        return segments + [target]

    @staticmethod
    def _items(content: Any) -> list[tuple[str, Any]]:
        """A turn's content as (kind, value) pairs, kind "text" or "image"."""
        if isinstance(content, str):
            return [("text", content)]
        if not isinstance(content, list):
            raise BadSampleError(
                "unknown_content", f"message content must be a string or a list, got {type(content).__name__}"
            )
        items = []
        for item in content:
            kind = item.get("type") if isinstance(item, dict) else None
            if kind == "text" and isinstance(item.get("text"), str):
                items.append(("text", item["text"]))
            elif (
                kind == "image_url" and isinstance(item.get("image_url"), dict) and "url" in item["image_url"]
            ):
                items.append(("image", item["image_url"]["url"]))
            elif kind == "image" and item.get("image") is not None:
                items.append(("image", item["image"]))
            else:
                raise BadSampleError(
                    "unknown_content",
                    f"content item {item!r:.200}: expected "
                    f"{{type: text, text}} or {{type: image_url, image_url: {{url}}}}",
                )
        return items

    def _chat(self, messages: Any, data_folder: str, rng: random.Random, c: ProcessorConfig) -> list[Segment]:
        if isinstance(messages, str):
            try:
                messages = json.loads(messages)
            except json.JSONDecodeError as exc:
                raise BadSampleError("bad_json", f"`messages` string does not parse: {exc}") from None
        if not isinstance(messages, list) or not messages:
            raise BadSampleError("empty_messages", "`messages` is empty")
        turns = []
        for m in messages:
            role = m.get("role") if isinstance(m, dict) else None
            if role not in ("system", "user", "assistant"):
                raise BadSampleError(
                    "unknown_content", f"message {m!r:.200}: role must be system, user or assistant"
                )
            turns.append((role, self._items(m.get("content"))))
        if not any(value for _, items in turns for _, value in items):
            raise BadSampleError("empty_messages", "every message is empty")
        generates = any(role == "assistant" and kind == "image" for role, items in turns for kind, _ in items)
        if generates and not self.visual_gen:
            raise BadSampleError(
                "unknown_content", "an assistant image (generation) while [bagel] visual_gen is off"
            )
        # An understanding sample's ViT images share one pixel budget (the release's img_num rule).
        num_vit = (
            1
            if generates
            else sum(kind == "image" and role != "assistant" for role, items in turns for kind, _ in items)
        )
        segments: list[Segment] = []
        for role, items in turns:
            texts: list[str] = []

            def close_text() -> None:
                if not texts:
                    return
                text = "\n".join(texts)
                texts.clear()
                if role == "assistant":
                    segments.append(TextSegment(self.encode(text), loss=True))
                elif not (generates and rng.random() < c.text_dropout_prob):
                    segments.append(TextSegment(self.encode(text), loss=c.loss_on == "all"))

            for kind, value in items:
                if kind == "text":
                    if value:
                        texts.append(value)
                    continue
                close_text()
                image = self._image(value, data_folder, c)
                if role == "assistant":
                    segments.append(self.vae_segment(image, noised=True, c=c))
                    continue
                if generates:  # editing: the source image is a clean VAE condition and a ViT input
                    drop_vae = rng.random() < c.vae_dropout_prob
                    segments.append(
                        DroppedImage() if drop_vae else self.vae_segment(image, noised=False, c=c)
                    )
                    if self.visual_und:
                        drop_vit = rng.random() < c.vit_dropout_prob
                        segments.append(DroppedImage() if drop_vit else self.vit_segment(image, c))
                elif self.visual_und:
                    segments.append(self.vit_segment(image, c, num_vit))
                else:
                    raise BadSampleError(
                        "unknown_content", "an understanding image while [bagel] visual_und is off"
                    )
            close_text()
        return segments
