"""Secure aggregation's cost per edge round in real MPI jobs, against plain aggregation, as devices per edge grow.

    .venv/bin/python bench/secagg_jobs.py [--devices 2,4,8,16] [--rounds 2] [--tau2 6] [--runs runs/secagg_jobs]
        [--reuse] [--json bench/results/secagg_jobs.json]

For each n in --devices: a topology of 1 edge with n device ranks, one client each (n + 2 ranks:
the cloud, the edge, the devices), and the tiny GPT-2 job of tests/mpi/test_privacy.py (built from
its config, no download: the topics task, 400 training samples split over the n clients, SGD, τ1 = 2
local steps, seed 0), `--rounds` cloud rounds of `--tau2` edge rounds each, in three settings:

  plain   no SecAgg: float32 [w·Δ, w] up, one MPI Reduce
  fixed   privacy.secagg with fixed point in Z_2^32 (identity/fp32 uplink), secagg_bound 10
  int8    privacy.secagg over the int8 codes on the shared grid (compression.device_up: int8), in
          Z_2^16 (n ≤ 258), secagg_bound 10

Each job is `hierfed run <topology.yaml> --config <run.yaml> --out <runs>/n<N>-<setting>` (hierfed
launches the venv's mpiexec itself, one torch thread per rank), one after another. From each run's
metrics.jsonl the edge rows give, per edge round: the edge's wall time (`seconds.wall`: broadcast,
the devices' training, aggregation) and SecAgg's part of it (`seconds.secagg`: adverts in to unmasked
sum; docs/privacy.md), as medians over the edge rounds after the first; and the device-edge bytes up
and down per client update (ring payload + SecAgg's keys and shares), with `bytes_secagg` alone. Ratios
are against plain at the same n. Bytes are exact; times are this machine's, as loaded as it is.

Honesty checks (the run fails if one does not hold): every SecAgg edge round had all n members
survive, none failed, and (fixed) no coordinate saturated; the fixed-point run's final parameters are
within FIXED_TOL of the plain run's (see `FIXED_TOL`); the int8 run's are within a tenth of what the
plain run's last cloud round moved them (int8's quantisation error, as tests/mpi/test_privacy.py
checks at n = 2).

Then the cost model for larger n, at the measured D and at --model-dims (default 75,268, the default
MiniLM + LoRA job's update): bytes per client = the ring's words (hierfed.privacy.ring, so the ring
width switches where hierfed's would) plus SecAgg's keys and shares, a + b·n fitted to the measured
`bytes_secagg` per client (exactly linear in n: one advert and one sealed share per peer); SecAgg's
seconds per edge round a + b·n fitted (least squares) to the measured medians, b being the time per
client on this machine, where all n clients share its cores (on separate devices they would do
their protocol work in parallel).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import sys
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from common import fmt_bytes, git_state, read_run, run_hierfed

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = "bench/secagg_jobs.py"

BOUND = 10.0  # secagg_bound on |w·Δ_i| (the MPI test's)
# The tiny GPT-2 job of tests/mpi/test_privacy.py (tests/mpi/test_jobs.py: TINY + SGD); SGD keeps a
# change of ~1e-8 in a starting point that small, where Adam's normalised steps can blow it up to ~lr.
RUN: dict[str, Any] = {
    "model": {"source": "gpt2", "size": "tiny", "max_length": 24},
    "data": {"train_samples": 400, "eval_samples": 64},
    "train": {"lr": 0.05, "batch_size": 8, "optimizer": "sgd"},
    "schedule": {"tau1": 2},
    "runtime": {"progress": False},
    "seed": 0,
}
SETTINGS: dict[str, dict[str, Any]] = {
    "plain": {},
    "fixed": {"privacy": {"secagg": True, "secagg_bound": BOUND}},
    "int8": {"privacy": {"secagg": True, "secagg_bound": BOUND}, "compression": {"device_up": "int8"}},
}
# Fixed point vs plain, final parameters, max |difference|. Per aggregation the edge's mean update
# differs from the exact one by the fixed-point rounding, <= n/(2S) per summed coordinate with
# S = (2^31 - 1 - n)/(n·B) (hierfed.privacy.ring.FixedPoint): <= n²B/2^32 ~ 6e-7 at n = 16, B = 10,
# divided by Σw = 400 samples: ~1.5e-9; and the plain run's float32 Reduce rounds its sum by about
# n·2^-24·B/Σw ~ 2.4e-8 at n = 16. Over the default 12 aggregations with SGD (which carries a small
# change in its starting point as it is) that is below 4e-7; 1e-6 leaves room and is still 10^4 below
# what one cloud round moves the parameters (~1e-2).
FIXED_TOL = 1e-6
INT8_TOL = 0.1  # int8 vs plain: max |difference| below this fraction of the plain run's last-round move
MODEL_N = (32, 64, 128, 256, 512, 1000)  # the cost model's n


def topology(n: int) -> dict[str, Any]:
    """1 edge with n device ranks, one client each."""
    return {"name": f"secagg-1x{n}", "description": f"1 edge with {n} devices, one client each (bench/secagg_jobs.py)",
            "edges": [{"name": "edge0", "devices": [{"ranks": n}]}]}


def run_config(setting: str, rounds: int, tau2: int) -> dict[str, Any]:
    data = json.loads(json.dumps(RUN))
    data["schedule"].update(rounds=rounds, tau2=tau2)
    for section, values in SETTINGS[setting].items():
        data.setdefault(section, {}).update(values)
    return data


def run_job(n: int, setting: str, runs: Path, rounds: int, tau2: int, timeout: float, commit: str) -> float:
    """One hierfed job; returns its wall time (launch to exit). Its commit and the machine's load
    average before and after go to job.json beside it."""
    base = runs / f"n{n}-{setting}"
    out = base / "out"
    if base.exists():
        shutil.rmtree(base)
    base.mkdir(parents=True)
    (base / "topology.yaml").write_text(yaml.safe_dump(topology(n)))
    (base / "run.yaml").write_text(yaml.safe_dump(run_config(setting, rounds, tau2)))
    args = ["run", str(base / "topology.yaml"), "--config", str(base / "run.yaml"), "--out", str(out)]
    before = os.getloadavg()
    print(f"[n={n} {setting}] {n + 2} ranks (load average {before[0]:.1f}) ...", file=sys.stderr, flush=True)
    job = run_hierfed(args, base / "job.log", timeout=timeout)
    if job.timed_out:
        raise SystemExit(f"{SCRIPT}: n={n} {setting} ran past {timeout:.0f} s (log: {base / 'job.log'})")
    if job.returncode != 0:
        raise SystemExit(f"{SCRIPT}: n={n} {setting} failed (exit {job.returncode}):\n  {job.tail()}")
    load = os.getloadavg()
    print(f"[n={n} {setting}] done in {job.wall_s:.0f} s (load average {load[0]:.1f})", file=sys.stderr, flush=True)
    (base / "job.json").write_text(json.dumps({"commit": commit, "job_s": job.wall_s, "load_before": before, "load_after": load}) + "\n")
    return job.wall_s


def _params(out: Path, which: str | None = None) -> np.ndarray:
    name = which or (out / "checkpoints" / "latest").read_text().strip()
    with np.load(out / "checkpoints" / name / "state.npz") as z:
        return z["params"]


def _per_client(edge: list[dict[str, Any]], key: str, direction: str) -> float:
    """Device-edge bytes of one direction per client update, over every edge round (exact: each
    client sends and receives the same each edge round, up to a few bytes of pickled keys)."""
    total = sum(r.get(key, {}).get("device-edge", {}).get(direction, 0) for r in edge)
    return total / sum(r["clients"] for r in edge)


def collect(n: int, setting: str, runs: Path) -> dict[str, Any]:
    """One finished job's numbers (its rows checked as the module docstring says)."""
    base = runs / f"n{n}-{setting}"
    out = base / "out"
    if not (out / "summary.json").exists():
        raise SystemExit(f"{SCRIPT}: no finished run in {out} (run without --reuse first)")
    summary, rows = read_run(out)
    edge = sorted((r for r in rows if r["tier"] == "edge"), key=lambda r: (r["round"], r["edge_round"]))
    if len(edge) < 2:
        raise SystemExit(f"{SCRIPT}: {out} has {len(edge)} edge round(s); the medians skip the first, so at least 2 are needed")
    if any(r["clients"] != n for r in edge):
        raise SystemExit(f"{SCRIPT}: {out}: not every edge round had all {n} clients")
    steady = edge[1:]  # the first edge round also waits for start-up stragglers
    got: dict[str, Any] = {
        "n": n, "setting": setting, "ranks": n + 2, "edge_rounds": len(edge), "dim": summary["trainable_params"],
        "wall_s": statistics.median(r["seconds"]["wall"] for r in steady),
        "compute_s": statistics.median(r["seconds"]["compute"] for r in steady),
        "aggregate_s": statistics.median(r["seconds"]["aggregate"] for r in steady),
        "secagg_s": statistics.median(r["seconds"]["secagg"] for r in steady) if setting != "plain" else None,
        "up": _per_client(edge, "bytes", "up"), "down": _per_client(edge, "bytes", "down"),
        "secagg_up": _per_client(edge, "bytes_secagg", "up"), "secagg_down": _per_client(edge, "bytes_secagg", "down"),
        "eval_loss": summary["final"].get("eval_loss"), "eval_accuracy": summary["final"].get("eval_accuracy"),
        **(json.loads((base / "job.json").read_text()) if (base / "job.json").exists() else {}),  # commit, job_s, load before/after
    }
    if setting != "plain":
        outcomes = [r["secagg"] for r in edge]
        bad = [o for o in outcomes if o["survivors"] != n or o["members"] != n or o["failed"] is not None]
        if bad:
            raise SystemExit(f"{SCRIPT}: {out}: a SecAgg edge round did not aggregate all {n} clients: {bad[0]}")
        got["ring"] = outcomes[0]["ring"]
        got["saturated"] = sum(o["saturated"] for o in outcomes)
    return got


def check_against_plain(n: int, runs: Path, rows: dict[str, dict[str, Any]]) -> None:
    """The SecAgg runs end where the plain run does, within their encodings' error (adds `off`)."""
    plain_out = runs / f"n{n}-plain" / "out"
    plain = _params(plain_out)
    latest = (plain_out / "checkpoints" / "latest").read_text().strip()
    before = f"round-{int(latest.split('-')[1]) - 1:04d}"
    moved = float(np.abs(plain - _params(plain_out, before)).max()) if (plain_out / "checkpoints" / before).exists() else None
    rows["plain"]["moved"] = moved
    for setting in ("fixed", "int8"):
        if setting not in rows:
            continue
        off = float(np.abs(_params(runs / f"n{n}-{setting}" / "out") - plain).max())
        rows[setting]["off"] = off
        if setting == "fixed":
            if rows[setting]["saturated"]:
                raise SystemExit(f"{SCRIPT}: n={n} fixed: {rows[setting]['saturated']} coordinates saturated at ±{BOUND}")
            if off > FIXED_TOL:
                raise SystemExit(f"{SCRIPT}: n={n} fixed point ends {off:.3g} from plain, beyond its error ({FIXED_TOL:g})")
        elif moved is not None and not off < INT8_TOL * moved:
            raise SystemExit(f"{SCRIPT}: n={n} int8 ends {off:.3g} from plain, beyond {INT8_TOL:g} x the last round's move ({moved:.3g})")


def fit_line(xs: list[float], ys: list[float]) -> tuple[float, float]:
    """Least-squares a + b·x (a line through one point is flat)."""
    if len(xs) < 2:
        return (ys[0] if ys else 0.0), 0.0
    b, a = np.polyfit(np.asarray(xs, dtype=float), np.asarray(ys, dtype=float), 1)
    return float(a), float(b)


def cost_model(results: list[dict[str, Any]], dims: list[int]) -> dict[str, Any]:
    """Per SecAgg setting: bytes_secagg up/down per client and SecAgg seconds per edge round fitted
    against n (a + b·n, least squares), and per update size D in `dims` and n in MODEL_N the bytes
    per client they predict: the ring words the encoding would use there (hierfed.privacy.ring, so
    int8 moves to Z_2^32 past 258 clients) plus the fitted keys and shares up; plain's downlink
    (measured, its parameter vector rescaled to D) plus the fitted keys and shares down."""
    from hierfed.privacy.ring import FixedPoint, SharedGrid

    plain = [r for r in results if r["setting"] == "plain"]
    measured_dim = plain[0]["dim"]
    down_overhead = statistics.median(r["down"] for r in plain) - 4 * measured_dim  # plain's downlink beyond 4 bytes a parameter
    fits: dict[str, Any] = {}
    points = []
    for setting in ("fixed", "int8"):
        rows = [r for r in results if r["setting"] == setting]
        if not rows:
            continue
        ns = [float(r["n"]) for r in rows]
        up, down = fit_line(ns, [r["secagg_up"] for r in rows]), fit_line(ns, [r["secagg_down"] for r in rows])
        secs = fit_line(ns, [r["secagg_s"] for r in rows])
        fits[setting] = {"secagg_up": up, "secagg_down": down, "secagg_s": secs}
        for dim in dims:
            for n in MODEL_N:
                enc = FixedPoint(BOUND, n) if setting == "fixed" else SharedGrid(BOUND, 8, fan_out=n)
                payload = enc.words(dim) * np.dtype(enc.dtype).itemsize  # the ring words, as the ledger counts them
                sa_up, sa_down = up[0] + up[1] * n, down[0] + down[1] * n
                points.append({"dim": dim, "n": n, "setting": setting, "ring": enc.ring, "up": payload + sa_up, "plain_up": 4 * (dim + 1),
                               "secagg_up": sa_up, "down": down_overhead + 4 * dim + sa_down, "plain_down": down_overhead + 4 * dim,
                               "secagg_down": sa_down, "secagg_s": secs[0] + secs[1] * n})
    return {"measured_dim": measured_dim, "fits": fits, "points": points}


def _ratio(a: float | None, b: float | None) -> str:
    return "—" if a is None or not b else f"{a / b:.2f}×"


def table(results: list[dict[str, Any]]) -> str:
    plain = {r["n"]: r for r in results if r["setting"] == "plain"}
    lines = ["| n | setting | edge wall / edge round | vs plain | slowest client's training | SecAgg s / edge round | up / client | vs plain | down / client"
             " | vs plain | bytes_secagg up / down per client | final max abs diff vs plain |",
             "|--:|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|"]
    for r in results:
        p = plain.get(r["n"])
        sec = "—" if r["secagg_s"] is None else f"{r['secagg_s'] * 1e3:.0f} ms"
        sa = "—" if r["setting"] == "plain" else f"{r['secagg_up']:,.0f} B / {r['secagg_down']:,.0f} B"
        off = "—" if "off" not in r else f"{r['off']:.1e}"
        if r["setting"] == "plain" and r.get("moved") is not None:
            off = f"(last round moved {r['moved']:.1e})"
        name = r["setting"] if r.get("ring") is None else f"{r['setting']} (Z_2^{r['ring']})"
        lines.append(f"| {r['n']} | {name} | {r['wall_s'] * 1e3:.0f} ms"
                     f" | {_ratio(r['wall_s'], p and p['wall_s'])} | {r['compute_s'] * 1e3:.0f} ms | {sec}"
                     f" | {r['up']:,.0f} B | {_ratio(r['up'], p and p['up'])}"
                     f" | {r['down']:,.0f} B | {_ratio(r['down'], p and p['down'])} | {sa} | {off} |")
    return "\n".join(lines)


def model_table(model: dict[str, Any]) -> str:
    lines = []
    for setting, m in model["fits"].items():
        (ua, ub), (da, db), (sa, sb) = m["secagg_up"], m["secagg_down"], m["secagg_s"]
        lines.append(f"{setting}: bytes_secagg per client ≈ {ua:,.0f} + {ub:,.1f}·n up, {da:,.0f} + {db:,.1f}·n down; "
                     f"SecAgg s per edge round ≈ {sa * 1e3:.0f} ms + {sb * 1e3:.1f} ms·n (least squares over the measured n)")
    lines += ["", "| D | n | setting | ring | up / client | vs plain fp32 | of which SecAgg | down / client | vs plain"
              " | SecAgg s / edge round (this machine's line) |",
              "|--:|--:|---|--:|--:|--:|--:|--:|--:|--:|"]
    for p in model["points"]:
        lines.append(f"| {p['dim']:,} | {p['n']} | {p['setting']} | Z_2^{p['ring']} | {fmt_bytes(p['up'])} | {_ratio(p['up'], p['plain_up'])}"
                     f" | {fmt_bytes(p['secagg_up'])} | {fmt_bytes(p['down'])} | {_ratio(p['down'], p['plain_down'])} | {p['secagg_s']:.2f} s |")
    return "\n".join(lines)


def _ints(minimum: int, why: str):
    """An argparse type: a comma-separated list of integers, each >= `minimum` (`why` says so)."""
    def parse(text: str) -> list[int]:
        try:
            values = [int(x) for x in text.split(",") if x.strip()]
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a comma-separated list of integers: {text!r}") from None
        if min(values, default=minimum - 1) < minimum:
            raise argparse.ArgumentTypeError(f"{why}: {text!r}")
        return values
    return parse


_devices = _ints(2, "devices per edge must be >= 2 (SecAgg needs at least 2 clients)")
_dims = _ints(1, "update sizes must be >= 1")


def _positive(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1: {text!r}")
    return v


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog=SCRIPT, description=__doc__.split("\n\n")[0])
    p.add_argument("--devices", type=_devices, default=[2, 4, 8, 16], help="devices (= clients) per edge, comma-separated (default 2,4,8,16)")
    p.add_argument("--settings", default="plain,fixed,int8", help="of plain, fixed, int8 (default: all; plain is needed for the ratios)")
    p.add_argument("--rounds", type=_positive, default=2, help="cloud rounds (default 2)")
    p.add_argument("--tau2", type=_positive, default=6, help="edge rounds per cloud round (default 6; the first edge round is skipped)")
    p.add_argument("--runs", default=str(ROOT / "runs" / "secagg_jobs"), help="where the jobs write (default runs/secagg_jobs)")
    p.add_argument("--timeout", type=float, default=1800, help="seconds per job (default 1800)")
    p.add_argument("--model-dims", type=_dims, default=[75268],
                   help="update sizes D for the cost model besides the measured one (default 75268: the default MiniLM + LoRA job's)")
    p.add_argument("--reuse", action="store_true", help="do not run; read the jobs already in --runs")
    p.add_argument("--json", help="write the results here (e.g. bench/results/secagg_jobs.json)")
    a = p.parse_args(argv)
    settings = [s.strip() for s in a.settings.split(",") if s.strip()]
    unknown = [s for s in settings if s not in SETTINGS]
    if unknown or "plain" not in settings:
        p.error(f"--settings: {'unknown ' + ', '.join(unknown) if unknown else 'plain is needed (the ratios and checks are against it)'}")
    if a.rounds * a.tau2 < 2:
        p.error("--rounds x --tau2 must be >= 2 (the medians skip the first edge round)")
    runs = Path(a.runs)
    commit = git_state()  # what the jobs run (each job's own is in its job.json)
    if not a.reuse:
        for n in a.devices:
            for s in settings:
                run_job(n, s, runs, a.rounds, a.tau2, a.timeout, commit)
    results = []
    for n in a.devices:
        rows = {s: collect(n, s, runs) for s in settings}
        check_against_plain(n, runs, rows)
        results += rows.values()
    print(table(results))
    model = cost_model(results, sorted({results[0]["dim"], *a.model_dims}))
    if model["fits"]:
        print()
        print(model_table(model))
    if a.json:
        Path(a.json).parent.mkdir(parents=True, exist_ok=True)
        commits = sorted({r.get("commit", "unknown") for r in results})
        Path(a.json).write_text(json.dumps({"commits": commits, "machine": platform.platform(), "rounds": a.rounds, "tau2": a.tau2,
                                            "bound": BOUND, "fixed_tol": FIXED_TOL, "results": results, "model": model}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
