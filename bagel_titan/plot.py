"""`bagel-titan-plot RUN_FOLDER`: the loss curves of a run, from its `metrics.jsonl`, as `loss.png`.

One panel per loss series the run logged (`loss`, then every `loss/<component>`), against the
step: the logged values (thin) and their exponential moving average (thick), with the
validation loss of the same series (`val/loss`, `val/loss/<component>`) as points when the run
validated. Needs matplotlib (`pip install 'bagel-titan[plot]'`).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from typing import Sequence

from bagel_titan.errors import UserError

SMOOTHING = 0.6
"""Weight of the past in the moving average drawn over the logged values (one per `log_freq`
steps, so lighter than TensorBoard's per-step 0.9)."""


def read_metrics(path: str) -> list[dict]:
    """The records of a `metrics.jsonl` (a torn last line from a crash is ignored)."""
    if not os.path.isfile(path):
        raise UserError(
            f"{path!r} does not exist: pass a run folder (<job.dump_folder>/<job.run_name>) "
            f"that has logged at least one step"
        )
    records = []
    with open(path) as f:
        for line in f:
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return records


def loss_series(records: list[dict]) -> dict[str, dict[str, list[tuple[int, float]]]]:
    """{series: {"train": [(step, value)], "val": [(step, value)]}} for `loss` and every
    `loss/<component>` (train) with their `val/`-prefixed counterparts; finite values only (a
    component's exact 0.0, a batch without its tokens, left out), a step logged twice (a resumed
    run) keeps its last value."""
    series: dict[str, dict[str, dict[int, float]]] = {}
    for record in records:
        step = record.get("step")
        if not isinstance(step, int):
            continue
        for key, value in record.items():
            split, name = ("val", key[4:]) if key.startswith("val/") else ("train", key)
            if (
                not (name == "loss" or name.startswith("loss/"))
                or not isinstance(value, (int, float))
                or not math.isfinite(value)
            ):
                continue
            if name != "loss" and value == 0.0:  # a step whose batch had no token of this component
                continue
            series.setdefault(name, {"train": {}, "val": {}})[split][step] = float(value)
    ordered = sorted(series, key=lambda name: (name != "loss", name))
    return {
        name: {split: sorted(points.items()) for split, points in series[name].items()} for name in ordered
    }


def smoothed(values: list[float], weight: float = SMOOTHING) -> list[float]:
    """Bias-corrected exponential moving average (as TensorBoard draws it)."""
    out, average = [], 0.0
    for i, value in enumerate(values):
        average = weight * average + (1 - weight) * value
        out.append(average / (1 - weight ** (i + 1)))
    return out


def plot_run(run_folder: str, out: str | None = None) -> str:
    """Write the loss curves of `run_folder` to `out` (default `<run_folder>/loss.png`); return
    its path."""
    series = loss_series(read_metrics(os.path.join(run_folder, "metrics.jsonl")))
    if not series:
        raise UserError(f"{run_folder}/metrics.jsonl has no loss values yet")
    try:
        import matplotlib
    except ImportError:
        raise UserError(
            "matplotlib is not installed: pip install 'bagel-titan[plot]' (or pip install matplotlib)"
        ) from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(series), figsize=(4 * len(series), 3.2), squeeze=False)
    for ax, (name, splits) in zip(axes[0], series.items()):
        if splits["train"]:
            steps, values = zip(*splits["train"])
            ax.plot(steps, values, color="tab:blue", alpha=0.3, linewidth=0.8)
            ax.plot(steps, smoothed(list(values)), color="tab:blue", linewidth=1.8, label="train")
        if splits["val"]:
            steps, values = zip(*splits["val"])
            ax.plot(steps, values, "o-", color="tab:orange", markersize=4, label="validation")
        positive = all(v > 0 for split in splits.values() for _, v in split)
        ax.set_yscale("log" if positive else "linear")
        ax.set_title(name)
        ax.set_xlabel("step")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(os.path.basename(os.path.normpath(run_folder)), fontsize=10)
    fig.tight_layout()
    out = out or os.path.join(run_folder, "loss.png")
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bagel-titan-plot", description=__doc__.splitlines()[0])
    parser.add_argument(
        "run_folder", help="a run folder (<job.dump_folder>/<job.run_name>) with metrics.jsonl"
    )
    parser.add_argument("--out", help="image path (default: RUN_FOLDER/loss.png)")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    try:
        print(f"wrote {plot_run(args.run_folder, args.out)}")
    except UserError as exc:
        print(f"bagel-titan-plot: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
