"""The straggler benchmark's table (issue 14): what each straggler policy did to participation,
to the simulated clock and to quality, from a finished (or partly finished) sweep of
launch/sweeps/hetero.yaml.

    hierfed sweep launch/sweeps/hetero.yaml            # the runs, and sweeps/hetero/summary.md
    .venv/bin/python bench/hetero.py [SPEC] [--out SWEEP_DIR] [--set KEY=VALUE ...]

`hierfed sweep` already reports, per condition over its seeds, the final accuracy, rounds and
simulated seconds to the target, and the plots of quality against simulated time. This script adds
what happened to the clients, from each point's summary.json (`participation`, totals over the run,
divided here by the cloud rounds): per cloud round, the client updates that reached an edge in full,
late ones cut to partial work, late ones dropped, clients that vanished mid-round (dropout) or were
unreachable; for FedBuff edges the arrivals applied, the attempts discarded at the end of a cloud
round, and the mean staleness. Also the simulated seconds a cloud round took, and the best accuracy
any round reached (the curves are noisy on this workload: the final round alone can mislead). It
prints one markdown table and writes it, with the numbers as JSON, to SWEEP_DIR/hetero.md and
hetero.json. Values are mean ± standard deviation over the seeds.
"""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path
from typing import Any

from common import mean_sd, sweep_points, sweep_table_main, write_table


def participation(point_dir: Path) -> dict[str, float]:
    """summary.json's participation totals, per cloud round."""
    s = json.loads((point_dir / "summary.json").read_text())
    rounds = max(1, s["rounds"])
    part = s.get("participation") or {}
    out = {k: part[k] / rounds for k in ("sampled", "available", "dropped", "late", "partial", "arrivals", "discarded") if k in part}
    if part.get("staleness_mean") is not None:
        out["staleness_mean"] = part["staleness_mean"]
    return out


def table(spec: str, out: str | None, sets: list[str] | None = None) -> tuple[list[dict[str, Any]], str]:
    sweep, resolved, conditions, target = sweep_points(spec, out, sets, "bench/hetero.py")
    dirs = {r.point.slug: r.point.dir for r in resolved}
    result = []
    for cond, pts in conditions.items():
        per: dict[str, list[float]] = {}
        for slug, rs in pts.items():
            acc = [r["eval_accuracy"] for r in rs if r.get("eval_accuracy") is not None]
            sim = [r["sim_clock_s"] for r in rs]
            values = {"accuracy_final": acc[-1], "accuracy_best": max(acc), "sim_s_per_round": sim[-1] / max(1, rs[-1]["round"]),
                      **participation(dirs[slug])}
            hit = next((r for r in rs if target is not None and (r.get("eval_accuracy") or 0) >= target), None)
            if hit is not None:
                values["sim_s_to_target"] = hit["sim_clock_s"]
            for k, v in values.items():
                per.setdefault(k, []).append(v)
        result.append({"condition": cond, "seeds": len(pts), "rounds": max(rs[-1]["round"] for rs in pts.values()),
                       "reached": f"{len(per.get('sim_s_to_target', []))}/{len(pts)}", **per})
    lines = [f"Sweep `{sweep.name}` ({sweep.out}); target accuracy {target}; clients per cloud round (mean over seeds): "
             "full = reached its edge with all its steps (FedBuff: arrivals applied).", "",
             "| policy | seeds | accuracy after R | best accuracy | reached | sim s to target | sim s per round | "
             "full | partial | late, dropped | vanished | unreachable | FedBuff discarded | staleness |",
             "|---|---:|---|---|---:|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in result:
        def mean(key: str, r: dict[str, Any] = r) -> float | None:
            return statistics.fmean(r[key]) if r.get(key) else None

        fedbuff = mean("arrivals") is not None
        sampled, available, dropped = mean("sampled") or 0.0, mean("available") or 0.0, mean("dropped") or 0.0
        late, partial = mean("late") or 0.0, mean("partial") or 0.0
        full = mean("arrivals") if fedbuff else available - dropped - late
        cells = [r["condition"].split("=")[-1], str(r["seeds"]), f"{mean_sd(r['accuracy_final'], 3)} (R = {r['rounds']})",
                 mean_sd(r["accuracy_best"], 3), r["reached"], mean_sd(r.get("sim_s_to_target", []), 1),
                 mean_sd(r["sim_s_per_round"], 2), f"{full:.1f}", f"{partial:.1f}", f"{late - partial:.1f}",
                 f"{dropped:.1f}", f"{sampled - available:.1f}",
                 f"{mean('discarded'):.1f}" if fedbuff else "–",
                 f"{mean('staleness_mean'):.2f}" if mean("staleness_mean") is not None else "–"]
        lines.append("| " + " | ".join(cells) + " |")
    return write_table(sweep, "hetero", result, lines)


def main(argv: list[str] | None = None) -> int:
    return sweep_table_main(__doc__, "hetero.yaml", table, argv)


if __name__ == "__main__":
    sys.exit(main())
