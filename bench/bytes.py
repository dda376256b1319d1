"""Bytes per tier: what each transmission technique buys on the cloud link, and what it costs.

    .venv/bin/python bench/bytes.py [--rounds N] [--results bench/results] [--only NAME,...] [--reuse]

Runs the default job (MiniLM + LoRA on the built-in topics task, seed 0, the default schedule:
6 cloud rounds, tau1 = 5 local steps, tau2 = 2 edge rounds per cloud round) once per configuration
below, one after another, each as its own `hierfed run --out <results>/bytes/<name>` (hierfed
launches mpiexec itself). It then reads each run's summary.json and the cloud rows of its
metrics.jsonl and prints one markdown table, also written to <results>/bytes.md with the numbers
as JSON in <results>/bytes.json.

  full-flat     (1) full-model flat FedAvg, fp32: topology flat, peft.method=none (every parameter
                    trains and travels), train.lr=5e-5 (a full-fine-tuning lr; the
                    LoRA runs keep hierfed's default 5e-3)
  lora-flat     (2) LoRA, flat
  lora-flat-t5  (2b) LoRA, flat with the default tau1 = 5 (half the local steps per cloud round)
  lora-hier     (3) LoRA, hierarchical (topology default)
  int8-up       (4) (3) + int8 on both uplinks (device_up, edge_up)
  int8-updown   (4b) (4) + int8 on both downlinks (edge_down, cloud_down)
  topk-up       (5) (3) + "topk:0.1 > int8" with error feedback on both uplinks
  topk-up-int8-down (5b) (5) + int8 on both downlinks

Flat topologies aggregate once per cloud round (tau2 does not apply), so a flat device would do
tau1 local steps per cloud round where a hierarchical one does tau1 * tau2. The flat runs (1), (2)
therefore use tau1 = tau1 * tau2 (10): every configuration trains the same number of local steps
per client per cloud round and communicates with the cloud once per cloud round. (2b)
shows flat at the default tau1 for reference. Bytes per cloud round do not depend on tau1.

Per cloud round = the run's total bytes on that link (all cloud rows, including round 0, which
carries the start-up plan) divided by the number of cloud rounds. Payload and control bytes are
counted at the sender per logical link (see docs/design.md, "Byte ledger"). The cloud link is
device-cloud for flat runs and edge-cloud for hierarchical ones; the edge link (device-edge)
exists only in hierarchical runs. Ratios are (1)'s cloud-link bytes over the row's.
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import sys
from pathlib import Path

from common import fmt_bytes, git_state, read_run, run_hierfed

ROOT = Path(__file__).resolve().parent.parent

TAU1, TAU2 = 5, 2  # hierfed's default schedule (hierfed/config.py: ScheduleConfig)
FULL_LR = 5e-5
TOPK = "topk:0.1 > int8"

# name, label, topology, extra arguments
CONFIGS: list[tuple[str, str, str, list[str]]] = [
    ("full-flat", "(1) full model, flat, fp32", "flat",
     ["--set", "peft.method=none", "--set", f"train.lr={FULL_LR}", "--tau1", str(TAU1 * TAU2)]),
    ("lora-flat", "(2) LoRA, flat", "flat", ["--tau1", str(TAU1 * TAU2)]),
    ("lora-flat-t5", "(2b) LoRA, flat, tau1=5", "flat", []),
    ("lora-hier", "(3) LoRA, hierarchical", "default", []),
    ("int8-up", "(4) (3) + int8 uplinks", "default",
     ["--set", "compression.device_up=int8", "--set", "compression.edge_up=int8"]),
    ("int8-updown", "(4b) (4) + int8 downlinks", "default",
     ["--set", "compression.device_up=int8", "--set", "compression.edge_up=int8",
      "--set", "compression.edge_down=int8", "--set", "compression.cloud_down=int8"]),
    ("topk-up", "(5) (3) + top-k 10% > int8 uplinks, EF", "default",
     ["--set", f"compression.device_up={TOPK}", "--set", f"compression.edge_up={TOPK}"]),
    ("topk-up-int8-down", "(5b) (5) + int8 downlinks", "default",
     ["--set", f"compression.device_up={TOPK}", "--set", f"compression.edge_up={TOPK}",
      "--set", "compression.edge_down=int8", "--set", "compression.cloud_down=int8"]),
]


def run_one(name: str, topology: str, extra: list[str], out: Path, rounds: int | None, seed: int) -> float:
    if out.exists():
        shutil.rmtree(out)
    args = ["run", topology, "--out", str(out), "--seed", str(seed), *extra] + (["--rounds", str(rounds)] if rounds is not None else [])
    print(f"[{name}] {' '.join(args)}", file=sys.stderr, flush=True)
    job = run_hierfed(args, out.parent / f"{name}.log")
    if job.returncode != 0:
        raise SystemExit(f"bench/bytes.py: {name} failed (exit {job.returncode}):\n  {job.tail()}")
    print(f"[{name}] done in {job.wall_s:.0f} s", file=sys.stderr, flush=True)
    return job.wall_s


def collect(name: str, label: str, out: Path, wall: float | None) -> dict:
    summary, rows = read_run(out)
    cloud = [r for r in rows if r["tier"] == "cloud"]
    rounds = summary["rounds"]
    assert rounds == len([r for r in cloud if r["round"] > 0]), f"{name}: summary and metrics disagree on rounds"

    def per_round(link: str, key: str = "bytes") -> dict[str, float] | None:
        if not any(link in r.get(key, {}) for r in cloud):
            return None
        up = sum(r.get(key, {}).get(link, {}).get("up", 0) for r in cloud)
        down = sum(r.get(key, {}).get(link, {}).get("down", 0) for r in cloud)
        # the cloud rows' totals are what summary.json reports; check that they agree
        assert summary[key][link] == {"up": up, "down": down}, f"{name}: {link} totals differ from summary.json"
        return {"up": up / rounds, "down": down / rounds, "total": (up + down) / rounds}

    def last_round(link: str) -> dict[str, int] | None:  # steady state: downlinks send deltas after round 1
        d = cloud[-1].get("bytes", {}).get(link)
        return None if d is None else {**d, "total": d["up"] + d["down"]}

    cloud_link = summary["cloud_link"]
    return {
        "name": name,
        "label": label,
        "topology": summary["topology"],
        "rounds": rounds,
        "clients": summary["clients"],
        "trainable_params": summary["trainable_params"],
        "total_params": summary["total_params"],
        "cloud_link": cloud_link,
        "cloud_per_round": per_round(cloud_link),
        "edge_per_round": per_round("device-edge"),
        "cloud_per_round_uncompressed": per_round(cloud_link, "bytes_uncompressed"),
        "cloud_last_round": last_round(cloud_link),
        "edge_last_round": last_round("device-edge"),
        "full_model_flat_fedavg_per_round": summary["full_model_flat_fedavg"]["device-cloud"]["up"] * 2 / rounds,
        "accuracy_initial": summary["initial"]["eval_accuracy"],
        "accuracy": summary["final"]["eval_accuracy"],
        "accuracy_by_round": [r.get("eval_accuracy") for r in cloud],
        "train_loss": summary["final"]["loss"],
        "compression": _config_section(out, "compression"),
        "lr": _config_section(out, "train")["lr"],
        "tau1": _config_section(out, "schedule")["tau1"],
        "tau2": _config_section(out, "schedule")["tau2"],
        "wall_s": wall,
    }


def _config_section(out: Path, section: str) -> dict:
    import yaml

    return yaml.safe_load((out / "config.yaml").read_text())[section]


def table(results: list[dict]) -> str:
    base = next((r for r in results if r["name"] == "full-flat"), None)
    hier = next((r for r in results if r["name"] == "lora-hier"), None)
    lines = [
        "| configuration | cloud link | cloud up+down / round | cloud up / round | edge link up+down / round | edge up / round"
        " | final acc | Δacc vs (3) | cloud bytes vs (1) |",
        "|---|---|--:|--:|--:|--:|--:|--:|--:|",
    ]
    for r in results:
        c, e = r["cloud_per_round"], r["edge_per_round"]
        ratio = f"{base['cloud_per_round']['total'] / c['total']:,.0f}× fewer" if base and r is not base else ("1×" if r is base else "—")
        dacc = f"{100 * (r['accuracy'] - hier['accuracy']):+.2f} pt" if hier else "—"
        lines.append(
            f"| {r['label']} | {r['cloud_link']} | {fmt_bytes(c['total'])} | {fmt_bytes(c['up'])} | "
            f"{fmt_bytes(e and e['total'])} | {fmt_bytes(e and e['up'])} | {100 * r['accuracy']:.2f}% | {dacc} | {ratio} |"
        )
    return "\n".join(lines)


def verdict(results: list[dict]) -> list[str]:
    by = {r["name"]: r for r in results}
    if "full-flat" not in by or "lora-hier" not in by:
        return []
    base, hier = by["full-flat"]["cloud_per_round"]["total"], by["lora-hier"]["accuracy"]
    out = []
    for name in ("int8-up", "int8-updown", "topk-up", "topk-up-int8-down"):
        if name in by:
            r = by[name]
            red = base / r["cloud_per_round"]["total"]
            red_up = by["full-flat"]["cloud_per_round"]["up"] / r["cloud_per_round"]["up"]
            d = 100 * (r["accuracy"] - hier)
            ok = red >= 1000 and abs(d) <= 1.0
            out.append(
                f"{r['label']}: {red:,.0f}× fewer cloud-link bytes (up+down; {red_up:,.0f}× uplink alone), "
                f"accuracy {d:+.2f} pt vs (3): aim {'met' if ok else 'NOT met'}"
            )
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, help="cloud rounds for every configuration (default: hierfed's, 6)")
    p.add_argument("--seed", type=int, default=0, help="run seed for every configuration (default 0, hierfed's)")
    p.add_argument("--results", default=str(ROOT / "bench" / "results"), help="results directory")
    p.add_argument("--only", help="comma-separated configuration names (default: all)")
    p.add_argument("--reuse", action="store_true", help="do not run; read the existing results")
    args = p.parse_args()

    results_dir = Path(args.results)
    runs_dir = results_dir / "bytes"
    runs_dir.mkdir(parents=True, exist_ok=True)
    names = args.only.split(",") if args.only else [c[0] for c in CONFIGS]
    unknown = set(names) - {c[0] for c in CONFIGS}
    if unknown:
        raise SystemExit(f"bench/bytes.py: unknown configuration(s): {', '.join(sorted(unknown))}")

    previous = {}
    if args.reuse and (results_dir / "bytes.json").exists():
        previous = json.loads((results_dir / "bytes.json").read_text())
    # before the runs: what they ran (with --reuse, what the earlier invocation recorded)
    git = previous.get("git", git_state() + " (recorded at --reuse time, not run time)") if args.reuse else git_state()
    walls = {r["name"]: r.get("wall_s") for r in previous.get("results", [])}
    results = []
    for name, label, topology, extra in CONFIGS:
        if name not in names:
            continue
        out = runs_dir / name
        wall = walls.get(name) if args.reuse else run_one(name, topology, extra, out, args.rounds, args.seed)
        results.append(collect(name, label, out, wall))

    md = table(results)
    notes = verdict(results)
    print(md)
    for line in notes:
        print(line)
    meta = {
        "command": previous.get("command") if args.reuse and previous.get("command") else " ".join(["python", "bench/bytes.py", *sys.argv[1:]]),
        "machine": f"{platform.node()} {platform.machine()}, {__import__('os').cpu_count()} CPUs, {platform.python_version()}",
        "rounds": results[0]["rounds"] if results else None,
        "seed": args.seed,
        "git": git,
    }
    (results_dir / "bytes.md").write_text(md + "\n\n" + "".join(f"- {n}\n" for n in notes))
    (results_dir / "bytes.json").write_text(json.dumps({**meta, "verdict": notes, "results": results}, indent=2) + "\n")


if __name__ == "__main__":
    main()
