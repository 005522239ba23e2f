"""The per-shard pipeline: mixture -> processor -> oversize policy -> packer -> collator.

`PackedIterable` is the torch IterableDataset each loader worker runs; its `state_dict()` is
the worker's exact position (mixing counter, reader positions, packer buffer, ready packs), so
that torchdata's StatefulDataLoader can resume it batch for batch. Buffered samples are not
stored: their keys are, and they are re-read and re-processed on resume (the processor is a
deterministic function of the raw sample).
"""

from __future__ import annotations

import traceback
from collections import Counter
from dataclasses import dataclass
from typing import Any, Iterator

from torch.utils.data import IterableDataset, get_worker_info

from bagel_titan.protocols import Collator, PackingStrategy, ProcessedSample, Processor

from .bad_samples import BadSampleCounter, BadSampleError, as_bad_record
from .handoff import FlatBatch
from .mixture import Drawn, MixtureStream, Source


@dataclass
class PipelineOptions:
    """The `[data]` settings one shard's pipeline needs."""

    packing_length: int
    strategy: PackingStrategy
    """A registered PackingStrategy."""
    window: int
    packer_options: dict[str, Any]
    """Strategy-specific options besides the window (release packing: its config, the indices
    of the mandatory sources)."""
    max_sample_tokens: int
    """Longest sample kept (`packing_length`, or the release's max_num_tokens_per_sample)."""
    max_sample_key: str
    """The setting that sets `max_sample_tokens`, for the skip reason."""
    oversize_policy: str
    seed: int
    infinite: bool
    shuffle: bool
    shuffle_window: int


@dataclass
class WorkerOutput:
    """What a worker sends per pack: the batch, and the counters that changed while building it."""

    batch: Any
    stats: dict[str, int]


def _as_key(key: Any) -> tuple[int, int, int]:
    source, epoch, position = key
    return int(source), int(epoch), int(position)


class PackedIterable(IterableDataset):
    """Packed batches of one data-parallel rank; each loader worker runs one shard of it."""

    def __init__(
        self,
        sources: list[Source],
        processor: Processor,
        collator: Collator[Any],
        options: PipelineOptions,
        *,
        dp_rank: int,
        dp_world_size: int,
    ):
        super().__init__()
        self.sources = sources
        self.processor = processor
        self.collator = collator
        self.options = options
        self.dp_rank = dp_rank
        self.dp_world_size = dp_world_size
        self._restore: dict[str, Any] | None = None
        self._live: _ShardRun | None = None

    def _shard(self) -> tuple[int, int]:
        info = get_worker_info()
        worker, workers = (0, 1) if info is None else (info.id, info.num_workers)
        return self.dp_rank * workers + worker, self.dp_world_size * workers

    def __iter__(self) -> Iterator[WorkerOutput]:
        shard_index, num_shards = self._shard()
        run = _ShardRun(self, shard_index, num_shards)
        if self._restore is not None:
            run.load_state_dict(self._restore)
            self._restore = None
        self._live = run
        return iter(run)

    def state_dict(self) -> dict[str, Any]:
        if self._live is None:
            return dict(self._restore) if self._restore is not None else {}
        return self._live.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._restore = state if state else None
        self._live = None


class _ShardRun:
    """One shard's live iteration (mixture position, packer, buffered samples, ready packs)."""

    def __init__(self, owner: PackedIterable, shard_index: int, num_shards: int):
        o = owner.options
        self.owner = owner
        self.mixture = MixtureStream(
            owner.sources,
            shard_index=shard_index,
            num_shards=num_shards,
            seed=o.seed,
            infinite=o.infinite,
            shuffle=o.shuffle,
            shuffle_window=o.shuffle_window,
        )
        self.packer = o.strategy.new_packer(o.packing_length, {"window": o.window, **o.packer_options})
        self.samples: dict[tuple[int, int, int], ProcessedSample] = {}
        self.ready: list[list[tuple[int, int, int]]] = []
        self.bad = BadSampleCounter()
        self.pending_stats: Counter[str] = Counter()
        self.finished = False
        # Per source: the epoch being read and whether it yielded a usable sample yet (a source
        # whose whole shard is bad would otherwise spin forever in an endless run).
        self.epoch_seen: dict[int, int] = {}
        self.epoch_good: dict[int, bool] = {}

    def _check_progress(self, drawn: Drawn) -> bool:
        """False when `drawn` starts a new pass of a source whose previous pass over this shard
        gave no usable sample: the shard then reads the whole dataset from the next epoch on
        (`drawn` is dropped). Whether a dataset has usable samples at all is decided over the
        whole dataset, once, by the loader (`check_usable`), so every shard agrees."""
        source = drawn.source
        if self.epoch_seen.get(source, drawn.epoch) != drawn.epoch and not self.epoch_good.get(source, True):
            whole_from = self.mixture.whole_from[source]
            if whole_from is not None and self.epoch_seen[source] >= whole_from:
                raise ValueError(
                    f"dataset {drawn.sample.dataset!r}: a whole pass over it gave no usable sample "
                    f"(skipped so far: {dict(self.bad.counts)}); fix the data or drop the dataset"
                )
            self.mixture.read_whole_from_next_epoch(source)
            self.epoch_seen[source] = self.mixture.epochs[source]
            self.epoch_good[source] = False
            return False
        if self.epoch_seen.get(source) != drawn.epoch:
            self.epoch_seen[source] = drawn.epoch
            self.epoch_good[source] = False
        return True

    # -- one sample ---------------------------------------------------------------------------
    def _skip(self, error: BadSampleError, drawn: Drawn) -> None:
        self.bad.record(error, drawn.sample.dataset, drawn.sample.index)
        self.pending_stats[f"skipped/{error.reason}"] += 1

    def _process(self, drawn: Drawn) -> ProcessedSample | None:
        """The processed sample, or None (counted) when the record is bad."""
        bad = as_bad_record(drawn.sample.data)
        if bad is not None:
            self._skip(bad, drawn)
            return None
        drawn.sample.epoch = drawn.epoch
        try:
            sample = self.owner.processor(drawn.sample)
        except BadSampleError as error:
            self._skip(error, drawn)
            return None
        except Exception as exc:  # never crash the run on one sample
            self._skip(
                BadSampleError("processor_error", f"{type(exc).__name__}: {exc}\n{traceback.format_exc()}"),
                drawn,
            )
            return None
        o = self.owner.options
        if sample.num_tokens > o.max_sample_tokens:
            truncated = None
            if o.oversize_policy == "truncate":
                truncated = sample.truncated(o.max_sample_tokens)
            if truncated is None:
                self._skip(
                    BadSampleError(
                        "oversize",
                        f"{sample.num_tokens} tokens > {o.max_sample_key} "
                        f"{o.max_sample_tokens} (oversize_policy = {o.oversize_policy!r})",
                    ),
                    drawn,
                )
                return None
            self.pending_stats["truncated"] += 1
            sample = truncated
        return sample

    # -- iteration ----------------------------------------------------------------------------
    def _emit(self) -> WorkerOutput:
        keys = self.ready.pop(0)
        batch = self.owner.collator([self.samples.pop(k) for k in keys])
        # in a loader worker: one buffer, not one segment per tensor
        sent = FlatBatch.pack(batch) if get_worker_info() is not None else batch
        stats = dict(self.pending_stats)
        self.pending_stats = Counter()
        return WorkerOutput(sent, stats)

    def __iter__(self) -> Iterator[WorkerOutput]:
        while True:
            if self.ready:
                yield self._emit()
                continue
            if self.finished:
                return
            # Release packing starts each pack with one sample of every mandatory dataset.
            wanted = self.packer.wanted_source()
            drawn = next(self.mixture, None) if wanted is None else self.mixture.draw_from(wanted)
            if drawn is None:
                self.ready.extend([_as_key(k) for k in pack] for pack in self.packer.flush())
                self.finished = True
                continue
            if not self._check_progress(drawn):
                continue
            sample = self._process(drawn)
            if sample is None:
                continue
            self.epoch_good[drawn.source] = True
            self.samples[drawn.key] = sample
            self.ready.extend(
                [_as_key(k) for k in pack] for pack in self.packer.add(drawn.key, sample.num_tokens)
            )

    # -- state --------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {
            "mixture": self.mixture.state_dict(),
            "packer": self.packer.state_dict(),
            "buffered": [list(k) for k in self.samples],
            "ready": [[list(k) for k in pack] for pack in self.ready],
            "pending_stats": dict(self.pending_stats),
            "finished": self.finished,
            # Whether each source's current pass gave a usable sample yet: it decides when a shard
            # switches to reading the whole dataset, so a resumed run must switch at the same draw.
            "progress": [
                [source, epoch, self.epoch_good.get(source, False)]
                for source, epoch in sorted(self.epoch_seen.items())
            ],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.mixture.load_state_dict(state["mixture"])
        self.packer.load_state_dict(state["packer"])
        self.ready = [[_as_key(k) for k in pack] for pack in state["ready"]]
        self.pending_stats = Counter(state["pending_stats"])
        self.finished = bool(state["finished"])
        self.epoch_seen = {int(source): int(epoch) for source, epoch, _ in state["progress"]}
        self.epoch_good = {int(source): bool(good) for source, _, good in state["progress"]}
        keys = [_as_key(k) for k in state["buffered"]]
        raw = self.mixture.fetch(keys)
        self.samples = {}
        for key in keys:
            sample = self._process(Drawn(key[0], key[1], key[2], raw[key]))
            if sample is None:
                raise RuntimeError(
                    f"sample {key} was buffered at the checkpoint but is now skipped: "
                    f"the data or the processor changed since the checkpoint"
                )
            self.samples[key] = sample
