"""The differential-privacy benchmark's table (issue 15): accuracy against ε with the Gaussian noise
added at the edges or at the cloud, from a finished (or partly finished) sweep of
launch/sweeps/privacy.yaml.

    hierfed sweep launch/sweeps/privacy.yaml           # the runs; summary.md has ε, accuracy_vs_epsilon.png
    .venv/bin/python bench/dp_accuracy.py [SPEC] [--out SWEEP_DIR] [--set KEY=VALUE ...]

`hierfed sweep` already reports each condition's ε after the last round beside its final accuracy.
This script adds what explains the accuracy: the noise on the global mean update per coordinate, from
each point's run config and topology — σC/n with the noise at the cloud (one draw of std σC on the sum
of all n clients' clipped updates), sqrt(E)·σC/n with the noise at E edges (each edge's sum of its
clients gets its own draw; distributed noise too: each client adds std σC/sqrt(n_e), so each
edge's sum carries σC; one draw of σC over a flat topology's clients), 0 without noise — against
C/sqrt(d), the root-mean-square coordinate of an update of norm C (d trainable values); the final
and the best accuracy (this workload's
curves are noisy: one round alone can mislead) and the final eval loss (smoother). Values are mean ±
standard deviation over the seeds. It prints one markdown table and writes it, with the numbers as
JSON, to SWEEP_DIR/dp_accuracy.md and dp_accuracy.json.
"""

from __future__ import annotations

import json
import math
import sys
from typing import Any

from common import mean_sd, sweep_points, sweep_table_main, write_table
from hierfed.experiments.report import condition_epsilon


def noise_per_coordinate(cfg: Any, placement: Any) -> float:
    """The std of the noise on one coordinate of the global mean update, per cloud round (uniform
    client weights, every client in the round: the sweep's client_fraction 1)."""
    p = cfg.privacy
    if not p.noise_multiplier or p.clip is None:
        return 0.0
    n = placement.num_clients
    draws = 1 if placement.flat or p.noise_at == "cloud" else len(placement.edges)  # edge or distributed: σC per edge sum
    return math.sqrt(draws) * p.noise_multiplier * p.clip / n


def table(spec: str, out: str | None, sets: list[str] | None = None) -> tuple[list[dict[str, Any]], str]:
    sweep, resolved, conditions, target = sweep_points(spec, out, sets, "bench/dp_accuracy.py")
    by_slug = {r.point.slug: r for r in resolved}
    result = []
    for cond, pts in conditions.items():
        per: dict[str, list[float]] = {}
        first = by_slug[next(iter(pts))]
        summary = json.loads((first.point.dir / "summary.json").read_text())
        for rs in pts.values():
            acc = [r["eval_accuracy"] for r in rs if r.get("eval_accuracy") is not None]
            loss = [r["eval_loss"] for r in rs if r.get("eval_loss") is not None]
            per.setdefault("accuracy_final", []).append(acc[-1])
            per.setdefault("accuracy_best", []).append(max(acc[1:] or acc))
            per.setdefault("loss_final", []).append(loss[-1])
            hit = next((r["round"] for r in rs if target is not None and (r.get("eval_accuracy") or 0) >= target), None)
            if hit is not None:
                per.setdefault("rounds_to_target", []).append(hit)
        eps = condition_epsilon(pts)
        p = first.cfg.privacy
        result.append({
            "condition": cond, "seeds": len(pts), "rounds": max(rs[-1]["round"] for rs in pts.values()),
            "noise_at": p.noise_at if p.noise_multiplier else None, "sigma": p.noise_multiplier, "clip": p.clip,
            "delta": p.delta, "epsilon": eps,
            "clients": first.placement.num_clients, "trainable": summary.get("trainable_params"),
            "noise_per_coordinate": noise_per_coordinate(first.cfg, first.placement),
            "signal_per_coordinate": p.clip / math.sqrt(summary["trainable_params"]) if p.clip and summary.get("trainable_params") else None,
            "reached": f"{len(per.get('rounds_to_target', []))}/{len(pts)}", **per,
        })
    lines = [f"Sweep `{sweep.name}` ({sweep.out}); target accuracy {target}; ε at δ = {result[0]['delta']:g} after the last "
             "round; noise: std per coordinate of the global mean update per round (C/sqrt(d): the root-mean-square "
             "coordinate of an update of norm C).", "",
             "| condition | seeds | noise at | σ | ε | noise / coordinate | C/sqrt(d) | accuracy final | accuracy best | "
             "eval loss final | reached | rounds to target |",
             "|---|---:|---|---:|---:|---:|---:|---|---|---|---:|---|"]
    for r in result:
        eps = "no DP" if r["epsilon"] is None else f"{r['epsilon']:.3g}"
        sig = "–" if r["signal_per_coordinate"] is None else f"{r['signal_per_coordinate']:.4f}"
        lines.append(f"| {r['condition'].split('=', 1)[-1]} | {r['seeds']} | {r['noise_at'] or '–'} | {r['sigma'] or 0:g} | {eps} | "
                     f"{r['noise_per_coordinate']:.4f} | {sig} | {mean_sd(r['accuracy_final'])} (R = {r['rounds']}) | "
                     f"{mean_sd(r['accuracy_best'])} | {mean_sd(r['loss_final'])} | {r['reached']} | "
                     f"{mean_sd(r['rounds_to_target'], 1) if r.get('rounds_to_target') else 'not reached'} |")
    return write_table(sweep, "dp_accuracy", result, lines)


def main(argv: list[str] | None = None) -> int:
    return sweep_table_main(__doc__, "privacy.yaml", table, argv)


if __name__ == "__main__":
    sys.exit(main())
