"""The "packed" dataloader: reader -> processor -> packing strategy -> collator, stateful.

Built on torchdata's `StatefulDataLoader`: each worker runs one shard of `PackedIterable`
(shard = dp_rank * num_workers + worker), and the loader's `state_dict()` holds every worker's
exact position plus the round-robin cursor, so a resumed run yields exactly the batches an
uninterrupted one would have. Bad-sample counters travel with each batch from its worker and
are summed here (`data_stats()`), so they are exact and part of the checkpoint. A worker's batch
arrives as one shared-memory buffer (`handoff.FlatBatch`), unpacked here.
"""

from __future__ import annotations

import atexit
import os
import signal
import weakref
from collections import Counter
from typing import TYPE_CHECKING, Any, Iterator, Sequence

from torchdata.stateful_dataloader import StatefulDataLoader

from bagel_titan.config.fields import ConfigError
from bagel_titan.config.job_config import DatasetEntry, JobConfig

from bagel_titan.protocols import ModelSpec, Processor, ReadPass

from .bad_samples import BadSampleError, DataError, DataPathError, as_bad_record
from .handoff import FlatBatch
from .mixture import Source
from .packing import ReleasePackingConfig
from .pipeline import PackedIterable, PipelineOptions, WorkerOutput


if TYPE_CHECKING:
    from bagel_titan.plugins import PluginManager


def _identity(item: Any) -> Any:
    return item


def _close_if_alive(ref: "weakref.ref[PackedDataloader]") -> None:
    loader = ref()
    if loader is not None:
        loader.close()


def _ignore_stop_signals(worker_id: int) -> None:
    """Loader workers ignore SIGTERM and SIGINT: a launcher or a scheduler (`timeout`, `scancel`,
    torchrun, Ctrl-C) signals the whole process group, and the main process decides to write a
    stop checkpoint, which needs the workers alive. They still end with the main process."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def resolve_sources(
    entries: Sequence[DatasetEntry],
    plugins: PluginManager,
    weight: float = 1.0,
    mandatory: bool = False,
    processor: dict[str, Any] | None = None,
) -> list[Source]:
    """Config entries -> sources, yaml mixtures expanded, every path and format checked now."""
    sources: list[Source] = []
    for i, entry in enumerate(entries):
        if not entry.path:
            raise DataError(
                f"[[data.datasets]] entry {i} has no `path`; set it to a file, a folder "
                f"or a .yaml list of datasets"
            )
        reader = (
            plugins.dataset_readers.get(entry.format) if entry.format else plugins.reader_for_path(entry.path)
        )
        if not os.path.exists(entry.path):
            raise DataPathError(
                f"dataset path {entry.path!r} ([[data.datasets]] entry {i}) does not "
                f"exist; fix `path` (relative paths resolve against {os.getcwd()!r})"
            )
        listed = reader.expand(entry.path)
        if listed is not None:
            sources.extend(
                resolve_sources(
                    listed,
                    plugins,
                    weight * entry.weight,
                    mandatory or entry.is_mandatory,
                    {**(processor or {}), **entry.processor},
                )
            )
            continue
        name = entry.name or entry.path
        first = reader.iter_samples(entry.path, shard_index=0, num_shards=1, start=0, read_pass=ReadPass())
        if next(iter(first), None) is None:
            raise DataError(
                f"dataset {name!r} ([[data.datasets]] entry {i}, format {reader.format!r}) "
                f"holds no samples; fix `path` or remove the entry"
            )
        if any(s.name == name for s in sources):
            raise DataError(f"two datasets are named {name!r}; give them distinct `name`s")
        sources.append(
            Source(
                name,
                entry.path,
                reader,
                weight * entry.weight,
                entry.data_folder,
                mandatory or entry.is_mandatory,
                {**(processor or {}), **entry.processor},
            )
        )
    if not sources:
        raise DataError("no datasets configured; add [[data.datasets]] entries with a `path`")
    return sources


def check_usable(sources: Sequence[Source], processor: Processor) -> None:
    """Raise `DataError` for a dataset with no usable sample at all, decided over the whole
    dataset (not per shard, so the answer does not depend on ranks x workers). Reads until the
    first usable sample: usually the first one."""
    for source in sources:
        skipped: Counter[str] = Counter()
        for raw in source.iter_shard(0, 1, 0, ReadPass()):
            bad = as_bad_record(raw.data)
            if bad is None:
                try:
                    processor(raw)
                    break
                except BadSampleError as error:
                    bad = error
                except Exception as exc:  # counted like the pipeline counts it
                    bad = BadSampleError("processor_error", f"{type(exc).__name__}: {exc}")
            skipped[bad.reason] += 1
        else:
            raise DataError(
                f"dataset {source.name!r} has no usable sample: all {sum(skipped.values())} records "
                f"were skipped ({dict(skipped)}); fix the data (the reasons are logged) or drop it"
            )


class PackedDataloader:
    """An endless (or one-pass) stateful iterator of packed batches for one data-parallel rank."""

    def __init__(
        self, dataset: PackedIterable, *, num_workers: int, prefetch_factor: int, packing_length: int
    ):
        self.dataset = dataset
        self.packing_length = packing_length
        self.layout = {
            "num_workers": num_workers,
            "dp_world_size": dataset.dp_world_size,
            "dp_rank": dataset.dp_rank,
        }
        kwargs: dict[str, Any] = {}
        if num_workers > 0:
            kwargs = {
                "prefetch_factor": prefetch_factor,
                "persistent_workers": False,
                "worker_init_fn": _ignore_stop_signals,
            }
        self.loader = StatefulDataLoader(
            dataset, batch_size=None, num_workers=num_workers, collate_fn=_identity, **kwargs
        )
        self.stats: Counter[str] = Counter()
        self._iterators: weakref.WeakSet[Any] = weakref.WeakSet()
        if num_workers > 0:
            atexit.register(_close_if_alive, weakref.ref(self))

    def close(self) -> None:
        """Stop the loader workers of every pass over this loader that is still open. They ignore
        SIGTERM, so the interpreter's exit, which terminates daemonic children with SIGTERM and
        then waits for them, must not meet them."""
        for iterator in list(self._iterators):
            if not hasattr(iterator, "_shutdown_workers"):
                continue
            iterator._shutdown_workers()  # asks the workers to finish, waits a moment for them
            for worker in getattr(iterator, "_workers", []):
                if worker.is_alive():
                    worker.kill()
                    worker.join()
        self._iterators.clear()

    def __iter__(self) -> Iterator[Any]:
        iterator = iter(self.loader)
        self._iterators.add(iterator)  # a new pass does not end an earlier one: close() ends all
        for output in iterator:
            assert isinstance(output, WorkerOutput)
            batch = output.batch
            if isinstance(batch, FlatBatch):
                batch = batch.unpack()
            self.stats.update(output.stats)
            self.stats["packs"] += 1
            self.stats["samples"] += batch.num_samples
            self.stats["tokens"] += batch.num_tokens
            yield batch

    def state_dict(self) -> dict[str, Any]:
        return {"loader": self.loader.state_dict(), "stats": dict(self.stats), "layout": dict(self.layout)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        saved = state.get("layout", self.layout)
        if saved != self.layout:
            raise ValueError(
                f"the data loader state was saved with {saved} but this run has {self.layout}; "
                f"exact resume needs the same data-parallel size and [data] num_workers"
            )
        self.loader.load_state_dict(state["loader"])
        self.stats = Counter({k: int(v) for k, v in state["stats"].items()})

    def data_stats(self) -> dict[str, float]:
        """Cumulative counters: data/samples, data/tokens, data/packs, data/fill_rate (real tokens
        over packs x packing_length), data/skipped/<reason>, data/truncated."""
        out = {f"data/{k}": float(v) for k, v in self.stats.items()}
        packs = self.stats.get("packs", 0)
        if packs:
            out["data/fill_rate"] = self.stats.get("tokens", 0) / (packs * self.packing_length)
        return out


def release_packing_options(
    job_config: JobConfig, sources: Sequence[Source], strategy: str, infinite: bool
) -> tuple[dict[str, Any], tuple[str, int]]:
    """Packer options and the per-sample limit (setting, tokens) for `strategy`; release packing
    checks its sizes against `[data] packing_length`, its `max_num_tokens`."""
    data = job_config.data
    mandatory = [s.name for s in sources if s.mandatory]
    if strategy != "release":
        if mandatory and infinite:
            raise ConfigError(
                f"[[data.datasets]] {mandatory[0]!r} sets is_mandatory, which only release packing "
                f'honours; set [data] packing_strategy = "release" or drop is_mandatory'
            )
        return {}, ("[data] packing_length", data.packing_length)
    config = (
        job_config.section("data.release_packing")
        if job_config.has_section("data.release_packing")
        else ReleasePackingConfig()
    )
    for name in ("max_num_tokens_per_sample", "expected_num_tokens"):
        if getattr(config, name) > data.packing_length:
            raise ConfigError(
                f"[data.release_packing] {name} = {getattr(config, name)} exceeds [data] "
                f"packing_length = {data.packing_length} (the release's max_num_tokens, the hard "
                f"cap of a pack); lower it or raise packing_length"
            )
    # A finite pass (validation) has no endless source to draw mandatory samples from.
    indices = [i for i, s in enumerate(sources) if s.mandatory] if infinite else []
    return (
        {"release": config, "mandatory": indices},
        ("[data.release_packing] max_num_tokens_per_sample", config.max_num_tokens_per_sample),
    )


class PackedDataloaderBuilder:
    """`[data] loader = "packed"`: the first-party dataloader."""

    name = "packed"

    def build(
        self,
        job_config: JobConfig,
        plugins: PluginManager,
        model_spec: ModelSpec[Any, Any],
        *,
        dp_rank: int,
        dp_world_size: int,
        datasets: Sequence[Any] | None = None,
        infinite: bool = True,
    ) -> PackedDataloader:
        data = job_config.data
        entries = list(data.datasets if datasets is None else datasets)
        sources = resolve_sources(entries, plugins)
        strategy_name = data.packing_strategy if data.packing else "none"
        packer_options, max_sample = release_packing_options(job_config, sources, strategy_name, infinite)
        options = PipelineOptions(
            packing_length=data.packing_length,
            strategy=plugins.packing_strategies.get(strategy_name),
            window=data.packing_window,
            packer_options=packer_options,
            max_sample_tokens=max_sample[1],
            max_sample_key=max_sample[0],
            oversize_policy=data.oversize_policy,
            seed=data.seed if data.seed >= 0 else job_config.training.seed,
            infinite=infinite,
            shuffle=data.shuffle,
            shuffle_window=data.shuffle_window,
        )
        processor = model_spec.build_processor(job_config)
        check_usable(sources, processor)
        dataset = PackedIterable(
            sources,
            processor,
            model_spec.build_collator(job_config),
            options,
            dp_rank=dp_rank,
            dp_world_size=dp_world_size,
        )
        return PackedDataloader(
            dataset,
            num_workers=data.num_workers,
            prefetch_factor=data.prefetch_factor,
            packing_length=data.packing_length,
        )
