"""The README's examples work as written: the plugin example's backend and loss, and every
`--section.key` it mentions exists."""

from __future__ import annotations

import re
import sys
import types

import pytest
import torch

from bagel_titan.config.manager import help_text
from bagel_titan.plugins import PluginManager
from bagel_titan.protocols import ModelOutputs
from bagel_titan_plugins.attention.eager import eager_attention
from bagel_titan_plugins.attention.meta import AttentionMeta
from conftest import REPO

README = (REPO / "README.md").read_text()


def plugin_example() -> types.ModuleType:
    section = README.split("## Writing a plugin", 1)[1]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    module = types.ModuleType("readme_plugin")
    sys.modules[module.__name__] = module  # as an import would (dataclasses look it up)
    exec(compile(code, "README.md", "exec"), module.__dict__)
    return module


def test_plugin_example_backend_matches_eager_and_loss_runs():
    module = plugin_example()
    backend = module.bagel_titan_attention_backends()[0]
    PluginManager(load_entry_points=False).attention_backends.register(backend.name, backend, "readme")
    attention = backend.build(None, None)
    meta = AttentionMeta.from_segments(
        [[(5, "causal"), (4, "full"), (3, "noise")], [(6, "causal")]], pad_to=20
    )
    generator = torch.Generator().manual_seed(0)
    q = torch.randn(20, 4, 8, generator=generator)
    k, v = torch.randn(2, 20, 2, 8, generator=generator)
    torch.testing.assert_close(
        attention(q, k, v, meta), eager_attention(q, k, v, meta.dense_mask()), atol=1e-5, rtol=1e-5
    )

    factory, section = (
        module.bagel_titan_loss_components()[0],
        module.bagel_titan_config_sections()["loss.z_loss"],
    )
    loss = factory(section())
    PluginManager(load_entry_points=False).loss_components.register(factory.name, factory, "readme")
    outputs = ModelOutputs(logits=torch.randn(3, 10, generator=generator))
    term = loss(outputs, 3)
    assert loss.count_name == "labels" and term.count == 3 and term.sum > 0
    torch.testing.assert_close(factory(section(scale=2.0))(outputs, 3).sum, 2 * term.sum)


@pytest.mark.parametrize(
    "page", ["README.md", *sorted(p.relative_to(REPO).as_posix() for p in (REPO / "docs").glob("*.md"))]
)
def test_every_option_the_docs_name_exists(page):
    manager = PluginManager()
    sections = {name: manager.config_sections.get(name) for name in manager.config_sections.names()}
    known = set(re.findall(r"--([a-z_.]+) \(", help_text(sections)))
    named = set(
        re.findall(
            r"--((?:job|model|training|optimizer|lr_scheduler|parallelism|activation_checkpoint|compile|"
            r"checkpoint|metrics|data|validation|attention|loss|ema|lora|bagel)\.[a-z_.]+)",
            (REPO / page).read_text(),
        )
    )
    assert named <= known, f"{page} names unknown options: {sorted(named - known)}"
