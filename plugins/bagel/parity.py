"""Parity with the public BAGEL implementation on a reference fixture folder.

`bagel-titan-parity FIXTURE_DIR [...] [--backend NAME]` builds the model from the folder's
`config.json` (fp32, CPU, eager attention unless `--backend` names another), loads `weights.safetensors` + `vae_weights.safetensors` through the
official-layout loader, runs the recorded packed batch (recorded timesteps and noise), and
prints the largest difference of every tensor of `expected.safetensors` (absolute) and every
gradient of `grads.safetensors` (relative, in norm). Exit status 1 above tolerance.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import dataclass

import torch
from safetensors.torch import load_file

from bagel_titan.errors import UserError
from bagel_titan.protocols import AttentionBackend
from bagel_titan_plugins.losses.ce import CELoss
from bagel_titan_plugins.losses.flow_mse import FlowMSELoss
from bagel_titan_plugins.losses.options import CEOptions, FlowMSEOptions

from .batch import BagelPackedBatch
from .config import architecture_from_release, bagel_config_from_release
from .modeling import Bagel
from .spec import bagel_loss_term, bagel_outputs, build_bagel
from .weights import detect, load_from_source

ABS_TOL = 1e-4
REL_TOL = 1e-4
GRAD_FLOOR = 1e-4


def load_fixture_model(folder: str, backend: AttentionBackend | None = None) -> Bagel:
    """The fixture's model (architecture from its `config.json`), weights loaded, fp32 on CPU."""
    with open(os.path.join(folder, "config.json")) as f:
        config = json.load(f)
    arch = architecture_from_release(config, vit_config_counts_extra_layer=False)
    with torch.device("meta"):
        model = build_bagel(arch, bagel_config_from_release(config), backend=backend)
    model.to_empty(device="cpu")
    load_from_source(model, detect(folder), folder)
    return model


def load_fixture_batch(folder: str) -> tuple[BagelPackedBatch, dict[str, torch.Tensor], dict]:
    """The recorded batch as a `BagelPackedBatch` (flex padding pseudo-sample removed), plus the
    raw tensors and `batch.json`."""
    with open(os.path.join(folder, "batch.json")) as f:
        info = json.load(f)
    t = load_file(os.path.join(folder, "batch.safetensors"))
    length = info["sequence_length"]
    sample_lens, split_lens, attn_modes = (
        list(info["sample_lens"]),
        list(info["split_lens"]),
        list(info["attn_modes"]),
    )
    if sum(sample_lens) > length:  # the final pseudo-sample (and split) is flex padding
        pad = sum(sample_lens) - length
        if sample_lens[-1] != pad or split_lens[-1] != pad:
            raise ValueError(f"{folder}: expected a final padding sample/split of {pad} tokens")
        sample_lens, split_lens, attn_modes = sample_lens[:-1], split_lens[:-1], attn_modes[:-1]
    shapes = [tuple(s) for s in info["patchified_vae_latent_shapes"]]
    counts = [h * w for h, w in shapes]
    starts = torch.tensor([0] + counts[:-1]).cumsum(0).tolist() if counts else []
    noised = [bool(torch.isfinite(t["packed_timesteps"][s]).item()) for s in starts]
    empty = torch.zeros(0, dtype=torch.long)
    batch = BagelPackedBatch(
        sequence_length=length,
        sample_lens=sample_lens,
        split_lens=split_lens,
        attn_modes=attn_modes,
        packed_text_ids=t["packed_text_ids"],
        packed_text_indexes=t["packed_text_indexes"],
        packed_position_ids=t["packed_position_ids"],
        packed_label_ids=t["packed_label_ids"],
        ce_loss_indexes=t["ce_loss_indexes"],
        ce_loss_weights=t["ce_loss_weights"],
        packed_vit_tokens=t.get("packed_vit_tokens", torch.zeros(0, 0)),
        packed_vit_token_indexes=t.get("packed_vit_token_indexes", empty),
        packed_vit_position_ids=t.get("packed_vit_position_ids", empty),
        vit_token_seqlens=t.get("vit_token_seqlens", empty),
        padded_images=t.get("padded_images"),
        patchified_vae_latent_shapes=shapes,
        packed_latent_position_ids=t.get("packed_latent_position_ids", empty),
        packed_vae_token_indexes=t.get("packed_vae_token_indexes", empty),
        vae_image_noised=noised,
        mse_loss_indexes=t.get("mse_loss_indexes", empty),
        padded_latent=t.get("padded_latent"),
        packed_timesteps=t.get("packed_timesteps"),
        noise=t.get("noise"),
        num_samples=len(sample_lens),
    )
    return batch, t, info


@dataclass
class Diff:
    name: str
    value: float
    tolerance: float
    kind: str  # "abs" or "rel"

    @property
    def ok(self) -> bool:
        return self.value <= self.tolerance


def compare_fixture(folder: str, backend: AttentionBackend | None = None) -> list[Diff]:
    """Run the fixture and return one `Diff` per expected tensor and per gradient."""
    model = load_fixture_model(folder, backend)
    batch, raw, info = load_fixture_batch(folder)
    expected = load_file(os.path.join(folder, "expected.safetensors"))
    grads = load_file(os.path.join(folder, "grads.safetensors"))

    result = model(batch, keep_intermediates=True)
    outputs = bagel_outputs(result, batch)
    ce_term = bagel_loss_term(CELoss(CEOptions()), outputs, batch)
    ce_rw_term = bagel_loss_term(CELoss(CEOptions(reweight=True)), outputs, batch)
    mse_term = bagel_loss_term(FlowMSELoss(FlowMSEOptions()), outputs, batch)
    ce_loss = ce_term.sum / max(ce_term.count, 1)
    mse_loss = mse_term.sum / max(mse_term.count, 1)
    total = ce_loss * info.get("ce_weight", 1.0) + mse_loss * info.get("mse_weight", 1.0)
    ours = dict(result.intermediates)
    ours["ce_logits"] = result.ce_logits
    ours["ce_per_token"] = torch.nn.functional.cross_entropy(
        result.ce_logits, batch.packed_label_ids, reduction="none"
    )
    if result.pred_velocity is not None:
        ours["mse_pred_velocity"] = result.pred_velocity
        ours["mse_target_velocity"] = result.target_velocity
        ours["mse_per_element"] = (result.pred_velocity - result.target_velocity) ** 2
    ours.update(
        ce_loss=ce_loss,
        ce_loss_reweighted=ce_rw_term.sum / ce_rw_term.count,
        mse_loss=mse_loss,
        total_loss=total,
    )
    total.backward()

    if model.vae is not None and "padded_images" in raw:
        ae = model.vae.module
        with torch.no_grad():
            moments = ae.moments(raw["padded_images"])
            mean = moments.chunk(2, dim=1)[0]
            ours["vae_moments"] = moments
            ours["vae_latent_mean_scaled"] = ae.args.scale_factor * (mean - ae.args.shift_factor)
            if "padded_latent" in raw:
                ours["vae_decoded"] = ae.decode(raw["padded_latent"])
            if "vae_posterior_eps" in raw and "padded_latent" in raw:
                ours["padded_latent"] = ae.encode(raw["padded_images"], eps=raw["vae_posterior_eps"])
                expected = dict(expected, padded_latent=raw["padded_latent"])

    diffs: list[Diff] = []
    for name, want in expected.items():
        if name not in ours:
            diffs.append(Diff(name, float("inf"), ABS_TOL, "missing"))
            continue
        got = ours[name].detach().float()
        if tuple(got.shape) != tuple(want.shape):
            diffs.append(
                Diff(f"{name} shape {tuple(got.shape)} vs {tuple(want.shape)}", float("inf"), ABS_TOL, "abs")
            )
            continue
        diffs.append(Diff(name, float((got - want).abs().max()) if want.numel() else 0.0, ABS_TOL, "abs"))
    params = dict(model.named_parameters())
    # A gradient that is analytically zero (the ViT's k_proj bias: softmax ignores a shift shared
    # by all keys) is float noise on both sides; its relative error is taken against a floor of
    # GRAD_FLOOR (1e-4) times the norm of the whole gradient instead of its own vanishing norm.
    squares = sum(((g.double() ** 2).sum() for g in grads.values()), torch.zeros((), dtype=torch.float64))
    floor = GRAD_FLOOR * float(torch.sqrt(squares))
    for name, want in grads.items():
        p = params.get(name)
        if p is None or p.grad is None:
            diffs.append(Diff(f"grad {name}", float("inf"), REL_TOL, "missing"))
            continue
        rel = float((p.grad - want).norm()) / max(float(want.norm()), floor, 1e-30)
        diffs.append(Diff(f"grad {name}", rel, REL_TOL, "rel"))
    extra = sorted(n for n, p in params.items() if p.requires_grad and n not in grads)
    for name in extra:
        diffs.append(Diff(f"grad {name} (not in fixture)", float("inf"), REL_TOL, "missing"))
    return diffs


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bagel-titan-parity", description=__doc__.splitlines()[0])
    parser.add_argument("fixtures", nargs="+", help="reference fixture folder(s)")
    parser.add_argument("--all", action="store_true", help="print every tensor, not only the worst ten")
    parser.add_argument(
        "--backend", default="eager", help="attention backend for the LLM and the ViT (default eager)"
    )
    args = parser.parse_args(argv)
    from bagel_titan.plugins import get_plugin_manager

    try:
        backend = get_plugin_manager().attention_backends.get(args.backend)
    except UserError as exc:
        print(f"bagel-titan-parity: error: {exc}", file=sys.stderr)
        return 2
    for folder in args.fixtures:
        if not os.path.isfile(os.path.join(folder, "config.json")):
            print(
                f"bagel-titan-parity: error: {folder!r} is not a reference fixture folder (no config.json); "
                f"pass folders of the format of tests/fixtures/bagel_reference/seed0",
                file=sys.stderr,
            )
            return 2
    failed = False
    for folder in args.fixtures:
        diffs = compare_fixture(folder, backend)
        bad = [d for d in diffs if not d.ok]
        failed |= bool(bad)
        shown = (
            diffs if args.all else sorted(diffs, key=lambda d: d.value / d.tolerance, reverse=True)[:10] + bad
        )
        print(f"{folder}: {len(diffs)} tensors, {len(bad)} above tolerance")
        seen = set()
        for d in shown:
            if d.name in seen:
                continue
            seen.add(d.name)
            print(f"  {'FAIL' if not d.ok else 'ok  '} {d.kind:7s} {d.value:.3e}  {d.name}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
