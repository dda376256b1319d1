"""hierfed.experiments (sweeps) without MPI: specs and axes, point directories and fingerprints, status, the report."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import yaml

from hierfed.experiments import report as sweep_report
from hierfed.experiments import sweep as sw
from hierfed.errors import HierfedError

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(autouse=True)
def in_root(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(ROOT)  # topology names resolve in ./topologies


def spec(tmp_path: Path, **data) -> str:
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return str(path)


def test_grid_is_the_product_of_the_axes_in_order(tmp_path: Path) -> None:
    s = sw.load_sweep(spec(tmp_path, name="g", grid={"topology": ["fanout-1x8", "flat-8"], "schedule.tau1": [2, 5]}),
                      out=str(tmp_path / "out"))
    pts = s.points()
    assert [p.label for p in pts] == ["topology=fanout-1x8,tau1=2", "topology=fanout-1x8,tau1=5",
                                      "topology=flat-8,tau1=2", "topology=flat-8,tau1=5"]
    assert pts[1].overrides == ('topology="fanout-1x8"', "schedule.tau1=5")
    assert pts[1].dir == tmp_path / "out" / "points" / "topology-fanout-1x8_tau1-5"


def test_named_axis_and_command_line_axes(tmp_path: Path) -> None:
    path = spec(tmp_path, grid={"codec": {"none": [], "int8": ["compression.device_up=int8"],
                                          "topk": {"compression.device_up": "topk:0.05 > int8"}}},
                set=["schedule.rounds=1"])
    s = sw.load_sweep(path, sets=["seed=3"], axes=["schedule.tau2=1,2"])
    assert s.name == "spec" and s.out == Path("sweeps/spec")
    pts = s.points()
    assert len(pts) == 6 and pts[0].label == "codec=none,tau2=1"
    assert pts[5].overrides == ("schedule.rounds=1", "seed=3", 'compression.device_up="topk:0.05 > int8"', "schedule.tau2=2")
    assert sw.parse_cli_axis("topology=[default, flat]").values[1] == ("flat", ('topology="flat"',))


@pytest.mark.parametrize("data, match", [
    ({"grid": {"schedule.tau1": []}}, "expected a non-empty list"),
    ({"grid": {"codec": {"x": "not-a-list"}}}, "expected a list of KEY=VALUE"),
    ({"grid": {"schedule.tau1": [1]}, "colour": 1}, "unknown field 'colour'"),
    ({"grid": {"topology": ["default"]}, "set": "x=1"}, "set: expected a list"),
])
def test_bad_specs_fail_in_one_line(tmp_path: Path, data: dict, match: str) -> None:
    with pytest.raises(HierfedError, match=match):
        sw.load_sweep(spec(tmp_path, **data))


def test_every_point_is_validated_before_anything_runs(tmp_path: Path) -> None:
    s = sw.load_sweep(spec(tmp_path, grid={"schedule.tau1": [2, 0]}), out=str(tmp_path / "o"))
    with pytest.raises(HierfedError, match=r"point tau1=0: .*schedule.tau1"):
        sw.plan(s)
    s = sw.load_sweep(spec(tmp_path, grid={"topology": ["default", "nope"]}), out=str(tmp_path / "o"))
    with pytest.raises(HierfedError, match="point topology=nope: unknown topology 'nope'"):
        sw.plan(s)


def test_status_follows_the_point_directory(tmp_path: Path) -> None:
    s = sw.load_sweep(spec(tmp_path, grid={"topology": ["default"]}), out=str(tmp_path / "o"))
    (r,) = sw.plan(s)
    assert r.placement.world_size == 7 and "topology: " + str(ROOT / "topologies" / "default.yaml") in r.run_yaml
    assert sw.status(r) == "pending"
    d = r.point.dir
    d.mkdir(parents=True)
    (d / "point.json").write_text(json.dumps({"fingerprint": r.fingerprint}))
    (d / "checkpoints").mkdir()
    (d / "checkpoints" / "latest").write_text("round-0001")
    assert sw.status(r) == "partial"
    (d / "summary.json").write_text("{}")
    assert sw.status(r) == "done"
    (changed,) = sw.plan(sw.load_sweep(spec(tmp_path, grid={"topology": ["default"]}, set=["seed=1"]), out=str(tmp_path / "o")))
    assert changed.fingerprint != r.fingerprint and sw.status(changed) == "stale"


def fake_run(r: sw.Resolved, accs: list[float]) -> None:
    """What a finished run leaves behind, for the report (default topology: 2 edges)."""
    d = r.point.dir
    d.mkdir(parents=True, exist_ok=True)
    (d / "point.json").write_text(json.dumps({"fingerprint": r.fingerprint}))
    rows = []
    for t, acc in enumerate(accs):
        if t:
            for e in ("edge0", "edge1"):
                rows.append({"round": t, "edge_round": 1, "tier": "edge", "edge": e, "clients": 2,
                             "seconds": {"compute": 1.0, "aggregate": 0.0}, "bytes": {"device-edge": {"up": 80_000, "down": 80_000}}})
        rows.append({"round": t, "edge_round": None, "tier": "cloud", "eval_accuracy": acc, "eval_loss": 1 - acc, "loss": None,
                     "seconds": {"round": 2.0, "compute": 1.0, "aggregate": 0.0} if t else {},
                     "bytes": {"device-edge": {"up": 160_000 * (t > 0), "down": 160_000 * (t > 0)}, "edge-cloud": {"up": 40_000, "down": 40_000}}})
    (d / "metrics.jsonl").write_text("".join(json.dumps(x) + "\n" for x in rows))
    (d / "summary.json").write_text("{}")


def test_report_writes_csv_summary_and_plots(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    s = sw.load_sweep(spec(tmp_path, name="rep", grid={"schedule.tau1": [1, 2, 3]}, target=0.5), out=str(tmp_path / "o"))
    r1, r2, r3 = sw.plan(s)
    fake_run(r1, [0.25, 0.4, 0.6])
    fake_run(r2, [0.25, 0.7, 0.8])  # r3 never ran
    files = sweep_report.report(s, [r1, r2, r3])
    assert {f.name for f in files} == {"results.csv", "summary.md", "accuracy_vs_round.png", "accuracy_vs_sim_time.png", "bytes_per_tier.png"}
    for f in files:
        assert f.stat().st_size > 0
    rows = list(csv.DictReader((s.out / "results.csv").open()))
    assert len(rows) == 6 and rows[0]["tau1"] == "1" and rows[0]["point"] == "tau1-1"
    assert float(rows[2]["sim_clock_s"]) > float(rows[1]["sim_clock_s"]) > 0 == float(rows[0]["sim_clock_s"])
    assert rows[1]["bytes_device_edge_up"] == "160000"
    md = (s.out / "summary.md").read_text()
    assert "2 of 3 points finished" in md and "target acc for time-to-target: 0.500 (given in the spec)" in md
    line1 = next(line for line in md.splitlines() if line.startswith("| tau1=1 "))
    line2 = next(line for line in md.splitlines() if line.startswith("| tau1=2 "))
    assert "| 0.250 → 0.600 | 2 | 2 |" in line1 and "| 0.250 → 0.800 | 2 | 1 |" in line2
    assert "not finished" in next(line for line in md.splitlines() if line.startswith("| tau1=3 "))
