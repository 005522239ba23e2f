"""Validation during training: the loss on held-out data, and the model spec's samples.

Every rank takes part (the model may be sharded, so forwards are collective); rank 0 writes.
"""

from __future__ import annotations

import contextlib
import logging
import os
from typing import TYPE_CHECKING, Any, Callable, ContextManager, Sequence

import numpy as np
import torch
import torch.distributed as dist
from PIL import Image

from bagel_titan.distributed.utils import Reducer
from bagel_titan.losses import loss_means
from bagel_titan.protocols import LossComponent, ModelSpec, TrainDataloader, loss_counts

if TYPE_CHECKING:
    from torch import nn

    from bagel_titan.config.job_config import JobConfig
    from bagel_titan.metrics.logger import MetricsLogger
    from bagel_titan.plugins import PluginManager

logger = logging.getLogger("bagel_titan")

# A fixed generator seed for validation noise: the held-out loss is comparable across steps.
VALIDATION_SEED = 20_240_601


class Validator:
    """Runs `[validation]` with the collaborators it is given (the trainer hands them over)."""

    def __init__(
        self,
        job_config: "JobConfig",
        plugins: "PluginManager",
        model: "nn.Module",
        model_spec: ModelSpec,
        loss_components: Sequence[LossComponent],
        loss_weights: Sequence[float],
        reducer: Reducer,
        metrics_logger: "MetricsLogger",
        *,
        device: torch.device,
        rank: int,
        dp_rank: int,
        dp_world_size: int,
        run_folder: str,
        compute_context: Callable[[], ContextManager[Any]] = contextlib.nullcontext,
    ):
        self.job_config, self.plugins = job_config, plugins
        self.cfg = job_config.validation
        self.model, self.model_spec = model, model_spec
        self.loss_components, self.loss_weights = list(loss_components), list(loss_weights)
        self.reducer, self.metrics_logger = reducer, metrics_logger
        self.device, self.rank, self.dp_rank, self.dp_world_size = device, rank, dp_rank, dp_world_size
        self.run_folder = run_folder
        self.compute_context = compute_context
        """The context the training forward runs in (bf16 autocast on one bf16 rank): the held-out
        loss is computed in the same precision."""
        self._loader: TrainDataloader | None = None

    def _held_out_loader(self) -> TrainDataloader:
        if self._loader is None:
            self._loader = self.plugins.dataloaders.get(self.job_config.data.loader).build(
                self.job_config,
                self.plugins,
                self.model_spec,
                dp_rank=self.dp_rank,
                dp_world_size=self.dp_world_size,
                datasets=self.cfg.datasets,
                infinite=False,
            )
        return self._loader

    @torch.no_grad()
    def held_out_loss(self) -> dict[str, float]:
        """Mean of each loss component over `validation.steps` packs per rank (the first packs
        of the held-out data, the same every time)."""
        batches = []
        for batch in self._held_out_loader():
            batches.append(batch)
            if len(batches) == self.cfg.steps:
                break
        if not batches:
            raise ValueError(
                f"[validation] datasets {[d.path for d in self.cfg.datasets]} gave no packs on data-parallel "
                f"rank {self.dp_rank}; add held-out data or set [validation] datasets = []"
            )
        # Ranks may hold different numbers of packs: all run the largest count (FSDP forwards
        # are collective), repeating their own packs, and only the real ones are counted.
        most = int(self.reducer.max([float(len(batches))])[0])
        sums = [0.0] * len(self.loss_components)
        counts = [0.0] * len(self.loss_components)
        was_training = self.model.training
        self.model.eval()
        for index in range(most):
            batch = batches[index % len(batches)].to(self.device)
            generator = torch.Generator(device=self.device).manual_seed(
                VALIDATION_SEED + index * 7919 + self.dp_rank
            )
            with self.compute_context():
                outputs = self.model_spec.forward(self.model, batch, generator)
                if index >= len(batches):
                    continue
                local_counts = loss_counts(self.model_spec, self.loss_components, batch)
                terms = [
                    component(outputs, count) for component, count in zip(self.loss_components, local_counts)
                ]
            for i, term in enumerate(terms):
                sums[i] += float(term.sum)
                counts[i] += float(term.count)
        self.model.train(was_training)
        reduced = self.reducer.sum(sums + counts)
        n = len(sums)
        return loss_means(
            [c.name for c in self.loss_components],
            self.loss_weights,
            reduced[:n],
            reduced[n:],
            prefix="val/loss",
        )

    @torch.no_grad()
    def samples(self, step: int) -> None:
        """Ask the model spec for samples; write PNGs and texts, and log them to TensorBoard."""
        was_training = self.model.training
        self.model.eval()
        generated = self.model_spec.generate_samples(self.model, self.job_config, step)
        self.model.train(was_training)
        if generated is None or self.rank != 0:
            return
        folder = os.path.join(self.run_folder, "samples", f"step-{step}")
        os.makedirs(folder, exist_ok=True)
        for name, image in generated.images.items():
            array = np.asarray(image, dtype=np.uint8)
            Image.fromarray(array).save(os.path.join(folder, f"{name}.png"))
            self.metrics_logger.log_image(f"samples/{name}", array, step)
        if generated.texts:
            with open(os.path.join(folder, "texts.md"), "w") as f:
                for name, text in generated.texts.items():
                    f.write(f"## {name}\n\n{text}\n\n")
                    self.metrics_logger.log_text(f"samples/{name}", text, step)
        logger.info(
            f"step {step}: wrote {len(generated.images)} sample image(s) and {len(generated.texts)} text(s) to {folder}"
        )

    def run(self, step: int) -> None:
        if self.cfg.datasets:
            metrics = self.held_out_loss()
            self.metrics_logger.log(step, metrics)
        self.samples(step)
        if dist.is_initialized():
            dist.barrier()
