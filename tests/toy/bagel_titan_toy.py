"""A toy model spec that exercises the core without BAGEL: a small packed causal LM.

Loaded by tests through ``[job] plugins = ["bagel_titan_toy"]`` (tests/toy is put on the path).
It registers the model spec ``toy_lm`` and the dataloader ``toy_synthetic`` (deterministic
synthetic documents, packed, stateful), and uses the first-party attention backends and losses.
Its ``[toy]`` section lets the checkpoint, crash and parallelism tests watch the real Trainer:
``trace`` records every step's weights checksum and data position, ``step_delay_s`` slows the
loop down enough to kill a job in the middle of it, ``save_pause`` holds a save between its data
files and its marker.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import nn

from bagel_titan.checkpoint.layout import step_of
from bagel_titan.checkpoint.writer import CheckpointWriter
from bagel_titan.hookspec import hookimpl
from bagel_titan.protocols import AttentionLayerSpec, ModelOutputs, ModelSpec
from bagel_titan_plugins.attention.meta import AttentionMeta


@dataclass
class ToyConfig:
    vocab_size: int = 64
    """Vocabulary size."""
    hidden_size: int = 32
    """Model width."""
    num_layers: int = 2
    """Transformer blocks."""
    num_heads: int = 4
    """Attention heads."""
    num_kv_heads: int = 2
    """Key/value heads (grouped-query attention)."""
    min_doc_len: int = 4
    """Shortest synthetic document."""
    max_doc_len: int = 24
    """Longest synthetic document."""


@dataclass
class ToyBatch:
    input_ids: torch.Tensor
    labels: torch.Tensor
    doc_lens: list[int]
    doc_keys: list[int] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return int(self.input_ids.shape[0])

    @property
    def packed_label_ids(self) -> torch.Tensor:
        """The CE targets (what `loss_counts` calls "labels")."""
        return self.labels[self.labels >= 0]

    def to(self, device):
        return dataclasses.replace(self, input_ids=self.input_ids.to(device), labels=self.labels.to(device))


class ToyBlock(nn.Module):
    def __init__(self, cfg: ToyConfig, index: int, backend, options):
        super().__init__()
        self.head_dim = cfg.hidden_size // cfg.num_heads
        self.num_heads, self.num_kv_heads = cfg.num_heads, cfg.num_kv_heads
        self.norm1 = nn.RMSNorm(cfg.hidden_size)
        self.q = nn.Linear(cfg.hidden_size, cfg.num_heads * self.head_dim)
        self.kv = nn.Linear(cfg.hidden_size, 2 * cfg.num_kv_heads * self.head_dim)
        self.o = nn.Linear(cfg.num_heads * self.head_dim, cfg.hidden_size)
        spec = AttentionLayerSpec(
            cfg.num_heads, cfg.num_kv_heads, self.head_dim, cfg.hidden_size, index, "decoder"
        )
        self.attn_core = backend.build(spec, options)
        self.norm2 = nn.RMSNorm(cfg.hidden_size)
        self.mlp = nn.Sequential(
            nn.Linear(cfg.hidden_size, 4 * cfg.hidden_size),
            nn.GELU(),
            nn.Linear(4 * cfg.hidden_size, cfg.hidden_size),
        )

    def forward(self, x_TD: torch.Tensor, meta: AttentionMeta) -> torch.Tensor:
        h = self.norm1(x_TD)
        T = h.shape[0]
        q = self.q(h).view(T, self.num_heads, self.head_dim)
        k, v = self.kv(h).view(T, 2, self.num_kv_heads, self.head_dim).unbind(1)
        x_TD = x_TD + self.o(self.attn_core(q, k, v, meta, h).reshape(T, -1))
        return x_TD + self.mlp(self.norm2(x_TD))


class ToyLM(nn.Module):
    def __init__(self, cfg: ToyConfig, backend, options):
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.pos = nn.Embedding(cfg.max_doc_len, cfg.hidden_size)
        self.layers = nn.ModuleList(ToyBlock(cfg, i, backend, options) for i in range(cfg.num_layers))
        self.norm = nn.RMSNorm(cfg.hidden_size)
        self.head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMeta) -> torch.Tensor:
        x = self.embed(input_ids) + self.pos(positions)
        for layer in self.layers:
            x = layer(x, meta)
        return self.head(self.norm(x))


class ToySpec(ModelSpec["ToyLM", "ToyBatch"]):
    name = "toy_lm"
    flavors = {"tiny": ToyConfig()}

    def build(self, job_config, plugins):
        backend_name = job_config.attention.backend
        backend = plugins.attention_backends.get(backend_name)
        return ToyLM(
            self.flavors[job_config.model.flavor],
            backend,
            job_config.section_or_none(f"attention.{backend_name}"),
        )

    def init_weights(self, model):
        generator = torch.Generator().manual_seed(1234)
        for name, p in sorted(model.named_parameters()):
            full = torch.empty(p.shape)
            if name.endswith("bias"):
                full.zero_()
            elif "norm" in name:
                full.fill_(1.0)
            else:
                full.normal_(0.0, 0.05, generator=generator)
            _copy_full(p, full)

    def load_weights(self, model, path):
        from safetensors.torch import load_file

        state = load_file(path)
        for name, p in model.named_parameters():
            _copy_full(p, state[name])

    def export(self, model, path, dtype, state_dict=None, *, ema=False):
        import os

        import torch.distributed as dist
        from safetensors.torch import save_file

        from bagel_titan.distributed.tensor_io import gather_full

        overrides = dict(state_dict or {})
        tensors = {k: gather_full(overrides.get(k, v), dtype) for k, v in model.state_dict().items()}
        if not dist.is_initialized() or dist.get_rank() == 0:
            save_file(tensors, os.path.join(path, "model.safetensors"))

    def sharding_units(self, model):
        return list(model.layers)

    def frozen_modules(self, model, job_config):
        groups = {"embed": [model.embed, model.pos], "head": [model.head]}
        return [m for g in job_config.model.freeze for m in groups[g]]

    def loss_counts(self, batch: ToyBatch) -> dict[str, float]:
        return {"labels": int(batch.packed_label_ids.shape[0])}

    def flops(self, batch: ToyBatch) -> float:
        return 0.0

    def forward(self, model, batch: ToyBatch, generator):
        meta = AttentionMeta.from_segments(
            [[(n, "causal")] for n in batch.doc_lens], device=batch.input_ids.device
        )
        positions = torch.cat([torch.arange(n) for n in batch.doc_lens]).to(batch.input_ids.device)
        logits = model(batch.input_ids, positions, meta)
        keep = batch.labels >= 0
        return ModelOutputs(logits=logits[keep], labels=batch.labels[keep])


def _copy_full(param: torch.Tensor, full: torch.Tensor) -> None:
    """Copy a full tensor into a parameter that may be an FSDP2 DTensor shard."""
    with torch.no_grad():
        if hasattr(param, "device_mesh"):
            from torch.distributed.tensor import distribute_tensor

            param.copy_(distribute_tensor(full.to(param.dtype), param.device_mesh, param.placements))
        else:
            param.copy_(full)


def make_document(seed: int, key: int, cfg: ToyConfig) -> list[int]:
    """Document `key`: an arithmetic sequence mod vocab, learnable from its first two tokens."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + key)
    length = int(torch.randint(cfg.min_doc_len, cfg.max_doc_len + 1, (1,), generator=g))
    start = int(torch.randint(0, cfg.vocab_size, (1,), generator=g))
    stride = int(torch.randint(1, 4, (1,), generator=g))
    return [(start + stride * i) % cfg.vocab_size for i in range(length)]


class ToyLoader:
    """Rank `r` of `w` takes documents r, r+w, r+2w, ... and packs them greedily (next fit)."""

    def __init__(self, cfg: ToyConfig, seed: int, pack_len: int, dp_rank: int, dp_world_size: int):
        self.cfg, self.seed, self.pack_len = cfg, seed, pack_len
        self.dp_rank, self.dp_world_size = dp_rank, dp_world_size
        self.next_key = dp_rank
        self.packs = 0

    def __iter__(self):
        while True:
            docs, keys, used = [], [], 0
            while True:
                doc = make_document(self.seed, self.next_key, self.cfg)
                if used + len(doc) > self.pack_len and docs:
                    break
                docs.append(doc[: self.pack_len])
                keys.append(self.next_key)
                used += len(docs[-1])
                self.next_key += self.dp_world_size
            self.packs += 1
            batch = pack_documents(docs)
            batch.doc_keys = keys
            yield batch

    def state_dict(self):
        return {"next_key": self.next_key, "packs": self.packs}

    def load_state_dict(self, state):
        self.next_key, self.packs = int(state["next_key"]), int(state["packs"])

    def data_stats(self):
        return {"data/packs": self.packs}

    def close(self) -> None:
        """Nothing to stop: no worker processes."""


class ToyLoaderBuilder:
    name = "toy_synthetic"

    def build(self, job_config, plugins, model_spec, *, dp_rank, dp_world_size, datasets=None, infinite=True):
        cfg = ToySpec.flavors[job_config.model.flavor]
        return ToyLoader(
            cfg, job_config.training.seed, job_config.data.packing_length, dp_rank, dp_world_size
        )


@dataclass
class ToyOptions:
    trace: bool = False
    """Write `<run>/toy_trace.jsonl` (rank 0): a `start` record after the build phase (resumed
    step, world size, weights checksums) and a `step` record per optimizer step (the logged
    metrics, weights checksums, every rank's data position); every rank also writes its process
    id to `<run>/toy_rank<N>.pid`."""
    step_delay_s: float = 0.0
    """Seconds every rank sleeps after each step (time for a test to kill a running job)."""
    save_pause: list[float] = field(default_factory=list)
    """`[step, seconds]`: after a rank wrote its data files for checkpoint `step` (before the
    metadata and the COMPLETE marker) it sleeps `seconds`, so that a crash test can kill the job
    in the middle of a save; empty: no pause."""


def pause_saves(step: int, seconds: float) -> None:
    """Fault injection of the crash tests, installed in the job's own processes: wraps the
    checkpoint storage writer so that it sleeps after writing checkpoint `step`'s data."""
    original = CheckpointWriter.write_data

    def write_data(self, plan, planner):
        future = original(self, plan, planner)
        if step_of(os.path.basename(str(self.path))) == step:
            future.wait()
            time.sleep(seconds)
        return future

    CheckpointWriter.write_data = write_data


def checksum(tensors) -> float:
    """Sum over all ranks of every local shard (float64): equal weights give equal checksums,
    to rounding, whatever the sharding. Collective."""
    total = torch.zeros((), dtype=torch.float64)
    for t in tensors:
        local = t.to_local() if hasattr(t, "to_local") else t
        total += local.detach().double().sum().cpu()
    dist.all_reduce(total)
    return total.item()


def _trace(trainer, kind: str, **fields) -> None:
    """Append one record to the trace (collective: checksums and positions come from every rank)."""
    record = {
        "kind": kind,
        "step": trainer.train_state.step,
        "world_size": dist.get_world_size(),
        "model": checksum(p for p in trainer.model.parameters() if p.requires_grad),
        "ema": checksum(trainer.ema.state_dict().values()) if trainer.ema is not None else None,
        **fields,
    }
    positions = [None] * dist.get_world_size()
    dist.all_gather_object(positions, trainer.dataloader.state_dict())
    record["positions"] = positions
    if dist.get_rank() == 0:
        with open(os.path.join(trainer.run_folder, "toy_trace.jsonl"), "a") as f:
            f.write(json.dumps(record) + "\n")


@hookimpl
def bagel_titan_config_sections():
    return {"toy": ToyOptions}


@hookimpl
def bagel_titan_on_train_start(trainer):
    options = trainer.job_config.section("toy")
    if options.save_pause:
        step, seconds = options.save_pause
        pause_saves(int(step), seconds)
    if options.trace:
        with open(os.path.join(trainer.run_folder, f"toy_rank{dist.get_rank()}.pid"), "w") as f:
            f.write(str(os.getpid()))
        _trace(trainer, "start")


@hookimpl
def bagel_titan_on_step_end(trainer, step, metrics):
    options = trainer.job_config.section("toy")
    if options.trace:
        _trace(trainer, "step", metrics=metrics)
    if options.step_delay_s:
        time.sleep(options.step_delay_s)


@hookimpl
def bagel_titan_model_specs():
    return [ToySpec()]


@hookimpl
def bagel_titan_dataloaders():
    return [ToyLoaderBuilder()]


def pack_documents(docs: list[list[int]]) -> ToyBatch:
    """One packed batch of the given documents (each predicts its own next tokens)."""
    ids = torch.tensor([t for d in docs for t in d])
    labels = torch.cat([torch.tensor(d[1:] + [-100]) for d in docs])
    return ToyBatch(input_ids=ids, labels=labels, doc_lens=[len(d) for d in docs])
