"""A non-editable install carries every package of `bagel_titan/` and `plugins/` (the latter as
`bagel_titan_plugins`), found by setup.py, not listed by hand."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _packages(tree: Path, name: str) -> set[str]:
    return {
        ".".join((name, *init.parent.relative_to(tree).parts))
        for init in tree.rglob("__init__.py")
        if "__pycache__" not in init.parts
    }


@pytest.mark.dist
def test_install_has_every_subpackage(tmp_path: Path) -> None:
    # Built from a copy of the tracked files: no build/ or egg-info of earlier builds takes part.
    source = tmp_path / "source"
    tracked = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True)
    for name in tracked.stdout.splitlines():
        if name.split("/", 1)[0] in ("bagel_titan", "plugins") or "/" not in name:
            (source / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, source / name)
    target = tmp_path / "site"
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation"]
        + ["--target", str(target), str(source)],
        check=True,
        cwd=tmp_path,
    )
    expected = _packages(ROOT / "bagel_titan", "bagel_titan") | _packages(
        ROOT / "plugins", "bagel_titan_plugins"
    )
    installed = _packages(target / "bagel_titan", "bagel_titan") | _packages(
        target / "bagel_titan_plugins", "bagel_titan_plugins"
    )
    assert "bagel_titan_plugins.compat.lmms" in expected and "bagel_titan.checkpoint" in expected
    assert installed == expected
    assert not (target / "plugins").exists(), "plugins/ is installed only as bagel_titan_plugins"
    modules = len(list((source / "plugins").rglob("*.py"))) + len(
        list((source / "bagel_titan").rglob("*.py"))
    )
    copied = len(list((target / "bagel_titan_plugins").rglob("*.py"))) + len(
        list((target / "bagel_titan").rglob("*.py"))
    )
    assert copied == modules
