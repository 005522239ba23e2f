"""Weighted mixing of several datasets for one shard (data-parallel rank x loader worker).

Deterministic: the k-th draw of shard s depends only on (seed, s, k), so the mixing state is a
counter. Every dataset restarts when its shard is exhausted (epochs repeat); its position
inside the current epoch is the whole reader state (readers skip `start` rows by metadata).

Shuffling keeps that property. Each epoch the reader visits its decoding units in a new
permutation (`ReadPass.shuffle`), and the stream is cut into windows of `shuffle_window`
consecutive samples, each permuted by a generator seeded with (seed, dataset, shard, epoch,
window). Position p of an epoch is therefore found again by re-reading only its window.
"""

from __future__ import annotations

import bisect
import itertools
import logging
import random
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

from bagel_titan.protocols import RawSample, ReadPass

logger = logging.getLogger(__name__)


@dataclass
class Source:
    """One dataset of the mixture, resolved: its reader and where its images live."""

    name: str
    path: str
    reader: Any
    weight: float
    data_folder: str = ""
    mandatory: bool = False
    """Release packing: one sample of this dataset starts every pack (`is_mandatory`)."""
    processor_options: dict[str, Any] = field(default_factory=dict)
    """Per-dataset processor overrides, handed to the processor with every sample."""

    def iter_shard(
        self, shard_index: int, num_shards: int, start: int, read_pass: ReadPass
    ) -> Iterator[RawSample]:
        for sample in self.reader.iter_samples(
            self.path, shard_index=shard_index, num_shards=num_shards, start=start, read_pass=read_pass
        ):
            sample.dataset = self.name
            sample.data_folder = sample.data_folder or self.data_folder
            sample.processor_options = self.processor_options
            yield sample


def window_shuffled(
    open_at: Callable[[int], Iterator[RawSample]],
    start: int,
    window: int,
    rng_for: Callable[[int], random.Random],
) -> Iterator[RawSample]:
    """The stream `open_at(0)` with each window of `window` consecutive samples permuted by
    `rng_for(window_index)`, from shuffled position `start` on (only that window is re-read)."""
    index, offset = divmod(start, window)
    stream = open_at(index * window)
    while chunk := list(itertools.islice(stream, window)):
        order = list(range(len(chunk)))
        rng_for(index).shuffle(order)
        for j in order[offset:]:
            yield chunk[j]
        index, offset = index + 1, 0


@dataclass(frozen=True)
class Drawn:
    """A raw sample and where it came from: (source, epoch, position in the shard's pass)."""

    source: int
    epoch: int
    position: int
    sample: RawSample

    @property
    def key(self) -> tuple[int, int, int]:
        return (self.source, self.epoch, self.position)


class MixtureStream:
    """Endless (or one-pass) weighted stream over the sources of one shard, with exact state."""

    def __init__(
        self,
        sources: list[Source],
        *,
        shard_index: int,
        num_shards: int,
        seed: int,
        infinite: bool,
        shuffle: bool = False,
        shuffle_window: int = 1,
    ):
        if not sources:
            raise ValueError("the dataset mixture is empty; add at least one [[data.datasets]] entry")
        total = sum(s.weight for s in sources)
        if any(s.weight < 0 for s in sources) or total <= 0:
            raise ValueError(
                f"dataset weights must be >= 0 with a positive sum, got "
                f"{[(s.name, s.weight) for s in sources]}"
            )
        self.sources = sources
        self.shard_index = shard_index
        self.num_shards = num_shards
        self.seed = seed
        self.infinite = infinite
        self.shuffle = shuffle
        self.shuffle_window = shuffle_window if shuffle else 1
        running = 0.0
        self.cumulative = []
        for s in sources:
            running += s.weight / total
            self.cumulative.append(running)
        self.draws = 0
        self.epochs = [0] * len(sources)
        self.positions = [0] * len(sources)
        self.current = 0  # one-pass mode: the source being read
        self.whole_from: list[int | None] = [None] * len(sources)
        """Per source: the epoch from which this shard reads the whole dataset, because its own
        part holds no usable sample (a small dataset over many ranks x workers); None: its part."""
        self._iters: list[Iterator[RawSample] | None] = [None] * len(sources)

    def _choose(self) -> int:
        u = random.Random(f"{self.seed}:{self.shard_index}:{self.draws}").random()
        self.draws += 1
        return min(bisect.bisect_right(self.cumulative, u), len(self.sources) - 1)

    def _read(self, i: int, epoch: int, start: int) -> Iterator[RawSample]:
        """Source `i`'s samples of `epoch` in this run's order, from position `start`."""
        source = self.sources[i]
        read_pass = ReadPass(epoch=epoch, seed=self.seed, shuffle=self.shuffle)

        whole_from = self.whole_from[i]
        whole = whole_from is not None and epoch >= whole_from
        shard, shards = (0, 1) if whole else (self.shard_index, self.num_shards)

        def open_at(first: int) -> Iterator[RawSample]:
            return source.iter_shard(shard, shards, first, read_pass)

        if self.shuffle_window == 1:
            return open_at(start)
        return window_shuffled(
            open_at,
            start,
            self.shuffle_window,
            lambda w: read_pass.rng("window", source.name, self.shard_index, self.num_shards, w),
        )

    def _next_of(self, i: int) -> RawSample | None:
        samples = self._iters[i]
        if samples is None:
            samples = self._iters[i] = self._read(i, self.epochs[i], self.positions[i])
        return next(samples, None)

    def __iter__(self) -> "MixtureStream":
        return self

    def __next__(self) -> Drawn:
        if not self.infinite:
            while self.current < len(self.sources):
                i = self.current
                sample = self._next_of(i)
                if sample is not None:
                    drawn = Drawn(i, 0, self.positions[i], sample)
                    self.positions[i] += 1
                    return drawn
                self.current += 1
            raise StopIteration
        return self.draw_from(self._choose())

    def draw_from(self, i: int) -> Drawn:
        """The next sample of source `i` (endless mode), without a weighted draw."""
        sample = self._next_of(i)
        if sample is None:  # end of this shard's pass: next epoch
            if self.positions[i] == 0:
                whole_from = self.whole_from[i]
                if whole_from is not None and self.epochs[i] >= whole_from:
                    raise ValueError(
                        f"dataset {self.sources[i].name!r} has no samples; fix `path` or drop it"
                    )
                self.read_whole_from_next_epoch(i)
            else:
                self._next_epoch(i)
            sample = self._next_of(i)
            if sample is None:  # a new pass that yields nothing: say so, not crash on a None sample
                raise ValueError(
                    f"dataset {self.sources[i].name!r} has no samples for this shard in epoch "
                    f"{self.epochs[i]}; fix `path` or drop it"
                )
        drawn = Drawn(i, self.epochs[i], self.positions[i], sample)
        self.positions[i] += 1
        return drawn

    def _next_epoch(self, i: int) -> None:
        self.epochs[i] += 1
        self.positions[i] = 0
        self._iters[i] = None

    def read_whole_from_next_epoch(self, i: int) -> None:
        """This shard's part of source `i` has no usable sample: from the next epoch on it reads
        the whole dataset (in its own window order), so the run goes on whenever the dataset as a
        whole has usable samples (the loader checks that once, at build time)."""
        if self.whole_from[i] is None:
            logger.warning(
                "dataset %r: shard %d of %d (data-parallel ranks x loader workers) holds no usable sample; "
                "this shard reads the whole dataset instead",
                self.sources[i].name,
                self.shard_index,
                self.num_shards,
            )
        self.whole_from[i] = self.epochs[i] + 1
        self._next_epoch(i)

    def fetch(self, keys: list[tuple[int, int, int]]) -> dict[tuple[int, int, int], RawSample]:
        """Re-read the samples at `keys` (to rebuild a restored packing buffer), one pass per source."""
        found: dict[tuple[int, int, int], RawSample] = {}
        by_pass: dict[tuple[int, int], list[tuple[int, int, int]]] = {}
        for key in keys:
            by_pass.setdefault((key[0], key[1]), []).append(key)
        for (i, epoch), wanted in by_pass.items():
            wanted.sort(key=lambda k: k[2])
            first = wanted[0][2]
            stream = self._read(i, epoch, first)
            position, sample = first, next(stream, None)
            for key in wanted:
                while position < key[2]:
                    position, sample = position + 1, next(stream, None)
                if sample is None:
                    raise RuntimeError(
                        f"cannot re-read sample {key} of dataset {self.sources[i].name!r} "
                        f"while resuming: the dataset changed since the checkpoint"
                    )
                found[key] = sample
        return found

    def state_dict(self) -> dict[str, Any]:
        return {
            "draws": self.draws,
            "epochs": list(self.epochs),
            "positions": list(self.positions),
            "current": self.current,
            "names": [s.name for s in self.sources],
            "order": self._order(),
            "whole_from": list(self.whole_from),
        }

    def _order(self) -> dict[str, Any]:
        return {"shuffle": self.shuffle, "shuffle_window": self.shuffle_window}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        names = [s.name for s in self.sources]
        if list(state["names"]) != names:
            raise ValueError(
                f"the checkpoint's data mixture {list(state['names'])} differs from the "
                f"configured one {names}; resume with the same [[data.datasets]]"
            )
        order = state.get("order", {"shuffle": False, "shuffle_window": 1})
        if order != self._order():
            wanted = (
                f"shuffle = true, shuffle_window = {order['shuffle_window']}"
                if order["shuffle"]
                else "shuffle = false"
            )
            raise ValueError(
                f"the checkpoint's data was read in the order {order} but this run is "
                f"configured with {self._order()}, so its positions would name other "
                f"samples; resume with [data] {wanted}"
            )
        self.draws = int(state["draws"])
        self.epochs = [int(e) for e in state["epochs"]]
        self.positions = [int(p) for p in state["positions"]]
        self.current = int(state["current"])
        self.whole_from = [None if w is None else int(w) for w in state.get("whole_from", self.whole_from)]
        self._iters = [None] * len(self.sources)
