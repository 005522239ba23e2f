"""`[profiling]`: the configured steps are recorded with torch.profiler into the run folder."""

from __future__ import annotations

import json

import pytest

from bagel_titan.cli import main as cli_main
from bagel_titan.config.manager import load_job_config
from bagel_titan.errors import UserError


def test_the_configured_steps_are_recorded_with_the_phases(tmp_path, toy_args):
    argv = [*toy_args, "--training.steps", "5", "--profiling.enable", "true"]
    assert cli_main([*argv, "--profiling.start_step", "3", "--profiling.steps", "2"]) == 0
    folder = tmp_path / "toy" / "profile" / "rank0"
    assert sorted(p.name for p in folder.iterdir()) == ["summary_step4.txt", "trace_step4.json"]

    events = json.loads((folder / "trace_step4.json").read_text())["traceEvents"]
    names = [e.get("name", "") for e in events]
    assert sum(n.startswith("ProfilerStep#") for n in set(names)) == 2  # steps 3 and 4, one each
    for phase in ("data", "forward", "loss", "backward", "clip_grad_norm", "optimizer"):
        assert names.count(phase) == 2, phase
    summary = (folder / "summary_step4.txt").read_text()
    assert summary.startswith("2 step(s) recorded: ")
    assert "ops by self cpu time total, steps up to 4" in summary
    assert "aten::" in summary
    ranges = summary.split("named ranges")[1]
    assert "forward" in ranges and "bagel" not in ranges  # the toy model names no parts


def test_a_resumed_run_records_the_steps_after_its_first(tmp_path, toy_args):
    argv = [*toy_args, "--checkpoint.enable", "true", "--checkpoint.interval", "3"]
    assert cli_main([*argv, "--training.steps", "3"]) == 0
    profiled = [*argv, "--training.steps", "7", "--profiling.enable", "true", "--profiling.steps", "2"]
    assert cli_main([*profiled, "--profiling.start_step", "2"]) == 0
    # resumed at step 3: step 4 warms up, steps 5 and 6 are recorded
    folder = tmp_path / "toy" / "profile" / "rank0"
    assert sorted(p.name for p in folder.iterdir()) == ["summary_step6.txt", "trace_step6.json"]


def test_a_run_that_ends_inside_the_window_writes_what_it_recorded(tmp_path, toy_args):
    argv = [*toy_args, "--training.steps", "3", "--profiling.enable", "true", "--profiling.start_step", "3"]
    assert cli_main([*argv, "--profiling.steps", "2"]) == 0
    folder = tmp_path / "toy" / "profile" / "rank0"
    assert sorted(p.name for p in folder.iterdir()) == ["summary_step3.txt", "trace_step3.json"]
    assert (folder / "summary_step3.txt").read_text().startswith("1 step(s) recorded: ")


def test_a_run_that_ends_before_the_window_says_so(tmp_path, toy_args, caplog):
    argv = [*toy_args, "--training.steps", "2", "--profiling.enable", "true", "--profiling.start_step", "3"]
    assert cli_main(argv) == 0
    assert not (tmp_path / "toy" / "profile").exists()
    assert "the run ended at step 2, before the first step to record; nothing written" in caplog.text


def test_a_bad_setting_names_its_key():
    with pytest.raises(UserError, match=r"profiling\.start_step must be >= 2"):
        load_job_config(["--profiling.start_step", "1"])
