"""Issue 19 items 3, 8, 9 (steps below the resumed step) and 12, through the real Trainer:
a resumed run applies the config's hyper-parameters and says so; no checkpoint is written during
a non-finite streak and the stop names the last healthy one; metrics.jsonl lists each step once
after a resume; data counters are summed over the data-parallel ranks."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import determinism_restored, run_bagel_titan
from faults_helpers import complete_steps, env, faults_args, text_corpus, write_jsonl

pytestmark = pytest.mark.dist


def _main_in_process(args: list[str], capsys) -> tuple[int, str]:
    """`bagel-titan ARGS` through its `main` in this process: the exit status and the standard
    error. torch's deterministic-algorithms switch, which the Trainer sets, is put back."""
    from bagel_titan.cli import main

    capsys.readouterr()
    with determinism_restored():
        code = main(args)
    return code, capsys.readouterr().err


def _rows(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_resume_applies_the_config_and_logs_each_step_once(tmp_path: Path, capsys) -> None:
    dataset = write_jsonl(tmp_path / "data.jsonl", text_corpus(100))
    run = tmp_path / "run"
    # The first two runs go through the command's `main` in this process (as test_user_errors.py
    # runs it: the exit status and standard error it gives the shell); the resumed run below is a
    # process of its own.
    assert _main_in_process(faults_args(run, dataset, steps=6), capsys)[0] == 0
    assert complete_steps(run) == [2, 4, 6]

    code, err = _main_in_process([*faults_args(run, dataset, steps=6), "--training.steps", "2"], capsys)
    assert code == 2
    assert "[training] steps = 2 but the run resumes from its checkpoint at step 6" in err
    assert "Traceback" not in err

    resumed = run_bagel_titan(
        [
            *faults_args(run, dataset, steps=6),
            "--checkpoint.load_step",
            "4",
            "--optimizer.lr",
            "1e-9",
            "--optimizer.weight_decay",
            "0.1",
        ],
        **env(),
    )
    assert "optimizer.lr (peak) 0.003 -> 1e-09" in resumed.stdout
    assert "optimizer.weight_decay 0.0 -> 0.1" in resumed.stdout
    rows = _rows(run)
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]  # steps 5 and 6 once, from the resumed run
    assert [r["lr"] for r in rows[4:]] == [1e-9, 1e-9]
    assert rows[3]["lr"] == 3e-3
    assert list((run / "checkpoint").glob("step-6.replaced-*")), "the earlier step-6 is kept, not overwritten"


def test_no_checkpoint_during_a_nonfinite_streak(tmp_path: Path) -> None:
    dataset = write_jsonl(tmp_path / "data.jsonl", text_corpus(100))
    run = tmp_path / "run"
    proc = run_bagel_titan(
        [*faults_args(run, dataset, steps=10), "--training.max_consecutive_nonfinite", "3"],
        check=False,
        FAULTS_NAN_FROM="3",
        **env(),
    )
    assert proc.returncode == 2, proc.stderr[-3000:]
    error = [line for line in proc.stderr.splitlines() if line.startswith("bagel-titan: error:")]
    assert len(error) == 1 and "Traceback" not in proc.stderr
    assert f"the last healthy checkpoint is {run / 'checkpoint' / 'step-2'}" in error[0]
    assert complete_steps(run) == [2]  # steps 4 (non-finite) and the stop were not saved


def test_data_counters_are_summed_over_ranks(tmp_path: Path) -> None:
    texts = text_corpus(60)
    texts[::5] = [""] * len(texts[::5])  # bad records ("no_target") in both ranks' shards
    dataset = write_jsonl(tmp_path / "data.jsonl", texts)
    run = tmp_path / "run"
    run_bagel_titan([*faults_args(run, dataset, steps=4), "--checkpoint.enable", "false"], nproc=2, **env())
    for row in _rows(run):
        assert row["data/tokens"] == row["tokens_seen"]  # before: rank 0's share only
        assert row["data/packs"] == 2 * row["step"]
