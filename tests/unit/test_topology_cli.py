"""`hierfed topology validate|ranks|show`: through argparse directly, and through the installed CLI."""

from __future__ import annotations

import functools
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import topology_cli
from hierfed.errors import HierfedError

ROOT = Path(__file__).resolve().parents[2]
TOPOS = ROOT / "topologies"
HIERFED = Path(sys.executable).parent / "hierfed"


def test_validate(capsys: pytest.CaptureFixture[str]) -> None:
    code, out = topology_cli(capsys, "validate", str(TOPOS / "default.yaml"))
    assert code == 0
    assert out == "ok: default: 1 cloud + 2 edges × (1 + 2 devices) = 7 ranks, 4 clients\n"


@pytest.mark.parametrize("name, size", [("default", 7), ("flat", 5), ("uneven", 7), ("virtual", 7)])
def test_ranks(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, name: str, size: int) -> None:
    monkeypatch.chdir(ROOT)  # bare names resolve in ./topologies
    assert topology_cli(capsys, "ranks", name) == (0, f"{size}\n")


def test_show_default(capsys: pytest.CaptureFixture[str]) -> None:
    code, out = topology_cli(capsys, "show", str(TOPOS / "default.yaml"))
    lines = out.splitlines()
    assert code == 0
    assert lines[0] == "default: 1 cloud + 2 edges × (1 + 2 devices) = 7 ranks, 4 clients"
    tree = [line for line in lines if line.startswith(("cloud", "├", "│", "└", " "))][-7:]
    assert [t.split("rank")[0].strip(" ├│└─") for t in tree] == [
        "cloud", "edge0", "edge0/d0", "edge0/d1", "edge1", "edge1/d0", "edge1/d1"]
    assert [int(t.split("rank ")[1].split()[0]) for t in tree] == list(range(7))
    assert tree[1].startswith("├─ edge0") and tree[2].startswith("│  ├─ edge0/d0")
    assert tree[6].startswith("   └─ edge1/d1")
    assert "↔ cloud 1000 Mb/s, 20 ms" in tree[1]
    assert "clients 0" in tree[2] and "16 GB ×1.0" in tree[2] and "↔ edge 100 Mb/s, 10 ms" in tree[2]


def test_show_virtual_is_compact(capsys: pytest.CaptureFixture[str]) -> None:
    _, out = topology_cli(capsys, "show", str(TOPOS / "virtual.yaml"))
    assert "clients 0-24 (25)" in out and "clients 75-99 (25)" in out
    assert "clients 0, 1" not in out


def test_show_flat_and_uneven(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    _, out = topology_cli(capsys, "show", str(TOPOS / "flat.yaml"))
    assert "└─ d3" in out and "↔ cloud 50 Mb/s, 40 ms" in out and "edge" not in out
    path = tmp_path / "z.yaml"
    path.write_text("edges:\n  - {ranks: 2, devices: [{class: phone, split_layers: 3}]}\n"
                    "device_classes: {phone: {memory_gb: 4, speed: 0.25}}\n", encoding="utf-8")
    _, out = topology_cli(capsys, "show", str(path))
    assert "└─ edge0        ranks 1-2  ↔ cloud" in out
    assert "4 GB ×0.25 phone split 3" in out


def test_errors_propagate_as_hierfed_error(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("edges:\n  - devices:\n      - ranks: 0\n", encoding="utf-8")
    with pytest.raises(HierfedError, match=r"bad\.yaml: edges\[0\]\.devices\[0\]\.ranks: must be >= 1"):
        topology_cli(capsys, "validate", str(bad))
    with pytest.raises(HierfedError, match="no such topology file"):
        topology_cli(capsys, "show", str(tmp_path / "missing.yaml"))


def test_subcommand_is_required(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as e:
        topology_cli(capsys)
    assert e.value.code == 2


# ------------------------------------------------ the real entry point (once hierfed/cli.py exists) ---

def needs_cli(test):
    """The installed `hierfed` console script is part of what is tested: missing, the test fails."""
    @functools.wraps(test)
    def run(*a, **kw):
        assert HIERFED.exists(), f"the `hierfed` console script is not installed at {HIERFED} (pip install -e .)"
        return test(*a, **kw)

    return run


@needs_cli
def test_cli_validate_ok() -> None:
    r = subprocess.run([str(HIERFED), "topology", "validate", str(TOPOS / "uneven.yaml")],
                       capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("ok: uneven: ") and r.stdout.count("\n") == 1


@needs_cli
@pytest.mark.parametrize("content", [
    "edges:\n  - devices:\n      - ranks: 0\n",
    "edges: [\n",
    None,
    # impossible sizes are refused from the counts alone, before a Placement materialises anything
    "edges:\n  - devices:\n      - {ranks: 1000000000000, clients: 1000000000000}\n",
    "devices:\n  - {ranks: 4, clients: 1000000000}\n",
])
def test_cli_validate_bad_is_one_line_exit_2(tmp_path: Path, content: str | None) -> None:
    path = tmp_path / "bad.yaml"
    if content is not None:
        path.write_text(content, encoding="utf-8")
    r = subprocess.run([str(HIERFED), "topology", "validate", str(path)],
                       capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert r.returncode == 2
    assert r.stdout == ""
    lines = r.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"hierfed: error: {path}: "), r.stderr
    assert "Traceback" not in r.stderr


def test_show_an_edge_that_trains_locally(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    path = tmp_path / "own.yaml"
    path.write_text("edges:\n  - {ranks: 2, train_locally: true, devices: [{ranks: 2}]}\n", encoding="utf-8")
    _, out = topology_cli(capsys, "show", str(path))
    assert "1 cloud + 1 edge × (2 + 2 devices) = 5 ranks, 3 clients" in out
    assert "└─ edge0" in out and "trains client 2 itself" in out


def test_validate_makes_the_checks_run_makes_before_launch(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    path = tmp_path / "both.yaml"
    path.write_text("edges:\n  - {train_locally: true, devices: [{ranks: 1, split_layers: 1}]}\n", encoding="utf-8")
    with pytest.raises(HierfedError, match="has split devices and train_locally: true"):
        topology_cli(capsys, "validate", str(path))
    run = tmp_path / "run.yaml"
    run.write_text("deepspeed: {config: {train_batch_size: 7}}\n", encoding="utf-8")
    with pytest.raises(HierfedError, match=r"deepspeed \(edge0\): train_batch_size 7"):
        topology_cli(capsys, "validate", str(TOPOS / "edge-clients.yaml"), "--config", str(run))
