"""Per-dataset image transforms: `[[data.datasets]] processor = {...}` overrides `[bagel.processor]`
for that dataset (the release's per-dataset image_transform_args / vit_image_transform_args), and
an understanding sample's ViT images share one pixel budget (the release's `img_num` rule,
data/transforms.py: max_pixels / img_num)."""

from __future__ import annotations

import pytest

from bagel_titan.config.fields import ConfigError
from bagel_titan.config.job_config import DatasetEntry, JobConfig
from bagel_titan.protocols import RawSample
from bagel_titan_plugins.bagel.processor import BagelProcessor, VaeSegment, VitSegment
from bagel_titan_plugins.bagel.processor_config import ProcessorConfig
from bagel_titan_plugins.data.example_data import Scene, render, write_example_data
from bagel_titan_plugins.data.loader import resolve_sources
from bagel_titan.protocols import ReadPass
from conftest import small_bagel_options


@pytest.fixture(scope="module")
def example(tmp_path_factory):
    return write_example_data(str(tmp_path_factory.mktemp("example")), num_samples=8, row_group_size=4)


def image(w=64, h=64):
    return {"bytes": render(Scene("square", "red", "blue", "large", 0.5, 0.5), w, h), "path": None}


def processor(example, datasets):
    cfg = JobConfig()
    cfg.data.datasets = datasets
    cfg.plugin_sections["bagel.processor"] = ProcessorConfig(
        vit_min_size=16,
        vit_max_size=64,
        vae_min_size=16,
        vae_max_size=64,
        vit_max_pixels=64 * 64,
        text_dropout_prob=0.0,
    )
    return BagelProcessor(
        cfg, small_bagel_options(), example["tokenizer"], vit_patch_size=4, vae_downsample=2
    )


def segments(proc, data, options=None, dataset="d"):
    sample = RawSample(dataset, 0, data, processor_options=dict(options or {}))
    return proc(sample).segments


def test_dataset_overrides_replace_the_processor_options(example):
    entries = [
        DatasetEntry(path=example["data"], name="big"),
        DatasetEntry(path=example["data"], name="small", processor={"vae_max_size": 32, "vae_min_size": 8}),
    ]
    proc = processor(example, entries)
    t2i = {"caption": "a red square", "image": image()}
    big = [s for s in segments(proc, t2i) if isinstance(s, VaeSegment)][0]
    small = [s for s in segments(proc, t2i, entries[1].processor) if isinstance(s, VaeSegment)][0]
    assert tuple(big.image.shape[1:]) == (64, 64) and tuple(small.image.shape[1:]) == (32, 32)
    # The loader hands every sample its dataset's overrides.
    sources = resolve_sources(entries, _readers())
    sample = next(sources[1].iter_shard(0, 1, 0, ReadPass()))
    assert sample.processor_options == {"vae_max_size": 32, "vae_min_size": 8}
    assert next(sources[0].iter_shard(0, 1, 0, ReadPass())).processor_options == {}


def test_understanding_images_share_the_vit_pixel_budget(example):
    proc = processor(example, [])

    def chat(n):
        content = [{"type": "image", "image": image()} for _ in range(n)] + [
            {"type": "text", "text": "colour ?"}
        ]
        return {"messages": [{"role": "user", "content": content}, {"role": "assistant", "content": "red ."}]}

    one = [s for s in segments(proc, chat(1)) if isinstance(s, VitSegment)]
    two = [s for s in segments(proc, chat(2)) if isinstance(s, VitSegment)]
    assert tuple(one[0].image.shape[1:]) == (64, 64)  # 4096 px: the whole budget
    assert len(two) == 2 and all(s.image.shape[1] * s.image.shape[2] <= 64 * 64 // 2 for s in two)
    assert all(tuple(s.image.shape[1:]) == (44, 44) for s in two)  # sqrt(2048) = 45.3 -> 44 (stride 4)


def test_an_unknown_override_names_the_dataset(example):
    with pytest.raises(ConfigError, match="unknown key 'vae_max_side'.*did you mean 'vae_max_size'"):
        processor(example, [DatasetEntry(path=example["data"], name="typo", processor={"vae_max_side": 32})])
    with pytest.raises(ConfigError, match="typo"):
        processor(
            example, [DatasetEntry(path=example["data"], name="typo", processor={"vae_max_size": "big"})]
        )


def _readers():
    from bagel_titan.plugins import PluginManager

    return PluginManager(load_entry_points=False, extra_modules=["bagel_titan_plugins.data.plugin"])
