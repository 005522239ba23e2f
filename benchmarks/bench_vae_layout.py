"""The frozen VAE's encode in its two memory layouts: contiguous (NCHW) against channels-last
(NHWC, `bagel_titan_plugins.bagel.vae.MEMORY_FORMAT`), per architecture, image size and dtype.

One image per encoder call (as training and `bagel-titan-encode-latents` call it), random
weights, no grad. The two layouts alternate call by call, so both share the machine's load; the
table gives the median time of each and their ratio, and the largest difference between the two
layouts' moments (the same math in another summation order).

    python benchmarks/bench_vae_layout.py                                  # tiny and full VAE, CPU
    python benchmarks/bench_vae_layout.py --device cuda --sizes 512x512,1024x1024 --dtypes bfloat16
"""

from __future__ import annotations

import argparse
import statistics
import time

from typing import TYPE_CHECKING

import torch

import common
from bench_anchor_step import anchor_architecture, load_config

if TYPE_CHECKING:
    from bagel_titan_plugins.bagel.vae import AutoEncoder

LAYOUTS = {"contiguous": torch.contiguous_format, "channels_last": torch.channels_last}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
HEADER = ["VAE", "image", "dtype", "contiguous ms", "channels-last ms", "speed-up", "max diff of moments"]


def time_encode(
    arch_name: str, size: tuple[int, int], dtype: torch.dtype, device: torch.device, calls: int
) -> dict[str, float]:
    from bagel_titan_plugins.bagel.vae import AutoEncoder

    torch.manual_seed(0)
    ae = AutoEncoder(anchor_architecture(load_config(), arch_name).vae).eval().requires_grad_(False)
    ae = ae.to(device=device, dtype=dtype)
    image = torch.randn(1, 3, *size, device=device, dtype=dtype)
    models = {name: _copy_in(ae, fmt) for name, fmt in LAYOUTS.items()}
    inputs = {name: image.contiguous(memory_format=fmt) for name, fmt in LAYOUTS.items()}
    times: dict[str, list[float]] = {name: [] for name in LAYOUTS}
    outputs: dict[str, torch.Tensor] = {}
    with torch.no_grad():
        for call in range(calls + 1):  # the first call of each layout is a warm-up
            for name in LAYOUTS:
                _sync(device)
                start = time.perf_counter()
                outputs[name] = models[name].moments(inputs[name])
                _sync(device)
                if call:
                    times[name].append(time.perf_counter() - start)
    result = {f"{name}_ms": statistics.median(t) * 1e3 for name, t in times.items()}
    result["max_diff"] = (outputs["contiguous"].float() - outputs["channels_last"].float()).abs().max().item()
    return result


def _copy_in(ae: AutoEncoder, fmt: torch.memory_format) -> AutoEncoder:
    import copy

    copied = copy.deepcopy(ae)
    copied.to(memory_format=fmt)  # type: ignore[call-overload]  # real, absent from torch's stubs
    return copied


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--vaes", default="tiny,full", help="tiny (the anchors') and/or full (FLUX's architecture)"
    )
    parser.add_argument("--sizes", default="192x256,256x256", help="image sizes HxW, comma-separated")
    parser.add_argument("--dtypes", default="float32,bfloat16")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--calls", type=int, default=3, help="timed calls per layout (after one warm-up)")
    parser.add_argument(
        "--threads", type=int, default=1, help="torch intra-op threads on CPU (0: torch's default)"
    )
    common.add_results_option(parser)
    args = parser.parse_args()
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    rows = []
    for vae in args.vaes.split(","):
        for size_text in args.sizes.split(","):
            h, w = (int(v) for v in size_text.split("x"))
            for dtype_name in args.dtypes.split(","):
                r = time_encode(vae, (h, w), DTYPES[dtype_name], device, args.calls)
                rows.append(
                    [
                        vae,
                        f"{h}x{w}",
                        dtype_name,
                        f"{r['contiguous_ms']:.1f}",
                        f"{r['channels_last_ms']:.1f}",
                        f"{r['contiguous_ms'] / r['channels_last_ms']:.2f}x",
                        f"{r['max_diff']:.1e}",
                    ]
                )
                print(common.markdown_table(HEADER, [rows[-1]]).splitlines()[-1], flush=True)
    table = common.markdown_table(HEADER, rows, "lll" + "r" * 4)
    print(table)
    notes = [
        "one image per encoder call, random weights, no grad; the layouts alternate call by call; "
        f"1 warm-up + {args.calls} timed calls each, medians",
        "tiny: the anchors' VAE (tiny_bagel.json); full: FLUX's architecture (ch 128, ch_mult 1,2,4,4)",
    ]
    common.append_section(args.results, "bench_vae_layout", common.device_description(device), notes, table)


if __name__ == "__main__":
    main()
