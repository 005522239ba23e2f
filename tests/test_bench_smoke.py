"""Every benchmark script runs at CI size and records its section in a temporary results file
(never benchmarks/RESULTS.md); plus the benchmark helpers whose numbers the tables rest on:
the anchor-style FLOP count, the synthetic packs and loader, the layer-count override."""

from __future__ import annotations

import random
import sys

import pytest

from conftest import REPO, run_command, torchrun_cmd

BENCH = REPO / "benchmarks"
if str(BENCH) not in sys.path:
    sys.path.insert(0, str(BENCH))

from bench_train_step import anchor_style_flops  # noqa: E402
from synthetic_plugin import (  # noqa: E402
    BenchSection,
    SyntheticPacks,
    draw_sample,
    bench_architecture,
    build_packs,
    full_pack_samples,
)

from synthetic_bagel import VaeImage, VitImage  # noqa: E402

from bagel_titan_plugins.bagel.config import BagelConfig, architecture_for  # noqa: E402

PY = sys.executable

# (script, arguments, section title, text the section must hold)
SCRIPTS = [
    ("bench_packing.py", ["--samples", "400"], "## bench_packing", "| best_fit_decreasing |"),
    (
        "bench_dataloader.py",
        ["--samples", "8", "--large-samples", "2"],
        "## bench_dataloader",
        "| example data",
    ),
    (
        "bench_attention.py",
        ["--seq-lens", "256", "--backends", "sdpa", "--iters", "1", "--warmup", "0"],
        "## bench_attention",
        "| sdpa | 256 |",
    ),
    (
        "bench_bagel_model.py",
        ["--tokens", "256", "--repeats", "1", "--backends", "sdpa"],
        "## bench_bagel_model",
        "| sdpa |",
    ),
    (
        "bench_train_step.py",
        ["--smoke", "--backends", "sdpa", "--ac", "none,full"],
        "## bench_train_step",
        "| sdpa | full | off | 256 |",
    ),
    (
        "bench_overhead.py",
        ["--smoke"],
        "## bench_overhead",
        "| bf16 autocast, example data through the packed loader (1 worker) | 4 |",
    ),
    (
        "bench_vae_fit.py",
        ["--steps", "4", "--num-samples", "16", "--threads", "1"],
        "## bench_vae_fit",
        "| fitted, 4 steps |",
    ),
    (
        "bench_vae_layout.py",
        ["--vaes", "tiny", "--sizes", "64x96", "--dtypes", "float32", "--calls", "1"],
        "## bench_vae_layout",
        "| tiny | 64x96 | float32 |",
    ),
    (
        "bench_sdpa_cpu_precision.py",
        ["--lengths", "32", "--masks", "text+image", "--calls", "1"],
        "## bench_sdpa_cpu_precision",
        "| 32 | text+image |",
    ),
]


def _run(cmd: list[str], results) -> str:
    run_command(cmd + ["--results", str(results)], timeout=240)
    assert results.exists(), f"{' '.join(cmd)} wrote no results section"
    return results.read_text()


@pytest.mark.dist
@pytest.mark.parametrize("script,args,title,expected", SCRIPTS, ids=[s[0] for s in SCRIPTS])
def test_script_records_its_section(tmp_path, script, args, title, expected):
    text = _run([PY, str(BENCH / script), *args], tmp_path / "RESULTS.md")
    assert text.count(title) == 1
    assert "- device: " in text or "device: " in text
    assert expected in text, text


@pytest.mark.dist
def test_checkpoint_script_records_its_section(tmp_path):
    cmd = torchrun_cmd(2, str(BENCH / "bench_checkpoint.py"), "--dim", "32", "--depth", "2", "--repeats", "1")
    text = _run(cmd, tmp_path / "RESULTS.md")
    assert "## bench_checkpoint" in text and "| async |" in text


@pytest.mark.dist
def test_example_qa_eval_scores_an_export(tmp_path):
    """A random debug model exported with the example tokenizer: scored, with the chance row."""
    import torch

    from bagel_titan_plugins.bagel import weights
    from synthetic_bagel import build_bagel_for_tests
    from bagel_titan_plugins.data.example_data import write_example_data

    example = write_example_data(str(tmp_path / "example"), num_samples=8)
    model = build_bagel_for_tests("debug")
    model.tokenizer_path = example["tokenizer"]
    weights.export(model, str(tmp_path / "export"), torch.float32)
    text = _run(
        [PY, str(BENCH / "eval_example_qa.py"), str(tmp_path / "export"), "--scenes", "2"],
        tmp_path / "RESULTS.md",
    )
    assert text.count("## eval_example_qa") == 1
    row = next(line for line in text.splitlines() if line.startswith(f"| {tmp_path / 'export'} |"))
    cells = row.strip("|").split("|")[1:]
    assert len(cells) == 3 and all(cell.strip().endswith("%") for cell in cells), row
    assert "| (chance) | 17% | 33% | 17% |" in text


@pytest.mark.dist
def test_example_gen_eval_scores_an_export(tmp_path):
    """A random debug model: each generated image read by the checker, per attribute, and a grid."""
    import torch

    from bagel_titan_plugins.bagel import weights
    from synthetic_bagel import build_bagel_for_tests
    from bagel_titan_plugins.data.example_data import write_example_data

    example = write_example_data(str(tmp_path / "example"), num_samples=8)
    model = build_bagel_for_tests("debug")
    model.tokenizer_path = example["tokenizer"]
    weights.export(model, str(tmp_path / "export"), torch.float32)
    text = _run(
        [
            PY,
            str(BENCH / "eval_example_gen.py"),
            str(tmp_path / "export"),
            "--prompts",
            "2",
            "--steps",
            "2",
            "--cfg",
            "1.0",
            "2.0",
            "--grid",
            str(tmp_path / "grid.png"),
        ],
        tmp_path / "RESULTS.md",
    )
    assert text.count("## eval_example_gen") == 1
    rows = [line for line in text.splitlines() if line.startswith(f"| {tmp_path / 'export'} |")]
    assert [row.split("|")[2].strip() for row in rows] == ["1", "2"]  # one row per --cfg
    assert all(cell.strip().endswith("%") for row in rows for cell in row.strip("|").split("|")[2:])
    assert "| (chance) |  | 17% | 17% | 33% |" in text and "2 steps" in text
    assert (tmp_path / "grid.png").is_file()


@pytest.mark.dist
def test_gpu_suite_smoke_checks_flex_and_reports_unavailable_parts_as_skipped_rows(tmp_path):
    """On CPU the flex training row cannot run (no CPU backward): a row with the reason, not a crash."""
    text = _run([PY, str(BENCH / "gpu_suite.py"), "--smoke"], tmp_path / "RESULTS.md")
    assert text.count("## gpu_suite (smoke, CPU)") == 1
    assert "| flex vs eager | pass |" in text
    flex_row = next(line for line in text.splitlines() if line.startswith("| 256 | flex |"))
    assert "refused at config load" in flex_row and "cannot train on the CPU" in flex_row
    sdpa_row = next(line for line in text.splitlines() if line.startswith("| 256 | sdpa |"))
    assert "refused" not in sdpa_row and "FAILED" not in sdpa_row
    nsa = next(line for line in text.splitlines() if line.startswith("| NSA Triton vs NSA PyTorch |"))
    assert "| skipped |" in nsa or "| pass |" in nsa
    ceiling = next(line for line in text.splitlines() if line.startswith("| matrix-product ceiling |"))
    assert "1024^3 float32 matrix product:" in ceiling and "TFLOP/s" in ceiling


# -- helpers ---------------------------------------------------------------------------------


def test_anchor_style_flops_is_the_qwen2_counter():
    llm = architecture_for("7b-mot").llm
    d, hd, layers, T = 3584, 128, 28, 8192
    linear = d * (28 * hd + 2 * 4 * hd + 28 * hd) + 3 * d * 18944
    expected = 6 * (linear * layers + 2 * 152064 * d) * T + 12 * T * T * hd * 28 * layers
    assert anchor_style_flops(T, llm) == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize("length", [256, 1000, 8192])
def test_packs_are_exactly_full_and_follow_the_mix(length):
    mix = BenchSection(vit_side=[2, 6], vae_side=[2, 4], text_ids=[4, 64], distinct_packs=3, seed=length)
    packs = build_packs(architecture_for("debug"), BagelConfig(), length, mix)
    assert [p.sequence_length for p in packs] == [length] * 3
    for p in packs:
        assert sum(p.sample_lens) == length and len(p.sample_lens) == p.num_samples


def test_sample_mix_follows_the_shares():
    mix = BenchSection(understanding_share=0.6, generation_share=0.3)
    rng = random.Random(0)
    samples = [draw_sample(rng, mix) for _ in range(3000)]
    und = sum(any(isinstance(s, VitImage) for s in sample) for sample in samples) / len(samples)
    gen = sum(any(isinstance(s, VaeImage) for s in sample) for sample in samples) / len(samples)
    assert und == pytest.approx(0.6, abs=0.04) and gen == pytest.approx(0.3, abs=0.04)
    sides = [s.h for sample in samples for s in sample if isinstance(s, VitImage)]
    assert min(sides) >= 27 and max(sides) <= 70


def test_short_pack_length_is_a_clear_error():
    with pytest.raises(ValueError, match="packing_length = 1 is too short"):
        full_pack_samples(random.Random(0), 1, BenchSection())


def test_synthetic_loader_resumes_where_it_stopped():
    packs = build_packs(
        architecture_for("debug"),
        BagelConfig(),
        128,
        BenchSection(vit_side=[2, 2], vae_side=[2, 2], text_ids=[4, 8], distinct_packs=3),
    )
    loader = SyntheticPacks(packs, 128)
    it = iter(loader)
    seen = [next(it) for _ in range(4)]
    assert seen[3] is packs[0]
    resumed = SyntheticPacks(packs, 128)
    resumed.load_state_dict(loader.state_dict())
    assert next(iter(resumed)) is packs[1]
    assert resumed.data_stats()["data/fill_rate"] == 1.0 and resumed.data_stats()["data/packs"] == 5


def test_layer_override_keeps_widths():
    arch = bench_architecture("7b-mot", llm_layers=2, vit_layers=3)
    full = architecture_for("7b-mot")
    assert (arch.llm.num_layers, arch.vit.num_layers) == (2, 3)
    assert arch.llm.hidden_size == full.llm.hidden_size and arch.vit.hidden_size == full.vit.hidden_size
    assert bench_architecture("7b-mot") == full
    with pytest.raises(ValueError, match="vit_side"):
        BenchSection(vit_side=[5])


def test_gpu_suite_rows_are_valid_trainer_configs_of_a_7b_width_model(tmp_path):
    """The GPU rows cannot run here: check that each is a config the trainer accepts and that
    the model it builds is BAGEL at 7B width with the requested layer counts."""
    import argparse
    import itertools

    import torch

    import gpu_suite
    from bagel_titan.config.manager import load_job_config
    from bench_train_step import job_argv

    args = argparse.Namespace(
        smoke=False, llm_layers=2, vit_layers=3, steps=3, warmup=2, peak_tflops=0.0, profile_dir="prof"
    )
    rows = gpu_suite.grid(args)
    keys = [(r.packing_length, r.backend, r.ac, r.compile) for r in rows]
    assert sorted(keys) == sorted(
        itertools.product((8192, 16384), ("sdpa", "flex"), ("none", "full"), (False, True))
    )
    # the most telling rows first (a spent time budget drops the last ones); only the first profiled
    assert keys[:2] == [(16384, "sdpa", "none", False), (16384, "flex", "none", False)]
    assert [r.profile_dir for r in rows] == ["prof"] + [""] * (len(rows) - 1)
    for row in rows:
        cfg, plugins = load_job_config(job_argv(row, str(tmp_path)))
        assert (cfg.training.dtype, cfg.training.device, cfg.model.flavor) == ("bfloat16", "cuda", "7b-mot")
        assert (cfg.data.packing_length, cfg.attention.backend, cfg.compile.enable) == (
            row.packing_length,
            row.backend,
            row.compile,
        )
    with torch.device("meta"):
        model = plugins.model_specs.get("bagel-bench").build(cfg, plugins)
    assert len(model.language_model.model.layers) == 2
    assert len(model.vit_model.vision_model.encoder.layers) == 3
    assert model.arch.llm.hidden_size == 3584 and model.arch.llm.vocab_size == 152064
    params = sum(p.numel() for p in model.parameters())
    assert 1.5e9 < params < 3e9, params


def test_failure_reason_is_the_exception_line_of_a_traceback():
    from bench_train_step import failure_reason

    stderr = "\n".join(
        [
            "/x/y.py:3: UserWarning: something",
            "[rank0]: Traceback (most recent call last):",
            '[rank0]:   File "a.py", line 1, in <module>',
            "[rank0]: torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB",
            "[rank0]: If this error occurs under torch.compile, try again",
        ]
    )
    assert (
        failure_reason(stderr, 1) == "torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB"
    )
    assert failure_reason("", 137) == "exit code 137"
