"""The build phase and the training loop. Nothing model specific: that comes from the model spec.

Build: model on the meta device -> freeze -> parallelize (AC, compile, FSDP2) -> materialise and
initialise / load -> optimizer, LR schedule, EMA -> resume point (`CheckpointManager.peek`) ->
dataloader -> checkpoint manager (resume).
Loop: microbatches -> forward -> loss components (normalised by their global counts) ->
backward -> clip -> non-finite guard -> step -> EMA -> metrics -> checkpoint -> export.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import math
import os
import signal
import time
from typing import TYPE_CHECKING, Any, Iterator

import torch
import torch.distributed as dist
from safetensors import SafetensorError
from torch import nn
from torch.profiler import record_function

from bagel_titan.checkpoint.export import export_weights
from bagel_titan.checkpoint.manager import CheckpointManager, ResumePoint
from bagel_titan.checkpoint.states import ModelState, OptimizerState
from bagel_titan.config.fields import tomllib
from bagel_titan.config.job_config import JobConfig
from bagel_titan.config.manager import check_run_environment, to_toml
from bagel_titan.distributed.parallel_dims import ParallelDims
from bagel_titan.distributed.parallelize import compute_autocast, parallelize
from bagel_titan.distributed.utils import (
    Reducer,
    all_reduce_sum,
    init_distributed,
    select_device,
    set_deterministic,
    set_seed,
    sum_over_ranks,
)
from bagel_titan.errors import UserError
from bagel_titan.lora import apply_lora, init_adapters
from bagel_titan.metrics.device_flops import device_name, peak_flops_per_second
from bagel_titan.metrics.logger import MetricsLogger
from bagel_titan.metrics.profiler import build_profiler
from bagel_titan.metrics.throughput import ThroughputMeter
from bagel_titan.optim.ema import EMA
from bagel_titan.optim.lr_scheduler import build_lr_scheduler
from bagel_titan.optim.optimizer import build_optimizer
from bagel_titan.losses import loss_means
from bagel_titan.protocols import Batch, LossComponent, ModelOutputs, ModelSpec, loss_counts
from bagel_titan.train_state import TrainState
from bagel_titan.validation import Validator

if TYPE_CHECKING:
    from torch.distributed.device_mesh import DeviceMesh

    from bagel_titan.plugins import PluginManager

logger = logging.getLogger("bagel_titan")


def restart_data_seed(seed: int, step: int) -> int:
    """The data seed of a run resumed at `step` whose data positions could not be restored."""
    digest = hashlib.sha256(f"{seed}:{step}".encode()).digest()
    return int.from_bytes(digest[:4], "little") & 0x7FFFFFFF


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


class TrainingStopped(UserError, RuntimeError):
    """The run cannot continue (too many consecutive non-finite steps)."""


class RunFolderError(UserError, OSError):
    """The run folder cannot be created or written."""


def _flat_config(text: str) -> dict[str, object]:
    """`section.key -> value` of a config.toml (sub-tables flattened)."""
    flat: dict[str, object] = {}

    def visit(prefix: str, table: dict) -> None:
        for key, value in table.items():
            if isinstance(value, dict):
                visit(f"{prefix}{key}.", value)
            else:
                flat[f"{prefix}{key}"] = value

    visit("", tomllib.loads(text))
    return flat


def build_parallel_model(
    job_config: JobConfig, plugins: PluginManager, mesh: DeviceMesh
) -> tuple[ModelSpec[Any, Any], nn.Module]:
    """The model spec and its model on the meta device, frozen and parallelized (no memory
    allocated yet: the caller materialises it with `to_empty`)."""
    model_spec = plugins.model_specs.get(job_config.model.name)
    with torch.device("meta"):
        model = model_spec.build(job_config, plugins)
    for module in model_spec.frozen_modules(model, job_config):
        module.requires_grad_(False)
    if job_config.lora.enable:  # before FSDP, so it shards the adapters with their frozen base
        apply_lora(model, model_spec, job_config.lora)
    separate = model_spec.separate_shards(model)
    parallelize(model, model_spec.sharding_units(model), job_config, mesh, separate_modules=separate)
    return model_spec, model


class Trainer:
    """Owns everything a run needs; `train()` runs the loop to `training.steps`."""

    def __init__(self, job_config: JobConfig, plugins: Any):
        self.job_config = cfg = job_config
        self.plugins = plugins
        check_run_environment(cfg, plugins)
        self.device = select_device(cfg.training.device)
        init_distributed(self.device)
        self.rank = dist.get_rank()
        self.world_size = dist.get_world_size()
        self.run_folder = os.path.join(cfg.job.dump_folder, cfg.job.run_name)
        if self.rank == 0:
            self._write_config(cfg)

        set_seed(cfg.training.seed)
        set_deterministic(cfg.training.deterministic)
        self.parallel_dims = ParallelDims(
            dp_replicate=cfg.parallelism.dp_replicate,
            dp_shard=cfg.parallelism.dp_shard,
            world_size=self.world_size,
        )
        mesh = self.parallel_dims.build_mesh(self.device.type)
        self.dp_rank = self.parallel_dims.dp_rank
        self.dp_world_size = self.parallel_dims.dp_world_size

        # -- model --
        self.model_spec, self.model = build_parallel_model(cfg, plugins, mesh)
        # With CPU offload FSDP2 keeps the sharded parameters in host memory: materialise them there.
        self.model.to_empty(device="cpu" if cfg.parallelism.cpu_offload else self.device)
        with torch.no_grad():
            self.model_spec.init_weights(self.model)
        if cfg.model.pretrained_path:
            try:
                self.model_spec.load_weights(self.model, cfg.model.pretrained_path)
            except SafetensorError as exc:  # a truncated or damaged weights file
                raise UserError(
                    f"[model] pretrained_path {cfg.model.pretrained_path!r}: a safetensors file does "
                    f"not read ({exc}); download it again"
                ) from None
        if cfg.lora.enable:
            init_adapters(self.model, cfg.training.seed)
        self.model.train()

        # -- optimisation --
        self.optimizer = build_optimizer(self.model, cfg.optimizer, self.device.type)
        self.lr_scheduler = build_lr_scheduler(
            self.optimizer, cfg.lr_scheduler, cfg.training.steps, cfg.optimizer.lr
        )
        self.ema = (
            EMA(self.model, cfg.ema.decay, cfg.ema.start_step, cfg.ema.update_interval, cfg.ema.device)
            if cfg.ema.enable
            else None
        )
        self.loss_components: list[LossComponent] = [
            plugins.loss_components.get(name)(cfg.section_or_none(f"loss.{name}"))
            for name in cfg.loss.components
        ]
        self.loss_weights = [cfg.loss.weights.get(name, 1.0) for name in cfg.loss.components]
        self.loss_fn = self._compute_loss
        # bf16 on one unwrapped rank: autocast around forward and loss (backward follows its casts).
        self._compute_context = lambda: compute_autocast(cfg, self.world_size, self.device.type)
        if cfg.compile.enable and "loss" in cfg.compile.components:
            # Dynamic from the start, as the units (see distributed/compile.py): packs change length.
            self.loss_fn = torch.compile(self._compute_loss, dynamic=True)

        # -- resume point, then the one dataloader (its seed depends on whether data restarts) --
        resume = CheckpointManager.peek(cfg.checkpoint, self.run_folder, self.dp_world_size)
        if resume.step > cfg.training.steps:
            raise UserError(
                f"[training] steps = {cfg.training.steps} but the run resumes from its checkpoint at step "
                f"{resume.step}; raise --training.steps above {resume.step}, or start a new run "
                f"(another [job] run_name)"
            )
        self.dataloader = self._build_dataloader(self._data_config(resume))
        self._data_iter: Iterator[Batch] | None = None

        # -- state, checkpoints, metrics --
        self.train_state = TrainState()
        states: dict[str, Any] = {
            "model": ModelState(self.model),
            "optimizer": OptimizerState(self.model, self.optimizer),
            "lr_scheduler": self.lr_scheduler,
            "train_state": self.train_state,
            "dataloader": self.dataloader,
        }
        if self.ema is not None:
            states["ema"] = self.ema
        self.checkpointer = CheckpointManager(
            cfg.checkpoint, self.run_folder, states, dp_rank=self.dp_rank, dp_world_size=self.dp_world_size
        )
        restored_step = self.checkpointer.load(resume=resume)
        if restored_step > 0:
            self._apply_configured_hyperparameters()
        if self.ema is not None and restored_step == 0:
            # Weights may have just come from `initial_load_path`: the average starts there.
            self.ema.copy_from_model()
        self.param_dtype = DTYPES[cfg.training.dtype]
        self.peak_flops = peak_flops_per_second(self.device, self.param_dtype, cfg.metrics.peak_tflops)
        self.metrics_logger = MetricsLogger(
            self.run_folder, cfg.metrics.enable_tensorboard, self.rank == 0, resumed_step=restored_step
        )
        self.throughput = ThroughputMeter(self.peak_flops)
        self.validator = (
            Validator(
                cfg,
                plugins,
                self.model,
                self.model_spec,
                self.loss_components,
                self.loss_weights,
                Reducer(self._collective_device()),
                self.metrics_logger,
                device=self.device,
                rank=self.rank,
                dp_rank=self.dp_rank,
                dp_world_size=self.dp_world_size,
                run_folder=self.run_folder,
                compute_context=self._compute_context,
            )
            if cfg.validation.enable
            else None
        )
        self.consecutive_nonfinite = 0
        self._signal_received: int | None = None
        self.stop_signal: int | None = None
        """The signal that stopped the run (received by any rank), or None."""
        self._pending: tuple[torch.Tensor, list[float], float] | None = None
        self._step_lr = cfg.optimizer.lr
        self.trainable_params = [p for p in self.model.parameters() if p.requires_grad]
        num_params = sum(p.numel() for p in self.model.parameters())
        num_trainable = sum(p.numel() for p in self.trainable_params)
        if self.rank == 0:
            logger.info(
                f"model {cfg.model.name}/{cfg.model.flavor}: {num_params / 1e6:.2f}M parameters "
                f"({num_trainable / 1e6:.2f}M trainable) on {self.world_size} rank(s), device "
                f"{device_name(self.device)}; run folder {self.run_folder}"
            )

    # -----------------------------------------------------------------------------------------

    def _write_config(self, cfg: JobConfig) -> None:
        """Rank 0: `<run>/config.toml`, logging what differs from the one a previous attempt of
        this run wrote (a resumed run applies the new values; see `_apply_configured_hyperparameters`)."""
        path = os.path.join(self.run_folder, "config.toml")
        text = to_toml(cfg)
        try:
            os.makedirs(self.run_folder, exist_ok=True)
            if os.path.exists(path):
                with open(path) as f:
                    try:
                        before = _flat_config(f.read())
                    except tomllib.TOMLDecodeError:  # edited by hand: nothing to compare with
                        before = _flat_config(text)
                after = _flat_config(text)
                changed = [
                    f"{k}: {before.get(k)!r} -> {after.get(k)!r}"
                    for k in sorted(set(before) | set(after))
                    if before.get(k) != after.get(k) and k != "job.config_file"
                ]
                if changed:
                    logger.info(f"config changed since this run folder's last start: {'; '.join(changed)}")
            with open(path, "w") as f:
                f.write(text)
        except OSError as exc:
            raise RunFolderError(
                f"cannot write the run folder {self.run_folder!r} ({exc.strerror}); set [job] dump_folder "
                f"to a writable folder"
            ) from None

    def _apply_configured_hyperparameters(self) -> None:
        """A resumed run trains with the config's optimizer and schedule values, not the
        checkpoint's: lr (the schedule's peak), betas, eps and weight decay are set again after
        the optimizer and schedule states are restored (max_norm and the schedule's shape are
        read from the config every step). What changed is logged."""
        opt = self.job_config.optimizer
        wanted = {"betas": tuple(opt.betas), "eps": opt.eps, "weight_decay": opt.weight_decay}
        changed = []
        scheduler = self.lr_scheduler
        for index, group in enumerate(self.optimizer.param_groups):
            for key, value in wanted.items():
                old = tuple(group[key]) if isinstance(group[key], (list, tuple)) else group[key]
                if old != value:
                    changed.append(f"optimizer.{key} {old} -> {value}")
                    group[key] = value
            if scheduler.base_lrs[index] != opt.lr:
                changed.append(f"optimizer.lr (peak) {scheduler.base_lrs[index]} -> {opt.lr}")
            scheduler.base_lrs[index] = opt.lr
            group["initial_lr"] = opt.lr
            group["lr"] = opt.lr * scheduler.lr_lambdas[index](scheduler.last_epoch)
        scheduler._last_lr = [group["lr"] for group in self.optimizer.param_groups]
        if changed and self.rank == 0:
            logger.info(
                f"resumed with the config's hyper-parameters, not the checkpoint's: {'; '.join(sorted(set(changed)))}"
            )

    def _build_dataloader(self, cfg: JobConfig) -> Any:
        builder = self.plugins.dataloaders.get(cfg.data.loader)
        return builder.build(
            cfg, self.plugins, self.model_spec, dp_rank=self.dp_rank, dp_world_size=self.dp_world_size
        )

    def _data_config(self, resume: ResumePoint) -> JobConfig:
        """The config the dataloader is built from. When the checkpoint's data positions do not
        map onto this run's data-parallel layout the data starts afresh; with the configured
        seed it would replay the run's first samples in the same order, so a seed derived from
        the resumed step gives a new order."""
        if resume.step == 0 or resume.restores_data:
            return self.job_config
        data = self.job_config.data
        seed = data.seed if data.seed >= 0 else self.job_config.training.seed
        restart_seed = restart_data_seed(seed, resume.step)
        if self.rank == 0:
            logger.info(
                f"data restarts at step {resume.step} with [data] seed {restart_seed} (derived from seed "
                f"{seed} and the step) so that it does not replay the run's first samples"
            )
        return dataclasses.replace(self.job_config, data=dataclasses.replace(data, seed=restart_seed))

    def _compute_loss(
        self, outputs: ModelOutputs, batch: Batch, global_counts: list[float]
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Σ weight * term.sum / global count, plus the detached sums for logging."""
        total = None
        sums = []
        local_counts = loss_counts(self.model_spec, self.loss_components, batch)
        for component, weight, count, local in zip(
            self.loss_components, self.loss_weights, global_counts, local_counts
        ):
            term = component(outputs, local)
            sums.append(term.sum.detach().float())
            if count == 0:
                contribution = term.sum * 0.0  # keeps the graph (and FSDP's hooks) connected
            else:
                contribution = term.sum.float() * (weight / count)
            total = contribution if total is None else total + contribution
        assert total is not None, "[loss] components is never empty (checked with the config)"
        return total, sums

    def _noise_generator(self, step: int, microbatch: int) -> torch.Generator:
        """Noise differs per step, microbatch and data-parallel rank, and is reproducible."""
        generator = torch.Generator(device=self.device)
        seed = (self.job_config.training.seed * 1_000_003 + step) * 1_009 + microbatch
        generator.manual_seed(seed * 65_537 + self.dp_rank)
        return generator

    def _next_batches(self) -> list[Batch]:
        if self._data_iter is None:
            self._data_iter = iter(self.dataloader)
        batches = [next(self._data_iter) for _ in range(self.job_config.training.grad_accum_steps)]
        return [b.to(self.device) for b in batches]

    def _all_reduce_sum(self, values: list[float]) -> list[float]:
        return all_reduce_sum(values, self._collective_device())

    def _collective_device(self) -> torch.device:
        return self.device if self.device.type == "cuda" else torch.device("cpu")

    def forward_backward(
        self, batches: list[Batch], step: int
    ) -> tuple[torch.Tensor, list[float], int, bool]:
        """Accumulate the gradients of one step's microbatches.

        Returns the per-component loss sums of this rank, the global counts, the global token
        count and whether any rank received a stop signal (all from one all-reduce).
        """
        n = len(self.loss_components)
        micro_counts = [c for b in batches for c in loss_counts(self.model_spec, self.loss_components, b)]
        local_tokens = float(sum(b.num_tokens for b in batches))
        signalled = self._signal_received is not None
        reduced = self._all_reduce_sum(
            micro_counts + [local_tokens, float(signalled), float(self._signal_received or 0)]
        )
        per_micro = [reduced[i * n : (i + 1) * n] for i in range(len(batches))]
        global_counts = [sum(col) for col in zip(*per_micro)]
        global_tokens = int(reduced[len(micro_counts)])
        stop_requested = reduced[-2] > 0
        if stop_requested and self.stop_signal is None:
            # Every rank reports the same signal (the mean of those received: they agree in practice).
            self.stop_signal = self._signal_received or round(reduced[-1] / reduced[-2])
        if self.job_config.training.grad_accum_weighting == "microbatches":  # the release's rule
            normalisers = [[count * len(batches) for count in counts] for counts in per_micro]
        else:
            normalisers = [global_counts] * len(batches)

        sums = torch.zeros(len(self.loss_components), dtype=torch.float64, device=self.device)
        for index, batch in enumerate(batches):
            with self._compute_context():
                with record_function("forward"):
                    outputs = self.model_spec.forward(self.model, batch, self._noise_generator(step, index))
                with record_function("loss"):
                    loss, term_sums = self.loss_fn(outputs, batch, normalisers[index])
            # FSDP averages gradients over the data-parallel ranks; the loss is already a global
            # mean, so undo that average.
            with record_function("backward"):
                (loss * self.dp_world_size).backward()
            sums += torch.stack(term_sums).double()
        return sums, global_counts, global_tokens, stop_requested

    def train_step(self, batches: list[Batch]) -> bool:
        """One optimizer step over this rank's microbatches; returns whether to stop the run."""
        step = self.train_state.step + 1
        sums, global_counts, global_tokens, stop_requested = self.forward_backward(batches, step)
        with record_function("clip_grad_norm"):
            grad_norm = self._clip_grad_norm()
        finite = math.isfinite(grad_norm)
        if finite:
            with record_function("optimizer"):
                self.optimizer.step()
            self.consecutive_nonfinite = 0
        else:
            self.consecutive_nonfinite += 1
            self.train_state.nonfinite_steps += 1
            logger.warning(
                f"step {step}: non-finite loss or gradient (grad norm {grad_norm}); step skipped "
                f"({self.consecutive_nonfinite} in a row, {self.train_state.nonfinite_steps} in all)"
            )
        self.optimizer.zero_grad(set_to_none=True)
        self._step_lr = self.optimizer.param_groups[0]["lr"]  # the lr this step used
        self.lr_scheduler.step()
        self.train_state.step = step
        self.train_state.tokens_seen += global_tokens
        if finite and self.ema is not None:
            self.ema.update(step)
        self.throughput.add(
            sum(b.num_tokens for b in batches), sum(self.model_spec.flops(b) for b in batches)
        )
        if self.consecutive_nonfinite >= self.job_config.training.max_consecutive_nonfinite:
            healthy = self.checkpointer.latest_complete() if self.job_config.checkpoint.enable else None
            where = f"the last healthy checkpoint is {healthy}" if healthy else "no checkpoint was saved"
            raise TrainingStopped(
                f"{self.consecutive_nonfinite} consecutive steps had a non-finite loss or gradient "
                f"(last at step {step}; {where}); lower [optimizer] lr, check the data, or raise "
                f"[training] max_consecutive_nonfinite"
            )
        self._pending = (sums, global_counts, grad_norm)
        return stop_requested

    def _clip_grad_norm(self) -> float:
        max_norm = self.job_config.training.max_norm
        norm = torch.nn.utils.clip_grad_norm_(
            self.trainable_params, max_norm if max_norm > 0 else float("inf"), foreach=True
        )
        if hasattr(norm, "full_tensor"):
            norm = norm.full_tensor()
        return float(norm)

    def _step_metrics(self) -> dict[str, float]:
        assert self._pending is not None, "a step's metrics are read after the step"
        sums, global_counts, grad_norm = self._pending
        reduced = self._all_reduce_sum(sums.tolist())
        metrics = loss_means(
            [c.name for c in self.loss_components], self.loss_weights, reduced, global_counts
        )
        metrics["grad_norm"] = grad_norm
        metrics["lr"] = self._step_lr
        metrics.update(self.throughput.read())
        metrics["tokens_seen"] = float(self.train_state.tokens_seen)
        metrics["nonfinite_steps"] = float(self.train_state.nonfinite_steps)
        if self.device.type == "cuda":
            metrics["memory/max_allocated_gib"] = torch.cuda.max_memory_allocated(self.device) / 2**30
            metrics["memory/max_reserved_gib"] = torch.cuda.max_memory_reserved(self.device) / 2**30
        metrics.update(self._data_stats())
        return metrics

    def _data_stats(self) -> dict[str, float]:
        """The loader's counters summed over the data-parallel ranks; a ratio (`fill_rate`) is
        averaged instead."""
        local = {key: float(value) for key, value in self.dataloader.data_stats().items()}
        total = sum_over_ranks(local)
        ratios = sum_over_ranks({key: 1.0 for key in local if key.endswith("fill_rate")})
        for key, ranks in ratios.items():
            total[key] /= ranks
        return total

    def _save_checkpoint(self, step: int, force: bool = False) -> None:
        """Save unless the last step was non-finite: a checkpoint of a diverging run would
        resume into the divergence."""
        if self.consecutive_nonfinite:
            if force or step % self.job_config.checkpoint.interval == 0:
                logger.warning(
                    f"step {step} was non-finite: not saving a checkpoint (the last healthy one "
                    f"is {self.checkpointer.latest_complete() or 'none'})"
                )
            return
        self.checkpointer.maybe_save(step, force=force)

    # -----------------------------------------------------------------------------------------

    def _install_signal_handlers(self):
        def handler(signum, frame):
            if self._signal_received is None:
                logger.warning(
                    f"received signal {signum}: saving a checkpoint and stopping after the next step"
                )
            self._signal_received = signum

        previous = {}
        for sig in (signal.SIGTERM, signal.SIGINT):
            previous[sig] = signal.signal(sig, handler)
        return previous

    def train(self) -> TrainState:
        cfg = self.job_config
        previous_handlers = self._install_signal_handlers()
        self.plugins.hook.bagel_titan_on_train_start(trainer=self)
        profiler = build_profiler(
            cfg.profiling, self.run_folder, self.rank, self.device, first_step=self.train_state.step
        )
        try:
            while self.train_state.step < cfg.training.steps:
                data_start = time.perf_counter()
                with record_function("data"):
                    batches = self._next_batches()
                data_wait = time.perf_counter() - data_start
                stop_requested = self.train_step(batches)
                step = self.train_state.step
                if profiler is not None:
                    profiler.step(step)
                metrics: dict[str, float] = {}
                if step % cfg.metrics.log_freq == 0 or step == cfg.training.steps:
                    metrics = self._step_metrics()
                    metrics["data_wait_s"] = data_wait
                    self.metrics_logger.log(step, metrics)
                self.plugins.hook.bagel_titan_on_step_end(trainer=self, step=step, metrics=metrics)
                last_step = step == cfg.training.steps
                if self.validator is not None and (step % cfg.validation.interval == 0 or last_step):
                    self.validator.run(step)
                self._save_checkpoint(step)
                if cfg.checkpoint.export_interval and step % cfg.checkpoint.export_interval == 0:
                    self.export(os.path.join(self.run_folder, "exports", f"step-{step}"))
                if stop_requested:
                    logger.warning(f"stopping at step {step} on signal {self.stop_signal}")
                    self._save_checkpoint(step, force=True)
                    break
            else:
                self._save_checkpoint(self.train_state.step, force=True)
                if cfg.checkpoint.export_at_end:
                    self.export(os.path.join(self.run_folder, "exports", "final"))
        finally:
            if profiler is not None:
                profiler.stop()
            self.checkpointer.wait()
            self.plugins.hook.bagel_titan_on_train_end(trainer=self)
            self.metrics_logger.close()
            for sig, handler in previous_handlers.items():
                signal.signal(sig, handler)
        return self.train_state

    def export(self, path: str) -> None:
        """Inference weights in the model spec's layout (the EMA's, when kept)."""
        dtype = DTYPES[self.job_config.checkpoint.export_dtype]
        export_weights(
            self.model_spec,
            self.model,
            path,
            dtype,
            ema=self.ema,
            lora=self.job_config.lora,
            base_model_name_or_path=self.job_config.model.pretrained_path or None,
        )
        if self.rank == 0:
            logger.info(f"exported weights to {path}")

    def close(self) -> None:
        self.checkpointer.close()
        self.dataloader.close()
