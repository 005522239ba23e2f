"""`[profiling]`: a few training steps recorded with `torch.profiler`.

The trainer calls `step()` after every step; the profiler records the configured steps, then
writes a Chrome trace and a table of the ops that took the most time (self time on the GPU when
one is used, on the CPU otherwise) and stops. The trainer and the model mark their phases with
`torch.profiler.record_function`, so the trace shows data / forward / loss / backward / optimizer
and the model's own parts.
"""

from __future__ import annotations

import logging
import os

import torch
from torch.autograd import DeviceType
from torch.autograd.profiler_util import EventList
from torch.profiler import ProfilerActivity, profile, schedule

from bagel_titan.config.job_config import Profiling

logger = logging.getLogger(__name__)

SUMMARY_ROWS = 40


def phase_table(averages: EventList) -> str:
    """The named ranges (`record_function`, `ProfilerStep*`): calls, CPU and device time in ms."""
    rows = [e for e in averages if e.is_user_annotation]
    rows.sort(key=lambda e: -max(e.cpu_time_total, e.device_time_total))
    lines = [f"{'range':<40} {'calls':>6} {'CPU total ms':>13} {'device total ms':>16}"]
    for e in rows:
        lines.append(
            f"{e.key:<40} {e.count:>6} {e.cpu_time_total / 1e3:>13.2f} {e.device_time_total / 1e3:>16.2f}"
        )
    return "\n".join(lines)


def busy_line(prof: profile, device: torch.device, recorded: int) -> str:
    """Wall time of a recorded step and, on a GPU, how much of it the device spent in kernels and
    copies (a low share: the step waits on the host, not on the GPU) and the allocator's retries.
    Only the first `recorded` step ranges count (a run that ends early leaves its tail in one more)."""
    events = prof.events()
    steps = sorted((e for e in events if e.name.startswith("ProfilerStep")), key=lambda e: e.time_range.start)
    steps = steps[:recorded]
    if not steps:
        return "no complete step recorded"
    start, end = steps[0].time_range.start, steps[-1].time_range.end
    wall_us = (end - start) / len(steps)
    line = f"{len(steps)} step(s) recorded: {wall_us / 1e3:.1f} ms of wall time a step"
    if device.type != "cuda":
        return line
    busy_us = sum(
        e.time_range.elapsed_us()
        for e in events
        if e.device_type == DeviceType.CUDA and start <= e.time_range.start < end
    ) / len(steps)
    stats = torch.cuda.memory_stats(device)
    return (
        f"{line}; GPU busy (kernels and copies) {busy_us / 1e3:.1f} ms a step, "
        f"{100 * busy_us / max(wall_us, 1e-9):.0f}% of it; allocator: {stats.get('num_alloc_retries', 0)} "
        f"retries, {stats.get('num_device_alloc', 0)} device allocations so far"
    )


class StepProfiler:
    """Records steps `start_step` .. `start_step + steps - 1` of the run, the step before them
    warming the profiler up (a run resumed past that point records the steps after its first)."""

    def __init__(self, cfg: Profiling, run_folder: str, rank: int, device: torch.device, first_step: int):
        self.folder = os.path.join(run_folder, cfg.folder, f"rank{rank}")
        self.device = device
        first_active = max(cfg.start_step, first_step + 2)  # after at least one warm-up step
        self.first_active, self.last_step = first_active, first_active + cfg.steps - 1
        activities = [ProfilerActivity.CPU]
        if device.type == "cuda":
            activities.append(ProfilerActivity.CUDA)
        # The profiler's step k covers the run's step first_step + 1 + k (`step()` is called after
        # each training step): skip up to the warm-up step, warm up for one, record `steps`.
        self._profile = profile(
            activities=activities,
            schedule=schedule(
                skip_first=first_active - first_step - 2, wait=0, warmup=1, active=cfg.steps, repeat=1
            ),
            on_trace_ready=self._write,
            record_shapes=True,
        )
        self._profile.start()
        self._running = True
        self._written = False
        self._last_seen = first_step

    def step(self, step: int) -> None:
        """Called after training step `step`."""
        if not self._running:
            return
        self._last_seen = step
        self._profile.step()
        if step >= self.last_step:
            self.stop()

    def stop(self) -> None:
        if self._running:
            self._running = False
            self._profile.stop()
            if not self._written:
                logger.warning(
                    f"profiler: the run ended at step {self._last_seen}, before the first step to "
                    f"record; nothing written (lower [profiling] start_step or raise [training] steps)"
                )

    def _write(self, prof: profile) -> None:
        last = min(self.last_step, self._last_seen)  # a run that ends early writes what it recorded
        recorded = last - self.first_active + 1
        if recorded < 1:  # stopped before the first step to record: only the run's tail was traced
            return
        os.makedirs(self.folder, exist_ok=True)
        trace = os.path.join(self.folder, f"trace_step{last}.json")
        prof.export_chrome_trace(trace)
        averages = prof.key_averages()
        sort_by = "self_device_time_total" if self.device.type == "cuda" else "self_cpu_time_total"
        table = averages.table(sort_by=sort_by, row_limit=SUMMARY_ROWS)
        summary = os.path.join(self.folder, f"summary_step{last}.txt")
        with open(summary, "w") as f:
            f.write(busy_line(prof, self.device, recorded) + "\n\n")
            f.write(f"ops by {sort_by.replace('_', ' ')}, steps up to {last}\n{table}\n")
            f.write(f"\nnamed ranges (the trainer's phases and the model's parts)\n{phase_table(averages)}\n")
        self._written = True
        logger.info(f"profiler: wrote {trace} and {summary}")


def build_profiler(
    cfg: Profiling, run_folder: str, rank: int, device: torch.device, first_step: int
) -> StepProfiler | None:
    return StepProfiler(cfg, run_folder, rank, device, first_step) if cfg.enable else None
