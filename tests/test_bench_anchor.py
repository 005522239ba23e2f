"""benchmarks/bench_anchor_step.py builds the anchors' packs (same stream, same first fit, same
token counts as the BAGEL release and LMMS Engine harnesses), bagel-titan's collator agrees with
their lengths, and the script runs at CI size through the trainer."""

from __future__ import annotations

import subprocess
import sys

import pytest

from conftest import REPO, subprocess_env

BENCH = REPO / "benchmarks"
if str(BENCH) not in sys.path:
    sys.path.insert(0, str(BENCH))

import bench_anchor_step as anchor  # noqa: E402

FIRST_PACKS = [1921, 1695, 1859, 2027, 1989, 1964, 1999, 2011]
"""Tokens of the first eight 2048-token packs in every anchor harness (their README)."""
FIRST_PACK_SAMPLES = [8, 6, 8, 10, 9, 10, 9, 8]


def test_stream_and_first_fit_packs_match_the_anchors():
    cfg = anchor.load_config()
    rows = anchor.make_rows(cfg, "t2i=3,text=1")
    assert len(rows) == 200 and sum(r["kind"] == "t2i" for r in rows) == 149
    packs = anchor.first_fit_packs(rows, cfg, 2048, 8)
    assert [sum(anchor.num_tokens(r, cfg) for r in p) for p in packs] == FIRST_PACKS
    assert [len(p) for p in packs] == FIRST_PACK_SAMPLES


def test_collated_packs_have_the_anchors_lengths():
    import torch

    cfg = anchor.load_config()
    pack = anchor.first_fit_packs(anchor.make_rows(cfg, "t2i=3,text=1"), cfg, 2048, 1)[0]
    batch = first_pack_batch()
    assert batch.sequence_length == FIRST_PACKS[0] and batch.sample_lens == [
        anchor.num_tokens(r, cfg) for r in pack
    ]
    images = [r for r in pack if r["kind"] == "t2i"]
    assert batch.num_mse_tokens == sum((r["height"] // 16) * (r["width"] // 16) for r in images)
    assert batch.padded_images.shape[0] == len(images) and float(batch.padded_images.abs().max()) <= 1.0
    texts = [r for r in pack if r["kind"] == "text"]
    assert batch.num_ce_tokens == sum(len(r["answer"].encode()) + 1 for r in texts)  # answer + <|im_end|>
    assert torch.equal(batch.packed_text_ids[:1], torch.tensor([cfg["special_tokens"]["bos_token_id"]]))


def first_pack_batch():
    from bagel_titan.config.job_config import JobConfig
    from bagel_titan_plugins.bagel.collator import BagelCollator

    cfg = anchor.load_config()
    pack = anchor.first_fit_packs(anchor.make_rows(cfg, "t2i=3,text=1"), cfg, 2048, 1)[0]
    arch = anchor.anchor_architecture(cfg)
    collate = BagelCollator(
        JobConfig(),
        anchor.anchor_bagel_config(cfg, "t2i=3,text=1"),
        special_tokens=anchor.special_tokens(cfg),
        vit_patch_size=arch.vit.patch_size,
        vae_downsample=arch.vae.downsample,
    )
    return collate([anchor.bagel_sample(r, cfg) for r in pack])


def test_release_inputs_lay_out_one_nested_mask_per_sample():
    """`--release`'s input builder (no release code needed): one mask per sample over exactly that
    sample's splits, timesteps per noised VAE token, and the loss indexes carried over."""
    import numpy as np
    import torch

    batch = first_pack_batch()
    seen = []

    def mask_fn(split_lens, attn_modes):
        seen.append((list(split_lens), list(attn_modes)))
        return torch.zeros(sum(split_lens), sum(split_lens))

    timesteps = anchor.draw_timesteps(batch, np.random.default_rng(0))
    data = anchor.release_inputs(batch, mask_fn, timesteps)
    assert [m.shape[0] for m in data["nested_attention_masks"]] == batch.sample_lens
    assert [n for splits, _ in seen for n in splits] == batch.split_lens
    assert [m for _, modes in seen for m in modes] == batch.attn_modes
    assert data["sequence_length"] == sum(data["sample_lens"]) == batch.sequence_length
    assert timesteps.shape == batch.packed_vae_token_indexes.shape and bool(torch.isfinite(timesteps).all())
    assert len(set(timesteps.tolist())) == len(batch.patchified_vae_latent_shapes)  # one draw per image
    assert torch.equal(data["mse_loss_indexes"], batch.mse_loss_indexes)
    assert torch.equal(data["ce_loss_indexes"], batch.ce_loss_indexes)
    assert data["padded_images"] is batch.padded_images and "packed_vit_tokens" not in data
    fixed = anchor.check_inputs(batch, 16, 2)
    assert fixed["noise"].shape == (batch.packed_vae_token_indexes.numel(), 64)
    assert torch.equal(fixed["noise"], anchor.check_inputs(batch, 16, 2)["noise"])  # seeded


@pytest.mark.dist
def test_script_runs_through_the_trainer_and_records_its_section(tmp_path):
    results = tmp_path / "RESULTS.md"
    proc = subprocess.run(
        [
            sys.executable,
            str(BENCH / "bench_anchor_step.py"),
            "--steps",
            "1",
            "--warmup",
            "1",
            "--pack-len",
            "512",
            "--threads",
            "1",
            "--results",
            str(results),
        ],
        cwd=REPO,
        env=subprocess_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert proc.stdout.count("STEP ") == 2
    total = next(line for line in proc.stdout.splitlines() if line.startswith("TOTAL "))
    assert "median_tok_s=" in total and "error" not in total
    text = results.read_text()
    assert text.count("## bench_anchor_step") == 1 and "| this tree | fp32 | sdpa | off | none |" in text
