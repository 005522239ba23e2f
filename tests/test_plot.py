"""`bagel-titan-plot`: every loss series of metrics.jsonl against the step, validation when
logged, as loss.png; one clear line without matplotlib or metrics."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from PIL import Image

from bagel_titan.plot import loss_series, main, plot_run, smoothed
from conftest import subprocess_env


def write_metrics(folder, records) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / "metrics.jsonl", "w") as f:
        for record in records:
            f.write(json.dumps(record) + "\n")
        f.write('{"step": 99, "loss"')  # a torn last line, as a crash leaves it


RECORDS = [
    {"step": 10, "loss": 3.0, "loss/ce": 2.0, "loss/flow_mse": 1.0, "lr": 1e-3, "grad_norm": 1.0},
    {"step": 20, "loss": 2.0, "loss/ce": 1.2, "loss/flow_mse": 0.8, "lr": 1e-3},
    {"step": 20, "val/loss": 2.5, "val/loss/ce": 1.6, "val/loss/flow_mse": 0.9},
    {"step": 30, "loss": 1.0, "loss/ce": 1.0, "loss/flow_mse": 0.0, "lr": 1e-3},  # no image in that batch
    {"step": 30, "loss": 1.5, "loss/ce": 0.7, "loss/flow_mse": 0.8},  # the step again after a resume
]


def test_series_are_the_losses_with_their_validation():
    series = loss_series(RECORDS)
    assert list(series) == ["loss", "loss/ce", "loss/flow_mse"]
    assert series["loss"]["train"] == [(10, 3.0), (20, 2.0), (30, 1.5)]
    assert series["loss/ce"]["val"] == [(20, 1.6)]
    assert series["loss/flow_mse"]["train"] == [(10, 1.0), (20, 0.8), (30, 0.8)]
    assert smoothed([1.0, 1.0, 1.0]) == pytest.approx([1.0, 1.0, 1.0])  # bias-corrected from the start


def test_writes_loss_png(tmp_path, capsys):
    run = tmp_path / "run"
    write_metrics(run, RECORDS)
    assert main([str(run)]) == 0
    assert capsys.readouterr().out.strip() == f"wrote {run / 'loss.png'}"
    with Image.open(run / "loss.png") as image:
        assert image.width > 3 * image.height  # one panel per series, side by side
    assert plot_run(str(run), str(tmp_path / "other.png")) == str(tmp_path / "other.png")


def test_user_errors(tmp_path):
    assert main([str(tmp_path / "nothing")]) == 2
    write_metrics(tmp_path / "run", [{"step": 1, "lr": 1.0}])
    assert main([str(tmp_path / "run")]) == 2
    # Without matplotlib (a None entry in sys.modules makes its import fail): one line, exit 2.
    write_metrics(tmp_path / "ok", RECORDS)
    code = "import sys; sys.modules['matplotlib'] = None; from bagel_titan.plot import main; sys.exit(main(sys.argv[1:]))"
    proc = subprocess.run(
        [sys.executable, "-c", code, str(tmp_path / "ok")],
        capture_output=True,
        text=True,
        timeout=120,
        env=subprocess_env(),
    )
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert (
        "bagel-titan-plot: error: matplotlib is not installed: pip install 'bagel-titan[plot]'" in proc.stderr
    )
