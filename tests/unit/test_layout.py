"""The package layout's contracts (pyproject.toml, [tool.importlinter]): layers and no import cycles.

`lint-imports` is import-linter's command; it reads the import graph with grimp, function-level
imports included. The second test shows the contracts can fail: a copy of the package with an
upward import and a cycle added breaks both.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
LINT = str(Path(sys.executable).parent / "lint-imports")


def lint(cwd: Path, pythonpath: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(pythonpath))
    return subprocess.run([LINT, "--no-cache"], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def test_layers_and_no_cycles_are_kept() -> None:
    res = lint(ROOT, ROOT)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "Contracts: 2 kept, 0 broken." in res.stdout


def test_an_upward_import_and_a_cycle_break_the_contracts(tmp_path: Path) -> None:
    shutil.copytree(ROOT / "hierfed", tmp_path / "hierfed", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    with open(tmp_path / "hierfed" / "topology" / "placement.py", "a") as f:
        f.write("\n\ndef _upward():\n    import hierfed.roles.cloud  # noqa: F401\n")
    with open(tmp_path / "hierfed" / "placement" / "memory.py", "a") as f:
        f.write("\n\ndef _cycle():\n    import hierfed.placement.link  # noqa: F401\n")
    with open(tmp_path / "hierfed" / "placement" / "link.py", "a") as f:
        f.write("\n\ndef _cycle():\n    import hierfed.placement.memory  # noqa: F401\n")
    res = lint(tmp_path, tmp_path)
    assert res.returncode != 0
    assert "Contracts: 0 kept, 2 broken." in res.stdout, res.stdout
    assert "hierfed.topology.placement -> hierfed.roles.cloud" in res.stdout, res.stdout
