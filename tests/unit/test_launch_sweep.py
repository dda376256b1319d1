"""hierfed.experiments (sweeps) without MPI: specs and axes, point directories and fingerprints, status, the report."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import yaml

from hierfed.errors import HierfedError
from hierfed.experiments import report as sweep_report
from hierfed.experiments import sweep as sw

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


def fake_run(r: sw.Resolved, accs: list[float], groups: dict[str, list[float]] | None = None,
             epsilon: list[float] | None = None) -> None:
    """What a finished run leaves behind, for the report (default topology: 2 edges of clients 0-1, 2-3).
    Each edge round, every client does 1 TFLOP of work; client 3 (edge1) twice that. `epsilon`: a DP
    run's ε after each round (the cloud rows' `epsilon`)."""
    d = r.point.dir
    d.mkdir(parents=True, exist_ok=True)
    (d / "point.json").write_text(json.dumps({"fingerprint": r.fingerprint}))
    rows = []
    for t, acc in enumerate(accs):
        if t:
            for e, clients in (("edge0", (0, 1)), ("edge1", (2, 3))):
                work = [{"client": c, "steps": 1, "flops": 1e12 * (1 + (c == 3)), "seconds": 1.0, "up": 40_000} for c in clients]
                rows.append({"round": t, "edge_round": 1, "tier": "edge", "edge": e, "clients": 2, "receivers": 2, "work": work,
                             "seconds": {"compute": 1.0, "aggregate": 0.0}, "bytes": {"device-edge": {"up": 80_000, "down": 80_000}}})
        row = {"round": t, "edge_round": None, "tier": "cloud", "eval_accuracy": acc, "eval_loss": 1 - acc, "loss": None,
               "seconds": {"round": 2.0, "compute": 1.0, "aggregate": 0.0} if t else {},
               "bytes": {"device-edge": {"up": 160_000 * (t > 0), "down": 160_000 * (t > 0)}, "edge-cloud": {"up": 40_000, "down": 40_000}}}
        if groups:
            row["groups"] = {g: {"eval_accuracy": v[t]} for g, v in groups.items()}
        if epsilon:
            row["epsilon"] = epsilon[t]
        rows.append(row)
    (d / "metrics.jsonl").write_text("".join(json.dumps(x) + "\n" for x in rows))
    (d / "summary.json").write_text(json.dumps({"trainable_params": 1000}))


def test_report_writes_csv_summary_and_plots(tmp_path: Path) -> None:
    s = sw.load_sweep(spec(tmp_path, name="rep", grid={"schedule.tau1": [1, 2, 3]}, target=0.5), out=str(tmp_path / "o"))
    r1, r2, r3 = sw.plan(s)
    fake_run(r1, [0.25, 0.4, 0.6])
    fake_run(r2, [0.25, 0.7, 0.8])  # r3 never ran
    files = sweep_report.report(s, [r1, r2, r3])
    assert {f.name for f in files} == {"results.csv", "summary.md", "accuracy_vs_round.png", "accuracy_vs_sim_time.png",
                                       "accuracy_vs_cloud_bytes.png", "bytes_per_tier.png"}
    for f in files:
        assert f.stat().st_size > 0
    rows = list(csv.DictReader((s.out / "results.csv").open()))
    assert len(rows) == 6 and rows[0]["tau1"] == "1" and rows[0]["point"] == "tau1-1"
    # the default run config's sim section: a speed-1.0 device is 0.5 TFLOP/s, so client 3's 2 TFLOP take 4 s a round
    assert float(rows[2]["sim_clock_s"]) > float(rows[1]["sim_clock_s"]) > 4.0 > 0 == float(rows[0]["sim_clock_s"])
    assert float(rows[1]["sim_compute_s"]) == pytest.approx(4.0, rel=1e-3)
    assert rows[1]["bytes_device_edge_up"] == "160000" and rows[2]["cloud_link_bytes"] == "240000"
    md = (s.out / "summary.md").read_text()
    assert "2 of 3 points finished" in md and "target accuracy for time-to-target: 0.5 (given in the spec)" in md
    line1 = next(line for line in md.splitlines() if line.startswith("| tau1=1 "))
    line2 = next(line for line in md.splitlines() if line.startswith("| tau1=2 "))
    assert "| 1 | 0.600 | 1/1 | 2 |" in line1 and "| 1 | 0.800 | 1/1 | 1 |" in line2
    assert "not finished" in next(line for line in md.splitlines() if line.startswith("| tau1=3 "))


def test_report_averages_seeds_and_reports_groups(tmp_path: Path) -> None:
    """A seed axis: one condition per topology, mean ± sd over its seeds; groups give a worst-group column and plot;
    a target no seed reaches says so; without a target in the spec the fallback is named."""
    s = sw.load_sweep(spec(tmp_path, name="seeds", grid={"schedule.tau2": [1, 2], "seed": [0, 1]},
                           target={"eval_accuracy": 0.75}), out=str(tmp_path / "o"))
    a0, a1, b0, b1 = sw.plan(s)
    fake_run(a0, [0.2, 0.6, 0.8], groups={"x": [0.1, 0.5, 0.7], "y": [0.3, 0.7, 0.9]})
    fake_run(a1, [0.2, 0.7, 0.9], groups={"x": [0.1, 0.6, 0.8], "y": [0.3, 0.8, 1.0]})
    fake_run(b0, [0.2, 0.4, 0.5], groups={"x": [0.1, 0.3, 0.4], "y": [0.3, 0.5, 0.6]})
    fake_run(b1, [0.2, 0.5, 0.7], groups={"x": [0.1, 0.4, 0.6], "y": [0.3, 0.6, 0.8]})
    files = {f.name for f in sweep_report.report(s, [a0, a1, b0, b1])}
    assert "accuracy_per_group.png" in files
    md = (s.out / "summary.md").read_text()
    row_a = next(line for line in md.splitlines() if line.startswith("| tau2=1 "))
    row_b = next(line for line in md.splitlines() if line.startswith("| tau2=2 "))
    # final 0.8, 0.9 -> mean 0.85 ± 0.0707; worst group 0.7, 0.8; mean group 0.8, 0.9; best group 0.9, 1.0;
    # both seeds reach 0.75 (at rounds 2 and 2)
    assert ("| 2 | 0.850 ± 0.071 (0.800–0.900) | 0.750 ± 0.071 (0.700–0.800) | 0.850 ± 0.071 (0.800–0.900) "
            "| 0.950 ± 0.071 (0.900–1.000) | 2/2 | 2.000 ± 0.000 (2–2) |") in row_a
    assert "| 0/2 | not reached | not reached | not reached |" in row_b
    s2 = sw.load_sweep(spec(tmp_path, name="seeds", grid={"schedule.tau2": [1, 2], "seed": [0, 1]}), out=str(tmp_path / "o"))
    sweep_report.report(s2, sw.plan(s2))
    assert "fallback: 0.9 × the best final mean" in (s2.out / "summary.md").read_text()


def test_report_gives_epsilon_of_private_points(tmp_path: Path) -> None:
    """Points with DP: their ε after the last round in the table (the same for every seed), "no DP" for
    the others, and a plot of final accuracy against ε; without DP points neither appears."""
    s = sw.load_sweep(spec(tmp_path, name="dp", grid={"schedule.tau2": [1, 2, 3], "seed": [0, 1]}, target=0.5),
                      out=str(tmp_path / "o"))
    a0, a1, b0, b1, c0, c1 = sw.plan(s)
    fake_run(a0, [0.2, 0.6, 0.8])
    fake_run(a1, [0.2, 0.7, 0.9])
    for r, accs in ((b0, [0.2, 0.4, 0.5]), (b1, [0.2, 0.4, 0.7])):
        fake_run(r, accs, epsilon=[0.0, 3.25, 4.75])
    for r, accs in ((c0, [0.2, 0.3, 0.3]), (c1, [0.2, 0.3, 0.4])):
        fake_run(r, accs, epsilon=[0.0, 0.5, 0.75])
    files = {f.name for f in sweep_report.report(s, [a0, a1, b0, b1, c0, c1])}
    assert "accuracy_vs_epsilon.png" in files
    md = (s.out / "summary.md").read_text()
    assert "| condition | seeds | accuracy final | ε | reached |" in md
    rows = {line.split(" | ")[0][2:]: line for line in md.splitlines() if line.startswith("| tau2=")}
    assert "| 2 | 0.850 ± 0.071 (0.800–0.900) | no DP | 2/2 |" in rows["tau2=1"]
    assert "| 2 | 0.600 ± 0.141 (0.500–0.700) | 4.75 | 2/2 |" in rows["tau2=2"]
    assert "| 2 | 0.350 ± 0.071 (0.300–0.400) | 0.75 | 0/2 |" in rows["tau2=3"]
    csv_rows = list(csv.DictReader((s.out / "results.csv").open()))
    assert [r["epsilon"] for r in csv_rows if r["point"] == b0.point.slug] == ["0.0", "3.25", "4.75"]
    plain = sw.load_sweep(spec(tmp_path, name="plain", grid={"schedule.tau2": [1]}), out=str(tmp_path / "p"))
    (p0,) = sw.plan(plain)
    fake_run(p0, [0.2, 0.6])
    assert "accuracy_vs_epsilon.png" not in {f.name for f in sweep_report.report(plain, [p0])}
    assert "| ε |" not in (plain.out / "summary.md").read_text()


@pytest.mark.parametrize("path", sorted(p for p in (Path(__file__).resolve().parents[2] / "launch" / "sweeps").glob("*.yaml")
                                        if not p.name.endswith("-run.yaml")), ids=lambda p: p.stem)
def test_every_shipped_spec_resolves_and_validates_each_point(path: Path, tmp_path: Path) -> None:
    """The specs that reproduce BENCHMARKS.md's studies (and the smoke sweep) load, and every point
    is a valid run config on a shipped topology that passes the pre-launch checks (e.g. Krum's
    fan-out, SCAFFOLD's local SGD: launch/sweeps/algorithms.yaml)."""
    from hierfed.cluster.preflight import check_supported

    s = sw.load_sweep(str(path), out=str(tmp_path / "o"))
    points = sw.plan(s)
    assert len(points) >= 2 and len({r.fingerprint for r in points}) == len(points)  # no two points the same run
    assert all(r.cfg is not None and r.placement.world_size >= 2 for r in points)
    for r in points:
        check_supported(r.placement, r.cfg)
