"""Save and resume training checkpoints with torch.distributed.checkpoint (DCP).

A checkpoint is `<run>/<[checkpoint] folder>/step-<N>/` (see `layout.py`). It holds:

- the shared states given to the manager (model, optimizer, lr_scheduler, train_state, ema):
  saved once, sharded tensors by each rank's shard, so a different world size can load them
  (DCP reshards);
- per rank: `dataloader.dp_rank_<i>` (the exact data position of data-parallel rank i) and
  `rng.rank_<r>` (global RNG states), as JSON in a uint8 tensor (`safe_io.encode_state`).

Loading runs no code from the checkpoint (`safe_io`): no pickle of the project's own, DCP's
metadata through a restricted unpickler, DCP's non-tensor values with `weights_only=True`.
Before a checkpoint is loaded its files are checked against the sizes and checksums its marker
records; a damaged newest checkpoint is moved aside (`step-<N>.unusable-<time>`, kept for
inspection, never deleted) and the previous complete one is loaded instead, with a warning.

Resume on a different data-parallel world size: model, optimizer, EMA, LR schedule and train
state are resharded exactly. A data position cannot be mapped between different shardings, so
the dataloader and RNG states are NOT restored: every rank keeps the freshly built state of its
dataloader (its shard of the data from the start, as seeded by the config) and a warning names
both world sizes. `peek()` tells beforehand which case `load()` will meet (`ResumePoint`), so the
trainer builds its one dataloader with a seed derived from the resumed step when the data
restarts, and the restarted data does not replay the run's first samples.
"""

from __future__ import annotations

import errno
import logging
import os
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any, Mapping, Protocol, cast

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.metadata import TensorStorageMetadata

from bagel_titan.checkpoint.layout import (
    SAVING,
    CheckpointInfo,
    describe_files,
    list_steps,
    move_aside,
    read_marker,
    remove_checkpoint,
    start_save,
    step_dir,
    verify,
    write_marker,
)
from bagel_titan.checkpoint.rng import rng_state, set_rng_state
from bagel_titan.checkpoint.safe_io import (
    SafeLoadPlanner,
    SafeReader,
    decode_state,
    encode_state,
    load_metadata,
)
from bagel_titan.checkpoint.writer import CheckpointWriter
from bagel_titan.config.job_config import Checkpoint
from bagel_titan.errors import UserError

logger = logging.getLogger(__name__)

DATALOADER = "dataloader"
RNG = "rng"


class Stateful(Protocol):
    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


class CheckpointError(UserError, RuntimeError):
    """A checkpoint the config asks for cannot be loaded."""


@dataclass(frozen=True)
class ResumePoint:
    """The checkpoint `CheckpointManager.load()` restores, as `peek()` chose it."""

    path: str | None
    """The checkpoint folder to read; None: nothing, the run starts from scratch."""
    step: int
    """The step the run continues after (0: from scratch, also after a model-only load)."""
    model_only: bool
    """Only the model weights are loaded (`initial_load_model_only`)."""
    restores_data: bool
    """The checkpoint was saved with this run's data-parallel layout, so the data positions and
    RNG states are restored; when False (and `step` > 0) the data starts afresh."""


@dataclass
class _PendingSave:
    step: int
    path: str
    future: Future


class CheckpointManager:
    """Periodic, optionally asynchronous, atomic DCP checkpoints of one run, and resume.

    `states` maps names to objects with `state_dict()`/`load_state_dict()`: "model" (a
    `ModelState`), "optimizer" (`OptimizerState`), "lr_scheduler", "train_state", "ema", and
    "dataloader", whose state differs per data-parallel rank and is stored per rank. Every rank
    constructs the manager and calls every method (they are collective).
    """

    def __init__(
        self,
        cfg: Checkpoint,
        run_folder: str,
        states: Mapping[str, Stateful],
        dp_rank: int,
        dp_world_size: int,
    ):
        self.cfg = cfg
        self.run_folder = run_folder
        self.root = os.path.join(run_folder, cfg.folder)
        self.states = {k: v for k, v in states.items() if k != DATALOADER}
        self.dataloader = states.get(DATALOADER)
        self.dp_rank = dp_rank
        self.dp_world_size = dp_world_size
        self.rank = dist.get_rank()
        self.world_size = dist.get_world_size()
        self.restored_data_state = False
        """After `load()`: whether the dataloader and RNG states were restored."""
        self._writer: CheckpointWriter | None = None  # created on the first save, then reused
        self._pending: _PendingSave | None = None
        self._last_saved_step = -1
        # Async saves run collectives from a background thread: give them their own gloo group
        # so they never interleave with the training loop's collectives.
        self._async_pg = dist.new_group(backend="gloo") if cfg.enable and cfg.async_mode == "async" else None

    # ------------------------------------------------------------------------------------------
    # Saving

    def maybe_save(self, step: int, force: bool = False) -> bool:
        """Save after optimizer step `step` if it is on the interval (or `force`, e.g. at the
        end of the run). Also finalises a finished asynchronous save. Returns whether a save
        started."""
        self._finalize_pending(block=False)
        if not self.cfg.enable or step == self._last_saved_step:
            return False
        if not force and step % self.cfg.interval:
            return False
        self._save(step)
        return True

    def wait(self) -> None:
        """Block until an in-flight asynchronous save is written and marked complete."""
        self._finalize_pending(block=True)

    def close(self) -> None:
        """Finish any in-flight save and release the checkpoint process group."""
        self.wait()
        if self._async_pg is not None:
            dist.destroy_process_group(self._async_pg)
            self._async_pg = None

    def _save(self, step: int) -> None:
        self._finalize_pending(block=True)
        path = step_dir(self.root, step)
        if self.rank == 0:
            self._prepare_folder(path)
        dist.barrier()
        state = self._shared_state_dicts()
        if self.dataloader is not None:
            state[DATALOADER] = {f"dp_rank_{self.dp_rank}": encode_state(self.dataloader.state_dict())}
        state[RNG] = {f"rank_{self.rank}": encode_state(rng_state())}
        self._last_saved_step = step
        if self._writer is None:
            self._writer = CheckpointWriter(self.root)
        if self._async_pg is None:
            try:
                dcp.save(state, checkpoint_id=path, storage_writer=self._writer)
            except BaseException as exc:  # DCP's CheckpointException is a BaseException
                _raise_save_error(path, exc)
                raise
            # dcp.save returns once every rank's data and the metadata are written.
            self._mark_complete(step, path)
            return
        result = dcp.async_save(
            state, checkpoint_id=path, storage_writer=self._writer, process_group=self._async_pg
        )
        # A Future, or (newer torch, with a stager) an AsyncSaveResponse that carries one.
        future = cast("Future[Any]", getattr(result, "upload_completion", result))
        self._pending = _PendingSave(step, path, future)

    def _prepare_folder(self, path: str) -> None:
        """Rank 0: an empty step folder marked `SAVING`. A folder already there is this step's
        interrupted save (removed) or something else (a complete checkpoint of an earlier
        attempt, or not ours): that is moved aside, never deleted."""
        try:
            os.makedirs(self.root, exist_ok=True)
            if os.path.exists(path):
                if read_marker(path) is None and os.path.exists(os.path.join(path, SAVING)):
                    remove_checkpoint(path)
                else:
                    kept = move_aside(path, "replaced")
                    logger.warning("%s already existed; moved it to %s before saving this step", path, kept)
            start_save(path)
        except OSError as exc:
            _raise_save_error(path, exc)
            raise

    def _finalize_pending(self, block: bool) -> None:
        pending = self._pending
        if pending is None or (not block and not pending.future.done()):
            return
        self._pending = None
        try:
            pending.future.result()  # re-raises a failed save
        except BaseException as exc:  # DCP's CheckpointException is a BaseException
            _raise_save_error(pending.path, exc)
            raise
        # The future of the coordinating rank completes after all ranks wrote and the metadata
        # is on disk, so rank 0 can mark the checkpoint complete on its own.
        self._mark_complete(pending.step, pending.path)

    def _mark_complete(self, step: int, path: str) -> None:
        if self.rank != 0:
            return
        write_marker(path, CheckpointInfo(step, self.world_size, self.dp_world_size, describe_files(path)))
        logger.info("checkpoint step %d complete: %s", step, path)
        self._apply_retention(step)

    def _apply_retention(self, newest: int) -> None:
        """Rank 0: keep the newest `keep_latest_k` complete checkpoints (0 keeps all), and drop
        this project's interrupted saves older than the newest complete one (nothing writes to
        them). Folders that are neither (no readable marker, no `SAVING`) are never touched."""
        complete, incomplete = list_steps(self.root)
        doomed = [s for s in incomplete if s < newest]
        if self.cfg.keep_latest_k:
            doomed += [s for s in complete[: -self.cfg.keep_latest_k] if s < newest]
        for step in doomed:
            remove_checkpoint(step_dir(self.root, step))
            logger.info("removed checkpoint step %d (keep_latest_k=%d)", step, self.cfg.keep_latest_k)

    def _shared_state_dicts(self) -> dict[str, Any]:
        return {name: obj.state_dict() for name, obj in self.states.items()}

    # ------------------------------------------------------------------------------------------
    # Loading

    def latest_complete(self) -> str | None:
        """The newest complete checkpoint folder of this run (None: there is none)."""
        complete = list_steps(self.root)[0]
        return step_dir(self.root, complete[-1]) if complete else None

    @classmethod
    def peek(cls, cfg: Checkpoint, run_folder: str, dp_world_size: int, step: int = -1) -> ResumePoint:
        """Which checkpoint `load(step)` would restore, without loading it, so that the caller
        can choose what depends on it (the data seed) before building the states.

        Order: `step` (or `[checkpoint] load_step`) if given, else the latest complete
        checkpoint of this run, else `initial_load_path` (model only when
        `initial_load_model_only`), else nothing. With `[checkpoint] enable = false` only
        `initial_load_path` is honoured. Collective (every rank calls it): rank 0 verifies the
        candidate's files against its marker; a damaged newest checkpoint is moved aside, as
        `load()` always did, and the previous complete one is chosen.
        """
        root = os.path.join(run_folder, cfg.folder)
        if cfg.enable:
            point = cls._choose_run_checkpoint(cfg, root, dp_world_size, step)
            if point is not None:
                return point
        if not cfg.initial_load_path:
            return ResumePoint(path=None, step=0, model_only=False, restores_data=False)
        info = cls._marker_or_raise(cfg.initial_load_path)
        if cfg.initial_load_model_only:
            return ResumePoint(cfg.initial_load_path, step=0, model_only=True, restores_data=False)
        return ResumePoint(
            cfg.initial_load_path,
            info.step,
            model_only=False,
            restores_data=_same_layout(info, dp_world_size),
        )

    @classmethod
    def _choose_run_checkpoint(
        cls, cfg: Checkpoint, root: str, dp_world_size: int, step: int
    ) -> ResumePoint | None:
        """The run's own checkpoint to resume from (None: it has none)."""
        rank = dist.get_rank()
        wanted = step if step != -1 else cfg.load_step
        complete, incomplete = list_steps(root)
        if wanted != -1:
            path = step_dir(root, wanted)
            if wanted in complete:
                problem = _verified(path)
                if problem:
                    raise CheckpointError(
                        f"[checkpoint] load_step = {wanted} but {path} is damaged: "
                        f"{problem}; pick another step or set load_step = -1"
                    )
            if wanted not in complete:
                state = "incomplete (interrupted save)" if wanted in incomplete else "missing"
                raise CheckpointError(
                    f"[checkpoint] load_step = {wanted} but {path} is "
                    f"{state}; complete checkpoints: {complete or 'none'}"
                )
            newer = [s for s in complete if s > wanted]
            if newer and rank == 0:
                logger.warning(
                    "[checkpoint] load_step = %d while newer checkpoints %s exist: a later "
                    "auto-resume (load_step = -1) would pick the newest of those, not this run's",
                    wanted,
                    newer,
                )
            return cls._run_point(path, dp_world_size)
        damaged = []
        for candidate in reversed(complete):
            path = step_dir(root, candidate)
            problem = _verified(path)
            if problem is None:
                return cls._run_point(path, dp_world_size)
            damaged.append(f"{path} ({problem})")
            if rank == 0:
                kept = move_aside(path, "unusable")
                logger.warning(
                    "checkpoint %s cannot be loaded: %s. Moved it to %s (kept for inspection, "
                    "never deleted); trying the previous complete checkpoint",
                    path,
                    problem,
                    kept,
                )
            dist.barrier()
        if damaged:
            raise CheckpointError(
                f"every complete checkpoint of this run is damaged: {'; '.join(damaged)}; they were moved "
                f"aside; restore one, or start from scratch by rerunning"
            )
        return None

    @classmethod
    def _run_point(cls, path: str, dp_world_size: int) -> ResumePoint:
        info = cls._marker_or_raise(path)
        return ResumePoint(path, info.step, model_only=False, restores_data=_same_layout(info, dp_world_size))

    @staticmethod
    def _marker_or_raise(path: str) -> CheckpointInfo:
        info = read_marker(path)
        if info is None:
            raise CheckpointError(
                f"{path} is not a complete bagel-titan checkpoint (no COMPLETE marker, or an unreadable one): "
                f"either its save was interrupted or it is not a step-<N> folder of a training run"
            )
        return info

    def load(self, step: int = -1, resume: ResumePoint | None = None) -> int:
        """Restore the run and return the step to continue after (0: start from scratch).

        `resume`: what `peek()` chose (then nothing is chosen or verified again); without it,
        `peek(step)` chooses now (see there for the order).

        After a model-only load the caller re-initialises what derives from the weights (e.g.
        `EMA.copy_from_model()`).
        """
        if resume is None:
            resume = self.peek(self.cfg, self.run_folder, self.dp_world_size, step)
        self.restored_data_state = False
        if resume.path is None:
            return 0
        self._load_from(resume.path, model_only=resume.model_only)
        assert self.restored_data_state == resume.restores_data, "peek() and load() disagree"
        return resume.step

    def _load_from(self, path: str, model_only: bool) -> int:
        info = self._marker_or_raise(path)
        names = ["model"] if model_only else list(self.states)
        metadata = load_metadata(path)
        saved = set(metadata.state_dict_metadata)
        self._check_present(path, names, saved)
        state = {name: self.states[name].state_dict() for name in names}
        restore_data = not model_only and _same_layout(info, self.dp_world_size)
        if restore_data:
            data_key = f"{DATALOADER}.dp_rank_{self.dp_rank}"
            if self.dataloader is not None and data_key not in saved:
                raise CheckpointError(
                    f"checkpoint {path} has no dataloader state ({data_key}) but this run has a "
                    f"dataloader; start from it with [checkpoint] initial_load_path instead"
                )
            if self.dataloader is not None:
                state[DATALOADER] = {f"dp_rank_{self.dp_rank}": _tensor_for(metadata, path, data_key)}
            state[RNG] = {f"rank_{self.rank}": _tensor_for(metadata, path, f"{RNG}.rank_{self.rank}")}
        elif not model_only:
            logger.warning(
                "checkpoint %s was saved with %d data-parallel ranks (world size %d), this run "
                "has %d (world size %d): model, optimizer, EMA, LR schedule and train state are "
                "resharded, but data positions and RNG states cannot be mapped; every rank "
                "starts its data shard afresh",
                path,
                info.dp_world_size,
                info.world_size,
                self.dp_world_size,
                self.world_size,
            )
        dcp.load(state, storage_reader=SafeReader(path), planner=SafeLoadPlanner())
        for name in names:
            self.states[name].load_state_dict(state[name])
        if restore_data:
            if self.dataloader is not None:
                self.dataloader.load_state_dict(decode_state(state[DATALOADER][f"dp_rank_{self.dp_rank}"]))
            set_rng_state(decode_state(state[RNG][f"rank_{self.rank}"]))
        self.restored_data_state = restore_data
        self._last_saved_step = info.step if os.path.dirname(path) == self.root else -1
        logger.info(
            "loaded %s from %s (step %d)", "model weights" if model_only else "checkpoint", path, info.step
        )
        return info.step

    @staticmethod
    def _check_present(path: str, names: list[str], saved_keys: set[str]) -> None:
        saved = {fqn.split(".", 1)[0] for fqn in saved_keys}
        missing = [n for n in names if n not in saved]
        if missing:
            raise CheckpointError(
                f"checkpoint {path} has no state for {missing} (saved: {sorted(saved)}); was it "
                f"saved with that component disabled (e.g. [ema] enable = false)? Start from it "
                f"with [checkpoint] initial_load_path and initial_load_model_only = true instead"
            )


def _same_layout(info: CheckpointInfo, dp_world_size: int) -> bool:
    """Whether checkpoint `info`'s data positions and RNG states map onto this run's ranks."""
    return info.dp_world_size == dp_world_size and info.world_size == dist.get_world_size()


def _verified(path: str) -> str | None:
    """What is wrong with complete checkpoint `path` (None: nothing): checked on rank 0 (it
    reads every file once) and agreed by all ranks."""
    problem = None
    if dist.get_rank() == 0:
        info = read_marker(path)
        problem = "its COMPLETE marker does not read" if info is None else verify(path, info, load_metadata)
    if dist.get_world_size() > 1:
        box = [problem]
        dist.broadcast_object_list(box, src=0)
        problem = box[0]
    return problem


def _tensor_for(metadata: Any, path: str, key: str) -> torch.Tensor:
    """An empty tensor shaped like the saved JSON state `key`, for DCP to load into."""
    saved = metadata.state_dict_metadata.get(key)
    if not isinstance(saved, TensorStorageMetadata):
        raise CheckpointError(
            f"checkpoint {path} stores {key} in the older pickled format, which is not loaded (it could "
            f"run code); start from it with [checkpoint] initial_load_path (model weights) instead"
        )
    return torch.empty(saved.size, dtype=torch.uint8)


def _raise_save_error(path: str, exc: BaseException) -> None:
    """Raise a one-line user error if a save failed for lack of space or permission (the partial
    folder keeps its `SAVING` note and is removed by a later save); else return."""
    seen: list[BaseException] = []
    todo: list[BaseException] = [exc]
    while todo:
        current = todo.pop()
        if current in seen:
            continue
        seen.append(current)
        if isinstance(current, OSError) and current.errno in (
            errno.ENOSPC,
            errno.EDQUOT,
            errno.EACCES,
            errno.EROFS,
            errno.EPERM,
        ):
            raise CheckpointError(
                f"cannot write checkpoint {path}: {os.strerror(current.errno)}; free space or fix the "
                f"permissions there (or set [checkpoint] folder / [job] dump_folder elsewhere) and rerun: "
                f"the run resumes from its last complete checkpoint"
            ) from exc
        failures = getattr(current, "failures", None)  # DCP's CheckpointException: {rank: error}
        if isinstance(failures, dict):  # values: an exception, or (exception, stack summary)
            for failure in failures.values():
                failure = failure[0] if isinstance(failure, tuple) and failure else failure
                if isinstance(failure, BaseException):
                    todo.append(failure)
        todo.extend(e for e in (current.__cause__, current.__context__) if e is not None)
