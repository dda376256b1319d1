"""A sweep's report: results.csv (a row per finished point and cloud round), summary.md (a table
per point: final quality, time and bytes to the target) and the plots, from the points' own
metrics.jsonl replayed through the simulated clock (hierfed.sim.clock)."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any


from hierfed.sim.clock import round_times

from hierfed.experiments.sweep import Resolved, Sweep, status

LINKS = ("device-edge", "edge-cloud", "device-cloud")


def collect(sweep: Sweep, resolved: list[Resolved]) -> list[dict[str, Any]]:
    """One row per (finished point, cloud round): metrics, bytes per tier, measured and simulated time."""
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
