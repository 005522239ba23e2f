"""A text model spec for the fault tests: the toy LM fed by the real "packed" dataloader.

Registered as model ``faults_lm`` (flavor ``tiny``). Its processor turns a jsonl record
``{"text": "..."}`` into byte tokens, so the tests run the first-party readers, loader workers,
bad-sample accounting and packing with a model that trains in a fraction of a second per step.

Fault injection, for tests only (environment variables read by the model's forward):

- ``FAULTS_RAISE_AT = "<rank>:<step>"``: that rank raises a RuntimeError in that step's forward;
- ``FAULTS_SLEEP_PER_STEP = "<seconds>"``: every forward sleeps, so a signal can land mid-step;
- ``FAULTS_NAN_FROM = "<step>"``: from that step on the loss is NaN on every rank.
"""

from __future__ import annotations

import dataclasses
import os
import time
from dataclasses import dataclass

import torch

from bagel_titan.hookspec import hookimpl
from bagel_titan.protocols import ModelOutputs, RawSample
from bagel_titan_plugins.data.bad_samples import BadSampleError
from bagel_titan_toy import ToyBatch, ToyConfig, ToySpec


@dataclass
class TextSample:
    tokens: list[int]

    @property
    def num_tokens(self) -> int:
        return len(self.tokens)


@dataclass
class FaultsBatch(ToyBatch):
    num_samples: int = 0

    def to(self, device):
        return dataclasses.replace(self, input_ids=self.input_ids.to(device), labels=self.labels.to(device))


class TextProcessor:
    def __init__(self, cfg: ToyConfig):
        self.vocab_size, self.max_len = cfg.vocab_size, cfg.max_doc_len

    def __call__(self, sample: RawSample) -> TextSample:
        text = sample.data.get("text")
        if not isinstance(text, str) or len(text) < 2:
            raise BadSampleError("no_target", f"record {sample.index} has no `text` of 2+ characters")
        return TextSample([b % self.vocab_size for b in text.encode()][: self.max_len])


def collate(samples: list[TextSample]) -> FaultsBatch:
    docs = [s.tokens for s in samples]
    ids = torch.tensor([t for d in docs for t in d])
    labels = torch.cat([torch.tensor(d[1:] + [-100]) for d in docs])
    return FaultsBatch(input_ids=ids, labels=labels, doc_lens=[len(d) for d in docs], num_samples=len(docs))


class FaultsSpec(ToySpec):
    name = "faults_lm"

    def __init__(self):
        self.steps_seen = 0

    def build(self, job_config, plugins):
        self.steps_seen = 0  # the spec outlives a run when runs share a process
        return super().build(job_config, plugins)

    def build_processor(self, job_config):
        return TextProcessor(self.flavors[job_config.model.flavor])

    def build_collator(self, job_config):
        return collate

    def forward(self, model, batch, generator):
        self.steps_seen += 1
        raise_at = os.environ.get("FAULTS_RAISE_AT", "")
        if raise_at:
            rank, step = (int(v) for v in raise_at.split(":"))
            if rank == int(os.environ.get("RANK", "0")) and step == self.steps_seen:
                raise RuntimeError(f"injected failure on rank {rank} at step {step}")
        if os.environ.get("FAULTS_SLEEP_PER_STEP"):
            time.sleep(float(os.environ["FAULTS_SLEEP_PER_STEP"]))
        outputs = super().forward(model, batch, generator)
        nan_from = os.environ.get("FAULTS_NAN_FROM", "")
        if nan_from and self.steps_seen >= int(nan_from):
            outputs = ModelOutputs(
                logits=outputs.logits * float("nan"), labels=outputs.labels, extras=outputs.extras
            )
        return outputs


@hookimpl
def bagel_titan_model_specs():
    return [FaultsSpec()]
