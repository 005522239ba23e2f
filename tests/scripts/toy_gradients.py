"""Accumulate one step's gradients of the toy model on fixed documents and save them.

    python toy_gradients.py OUT.pt LAYOUT [bagel-titan overrides...]

LAYOUT says how this rank splits the documents into microbatches, e.g. "0123" (one microbatch
of four documents), "0,1,2,3" (four of one), or "0,1|2,3" (rank 0 gets 0 and 1, rank 1 gets 2
and 3, one document per microbatch). Run under torchrun for more than one rank; one rank can
also call `step_gradients` in its own process.
"""

import os
import sys

import torch
import torch.distributed as dist

from bagel_titan.config.manager import load_job_config
from bagel_titan.distributed.utils import destroy_distributed
from bagel_titan.trainer import Trainer
from bagel_titan_toy import ToySpec, make_document, pack_documents


def step_gradients(layout: str, overrides: list[str]) -> dict[str, torch.Tensor]:
    """The real Trainer's gradients (full tensors on every rank) after one step's forward and
    backward over this rank's microbatches of LAYOUT; the Trainer and process group are closed."""
    job_config, plugins = load_job_config(overrides)
    trainer = Trainer(job_config, plugins)
    try:
        cfg = ToySpec.flavors["tiny"]
        documents = [make_document(seed=7, key=k, cfg=cfg) for k in range(4)]
        rank_layout = layout.split("|")[dist.get_rank()]
        batches = [pack_documents([documents[int(c)] for c in micro]) for micro in rank_layout.split(",")]
        trainer.job_config.training.grad_accum_steps = len(batches)
        trainer.forward_backward(batches, step=1)
        grads = {}
        for name, p in trainer.model.named_parameters():
            g = p.grad
            grads[name] = (g.full_tensor() if hasattr(g, "full_tensor") else g).detach().clone()
    finally:
        trainer.close()
        destroy_distributed()
    return grads


if __name__ == "__main__":
    out_path, layout, *overrides = sys.argv[1:]
    grads = step_gradients(layout, overrides)
    if int(os.environ.get("RANK", "0")) == 0:
        torch.save(grads, out_path)
