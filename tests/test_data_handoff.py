"""A batch's hand-off from a loader worker (plugins/data/handoff.py): every field arrives exact
through one named shared-memory segment, and the packed loader's worker batches equal the
in-process ones field for field."""

from __future__ import annotations

import dataclasses
import pickle
from multiprocessing.reduction import ForkingPickler

import torch

from bagel_titan.config.job_config import DatasetEntry
from bagel_titan_plugins.attention.meta import AttentionMeta
from bagel_titan_plugins.data.handoff import FlatBatch
from test_data_loader import build, example, job, plugins  # noqa: F401 (fixtures)


def assert_same(a, b, where="batch"):
    """Field for field: tensors bitwise (dtype, shape, values), the rest by ==."""
    assert type(a) is type(b), where
    if isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and a.shape == b.shape, where
        assert torch.equal(a, b), where
    elif dataclasses.is_dataclass(a):
        for f in dataclasses.fields(a):
            assert_same(getattr(a, f.name), getattr(b, f.name), f"{where}.{f.name}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f"{where}[{i}]")
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for k in a:
            assert_same(a[k], b[k], f"{where}[{k!r}]")
    else:
        assert a == b, where


@dataclasses.dataclass
class Pack:
    ids: torch.Tensor
    pixels: torch.Tensor
    extras: list
    meta: AttentionMeta
    nothing: torch.Tensor | None = None


def a_pack() -> Pack:
    ids = torch.arange(37, dtype=torch.int64)
    meta = AttentionMeta.from_segments([[(5, "causal"), (4, "full")], [(3, "noise")]], position_ids=ids[:12])
    return Pack(
        ids=ids,
        pixels=torch.randn(3, 5, 7).permute(2, 0, 1),  # not contiguous
        extras=[
            torch.tensor([True, False, True]),
            torch.randn(4, 3).to(torch.bfloat16),
            torch.zeros(0, 588),
            torch.tensor(2.5),  # 0-dim
            ids,  # the same tensor object again
            [(1, 2), "text"],
        ],
        meta=meta,
    )


def test_pack_unpack_is_exact():
    pack = a_pack()
    flat = FlatBatch.pack(pack)
    # the DataLoader's own pickler, as between a worker and the training process
    back = pickle.loads(ForkingPickler.dumps(flat)).unpack()
    assert_same(back, pack)
    assert back.extras[4] is back.ids  # one tensor object stays one tensor
    assert back.pixels.is_contiguous()
    back.ids += 1  # ordinary writable tensors, each in its own bytes
    assert torch.equal(back.ids, torch.arange(1, 38)) and torch.equal(back.extras[0], pack.extras[0])


def test_a_batch_without_tensor_bytes():
    flat = FlatBatch.pack({"empty": torch.zeros(0, 3), "n": 3})
    assert flat.segment is None
    back = pickle.loads(ForkingPickler.dumps(flat)).unpack()
    assert back["empty"].shape == (0, 3) and back["n"] == 3


def test_tensors_that_cannot_be_flattened_still_travel():
    weight = torch.nn.Parameter(torch.ones(3))
    back = FlatBatch.pack({"w": weight, "x": torch.ones(2)}).unpack()
    assert isinstance(back["w"], torch.nn.Parameter) and torch.equal(back["w"], weight)


def test_worker_batches_equal_in_process_batches(example, plugins):  # noqa: F811
    """One worker reads the same shard as the main process: the same batches, every field."""
    datasets = [DatasetEntry(path=example["data"])]
    in_process = iter(build(job(datasets, workers=0), plugins, example))
    loader = build(job(datasets, workers=1), plugins, example)
    try:
        through_worker = iter(loader)
        for _ in range(6):
            assert_same(next(through_worker), next(in_process))
    finally:
        loader.close()
