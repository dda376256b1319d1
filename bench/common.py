"""Shared by the benchmark scripts (run as `python bench/<name>.py`, so this imports as `common`):
where the repository is, what commit a result came from, byte formatting, and running a hierfed
job in a subprocess and reading back what it wrote."""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich import filesize

ROOT = Path(__file__).resolve().parent.parent


def git_state() -> str:
    """The commit the runs used, and the package files that differed from it (hierfed is editable)."""
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "hierfed"], cwd=ROOT, capture_output=True, text=True).stdout.split("\n")
    except OSError:
        return "unknown"
    dirty = [line[3:] for line in dirty if line.strip()]
    return head + (f" + uncommitted changes to {', '.join(dirty)}" if dirty else "")


def fmt_bytes(n: float | None) -> str:
    """Decimal units with 2 decimals ('5.10 GB', '340.00 MB'; rich's file sizes); '—' for None."""
    return "—" if n is None else filesize.decimal(int(n), precision=2)


@dataclass
class Job:
    """A finished `hierfed run` subprocess: its exit status, wall time and output."""

    returncode: int
    wall_s: float
    output: str
    timed_out: bool = False

    def tail(self, lines: int = 5) -> str:
        return "\n  ".join(self.output.strip().splitlines()[-lines:])


def run_hierfed(args: list[str], log: Path, timeout: float | None = None, env: dict[str, str] | None = None) -> Job:
    """`python -m hierfed ARGS` from the repository root (hierfed launches mpiexec itself), one
    thread per rank; stdout and stderr go to `log` as well as into the result."""
    cmd = [sys.executable, "-m", "hierfed", *args]
    env = dict(os.environ, OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONUNBUFFERED="1") | (env or {})
    started = time.monotonic()
    try:
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
        job = Job(proc.returncode, time.monotonic() - started, proc.stdout + proc.stderr)
    except subprocess.TimeoutExpired as e:
        text = "".join(x.decode(errors="replace") if isinstance(x, bytes) else (x or "") for x in (e.stdout, e.stderr))
        job = Job(-1, time.monotonic() - started, text, timed_out=True)
    log.parent.mkdir(parents=True, exist_ok=True)
    log.write_text(job.output)
    return job


def read_run(out: Path) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """A finished run's summary.json and its metrics.jsonl rows."""
    summary = json.loads((out / "summary.json").read_text())
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return summary, rows


def mean_sd(values: list[float], digits: int = 3) -> str:
    """Values over seeds as "mean ± standard deviation" (one value as itself, none as "–")."""
    if not values:
        return "–"
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    return f"{statistics.fmean(values):.{digits}f} ± {statistics.stdev(values):.{digits}f}"


def sweep_points(spec: str, out: str | None, sets: list[str] | None, script: str):
    """A finished (or partly finished) sweep read back for a benchmark table: the Sweep, its
    resolved points, the cloud rows grouped {condition: {point: rows}}, and the accuracy target."""
    from hierfed.experiments.report import collect, target_for
    from hierfed.experiments.sweep import load_sweep, plan

    sweep = load_sweep(spec, out, sets)
    resolved = plan(sweep)
    rows = collect(sweep, resolved)
    if not rows:
        raise SystemExit(f"{script}: no finished point under {sweep.out} (run `hierfed sweep {spec}` first)")
    conditions: dict[str, dict[str, list[dict[str, Any]]]] = {}
    for r in rows:
        conditions.setdefault(r["condition"], {}).setdefault(r["point"], []).append(r)
    target, _ = target_for(sweep, conditions, "eval_accuracy")
    return sweep, resolved, conditions, target


def write_table(sweep, name: str, result: list[dict[str, Any]], lines: list[str]) -> tuple[list[dict[str, Any]], str]:
    """A sweep table's markdown and numbers written to SWEEP_DIR/<name>.md and <name>.json; returns both."""
    md = "\n".join(lines) + "\n"
    (sweep.out / f"{name}.md").write_text(md)
    (sweep.out / f"{name}.json").write_text(json.dumps(result, indent=1))
    return result, md


def sweep_table_main(doc: str, spec: str, table, argv: list[str] | None = None) -> int:
    """The command line of a script that tabulates a sweep: [SPEC] [--out DIR] [--set KEY=VALUE]."""
    import argparse

    p = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    p.add_argument("spec", nargs="?", default=str(ROOT / "launch" / "sweeps" / spec))
    p.add_argument("--out", help=f"the sweep's directory (default: the spec's, sweeps/{Path(spec).stem})")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="as given to `hierfed sweep` (a point is read only if its run config still matches)")
    args = p.parse_args(argv)
    _, md = table(args.spec, args.out, args.overrides)
    print(md)
    return 0
