"""Plugin discovery: entry points of an installed third-party distribution, clashes, unknown names."""

from __future__ import annotations

import json
import sys
import textwrap
import types
from pathlib import Path
from typing import Any

import pytest
from torch import nn

from bagel_titan.hookspec import hookimpl
from bagel_titan.plugins import PluginError, PluginManager, UnknownNameError
from bagel_titan.errors import UserError
from bagel_titan.protocols import AttentionBackend, ModelSpec
from conftest import run_bagel_titan

THIRD_PARTY_MODULE = '''
"""A third-party bagel-titan plugin: an attention backend and a loss component."""
import os

import torch
from torch import nn

from bagel_titan.hookspec import hookimpl
from bagel_titan.protocols import AttentionBackend, AttentionModule, LossTerm
from bagel_titan_plugins.attention.eager import eager_attention


class CountingAttention(AttentionModule):
    """Exact attention that records that it ran (so the test can tell it was selected)."""

    calls = 0

    def forward(self, q, k, v, meta, hidden=None):
        CountingAttention.calls += 1
        if CountingAttention.calls == 1:
            open(os.environ["THIRD_PARTY_MARKER"], "a").write("attention\\n")
        return eager_attention(q, k, v, meta.dense_mask())


class CountingBackend(AttentionBackend):
    name = "counting_eager"

    def build(self, spec, options):
        return CountingAttention()


class ZLoss:
    """PaLM's z-loss: log(sum(exp(logits)))^2 per labelled token."""

    name = "z_loss"

    def __init__(self, options):
        self.options = options

    count_name = "labels"

    def __call__(self, outputs, count):
        open(os.environ["THIRD_PARTY_MARKER"], "a").write("z_loss\\n")
        z = torch.logsumexp(outputs.logits.float(), dim=-1)
        return LossTerm(sum=(z * z).sum(), count=count)


class ZLossFactory:
    name = "z_loss"

    def __call__(self, options):
        return ZLoss(options)


@hookimpl
def bagel_titan_attention_backends():
    return [CountingBackend()]


@hookimpl
def bagel_titan_loss_components():
    return [ZLossFactory()]
'''


def make_distribution(site: Path) -> None:
    """A real installed distribution: a module plus its `*.dist-info` with entry points."""
    site.mkdir(parents=True, exist_ok=True)
    (site / "thirdparty_bagel_plugin.py").write_text(THIRD_PARTY_MODULE)
    info = site / "thirdparty_bagel_plugin-0.1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: thirdparty-bagel-plugin\nVersion: 0.1.0\n")
    (info / "entry_points.txt").write_text("[bagel_titan]\nthirdparty = thirdparty_bagel_plugin\n")
    (info / "RECORD").write_text("")


@pytest.mark.dist
def test_third_party_distribution_selected_from_toml(tmp_path, toy_args):
    site = tmp_path / "site"
    make_distribution(site)
    marker = tmp_path / "marker.txt"
    config = tmp_path / "train.toml"
    config.write_text(
        textwrap.dedent("""
        [attention]
        backend = "counting_eager"
        [loss]
        components = ["ce", "z_loss"]
        weights = { z_loss = 1e-4 }
    """)
    )
    args = [a for a in toy_args]
    # The TOML chooses the backend and the losses: drop the toy defaults for those keys.
    for key in ("--attention.backend", "--loss.components"):
        i = args.index(key)
        del args[i : i + 2]
    run_bagel_titan(
        ["--job.config_file", str(config), *args, "--training.steps", "2"],
        PYTHONPATH=str(site),
        THIRD_PARTY_MARKER=str(marker),
    )
    seen = set(marker.read_text().split())
    assert seen == {"attention", "z_loss"}
    records = [json.loads(line) for line in (tmp_path / "toy" / "metrics.jsonl").read_text().splitlines()]
    assert "loss/z_loss" in records[-1] and "loss/ce" in records[-1]


def _module(name: str, **hooks) -> types.ModuleType:
    module = types.ModuleType(name)
    for hook_name, fn in hooks.items():
        setattr(module, hook_name, hookimpl(fn))
    sys.modules[name] = module
    return module


class _Backend(AttentionBackend):
    def __init__(self, name):
        self.name = name

    def build(self, spec, options):
        raise AssertionError("not built in this test")


def test_two_plugins_registering_one_name_is_an_error_naming_both():
    _module("plugin_one", bagel_titan_attention_backends=lambda: [_Backend("dup")])
    _module("plugin_two", bagel_titan_attention_backends=lambda: [_Backend("dup")])
    with pytest.raises(PluginError) as info:
        PluginManager(["plugin_one", "plugin_two"], load_entry_points=False)
    assert (
        "'dup'" in str(info.value) and "'plugin_one'" in str(info.value) and "'plugin_two'" in str(info.value)
    )


class _BareBackend:
    """A backend written against the structure alone, without the contract's defaults."""

    name = "bare"

    def build(self, spec, options):
        raise AssertionError("not built in this test")


def test_an_object_lacking_a_contract_member_is_refused_when_registered():
    _module("plugin_bare", bagel_titan_attention_backends=lambda: [_BareBackend()])
    with pytest.raises(PluginError) as info:
        PluginManager(["plugin_bare"], load_entry_points=False)
    message = str(info.value)
    assert "attention backend 'bare' of plugin 'plugin_bare' lacks encoder_fallback, trains_on_cpu" in message
    assert "subclass bagel_titan.protocols.AttentionBackend" in message


def test_unknown_name_lists_registered_ones():
    manager = PluginManager()
    with pytest.raises(UnknownNameError) as info:
        manager.attention_backends.get("eagr")
    message = str(info.value)
    assert "unknown attention backend 'eagr' in [attention] backend; did you mean 'eager'?" in message
    assert "registered: " in message and "eager" in message


def test_unknown_plugin_module_is_a_clear_error():
    with pytest.raises(
        PluginError, match="cannot import plugin module 'no_such_plugin_xyz' named in \\[job\\] plugins"
    ):
        PluginManager(["no_such_plugin_xyz"], load_entry_points=False)


def test_first_party_plugins_come_from_entry_points():
    manager = PluginManager()
    assert "eager" in manager.attention_backends.names()
    assert manager.attention_backends.plugin_of("eager") == "attention"


class _MinimalSpec(ModelSpec[nn.Module, Any]):
    """A model spec with no optional member of its own: the contract's defaults apply."""

    name = "minimal"


def test_a_spec_without_lora_groups_refuses_lora_enable():
    from bagel_titan.config.job_config import LoRA
    from bagel_titan.lora import apply_lora

    with pytest.raises(UserError, match="model spec 'minimal' does not support LoRA; set \\[lora\\] enable"):
        apply_lora(nn.Linear(2, 2), _MinimalSpec(), LoRA(enable=True))


def test_the_contract_defaults_ask_the_core_for_nothing():
    spec, model = _MinimalSpec(), nn.Linear(2, 2)
    assert spec.separate_shards(model) == [] and spec.attention_backends(None) == {}
    assert spec.generate_samples(model, None, 0) is None and spec.flavors == {}
