"""Sweeps: a grid of runs (topologies, tau1, tau2, codecs, any run-config field), one directory per
point, then one CSV, a markdown summary and PNG plots over all of them.

A spec file (YAML) names a base run config, overrides for every point, and the grid's axes:

    name: fanout
    config: tiny-run.yaml              # relative to the spec file; default: the embedded defaults
    set: [schedule.rounds=4]           # every point, like --set
    grid:
      topology: [fanout-1x8, fanout-2x4, flat-8]     # a run-config key and its values
      schedule.tau1: [2, 5]
      codec:                           # a named axis: each value a label and its overrides
        none: []
        topk: [compression.device_up=topk:0.05]
    target: 0.8                        # accuracy for time-to-accuracy (default: 0.9 x best final)

The grid is the product of its axes, in file order. A point's directory is named from its values
(`topology-fanout-2x4_tau1-2`) and holds `run.yaml` (the resolved run config, `hierfed run --config`
reruns it by hand), `point.json` (its fingerprint), `log.txt` and the run's own results. A point is
finished when its summary.json exists and its fingerprint (run config + topology file) still
matches, so re-running a sweep skips finished points and reruns changed ones; an interrupted point
resumes from its last checkpoint.
"""

from __future__ import annotations

import csv
import hashlib
import json
import re
import shutil
import time
from dataclasses import dataclass, field
from itertools import product
from pathlib import Path
from typing import Any

import yaml

from hierfed.errors import HierfedError

LINKS = ("device-edge", "edge-cloud", "device-cloud")


@dataclass(frozen=True)
class Axis:
    key: str  # a run-config key ("schedule.tau1"), or a name for a named axis ("codec")
    values: tuple[tuple[str, tuple[str, ...]], ...]  # (label, --set overrides) per value

    @property
    def short(self) -> str:
        return self.key.rsplit(".", 1)[-1]


@dataclass(frozen=True)
class Point:
    index: int
    labels: dict[str, str]  # axis short name -> value label
    overrides: tuple[str, ...]
    slug: str
    dir: Path

    @property
    def label(self) -> str:
        return ",".join(f"{k}={v}" for k, v in self.labels.items()) or "base"


@dataclass
class Sweep:
    name: str
    out: Path
    config: str | None = None  # base run config file
    sets: list[str] = field(default_factory=list)
    axes: list[Axis] = field(default_factory=list)
    target: float | None = None

    def points(self) -> list[Point]:
        pts = []
        for i, combo in enumerate(product(*(a.values for a in self.axes))):
            labels = {a.short: label for a, (label, _) in zip(self.axes, combo)}
            slug = "_".join(f"{k}-{v}" for k, v in labels.items()) or "base"
            slug = re.sub(r"[^A-Za-z0-9._+-]+", "-", slug).strip("-")[:120]
            overrides = tuple(self.sets) + tuple(o for _, ovs in combo for o in ovs)
            pts.append(Point(i, labels, overrides, slug, self.out / "points" / slug))
        slugs = [p.slug for p in pts]
        if len(set(slugs)) != len(slugs):
            dup = next(s for s in slugs if slugs.count(s) > 1)
            raise HierfedError(f"sweep {self.name}: two points would share the directory {dup!r}; give the axes distinct values")
        return pts


# ------------------------------------------------------------------------- the spec ---


def _value(v: Any) -> str:
    """A value as --set text (JSON is YAML, so strings stay strings and lists stay lists)."""
    return json.dumps(v, separators=(",", ":"))


def _label(v: Any) -> str:
    return v if isinstance(v, str) else json.dumps(v, separators=(",", ":"))


def parse_axis(key: str, values: Any, where: str) -> Axis:
    """A list of values for a config key, or a mapping label -> overrides (list of K=V, or a mapping)."""
    if isinstance(values, list) and values:
        return Axis(key, tuple((_label(v), (f"{key}={_value(v)}",)) for v in values))
    if isinstance(values, dict) and values:
        out = []
        for label, ovs in values.items():
            if isinstance(ovs, dict):
                ovs = [f"{k}={_value(v)}" for k, v in ovs.items()]
            if ovs is None:
                ovs = []
            if not isinstance(ovs, list) or not all(isinstance(o, str) and "=" in o for o in ovs):
                raise HierfedError(f"{where}: grid.{key}.{label}: expected a list of KEY=VALUE overrides or a mapping")
            out.append((str(label), tuple(ovs)))
        return Axis(key, tuple(out))
    raise HierfedError(f"{where}: grid.{key}: expected a non-empty list of values, or a mapping of named values")


def parse_cli_axis(item: str) -> Axis:
    """`--axis schedule.tau1=2,5` or `--axis 'topology=[fanout-1x8, flat-8]'`."""
    key, sep, raw = item.partition("=")
    if not sep or not key.strip() or not raw.strip():
        raise HierfedError(f"--axis {item!r}: expected KEY=V1,V2,..., e.g. schedule.tau1=2,5")
    raw = raw.strip()
    values = yaml.safe_load(raw) if raw.startswith("[") else [yaml.safe_load(v) if v.strip() else "" for v in raw.split(",")]
    return parse_axis(key.strip(), values, "--axis")


def load_sweep(spec: str | None, out: str | None = None, sets: list[str] | None = None, axes: list[str] | None = None,
               config: str | None = None, name: str | None = None) -> Sweep:
    """A sweep from a spec file and/or command-line axes; the command line adds to the file."""
    data: dict[str, Any] = {}
    where, base_dir = "sweep", Path(".")
    if spec:
        where, base_dir = spec, Path(spec).parent
        try:
            data = yaml.safe_load(Path(spec).read_text()) or {}
        except OSError as e:
            raise HierfedError(f"{spec}: cannot read sweep spec ({e.strerror})") from None
        except yaml.YAMLError:
            raise HierfedError(f"{spec}: not valid YAML") from None
        if not isinstance(data, dict):
            raise HierfedError(f"{spec}: a sweep spec is a mapping (name, config, set, grid, target, out)")
        unknown = set(data) - {"name", "config", "set", "grid", "target", "out", "description"}
        if unknown:
            raise HierfedError(f"{spec}: unknown field {sorted(unknown)[0]!r} (allowed: name, description, config, set, grid, target, out)")
    grid = data.get("grid") or {}
    if not isinstance(grid, dict):
        raise HierfedError(f"{where}: grid: expected a mapping of axes")
    parsed = [parse_axis(str(k), v, where) for k, v in grid.items()] + [parse_cli_axis(a) for a in axes or []]
    base = config or (str(base_dir / data["config"]) if data.get("config") else None)
    spec_sets = data.get("set") or []
    if not isinstance(spec_sets, list) or not all(isinstance(s, str) for s in spec_sets):
        raise HierfedError(f"{where}: set: expected a list of KEY=VALUE strings")
    sweep_name = name or data.get("name") or (Path(spec).stem if spec else "sweep")
    target = data.get("target")
    if target is not None and not isinstance(target, (int, float)):
        raise HierfedError(f"{where}: target: expected a number")
    return Sweep(str(sweep_name), Path(out or data.get("out") or f"sweeps/{sweep_name}"), base,
                 list(spec_sets) + list(sets or []), parsed, target)


# --------------------------------------------------------------- resolving and status ---


@dataclass(frozen=True)
class Resolved:
    point: Point
    run_yaml: str
    placement: Any  # hierfed.topology.Placement
    fingerprint: str


def resolve(sweep: Sweep, point: Point) -> Resolved:
    """The point's full run config (validated) with its topology as an absolute path."""
    from hierfed.config import dump_config, load_config
    from hierfed.topology import load_topology

    try:
        cfg = load_config(sweep.config, [*point.overrides, f"out={_value(str(point.dir))}"])
        topo = load_topology(cfg.topology)
        path = Path(topo.source).resolve()
        cfg = load_config(sweep.config, [*point.overrides, f"out={_value(str(point.dir))}", f"topology={_value(str(path))}"])
    except HierfedError as e:
        raise HierfedError(f"sweep {sweep.name}, point {point.label}: {e}") from None
    text = dump_config(cfg)
    digest = hashlib.sha256(text.encode() + path.read_bytes()).hexdigest()[:16]
    return Resolved(point, text, topo.placement(), digest)


def status(r: Resolved) -> str:
    """done | partial (checkpointed, resumable) | stale (settings changed) | pending."""
    d = r.point.dir
    try:
        meta = json.loads((d / "point.json").read_text())
    except (OSError, ValueError):
        meta = None
    if meta is None:
        return "stale" if d.exists() and any(d.iterdir()) else "pending"
    if meta.get("fingerprint") != r.fingerprint:
        return "stale"
    if (d / "summary.json").exists():
        return "done"
    return "partial" if (d / "checkpoints" / "latest").exists() else "pending"


def plan(sweep: Sweep) -> list[Resolved]:
    """Every point resolved and validated up front: a typo in any axis fails before anything runs."""
    return [resolve(sweep, p) for p in sweep.points()]


# --------------------------------------------------------------------------- running ---


def run_point(r: Resolved, launcher: str = "auto", total: int | None = None) -> bool:
    """Run one point unless finished; True when it is finished afterwards."""
    from hierfed.launch import plan_job, run_job

    p, d = r.point, r.point.dir
    head = f"[{p.index + 1}/{total}] {p.label}" if total else f"[{p.index}] {p.label}"
    state = status(r)
    if state == "done":
        print(f"{head}: done, skipped", flush=True)
        return True
    if state == "stale":
        print(f"{head}: settings changed since the last attempt; starting over", flush=True)
        shutil.rmtree(d)
    d.mkdir(parents=True, exist_ok=True)
    (d / "run.yaml").write_text(r.run_yaml)
    (d / "point.json").write_text(json.dumps({"index": p.index, "label": p.label, "labels": p.labels,
                                              "overrides": list(p.overrides), "fingerprint": r.fingerprint,
                                              "world_size": r.placement.world_size}, indent=2) + "\n")
    argv = ["run", "--config", str(d / "run.yaml")] + (["--resume"] if state == "partial" else [])
    job = plan_job(r.placement, argv, d / "launch", launcher, exact=False)
    print(f"{head}: {r.placement.summary()}; {'resuming, ' if state == 'partial' else ''}{job.launcher}, log {d / 'log.txt'}", flush=True)
    started = time.monotonic()
    code = run_job(job, d / "launch", log=d / "log.txt")
    took = time.monotonic() - started
    if code or not (d / "summary.json").exists():
        tail = (d / "log.txt").read_text(errors="replace").splitlines()[-15:]
        print(f"{head}: FAILED (exit {code}) after {took:.1f} s; last lines of {d / 'log.txt'}:", flush=True)
        print("\n".join(f"    {line}" for line in tail), flush=True)
        return False
    s = json.loads((d / "summary.json").read_text())
    key = "eval_accuracy" if s["final"].get("eval_accuracy") is not None else "eval_loss"
    print(f"{head}: finished in {took:.1f} s, {key} {s['initial'][key]:.3f} -> {s['final'][key]:.3f}", flush=True)
    return True


# --------------------------------------------------------------------------- results ---


def collect(sweep: Sweep, resolved: list[Resolved]) -> list[dict[str, Any]]:
    """One row per (finished point, cloud round): metrics, bytes per tier, measured and simulated time."""
    from hierfed.simclock import round_times

    rows: list[dict[str, Any]] = []
    for r in resolved:
        if status(r) != "done":
            continue
        p = r.point
        metrics = [json.loads(line) for line in (p.dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
        sim = {t.round: t for t in round_times(metrics, r.placement)}
        for m in sorted((m for m in metrics if m.get("tier") == "cloud"), key=lambda m: m["round"]):
            t = sim[m["round"]]
            row: dict[str, Any] = {"sweep": sweep.name, "point": p.slug, **p.labels,
                                   "topology": r.placement.topology.name, "world_size": r.placement.world_size,
                                   "clients": r.placement.num_clients, "round": m["round"],
                                   "eval_accuracy": m.get("eval_accuracy"), "eval_loss": m.get("eval_loss"),
                                   "train_loss": m.get("loss")}
            for link in LINKS:
                d = (m.get("bytes") or {}).get(link) or {}
                row[f"bytes_{link.replace('-', '_')}_up"] = d.get("up", 0)
                row[f"bytes_{link.replace('-', '_')}_down"] = d.get("down", 0)
            secs = m.get("seconds") or {}
            row.update(seconds_round=secs.get("round", 0.0), seconds_compute=secs.get("compute", 0.0),
                       sim_round_s=t.seconds, sim_compute_s=t.compute, sim_comm_s=t.communication, sim_clock_s=t.clock)
            rows.append(row)
    return rows


def report(sweep: Sweep, resolved: list[Resolved]) -> list[Path]:
    """Write results.csv, summary.md and the plots; returns the files written."""
    rows = collect(sweep, resolved)
    sweep.out.mkdir(parents=True, exist_ok=True)
    written = [_write_csv(sweep.out / "results.csv", rows)]
    points = _per_point(rows)
    metric = "eval_accuracy" if any(r["eval_accuracy"] is not None for r in rows) else "eval_loss"
    target = _target(sweep, points, metric)
    written.append(_write_summary(sweep, resolved, points, metric, target))
    written += _plots(sweep.out, points, metric)
    return written


def _write_csv(path: Path, rows: list[dict[str, Any]]) -> Path:
    columns: list[str] = []
    for r in rows:
        columns += [k for k in r if k not in columns]
    with path.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=columns or ["sweep", "point", "round"])
        w.writeheader()
        w.writerows(rows)
    return path


def _per_point(rows: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    out: dict[str, list[dict[str, Any]]] = {}
    for r in rows:
        out.setdefault(r["point"], []).append(r)
    return out


def _better(metric: str, a: float, b: float) -> bool:
    """a reaches b (accuracy: at least; loss: at most)."""
    return a >= b if metric == "eval_accuracy" else a <= b


def _target(sweep: Sweep, points: dict[str, list[dict[str, Any]]], metric: str) -> float | None:
    if sweep.target is not None:
        return float(sweep.target)
    finals = [rs[-1][metric] for rs in points.values() if rs[-1][metric] is not None]
    if not finals:
        return None
    return 0.9 * max(finals) if metric == "eval_accuracy" else 1.1 * min(finals)


def _reached(rs: list[dict[str, Any]], metric: str, target: float | None) -> dict[str, Any] | None:
    return next((r for r in rs if target is not None and r[metric] is not None and _better(metric, r[metric], target)), None)


def _mb(n: float) -> str:
    return f"{n / 1e6:.3f}"


def _write_summary(sweep: Sweep, resolved: list[Resolved], points: dict[str, list[dict[str, Any]]],
                   metric: str, target: float | None) -> Path:
    short = "acc" if metric == "eval_accuracy" else "loss"
    done = sum(1 for r in resolved if r.point.slug in points)
    lines = [f"# Sweep `{sweep.name}`: {done} of {len(resolved)} points finished", ""]
    lines += [f"- base run config: `{sweep.config or 'embedded defaults'}`" + (f"; for every point: `{' '.join(sweep.sets)}`" if sweep.sets else "")]
    lines += ["- axes: " + "; ".join(f"`{a.key}` = {', '.join(label for label, _ in a.values)}" for a in sweep.axes)]
    lines += ["- simulated time: measured compute + the topology's link models per round (docs/launch.md)"]
    if target is not None:
        how = "given in the spec" if sweep.target is not None else ("0.9 × the best final" if short == "acc" else "1.1 × the best final")
        lines += [f"- target {short} for time-to-target: {target:.3f} ({how})"]
    lines += ["", f"| point | ranks | clients | {short} start → end | rounds | rounds to target | sim time to target (s) "
              "| sim time total (s) | measured (s) | device-edge MB | edge-cloud MB | device-cloud MB |",
              "|---|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in resolved:
        rs = points.get(r.point.slug)
        if not rs:
            lines.append(f"| {r.point.label} | {r.placement.world_size} | {r.placement.num_clients} | not finished |  |  |  |  |  |  |  |  |")
            continue
        hit = _reached(rs, metric, target)
        tb = {link: sum(x[f"bytes_{link.replace('-', '_')}_up"] + x[f"bytes_{link.replace('-', '_')}_down"] for x in rs) for link in LINKS}
        first, last = rs[0][metric], rs[-1][metric]
        hit_round, hit_time = (str(hit["round"]), f"{hit['sim_clock_s']:.2f}") if hit else ("–", "–")
        lines.append(
            f"| {r.point.label} | {rs[0]['world_size']} | {rs[0]['clients']} | {_num(first)} → {_num(last)} | {rs[-1]['round']} "
            f"| {hit_round} | {hit_time} | {rs[-1]['sim_clock_s']:.2f} "
            f"| {sum(x['seconds_round'] for x in rs):.1f} | {_mb(tb['device-edge'])} | {_mb(tb['edge-cloud'])} | {_mb(tb['device-cloud'])} |")
    lines += ["", "Files: `results.csv` (a row per point and cloud round), "
              f"`{short_name(metric)}_vs_round.png`, `{short_name(metric)}_vs_sim_time.png`, `bytes_per_tier.png`; "
              "each point's own results in `points/<point>/`.", ""]
    path = sweep.out / "summary.md"
    path.write_text("\n".join(lines))
    return path


def _num(x: float | None) -> str:
    return "–" if x is None else f"{x:.3f}"


def short_name(metric: str) -> str:
    return "accuracy" if metric == "eval_accuracy" else "loss"


def _plots(out: Path, points: dict[str, list[dict[str, Any]]], metric: str) -> list[Path]:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("hierfed: plots skipped: matplotlib is not installed (pip install 'hierfed[plots]')")
        return []
    name, ylabel = short_name(metric), metric.replace("_", " ")
    files = []
    for x, xlabel, fname in (("round", "cloud round", f"{name}_vs_round.png"),
                             ("sim_clock_s", "simulated wall clock (s)", f"{name}_vs_sim_time.png")):
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for slug, rs in points.items():
            pts = [(r[x], r[metric]) for r in rs if r[metric] is not None]
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", markersize=3, label=slug)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(out / fname, dpi=120)
        plt.close(fig)
        files.append(out / fname)
    fig, ax = plt.subplots(figsize=(7, 4.5))
    width = 0.8 / max(1, len(LINKS))
    slugs = list(points)
    for i, link in enumerate(LINKS):
        col = link.replace("-", "_")
        totals = [sum(r[f"bytes_{col}_up"] + r[f"bytes_{col}_down"] for r in points[s]) / 1e6 for s in slugs]
        ax.bar([j + (i - 1) * width for j in range(len(slugs))], totals, width, label=link)
    ax.set_xticks(range(len(slugs)))
    ax.set_xticklabels(slugs, rotation=30, ha="right", fontsize=7)
    ax.set_ylabel("MB sent (up + down, whole run)")
    ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(out / "bytes_per_tier.png", dpi=120)
    plt.close(fig)
    return files + [out / "bytes_per_tier.png"]
