"""The BAGEL collator reproduces the reference fixture's packed batch from its raw ingredients,
and the processor builds the right segments from the example data."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from bagel_titan.config.job_config import JobConfig
from bagel_titan.protocols import RawSample
from bagel_titan_plugins.bagel.collator import BagelCollator
from bagel_titan_plugins.bagel.processor import (
    BagelProcessor,
    BagelSample,
    DroppedImage,
    SpecialTokens,
    TextSegment,
    VaeSegment,
    VitSegment,
)
from bagel_titan_plugins.data.bad_samples import BadSampleError
from bagel_titan_plugins.data.example_data import write_example_data

from bagel_titan_plugins.bagel.config import BagelConfig
from conftest import reference_dirs, small_bagel_options

FIXTURE_DIRS = reference_dirs()


def samples_from_fixture(meta: dict, tensors: dict[str, torch.Tensor]) -> list[BagelSample]:
    """The fixture's sequence plans + raw ingredients as processed samples."""
    samples = []
    for s, plan in enumerate(meta["samples"]):
        segments, t, i = [], 0, 0
        for item in plan["sequence_plan"]:
            if item["type"] == "text":
                label = item["special_token_label"] if item["special_token_loss"] else None
                ids = tensors[f"raw.sample{s}.text{t}"].tolist()
                segments.append(TextSegment(ids, loss=bool(item["loss"]), eos_label=label))
                t += 1
            elif item["type"] == "vit_image":
                segments.append(VitSegment(tensors[f"raw.sample{s}.image{i}"], meta["vit_patch_size"]))
                i += 1
            else:
                image = tensors[f"raw.sample{s}.image{i}"]
                segments.append(VaeSegment(image, meta["vae_image_downsample"], noised=bool(item["loss"])))
                i += 1
        samples.append(BagelSample(segments, ("fixture", s)))
    return samples


@pytest.mark.parametrize("folder", FIXTURE_DIRS, ids=lambda p: p.name)
def test_collator_reproduces_reference_batch(folder: Path):
    meta = json.loads((folder / "batch.json").read_text())
    config = json.loads((folder / "config.json").read_text())
    tensors = load_file(str(folder / "batch.safetensors"))
    ids = meta["special_token_ids"]
    special = SpecialTokens(
        ids["bos_token_id"], ids["eos_token_id"], ids["start_of_image"], ids["end_of_image"]
    )
    section = BagelConfig(
        latent_patch_size=config["latent_patch_size"],
        max_latent_size=config["max_latent_size"],
        vit_max_num_patch_per_side=config["vit_max_num_patch_per_side"],
    )
    collator = BagelCollator(
        JobConfig(),
        section,
        vit_patch_size=meta["vit_patch_size"],
        vae_downsample=meta["vae_image_downsample"] // config["latent_patch_size"],
        special_tokens=special,
    )
    samples = samples_from_fixture(meta, tensors)
    batch = collator(samples)

    assert batch.sequence_length == meta["sequence_length"]
    assert sum(s.num_tokens for s in samples) == meta["sequence_length"]
    real = meta["num_real_samples"]
    assert batch.sample_lens == meta["sample_lens"][:real]  # the fixture adds a flex padding sample
    n_pad_splits = len(meta["split_lens"]) - len(batch.split_lens)
    assert n_pad_splits == 1
    assert batch.split_lens == meta["split_lens"][:-1]
    assert batch.attn_modes == meta["attn_modes"][:-1]
    assert [list(s) for s in batch.patchified_vae_latent_shapes] == meta["patchified_vae_latent_shapes"]
    for name in (
        "packed_text_ids",
        "packed_text_indexes",
        "packed_position_ids",
        "packed_label_ids",
        "ce_loss_indexes",
        "packed_vit_token_indexes",
        "packed_vit_position_ids",
        "packed_latent_position_ids",
        "packed_vae_token_indexes",
        "mse_loss_indexes",
    ):
        assert torch.equal(getattr(batch, name), tensors[name]), name
    assert torch.equal(batch.vit_token_seqlens.long(), tensors["vit_token_seqlens"])
    torch.testing.assert_close(batch.ce_loss_weights, tensors["ce_loss_weights"])
    torch.testing.assert_close(batch.packed_vit_tokens, tensors["packed_vit_tokens"], rtol=0, atol=0)
    torch.testing.assert_close(batch.padded_images, tensors["padded_images"], rtol=0, atol=0)
    timesteps = tensors["packed_timesteps"]
    noised_tokens = torch.cat(
        [
            torch.full((h * w,), noised)
            for (h, w), noised in zip(batch.patchified_vae_latent_shapes, batch.vae_image_noised)
        ]
    )
    assert torch.equal(noised_tokens, torch.isfinite(timesteps))


@pytest.mark.parametrize("folder", FIXTURE_DIRS, ids=lambda p: p.name)
def test_batch_carries_its_attention_metadata(folder: Path):
    """The collator (in a loader worker) builds the LLM's and the ViT's attention metadata and the
    noised-token index, so the model's forward has no layout work left; they survive pickling
    (worker -> trainer) and `.to()`."""
    import pickle

    from bagel_titan_plugins.attention.meta import CAUSAL, FULL, NOISE

    meta = json.loads((folder / "batch.json").read_text())
    config = json.loads((folder / "config.json").read_text())
    tensors = load_file(str(folder / "batch.safetensors"))
    ids = meta["special_token_ids"]
    special = SpecialTokens(
        ids["bos_token_id"], ids["eos_token_id"], ids["start_of_image"], ids["end_of_image"]
    )
    section = BagelConfig(
        latent_patch_size=config["latent_patch_size"],
        max_latent_size=config["max_latent_size"],
        vit_max_num_patch_per_side=config["vit_max_num_patch_per_side"],
    )
    collator = BagelCollator(
        JobConfig(),
        section,
        vit_patch_size=meta["vit_patch_size"],
        vae_downsample=meta["vae_image_downsample"] // config["latent_patch_size"],
        special_tokens=special,
    )
    batch = pickle.loads(pickle.dumps(collator(samples_from_fixture(meta, tensors)))).to("cpu")

    llm = batch.attention
    codes = {"causal": CAUSAL, "full": FULL, "noise": NOISE}
    assert llm.doc_lengths == batch.sample_lens and llm.cu_seqlens.tolist()[-1] == batch.sequence_length
    assert torch.equal(llm.doc_ids, torch.cat([torch.full((n,), d) for d, n in enumerate(batch.sample_lens)]))
    assert torch.equal(
        llm.segment_ids, torch.cat([torch.full((n,), s) for s, n in enumerate(batch.split_lens)])
    )
    assert torch.equal(
        llm.token_modes,
        torch.cat([torch.full((n,), codes[m]) for n, m in zip(batch.split_lens, batch.attn_modes)]),
    )
    assert torch.equal(llm.position_ids, batch.packed_position_ids)
    assert batch.vit_attention.doc_lengths == batch.vit_token_seqlens.tolist()
    noised = torch.isfinite(tensors["packed_timesteps"]).nonzero().flatten()
    assert torch.equal(batch.noised_vae_tokens, noised)
    assert torch.equal(batch.packed_vae_token_indexes[batch.noised_vae_tokens], batch.mse_loss_indexes)


# ---------------------------------------------------------------------------------------------
# The processor on real records
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def example(tmp_path_factory) -> dict[str, str]:
    return write_example_data(str(tmp_path_factory.mktemp("example")), num_samples=32)


def make_processor(tokenizer: str, **overrides) -> BagelProcessor:
    from bagel_titan_plugins.bagel.processor_config import ProcessorConfig

    job = JobConfig()
    job.plugin_sections["bagel.processor"] = ProcessorConfig(
        vit_min_size=16, vit_max_size=32, vae_min_size=16, vae_max_size=32, min_image_side=8, **overrides
    )
    return BagelProcessor(job, small_bagel_options(), tokenizer, vit_patch_size=4, vae_downsample=2)


def image_item(width=40, height=24):
    from bagel_titan_plugins.data.example_data import Scene, render

    return {
        "type": "image_url",
        "image_url": {
            "url": {
                "bytes": render(Scene("circle", "red", "blue", "large", 0.5, 0.5), width, height),
                "path": None,
            }
        },
    }


def test_understanding_sample_segments_and_loss(example):
    processor = make_processor(example["tokenizer"])
    raw = RawSample(
        "d",
        0,
        {
            "messages": [
                {"role": "system", "content": "you describe shapes ."},
                {
                    "role": "user",
                    "content": [image_item(), {"type": "text", "text": "what shape is in the image ?"}],
                },
                {"role": "assistant", "content": [{"type": "text", "text": "it is a circle ."}]},
            ]
        },
    )
    sample = processor(raw)
    kinds = [type(s).__name__ for s in sample.segments]
    assert kinds == ["TextSegment", "VitSegment", "TextSegment", "TextSegment"]
    system, vit, question, answer = sample.segments
    assert not system.loss and not question.loss and answer.loss
    assert processor.tokenizer.decode(answer.ids) == "it is a circle ."
    # 40x24 -> long side capped at 32 px, multiples of the 4 px patch: 32x20 (keeps aspect 5:3).
    assert tuple(vit.image.shape) == (3, 20, 32)
    assert vit.image.min() >= -1 and vit.image.max() <= 1
    assert sample.num_tokens == sum(len(s.ids) + 2 for s in (system, question, answer)) + 8 * 5 + 2


def test_generation_and_editing_samples(example):
    processor = make_processor(
        example["tokenizer"], text_dropout_prob=0.0, vit_dropout_prob=0.0, vae_dropout_prob=0.0
    )
    t2i = processor(RawSample("d", 1, {"caption": "a red circle", "image": image_item()["image_url"]["url"]}))
    assert [type(s).__name__ for s in t2i.segments] == ["TextSegment", "VaeSegment"]
    assert t2i.segments[1].noised and tuple(t2i.segments[1].image.shape) == (3, 20, 32)  # multiples of 2*2
    edit = processor(
        RawSample(
            "d",
            2,
            {
                "messages": [
                    {"role": "user", "content": [image_item(), {"type": "text", "text": "make it green"}]},
                    {"role": "assistant", "content": [image_item()]},
                ]
            },
        )
    )
    kinds = [(type(s).__name__, getattr(s, "noised", None)) for s in edit.segments]
    assert kinds == [("VaeSegment", False), ("VitSegment", None), ("TextSegment", None), ("VaeSegment", True)]


def test_conditioning_dropout_is_deterministic_per_sample(example):
    processor = make_processor(
        example["tokenizer"], text_dropout_prob=0.5, vit_dropout_prob=0.5, vae_dropout_prob=0.5
    )
    record = {
        "messages": [
            {"role": "user", "content": [image_item(), {"type": "text", "text": "make it green"}]},
            {"role": "assistant", "content": [image_item()]},
        ]
    }
    layouts = set()
    for index in range(40):
        first = processor(RawSample("d", index, record))
        again = processor(RawSample("d", index, record))
        layout = tuple(type(s).__name__ for s in first.segments)
        assert layout == tuple(type(s).__name__ for s in again.segments)
        layouts.add(layout)
    assert len(layouts) > 2  # the draws differ between samples
    assert any("DroppedImage" in layout for layout in layouts)


def test_conditioning_dropout_differs_between_epochs(example):
    processor = make_processor(
        example["tokenizer"], text_dropout_prob=0.5, vit_dropout_prob=0.5, vae_dropout_prob=0.5
    )
    record = {"caption": "a red circle", "image": image_item()["image_url"]["url"]}

    def text_kept(index: int, epoch: int) -> bool:
        segments = processor(RawSample("d", index, record, epoch=epoch)).segments
        return any(type(s).__name__ == "TextSegment" and s.ids for s in segments)

    per_epoch = [[text_kept(index, epoch) for index in range(40)] for epoch in range(3)]
    assert per_epoch[0] != per_epoch[1] != per_epoch[2]
    assert per_epoch[1] == [text_kept(index, 1) for index in range(40)]  # a repeated read agrees


@pytest.mark.parametrize(
    "data, reason",
    [
        ({"messages": []}, "empty_messages"),
        ({"messages": [{"role": "user", "content": [{"type": "video", "video": "x"}]}]}, "unknown_content"),
        (
            {
                "messages": [
                    {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "nope.png"}}]},
                    {"role": "assistant", "content": "x"},
                ]
            },
            "image_missing",
        ),
        ({"caption": "a", "image": b"not an image"}, "image_corrupt"),
        ({"caption": "a", "image": "data:image/png;base64,@@@"}, "image_corrupt"),
        ({"caption": "a", "image": image_item(4, 4)["image_url"]["url"]}, "image_too_small"),
        ({"messages": [{"role": "user", "content": "hello"}]}, "no_target"),
        ({"foo": 1}, "unknown_content"),
    ],
)
def test_bad_records_raise_with_reason(example, tmp_path, data, reason):
    processor = make_processor(example["tokenizer"])
    with pytest.raises(BadSampleError) as info:
        processor(RawSample("d", 0, data, data_folder=str(tmp_path)))
    assert info.value.reason == reason


def test_too_large_images_are_refused_before_decoding(example):
    processor = make_processor(example["tokenizer"], max_image_pixels=30 * 30)
    with pytest.raises(BadSampleError) as info:
        processor(RawSample("d", 0, {"caption": "a", "image": image_item(40, 24)["image_url"]["url"]}))
    assert info.value.reason == "image_too_large"


def test_image_sources_path_and_data_url(example, tmp_path):
    import base64

    processor = make_processor(example["tokenizer"])
    png = image_item()["image_url"]["url"]["bytes"]
    (tmp_path / "img.png").write_bytes(png)
    url = "data:image/png;base64," + base64.b64encode(png).decode()
    for source, folder in (("img.png", str(tmp_path)), (str(tmp_path / "img.png"), ""), (url, "")):
        sample = processor(
            RawSample("d", 0, {"caption": "a red circle", "image": source}, data_folder=folder)
        )
        assert isinstance(sample.segments[-1], VaeSegment)


def test_text_only_truncation(example):
    processor = make_processor(example["tokenizer"])
    sample = processor(RawSample("d", 0, {"text": "a red circle on a blue background " * 10}))
    cut = sample.truncated(20)
    assert cut is not None and cut.num_tokens == 20
    assert (
        processor(RawSample("d", 1, {"caption": "a", "image": image_item()["image_url"]["url"]})).truncated(5)
        is None
    )
    assert DroppedImage().num_tokens == 0


def test_interpolated_position_ids_cover_the_table():
    from bagel_titan_plugins.bagel.collator import grid_position_ids, grid_position_ids_interpolated

    ids = grid_position_ids_interpolated(2, 4, side=8).view(2, 4)
    assert ids.tolist() == [[0, 2, 4, 6], [32, 34, 36, 38]]  # rows 0 and 4, cols 0, 2, 4, 6
    assert torch.equal(grid_position_ids_interpolated(8, 8, 8), grid_position_ids(8, 8, 8))


def test_fit_size_respects_every_bound():
    from bagel_titan_plugins.data.images import fit_size

    assert fit_size(640, 480, min_size=512, max_size=1024, stride=16, max_side=1024) == (688, 512)
    assert fit_size(4000, 3000, min_size=512, max_size=1024, stride=16, max_side=1024) == (1024, 768)
    assert fit_size(
        4000, 3000, min_size=378, max_size=980, stride=14, max_side=70 * 14, max_pixels=14 * 14 * 9 * 1024
    ) == (980, 742)  # 735 rounds to 53 patches
    w, h = fit_size(1000, 1000, min_size=512, max_size=1024, stride=16, max_side=1024, max_pixels=500_000)
    assert w * h <= 500_000 and w % 16 == 0 and w == h
    assert fit_size(100, 20, min_size=512, max_size=64, stride=4, max_side=32) == (32, 8)


def test_transparent_images_are_composited_on_white(tmp_path):
    from PIL import Image

    from bagel_titan_plugins.data.images import load_rgb

    Image.new("RGBA", (20, 20), (255, 0, 0, 0)).save(tmp_path / "clear.png")
    rgb = load_rgb("clear.png", str(tmp_path), min_side=8, max_pixels=10**6)
    assert rgb.mode == "RGB" and rgb.getpixel((3, 3)) == (255, 255, 255)
