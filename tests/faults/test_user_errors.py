"""Issue 19 items 9 and 11, issue 15 item 9: every user-caused failure is one
`bagel-titan: error:` line naming the key or file and the fix, exit code 2, no traceback; bad
values are refused when the config is loaded."""

from __future__ import annotations

from pathlib import Path

import pytest
from faults_helpers import faults_args, text_corpus, write_jsonl

from bagel_titan.cli import main
from bagel_titan.config.fields import ConfigError
from bagel_titan.config.manager import load_job_config


@pytest.mark.parametrize(
    "argv, message",
    [
        (
            ["--training.max_consecutive_nonfinite", "0"],
            "training.max_consecutive_nonfinite must be >= 1, got 0",
        ),
        (["--lr_scheduler.warmup_steps", "-1"], "lr_scheduler.warmup_steps must be >= 0, got -1"),
        (["--optimizer.lr", "-0.1"], "optimizer.lr must be >= 0, got -0.1"),
        (["--data.num_workers", "-1"], "data.num_workers must be >= 0"),
        (["--ema.decay", "1.0"], "ema.decay must be in [0, 1), got 1.0"),
        (["--parallelism.dp_shard", "0"], "parallelism.dp_shard must be >= 1 or -1 (auto)"),
        (["--checkpoint.keep_latest_k", "-1"], "checkpoint.keep_latest_k must be >= 0"),
    ],
)
def test_bad_values_are_refused_by_the_config(argv: list[str], message: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_job_config(argv)
    assert message in str(info.value)


def _run_in_process(args: list[str], capsys) -> tuple[int, str]:
    code = main([*args, "--training.deterministic", "false"])
    err = capsys.readouterr().err
    return code, err


@pytest.fixture
def corpus(tmp_path: Path) -> Path:
    return write_jsonl(tmp_path / "data.jsonl", text_corpus(20))


@pytest.mark.parametrize(
    "case, message",
    [
        ("flavor", "[model] flavor 'huge' is not a flavor of model 'faults_lm'; choose one of: tiny"),
        ("pretrained", "[model] pretrained_path"),
        ("tokenizer", "[model] tokenizer_path"),
        ("dataset", "dataset path"),
        ("dump_folder", "cannot write the run folder"),
        ("flex_on_cpu", "[attention] backend = 'flex' cannot train on the CPU"),
        ("safetensors", "a safetensors file does not read"),
        ("negative_lr", "optimizer.lr must be >= 0"),
        ("workers", "data.num_workers must be >= 0"),
        ("steps", "training.steps must be > 0"),
    ],
)
def test_user_mistakes_are_one_line_exit_2(
    tmp_path: Path, corpus: Path, capsys, case: str, message: str
) -> None:
    dataset = corpus
    extra: list[str] = []
    if case == "flavor":
        extra = ["--model.flavor", "huge"]
    elif case == "pretrained":
        extra = ["--model.pretrained_path", str(tmp_path / "no-such-weights")]
    elif case == "tokenizer":
        extra = ["--model.tokenizer_path", str(tmp_path / "no-such-tokenizer")]
    elif case == "dataset":
        dataset = tmp_path / "missing.jsonl"
    elif case == "dump_folder":
        (tmp_path / "a-file").write_text("")
        extra = ["--job.dump_folder", str(tmp_path / "a-file" / "runs")]
    elif case == "flex_on_cpu":
        extra = ["--attention.backend", "flex"]
    elif case == "safetensors":
        from safetensors.torch import save_file
        import torch

        weights = tmp_path / "model.safetensors"
        save_file({"head.weight": torch.zeros(64, 32)}, str(weights))
        weights.write_bytes(weights.read_bytes()[:-100])
        extra = ["--model.pretrained_path", str(weights)]
    elif case == "negative_lr":
        extra = ["--optimizer.lr", "-1"]
    elif case == "workers":
        extra = ["--data.num_workers", "-1"]
    elif case == "steps":
        extra = ["--training.steps", "0"]
    code, err = _run_in_process([*faults_args(tmp_path / "run", dataset), *extra], capsys)
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2, err
    assert len(lines) == 1 and lines[0].startswith("bagel-titan: error: "), err
    assert message in lines[0]
    assert "Traceback" not in err


@pytest.fixture(scope="module")
def bagel_example(tmp_path_factory) -> dict[str, str]:
    from bagel_titan_plugins.data.example_data import ensure_example_data

    return ensure_example_data(str(tmp_path_factory.mktemp("example") / "data"))


@pytest.mark.parametrize(
    "case, message",
    [
        ("vae_not_safetensors", "is not a readable safetensors file"),
        ("pretrained_bad_weights", "ema.safetensors' is not a readable safetensors file"),
        ("pretrained_unknown_layout", "cannot tell the weight layout"),
        ("pretrained_wrong_keys", "do not match the model: missing"),
        ("tokenizer_folder_without_one", "cannot load a tokenizer from"),
        ("freeze_group", "unknown group(s) ['nope'] in [model] freeze"),
    ],
)
def test_bagel_weight_and_tokenizer_mistakes_are_one_line_exit_2(
    tmp_path: Path, bagel_example: dict[str, str], capsys, case: str, message: str
) -> None:
    """The BAGEL model spec's own inputs (weights, VAE file, tokenizer, freeze groups) fail the
    same way as the core's: one line naming the file or key, exit 2."""
    from safetensors.torch import save_file
    import torch

    folder = tmp_path / "weights"
    folder.mkdir()
    extra: list[str] = []
    if case == "vae_not_safetensors":
        (folder / "ae.safetensors").write_text("not a safetensors file")
        extra = ["--bagel.vae_path", str(folder / "ae.safetensors")]
    elif case == "pretrained_bad_weights":
        (folder / "llm_config.json").write_text("{}")
        (folder / "ema.safetensors").write_bytes(b"\x00" * 16)
        (folder / "ae.safetensors").write_bytes(b"\x00" * 16)
        extra = ["--model.pretrained_path", str(folder)]
    elif case == "pretrained_unknown_layout":
        (folder / "weights.bin").write_bytes(b"\x00")
        extra = ["--model.pretrained_path", str(folder)]
    elif case == "pretrained_wrong_keys":
        (folder / "config.json").write_text("{}")
        save_file({"not_a_bagel.weight": torch.zeros(2, 2)}, str(folder / "model.safetensors"))
        extra = ["--model.pretrained_path", str(folder)]
    elif case == "tokenizer_folder_without_one":
        extra = ["--model.tokenizer_path", str(folder)]
    elif case == "freeze_group":
        extra = ["--model.freeze", '["nope"]']
    args = [
        "--job.config_file",
        str(Path(__file__).resolve().parents[2] / "train_configs" / "debug_model.toml"),
        "--job.dump_folder",
        str(tmp_path / "run"),
        "--model.tokenizer_path",
        bagel_example["tokenizer"],
        "--data.datasets",
        f'[{{path = "{bagel_example["data"]}"}}]',
        "--data.num_workers",
        "0",
        "--training.steps",
        "1",
        "--training.device",
        "cpu",
        "--bagel.vae_path",
        "",
        "--validation.enable",
        "false",
        *extra,
    ]
    code, err = _run_in_process(args, capsys)
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2, err
    assert len(lines) == 1 and lines[0].startswith("bagel-titan: error: "), err
    assert message in lines[0], lines[0]
    assert "Traceback" not in err


@pytest.mark.parametrize(
    "command, argv, message",
    [
        ("parity", ["{tmp}/no-fixture"], "is not a reference fixture folder (no config.json)"),
        ("example_data", ["{tmp}/a-file/data"], "cannot write"),
        ("encode_latents", ["--bagel.latent_cache", "{tmp}/a-file/cache"], "[bagel] latent_cache"),
    ],
)
def test_helper_commands_fail_in_one_line(
    tmp_path: Path, capsys, command: str, argv: list[str], message: str
):
    """The other commands' user mistakes: one `<command>: error:` line, exit 2, no traceback."""
    from bagel_titan_plugins.bagel import encode_latents, parity
    from bagel_titan_plugins.data import example_data

    (tmp_path / "a-file").write_text("")  # a file where a folder is expected
    mains = {"parity": parity.main, "example_data": example_data.main, "encode_latents": encode_latents.main}
    args = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    if command == "encode_latents":
        from safetensors.torch import save_file

        from bagel_titan_plugins.bagel.spec import build_bagel
        from bagel_titan_plugins.bagel.config import BagelConfig, architecture_for

        vae = build_bagel(architecture_for("debug"), BagelConfig()).vae
        assert vae is not None
        save_file(
            {k: v.contiguous() for k, v in vae.module.state_dict().items()}, str(tmp_path / "ae.safetensors")
        )
        debug = Path(__file__).resolve().parents[2] / "train_configs" / "debug_model.toml"
        args = ["--job.config_file", str(debug), "--bagel.vae_path", str(tmp_path / "ae.safetensors"), *args]
    code = mains[command](args)
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2, err
    assert len(lines) == 1 and ": error: " in lines[0] and message in lines[0], err
    assert "Traceback" not in err
