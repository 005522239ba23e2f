"""NSA parameters under FSDP2 (2 ranks, gloo): built on meta, sharded, initialised in place as
DTensors, they equal an unsharded module's and give the same forward."""

from __future__ import annotations

import pytest

import os
import random

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from bagel_titan.distributed.utils import destroy_distributed
from conftest import free_port

pytestmark = pytest.mark.dist  # every test here launches processes

SPEC_ARGS = (4, 2, 8, 24, 0, "decoder")
OPTIONS = {
    "compress_type": "linear",
    "block_size": 16,
    "kernel_size": 8,
    "kernel_stride": 4,
    "topk": 4,
    "window_size": 12,
}


def _worker(rank: int, world_size: int, port: int) -> None:
    from torch.distributed.fsdp import fully_shard

    from bagel_titan.protocols import AttentionLayerSpec
    from bagel_titan_plugins.attention.nsa import NSABackend, NSAConfig
    from synthetic_attention import random_inputs, random_pack

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        spec = AttentionLayerSpec(*SPEC_ARGS)
        with torch.device("meta"):
            sharded = NSABackend().build(spec, NSAConfig(**OPTIONS))
        fully_shard(sharded)
        sharded.to_empty(device="cpu")
        sharded.reset_parameters()
        plain = NSABackend().build(spec, NSAConfig(**OPTIONS))
        assert list(sharded.state_dict()) == list(plain.state_dict())
        for (name, a), (_, b) in zip(sharded.state_dict().items(), plain.state_dict().items()):
            assert torch.equal(a.full_tensor(), b), name

        docs = random_pack(random.Random(0), 90, 3)
        inputs = random_inputs(docs, num_heads=4, num_kv_heads=2, head_dim=8, hidden_size=24, pad=2)
        args = (inputs.q_THD, inputs.k_THD, inputs.v_THD, inputs.meta, inputs.hidden_TD)
        with torch.no_grad():
            torch.testing.assert_close(sharded(*args), plain(*args))
    finally:
        destroy_distributed()


def test_nsa_parameters_shard_and_initialise_as_dtensors():
    mp.spawn(_worker, args=(2, free_port()), nprocs=2, join=True)
