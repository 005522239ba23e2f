"""Metric sinks: the console line, TensorBoard event files and `metrics.jsonl`.

Every sink receives the same dict of numbers for a logged step, so the three never disagree.
"""

from __future__ import annotations

import json
import logging
import math
import os
from typing import Any

logger = logging.getLogger("bagel_titan")

# Order of the console line; anything else is appended alphabetically.
CONSOLE_ORDER = ("loss", "val/loss", "grad_norm", "lr", "tokens_per_s", "mfu_pct", "memory/max_reserved_gib")


def format_console(step: int, metrics: dict[str, float]) -> str:
    def fmt(key: str, value: float) -> str:
        if isinstance(value, float) and (abs(value) >= 1e4 or (0 < abs(value) < 1e-3)):
            return f"{key} {value:.3e}"
        if isinstance(value, float):
            return f"{key} {value:.4f}"
        return f"{key} {value}"

    keys = [k for k in CONSOLE_ORDER if k in metrics]
    keys += sorted(
        k for k in metrics if k not in CONSOLE_ORDER and k.startswith(("loss/", "val/loss/", "data/skipped"))
    )
    return f"step {step:>6}  " + "  ".join(fmt(k, metrics[k]) for k in keys)


def _truncate_after(path: str, step: int) -> None:
    """Keep the rows of `metrics.jsonl` up to `step` (atomically: a crash leaves old or new)."""
    if not os.path.exists(path):
        return
    kept, dropped = [], 0
    with open(path) as f:
        for line in f:
            try:
                row_step = json.loads(line).get("step", 0)
            except ValueError:  # a line cut short by a crash
                dropped += 1
                continue
            if row_step <= step:
                kept.append(line if line.endswith("\n") else line + "\n")
            else:
                dropped += 1
    if dropped:
        tmp = path + ".tmp"
        with open(tmp, "w") as f:
            f.writelines(kept)
        os.replace(tmp, path)
        logger.info(
            f"metrics.jsonl: dropped {dropped} rows after step {step} (the resumed run logs them again)"
        )


class MetricsLogger:
    """Writes logged steps to the console, TensorBoard and `<run>/metrics.jsonl` (rank 0 only).

    `metrics.jsonl` holds one JSON object per logged step; a non-finite value (NaN, inf) is
    written as `null` there (TensorBoard and the console keep the float).
    """

    def __init__(self, run_folder: str, enable_tensorboard: bool, is_rank0: bool, resumed_step: int = 0):
        """`resumed_step`: the step the run resumes after. Rows logged after it by an earlier
        attempt (steps the resumed run repeats) are dropped from `metrics.jsonl`, and
        TensorBoard purges them, so every step appears once."""
        self.is_rank0 = is_rank0
        self.jsonl = None
        self.tb = None
        if not is_rank0:
            return
        os.makedirs(run_folder, exist_ok=True)
        path = os.path.join(run_folder, "metrics.jsonl")
        _truncate_after(path, resumed_step)
        # Append: a resumed run continues the same file (its steps continue where it stopped).
        self.jsonl = open(path, "a", buffering=1)
        if enable_tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(
                os.path.join(run_folder, "tb"), purge_step=resumed_step + 1 if resumed_step else None
            )

    def log(self, step: int, metrics: dict[str, float]) -> None:
        if not self.is_rank0:
            return
        logger.info(format_console(step, metrics))
        record: dict[str, Any] = {"step": step}
        for key, value in metrics.items():
            # JSON has no NaN/Infinity: a non-finite value is written as null, which every JSON
            # reader accepts and no check mistakes for a number.
            record[key] = value if math.isfinite(value) else None
            if self.tb is not None:
                self.tb.add_scalar(key, value, step)
        if self.jsonl is not None:
            self.jsonl.write(json.dumps(record) + "\n")

    def log_text(self, tag: str, text: str, step: int) -> None:
        if self.is_rank0 and self.tb is not None:
            self.tb.add_text(tag, text, step)

    def log_image(self, tag: str, image_HWC: Any, step: int) -> None:
        if self.is_rank0 and self.tb is not None:
            self.tb.add_image(tag, image_HWC, step, dataformats="HWC")

    def close(self) -> None:
        if self.tb is not None:
            self.tb.flush()
            self.tb.close()
            self.tb = None
        if self.jsonl is not None:
            self.jsonl.close()
            self.jsonl = None
