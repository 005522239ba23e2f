"""The latent cache against encoding every step (issue 20, item 5): step tokens/s with the FULL
FLUX VAE architecture (random weights), on the anchors' tiny BAGEL and packs.

The anchors' configuration (`bench_anchor_step.py`: tiny_bagel.json shapes, the same sample
stream, first-fit packs of 2048 tokens, world size 1, one pack per step) with `"full"` VAE
(ch 128, ch_mult 1,2,4,4, 2 res blocks: FLUX's). Two copies of the same model train side by
side, step by step (A/B interleaved in one process, so both see the same machine load), each
step = VAE encode (A) or cached moments (B) + forward + CE + flow-MSE + backward + clip 1.0 +
AdamW; the batches are collated once beforehand (loader work, untimed, as in bench_anchor_step).
The cache is filled first exactly as `bagel-titan-encode-latents` fills it (one image per
encoder call; timed and reported as the one-off cost). Each step also checks that both copies
got bitwise the same loss (the cache must not change training).

    python benchmarks/bench_latent_cache.py                       # 4 timed steps after 1 warm-up
    python benchmarks/bench_latent_cache.py --vae tiny --steps 8
"""

from __future__ import annotations

import argparse
import copy
import statistics
import tempfile
import time
from typing import TYPE_CHECKING, Any

import torch

import common
from bench_anchor_step import (
    anchor_architecture,
    anchor_bagel_config,
    bagel_sample,
    first_fit_packs,
    load_config,
    make_rows,
    special_tokens,
)

if TYPE_CHECKING:
    from bagel_titan_plugins.bagel.batch import BagelPackedBatch
    from bagel_titan_plugins.bagel.modeling import Bagel


def build(
    args: argparse.Namespace, cache_dir: str
) -> tuple[dict[str, Bagel], dict[str, list[BagelPackedBatch]], int, float]:
    from bagel_titan.plugins import get_plugin_manager
    from bagel_titan_plugins.bagel.collator import BagelCollator
    from bagel_titan_plugins.bagel.latent_cache import LatentCache, content_key
    from bagel_titan_plugins.bagel.processor import VaeSegment
    from bagel_titan_plugins.bagel.spec import build_bagel

    cfg = load_config()
    arch = anchor_architecture(cfg, args.vae)
    options = anchor_bagel_config(cfg, args.mix)
    backend = get_plugin_manager().attention_backends.get(args.backend)
    torch.manual_seed(0)
    model = build_bagel(arch, options, backend=backend)
    model.init_weights()
    twin = copy.deepcopy(model)
    packs = first_fit_packs(make_rows(cfg, args.mix), cfg, args.pack_len, args.packs)
    samples = [[bagel_sample(r, cfg) for r in pack] for pack in packs]

    vae = model.vae
    assert vae is not None  # anchor_bagel_config: visual_gen=True
    cache = LatentCache(cache_dir, vae.identity(), vae.dtype_for(torch.device("cpu")))
    start, images = time.perf_counter(), 0
    for pack in samples:  # what bagel-titan-encode-latents does per image
        for seg in (s for sample in pack for s in sample.segments if isinstance(s, VaeSegment)):
            key = content_key(seg.image)
            hw = (seg.image.shape[1] // arch.vae.downsample, seg.image.shape[2] // arch.vae.downsample)
            if cache.get(key, hw).moments is None:
                cache.put(key, vae.moments_of(seg.image), (seg.image.shape[1], seg.image.shape[2]))
                images += 1
    fill_s = time.perf_counter() - start

    kwargs: dict[str, Any] = dict(
        special_tokens=special_tokens(cfg),
        vit_patch_size=arch.vit.patch_size,
        vae_downsample=arch.vae.downsample,
    )
    plain = BagelCollator(None, options, **kwargs)
    cached = BagelCollator(None, options, latent_cache=cache, **kwargs)
    batches = {"encoded": [plain(p) for p in samples], "cached": [cached(p) for p in samples]}
    assert all(b.padded_images is None and not any(b.vae_cache_misses) for b in batches["cached"])
    return {"encoded": model, "cached": twin}, batches, images, fill_s


def step(model: Bagel, optimizer: torch.optim.Optimizer, batch: BagelPackedBatch, seed: int) -> float:
    from bagel_titan_plugins.bagel.spec import bagel_loss_term, bagel_outputs
    from bagel_titan_plugins.losses.ce import CELoss
    from bagel_titan_plugins.losses.flow_mse import FlowMSELoss
    from bagel_titan_plugins.losses.options import CEOptions, FlowMSEOptions

    generator = torch.Generator().manual_seed(seed)
    outputs = bagel_outputs(model(batch, generator), batch)
    loss: torch.Tensor | float = 0.0
    for component in (CELoss(CEOptions()), FlowMSELoss(FlowMSEOptions())):
        term = bagel_loss_term(component, outputs, batch)
        loss = loss + term.sum / max(term.count, 1)
    assert isinstance(loss, torch.Tensor)  # two terms were added
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return float(loss.detach())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vae", default="full", choices=["tiny", "full"])
    parser.add_argument("--steps", type=int, default=4, help="timed steps per side")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps per side first")
    parser.add_argument("--packs", type=int, default=5, help="distinct packs (cycled)")
    parser.add_argument("--pack-len", type=int, default=2048)
    parser.add_argument("--mix", default="t2i=3,text=1")
    parser.add_argument("--backend", default="sdpa")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    common.add_results_option(parser)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    with tempfile.TemporaryDirectory() as cache_dir:
        models, batches, images, fill_s = build(args, cache_dir)
        optimizers = {
            k: torch.optim.AdamW(m.parameters(), lr=1e-4, weight_decay=0.0) for k, m in models.items()
        }
        times: dict[str, list[float]] = {k: [] for k in models}
        tokens: list[int] = []
        same = True
        for i in range(args.warmup + args.steps):
            n = i % args.packs
            losses = {}
            for side in ("encoded", "cached") if i % 2 == 0 else ("cached", "encoded"):
                start = time.perf_counter()
                losses[side] = step(models[side], optimizers[side], batches[side][n], seed=i)
                elapsed = time.perf_counter() - start
                if i >= args.warmup:
                    times[side].append(elapsed)
            same &= losses["encoded"] == losses["cached"]
            if i >= args.warmup:
                tokens.append(batches["encoded"][n].sequence_length)
            print(
                f"STEP {i} pack {n} tokens {batches['encoded'][n].sequence_length} "
                + " ".join(f"{k} {times[k][-1] if i >= args.warmup else float('nan'):.2f}s" for k in times)
                + f" loss {losses['encoded']:.6f} vs {losses['cached']:.6f}",
                flush=True,
            )
    rows = []
    medians = {}
    for side in ("encoded", "cached"):
        tok_s = [t / s for t, s in zip(tokens, times[side])]
        medians[side] = statistics.median(tok_s)
        rows.append(
            [
                "VAE encode every step" if side == "encoded" else "latent cache",
                len(tok_s),
                f"{statistics.median(times[side]):.2f}",
                f"{medians[side]:,.0f}",
                "1.00x" if side == "encoded" else f"{medians[side] / medians['encoded']:.2f}x",
            ]
        )
    table = common.markdown_table(
        ["step", "timed steps", "step s (median)", "tokens/s (median)", "ratio"], rows
    )
    notes = [
        f"anchor configuration (tiny_bagel.json, VAE {args.vae}, random weights), mix {args.mix}, first-fit packs "
        f"of {args.pack_len} tokens ({args.packs} distinct, cycled), fp32, backend {args.backend}, world size 1",
        "step: VAE encode (or cached moments) + forward + CE + flow-MSE + backward + clip 1.0 + AdamW; the two "
        "sides interleaved step by step in one process (their order alternating)",
        f"filling the cache first (one image per encoder call, as bagel-titan-encode-latents): {images} images "
        f"in {fill_s:.1f} s",
        f"losses bitwise equal on every step (cached vs encoded): {'yes' if same else 'NO'}",
    ]
    print(table)
    common.append_section(args.results, "bench_latent_cache", common.device_description(), notes, table)
    if not same:
        raise SystemExit("the cached and the encoded step gave different losses")


if __name__ == "__main__":
    main()
