"""Bad-sample accounting: skip, count per reason, log the first few in full; never crash.

Readers cannot raise from inside a generator without ending it, so a reader that meets an
unreadable record yields a `RawSample` whose data is `bad_record(reason, detail)`; the processor
raises `BadSampleError` for records it cannot turn into a sample. The loader turns both into a
count in `BadSampleCounter` (exported as ``data/skipped/<reason>`` by `data_stats()`).
"""

from __future__ import annotations

import logging
from collections import Counter
from typing import Any

from bagel_titan.errors import UserError

logger = logging.getLogger(__name__)

BAD_RECORD_KEY = "__bad_record__"

# The skip reasons (bad_json, image_missing, oversize, ...) are listed in docs/data.md.


class DataError(UserError, ValueError):
    """A dataset the run cannot use: a missing path, no readable file, no usable sample."""


class DataPathError(DataError, FileNotFoundError):
    """A dataset path that does not exist, or a folder without data files."""


class BadSampleError(Exception):
    """A record that cannot become a training sample; `reason` is the counter it increments."""

    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


def bad_record(reason: str, detail: str) -> dict[str, Any]:
    """The `RawSample.data` a reader yields for a record it could not read."""
    return {BAD_RECORD_KEY: {"reason": reason, "detail": detail}}


def as_bad_record(data: dict[str, Any]) -> BadSampleError | None:
    """The error a reader recorded in `data`, or None for a good record."""
    bad = data.get(BAD_RECORD_KEY) if isinstance(data, dict) else None
    return None if bad is None else BadSampleError(bad["reason"], bad["detail"])


class BadSampleCounter:
    """Exact per-reason counts, plus a log line per bad sample (the first `log_first` in full)."""

    def __init__(self, log_first: int = 5):
        self.counts: Counter[str] = Counter()
        self.log_first = log_first

    def record(self, error: BadSampleError, dataset: str, index: int) -> None:
        self.counts[error.reason] += 1
        total = sum(self.counts.values())
        if total <= self.log_first:
            logger.warning("skipped bad sample %s[%d] (%s): %s", dataset, index, error.reason, error.detail)
        elif total == self.log_first + 1:
            logger.warning(
                "skipped bad sample %s[%d] (%s); further bad samples are only counted "
                "(see data/skipped/* in the metrics)",
                dataset,
                index,
                error.reason,
            )

    def merge(self, counts: dict[str, int]) -> None:
        self.counts.update(counts)

    def state_dict(self) -> dict[str, int]:
        return dict(self.counts)

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.counts = Counter({k: int(v) for k, v in state.items()})
