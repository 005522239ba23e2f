"""Validation during training: the loss on held-out data, and the model spec's samples.

Every rank takes part (the model may be sharded, so forwards are collective); rank 0 writes.
"""

from __future__ import annotations

import logging
import os
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.distributed as dist
from PIL import Image

from bagel_titan.protocols import loss_counts

if TYPE_CHECKING:
    from bagel_titan.trainer import Trainer

logger = logging.getLogger("bagel_titan")

# A fixed generator seed for validation noise: the held-out loss is comparable across steps.
VALIDATION_SEED = 20_240_601


class Validator:
    def __init__(self, trainer: "Trainer"):
        self.trainer = trainer
        self.cfg = trainer.job_config.validation
        self._loader = None

    def _held_out_loader(self):
        if self._loader is None:
            t = self.trainer
            self._loader = t.plugins.dataloaders.get(t.job_config.data.loader).build(
                t.job_config, t.plugins, t.model_spec, dp_rank=t.dp_rank, dp_world_size=t.dp_world_size,
                datasets=self.cfg.datasets, infinite=False,
            )
        return self._loader

    @torch.no_grad()
    def held_out_loss(self) -> dict[str, float]:
        """Mean of each loss component over `validation.steps` packs per rank (the first packs
        of the held-out data, the same every time)."""
        t = self.trainer
        batches = []
        for batch in self._held_out_loader():
            batches.append(batch)
            if len(batches) == self.cfg.steps:
                break
        if not batches:
            raise ValueError(
                f"[validation] datasets {[d.path for d in self.cfg.datasets]} gave no packs on data-parallel "
                f"rank {t.dp_rank}; add held-out data or set [validation] datasets = []"
            )
        # Ranks may hold different numbers of packs: all run the largest count (FSDP forwards
        # are collective), repeating their own packs, and only the real ones are counted.
        most = int(t._all_reduce_max([float(len(batches))])[0])
        sums = [0.0] * len(t.loss_components)
        counts = [0.0] * len(t.loss_components)
        was_training = t.model.training
        t.model.eval()
        for index in range(most):
            batch = batches[index % len(batches)].to(t.device)
            generator = torch.Generator(device=t.device).manual_seed(VALIDATION_SEED + index * 7919 + t.dp_rank)
            outputs = t.model_spec.forward(t.model, batch, generator)
            if index >= len(batches):
                continue
            local_counts = loss_counts(t.model_spec, t.loss_components, batch)
            for i, (component, count) in enumerate(zip(t.loss_components, local_counts)):
                term = component(outputs, count)
                sums[i] += float(term.sum)
                counts[i] += float(term.count)
        t.model.train(was_training)
        reduced = t._all_reduce_sum(sums + counts)
        n = len(sums)
        metrics = {}
        total = 0.0
        for component, weight, value, count in zip(t.loss_components, t.loss_weights, reduced[:n], reduced[n:]):
            mean = value / count if count else 0.0
            metrics[f"val/loss/{component.name}"] = mean
            total += weight * mean
        metrics["val/loss"] = total
        return metrics

    @torch.no_grad()
    def samples(self, step: int) -> None:
        """Ask the model spec for samples; write PNGs and texts, and log them to TensorBoard."""
        t = self.trainer
        generate = getattr(t.model_spec, "generate_samples", None)
        if generate is None:
            return
        was_training = t.model.training
        t.model.eval()
        generated = generate(t.model, t.job_config, step)
        t.model.train(was_training)
        if t.rank != 0:
            return
        folder = os.path.join(t.run_folder, "samples", f"step-{step}")
        os.makedirs(folder, exist_ok=True)
        for name, image in generated.images.items():
            array = np.asarray(image, dtype=np.uint8)
            Image.fromarray(array).save(os.path.join(folder, f"{name}.png"))
            t.metrics_logger.log_image(f"samples/{name}", array, step)
        if generated.texts:
            with open(os.path.join(folder, "texts.md"), "w") as f:
                for name, text in generated.texts.items():
                    f.write(f"## {name}\n\n{text}\n\n")
                    t.metrics_logger.log_text(f"samples/{name}", text, step)
        logger.info(
            f"step {step}: wrote {len(generated.images)} sample image(s) and {len(generated.texts)} text(s) to {folder}"
        )

    def run(self, step: int) -> None:
        t = self.trainer
        if self.cfg.datasets:
            metrics = self.held_out_loss()
            t.metrics_logger.log(step, metrics)
        self.samples(step)
        if dist.is_initialized():
            dist.barrier()
