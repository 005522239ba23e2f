"""JobConfig: TOML + CLI precedence, validation messages, --help, TOML round trip, plugin sections."""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass

import pytest

from bagel_titan.cli import main as cli_main
from bagel_titan.config import ConfigError, to_toml
from bagel_titan.config.manager import build_job_config, help_text, split_command_line
from bagel_titan.config.fields import tomllib


@dataclass
class FancySection:
    topk: int = 16
    """Blocks per query."""
    mode: str = "a"
    """A mode."""


PLUGIN_SECTIONS = {"attention.fancy": FancySection}


def load(toml_text: str = "", argv: list[str] = (), sections=PLUGIN_SECTIONS):
    raw = tomllib.loads(toml_text)
    return build_job_config(raw, split_command_line(list(argv)), sections)


def test_precedence_cli_over_toml_over_defaults():
    cfg = load("[training]\nsteps = 7\nseed = 3\n", ["--training.steps", "9"])
    assert cfg.training.steps == 9  # CLI
    assert cfg.training.seed == 3  # TOML
    assert cfg.training.grad_accum_steps == 1  # default


def test_equals_form_lists_booleans_and_nested_sections():
    cfg = load(
        "[attention]\nbackend = 'fancy'\n[attention.fancy]\nmode = 'b'\n",
        [
            "--optimizer.betas=0.8,0.9",
            "--job.print_config",
            "--checkpoint.enable",
            "false",
            "--attention.fancy.topk",
            "8",
            "--model.freeze",
            '["vit", "llm"]',
            "--loss.components",
            "ce",
            "--loss.weights",
            "{ce = 0.5}",
        ],
    )
    assert cfg.optimizer.betas == [0.8, 0.9]
    assert cfg.job.print_config is True
    assert cfg.checkpoint.enable is False
    assert cfg.section("attention.fancy") == FancySection(topk=8, mode="b")
    assert cfg.model.freeze == ["vit", "llm"]
    assert cfg.loss.weights == {"ce": 0.5}


def test_dataset_tables():
    cfg = load("[[data.datasets]]\npath = 'a.parquet'\nweight = 2\n[[data.datasets]]\npath = 'b.jsonl'\n")
    assert [d.path for d in cfg.data.datasets] == ["a.parquet", "b.jsonl"]
    assert cfg.data.datasets[0].weight == 2.0


@pytest.mark.parametrize(
    "toml_text, argv, message",
    [
        ("[training]\nstepz = 3\n", [], "unknown key 'stepz' in [training]; did you mean 'steps'?"),
        ("[trainig]\nsteps = 3\n", [], "unknown section [trainig]; did you mean 'training'?"),
        ("", ["--training.stesp", "3"], "unknown key 'stesp' in [training]; did you mean 'steps'?"),
        ("", ["--trainnig.steps", "3"], "did you mean 'training'?"),
        (
            "",
            ["--attention.fancy.topp", "3"],
            "unknown key 'topp' in [attention.fancy]; did you mean 'topk'?",
        ),
        ("[training]\nsteps = 'many'\n", [], "training.steps: expected int, got 'many'"),
        ("", ["--training.steps", "ten"], "training.steps: expected int, got 'ten'"),
        ("", ["--checkpoint.enable", "maybe"], "expected a boolean"),
        (
            "[lr_scheduler]\ndecay_type = 'cos'\n",
            [],
            "expected one of 'constant', 'linear', 'cosine', got 'cos'",
        ),
        (
            "[[data.datasets]]\npaht = 'x'\n",
            [],
            "unknown key 'paht' in [data.datasets[0]]; did you mean 'path'?",
        ),
        ("[training]\nsteps = 0\n", [], "training.steps must be > 0"),
        (
            "[loss]\nweights = { mse = 2.0 }\n",
            [],
            "loss.weights names ['mse'], which are not in loss.components",
        ),
    ],
)
def test_errors_name_the_key_and_the_fix(toml_text, argv, message):
    with pytest.raises(ConfigError) as info:
        load(toml_text, argv)
    assert message in str(info.value)


def test_resolved_toml_round_trips():
    cfg = load(
        "[[data.datasets]]\npath = 'a.parquet'\n[attention.fancy]\ntopk = 4\n",
        [
            "--optimizer.betas",
            "0.5,0.6",
            "--loss.components",
            "ce,flow_mse",
            "--loss.weights",
            "{ce = 2.0, flow_mse = 0.5}",
            "--job.description",
            'a "quoted" text',
        ],
    )
    again = load(to_toml(cfg))
    assert dataclasses.asdict(again) == dataclasses.asdict(cfg)


def test_help_lists_every_key_with_default_and_doc():
    text = help_text(PLUGIN_SECTIONS)
    cfg = load()
    for section in [
        "job",
        "model",
        "training",
        "optimizer",
        "lr_scheduler",
        "parallelism",
        "activation_checkpoint",
        "compile",
        "checkpoint",
        "metrics",
        "data",
        "attention",
        "loss",
        "ema",
    ]:
        for f in dataclasses.fields(cfg.section(section)):
            assert f"--{section}.{f.name} (" in text, f"{section}.{f.name} missing from --help"
    assert "--attention.fancy.topk (int, default: 16)\n      Blocks per query." in text
    assert "--training.steps (int, default: 100)\n      Optimizer steps to train for." in text


def test_cli_reports_misspelt_key_without_a_traceback(tmp_path, capsys):
    config = tmp_path / "bad.toml"
    config.write_text("[optimizer]\nlearning_rate = 1e-4\n")
    assert cli_main(["--job.config_file", str(config)]) == 2
    err = capsys.readouterr().err
    assert "unknown key 'learning_rate' in [optimizer]" in err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err


def test_cli_help_and_print_config(capsys):
    assert cli_main(["--help"]) == 0
    assert "--data.packing_length" in capsys.readouterr().out
    assert cli_main(["--training.steps", "3", "--job.print_config"]) == 0
    assert tomllib.loads(capsys.readouterr().out)["training"]["steps"] == 3


@pytest.mark.parametrize(
    "argv, key",
    [
        (["--attention.backend", "flex"], "[attention] backend"),
        (["--bagel.vit_backend", "flex"], "[bagel] vit_backend"),
    ],
)
def test_a_backend_without_cpu_backward_is_refused_at_config_time(argv, key):
    """The core checks its own backend and the ones the model spec names (BAGEL's ViT backend)."""
    from bagel_titan.config.manager import check_run_environment, load_job_config

    cfg, plugins = load_job_config(
        ["--model.name", "bagel", "--loss.components", "ce", "--training.device", "cpu", *argv]
    )
    with pytest.raises(ConfigError, match=rf"{re.escape(key)} = 'flex' cannot train on the CPU"):
        check_run_environment(cfg, plugins)


@pytest.mark.parametrize(
    "argv, message",
    [
        ([], r"\[model\] name is not set; name the model spec to train, one of: .*bagel"),
        (["--model.name", "bagel"], r"\[loss\] components is empty; .*ce, .*flow_mse"),
    ],
)
def test_the_core_names_no_model_and_no_loss(argv, message):
    from bagel_titan.config.manager import check_run_environment, load_job_config

    cfg, plugins = load_job_config(["--training.device", "cpu", *argv])
    with pytest.raises(ConfigError, match=message):
        check_run_environment(cfg, plugins)
