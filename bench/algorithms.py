"""The algorithms benchmark's table (issue 13): every aggregation rule and client algorithm on one
non-IID job, from a finished (or partly finished) sweep of launch/sweeps/algorithms.yaml.

    hierfed sweep launch/sweeps/algorithms.yaml          # the runs, and sweeps/algorithms/summary.md
    .venv/bin/python bench/algorithms.py [SPEC] [--out SWEEP_DIR] [--set KEY=VALUE ...]

`hierfed sweep` already reports, per condition over its seeds, the final accuracy, rounds and
simulated seconds to the target, and cloud-link bytes. This script adds what the sweep's table
does not show: the bytes of one round on each link, per sender (what one device sends its edge,
what one edge sends the cloud, and what comes down), against FedAvg's, so SCAFFOLD's doubled
uplink and the gathered rules' per-client rows are visible; and what the gathered rules report in
their tier rows (the share of updates norm clipping scaled; lora_exact's residual energy). It
prints one markdown table and writes it, with the numbers as JSON, to SWEEP_DIR/algorithms.md and
algorithms.json.

Per round = the mean over cloud rounds 1..R of the bytes each metrics row counts on that link (the
cloud rows sum every rank's sends of the round; round 0, the start-up plan, is left out), divided
by the devices or edges at its ends (device links: the topology's clients, one per device rank on
fanout-2x4; edge links: the edges). A cloud round holds tau2 edge rounds: on the sweep's workload
a FedAvg device sends 2 × (dim + 1) float32 per cloud round, a SCAFFOLD device 2 × (2 dim + 1).
Accuracy columns are the sweep's (mean ± standard deviation over seeds).
"""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path
from typing import Any

from common import mean_sd, sweep_points, sweep_table_main, write_table


def findings(point_dir: Path) -> dict[str, list[float]]:
    """What the gathered rules said in the point's metrics rows: clipped share, residual energy."""
    out: dict[str, list[float]] = {"clipped": [], "residual_energy": []}
    for line in (point_dir / "metrics.jsonl").read_text().splitlines():
        agg = (json.loads(line) if line.strip() else {}).get("aggregation") or {}
        if agg.get("updates") and "clipped" in agg:
            out["clipped"].append(agg["clipped"] / agg["updates"])
        if "residual_energy" in agg:
            out["residual_energy"].append(agg["residual_energy"])
    return out


def table(spec: str, out: str | None, sets: list[str] | None = None) -> tuple[list[dict[str, Any]], str]:
    sweep, resolved, conditions, target = sweep_points(spec, out, sets, "bench/algorithms.py")
    dirs = {r.point.slug: r.point.dir for r in resolved}
    edges = {r.point.slug: len(r.placement.edges) for r in resolved}
    result = []
    for cond, pts in conditions.items():
        finals = [rs[-1]["eval_accuracy"] for rs in pts.values() if rs[-1].get("eval_accuracy") is not None]
        hits = [next((r["round"] for r in rs if r.get("eval_accuracy") is not None and r["eval_accuracy"] >= target), None)
                for rs in pts.values()] if target is not None else []
        per_round: dict[str, list[float]] = {}
        found: dict[str, list[float]] = {"clipped": [], "residual_energy": []}
        for slug, rs in pts.items():
            clients, n_edges = rs[0]["clients"], max(1, edges[slug])
            for r in rs:
                if r["round"] < 1:
                    continue
                for key, senders in (("bytes_device_edge_up", clients), ("bytes_device_edge_down", clients),
                                     ("bytes_edge_cloud_up", n_edges), ("bytes_edge_cloud_down", n_edges)):
                    per_round.setdefault(key, []).append(r[key] / senders)
            for k, v in findings(dirs[slug]).items():
                found[k] += v
        result.append({
            "condition": cond, "seeds": len(pts), "rounds": max(rs[-1]["round"] for rs in pts.values()),
            "accuracy_final": finals, "rounds_to_target": [h for h in hits if h is not None],
            "reached": f"{sum(h is not None for h in hits)}/{len(pts)}",
            **{k: statistics.fmean(v) for k, v in per_round.items()},
            "clipped_share": statistics.fmean(found["clipped"]) if found["clipped"] else None,
            "residual_energy": statistics.fmean(found["residual_energy"]) if found["residual_energy"] else None,
        })
    base = next((r for r in result if r["condition"].endswith("=fedavg")), None)
    lines = [f"Sweep `{sweep.name}` ({sweep.out}); target accuracy {target}; bytes: kB per cloud round per device (device "
             "links) or per edge (edge links); device up × FedAvg: that uplink over FedAvg's.", "",
             "| condition | seeds | accuracy after R | reached | rounds to target | device→edge up | edge→device down | "
             "edge→cloud up | cloud→edge down | device up × FedAvg | notes |",
             "|---|---:|---|---:|---|---:|---:|---:|---:|---:|---|"]
    for r in result:
        ratio = r["bytes_device_edge_up"] / base["bytes_device_edge_up"] if base and base["bytes_device_edge_up"] else None
        notes = []
        if r["clipped_share"] is not None:
            notes.append(f"clipped {100 * r['clipped_share']:.0f}% of updates")
        if r["residual_energy"] is not None:
            notes.append(f"residual energy {r['residual_energy']:.3g}")
        lines.append(f"| {r['condition'].split('=', 1)[-1]} | {r['seeds']} | {mean_sd(r['accuracy_final'])} (R = {r['rounds']}) | "
                     f"{r['reached']} | {mean_sd(r['rounds_to_target'], 1) if r['rounds_to_target'] else 'not reached'} | "
                     f"{r['bytes_device_edge_up'] / 1e3:.1f} | {r['bytes_device_edge_down'] / 1e3:.1f} | "
                     f"{r['bytes_edge_cloud_up'] / 1e3:.1f} | {r['bytes_edge_cloud_down'] / 1e3:.1f} | "
                     f"{'–' if ratio is None else f'{ratio:.2f}'} | {'; '.join(notes)} |")
    return write_table(sweep, "algorithms", result, lines)


def main(argv: list[str] | None = None) -> int:
    return sweep_table_main(__doc__, "algorithms.yaml", table, argv)


if __name__ == "__main__":
    sys.exit(main())
