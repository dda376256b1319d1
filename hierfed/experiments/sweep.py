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
    target: {eval_accuracy: 0.8}       # absolute targets for time-to-target (or a number: the main metric)
    # a `seed` axis is averaged over: summary.md reports mean ± std per condition, plots a band

The grid is the product of its axes, in file order. A point's directory is named from its values
(`topology-fanout-2x4_tau1-2`) and holds `run.yaml` (the resolved run config, `hierfed run --config`
reruns it by hand), `point.json` (its fingerprint), `log.txt` and the run's own results. A point is
finished when its summary.json exists and its fingerprint (run config + topology file) still
matches, so re-running a sweep skips finished points and reruns changed ones; an interrupted point
resumes from its last checkpoint.
"""

from __future__ import annotations

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
    target: dict[str, float] = field(default_factory=dict)  # metric -> absolute target (time-to-target)

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
    target = _targets(data.get("target"), where)
    return Sweep(str(sweep_name), Path(out or data.get("out") or f"sweeps/{sweep_name}"), base,
                 list(spec_sets) + list(sets or []), parsed, target)


METRICS = ("eval_accuracy", "eval_loss", "eval_perplexity")  # what a target may name; accuracy is higher-better


def _targets(raw: Any, where: str) -> dict[str, float]:
    """`target: 0.8` (the sweep's main metric: accuracy, else perplexity, else loss) or
    `target: {eval_accuracy: 0.8, eval_perplexity: 20}`."""
    if raw is None:
        return {}
    if isinstance(raw, (int, float)) and not isinstance(raw, bool):
        return {"main": float(raw)}
    if isinstance(raw, dict) and raw:
        bad = next((k for k in raw if k not in METRICS), None)
        if bad is not None:
            raise HierfedError(f"{where}: target: unknown metric {bad!r} (known: {', '.join(METRICS)})")
        if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in raw.values()):
            raise HierfedError(f"{where}: target: every value must be a number")
        return {k: float(v) for k, v in raw.items()}
    raise HierfedError(f"{where}: target: expected a number or a mapping of metric -> number ({', '.join(METRICS)})")


# --------------------------------------------------------------- resolving and status ---


@dataclass(frozen=True)
class Resolved:
    point: Point
    run_yaml: str
    placement: Any  # hierfed.topology.Placement
    fingerprint: str
    cfg: Any = None  # hierfed.config.RunConfig


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
    return Resolved(point, text, topo.placement(), digest, cfg)


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
    from hierfed.cluster.jobs import plan_job, run_job

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
