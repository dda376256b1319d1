"""A sweep's report: results.csv (a row per finished point and cloud round), summary.md (a table per
condition, over its seeds: final quality, worst/mean/best group, time and bytes to the target) and the plots,
from the points' own metrics.jsonl replayed through the simulated clock (hierfed.sim.clock). Points with
differential privacy add their ε (at the run's δ) after the last round to the table, and a plot of final
quality against it.

A condition is a point's labels without `seed`: the points of a `seed` axis are repeats of one
condition, and every number in summary.md is their mean ± standard deviation (with the range). The
target of time-to-target is absolute, from the spec (`target:`); without one it falls back to 0.9 ×
the best final mean accuracy (1.1 × the best final loss or perplexity), said so in summary.md.
"""

from __future__ import annotations

import csv
import json
import math
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hierfed.experiments.sweep import Resolved, Sweep, status
from hierfed.sim.clock import Rates, round_times

LINKS = ("device-edge", "edge-cloud", "device-cloud")
SEED_AXIS = "seed"


def main_metric(rows: list[dict[str, Any]]) -> str:
    """Accuracy for classification, else perplexity (causal LM), else eval loss."""
    for m in ("eval_accuracy", "eval_perplexity", "eval_loss"):
        if any(r.get(m) is not None for r in rows):
            return m
    return "eval_loss"


def higher_is_better(metric: str) -> bool:
    return metric.endswith("accuracy")


def _reaches(metric: str, value: float, target: float) -> bool:
    return value >= target if higher_is_better(metric) else value <= target


def collect(sweep: Sweep, resolved: list[Resolved]) -> list[dict[str, Any]]:
    """One row per (finished point, cloud round): metrics (per group too), bytes per tier, measured
    and simulated time."""
    rows: list[dict[str, Any]] = []
    for r in resolved:
        if status(r) != "done":
            continue
        p = r.point
        metrics = [json.loads(line) for line in (p.dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
        summary = json.loads((p.dir / "summary.json").read_text() or "{}")
        rates = Rates.from_config(r.cfg.sim) if r.cfg is not None else Rates()
        sim = {t.round: t for t in round_times(metrics, r.placement, rates, int(summary.get("trainable_params") or 0))}
        cloud_link = "device-cloud" if r.placement.flat else "edge-cloud"
        cloud_bytes = 0
        condition = ",".join(f"{k}={v}" for k, v in p.labels.items() if k != SEED_AXIS) or "base"
        for m in sorted((m for m in metrics if m.get("tier") == "cloud"), key=lambda m: m["round"]):
            t = sim[m["round"]]
            row: dict[str, Any] = {"sweep": sweep.name, "point": p.slug, "condition": condition, **p.labels,
                                   "topology": r.placement.topology.name, "world_size": r.placement.world_size,
                                   "clients": r.placement.num_clients, "round": m["round"], "train_loss": m.get("loss")}
            row.update({k: m.get(k) for k in ("eval_accuracy", "eval_loss", "eval_perplexity")})
            if m.get("epsilon") is not None:
                row["epsilon"] = m["epsilon"]
            for group, gm in (m.get("groups") or {}).items():
                row.update({f"group:{group}:{k}": v for k, v in gm.items()})
            for link in LINKS:
                d = (m.get("bytes") or {}).get(link) or {}
                row[f"bytes_{link.replace('-', '_')}_up"] = d.get("up", 0)
                row[f"bytes_{link.replace('-', '_')}_down"] = d.get("down", 0)
            d = (m.get("bytes") or {}).get(cloud_link) or {}
            cloud_bytes += d.get("up", 0) + d.get("down", 0)
            secs = m.get("seconds") or {}
            row.update(cloud_link_bytes=cloud_bytes, seconds_round=secs.get("round", 0.0), seconds_compute=secs.get("compute", 0.0),
                       sim_round_s=t.seconds, sim_compute_s=t.compute, sim_comm_s=t.communication, sim_clock_s=t.clock)
            rows.append(row)
    return rows


@dataclass
class Stat:
    """A number over a condition's seeds."""

    values: list[float]

    def __str__(self) -> str:
        if not self.values:
            return "–"
        if len(self.values) == 1:
            return _fmt(self.values[0])
        mean = statistics.fmean(self.values)
        sd = statistics.stdev(self.values)
        return f"{_fmt(mean)} ± {_fmt(sd)} ({_fmt(min(self.values))}–{_fmt(max(self.values))})"

    @property
    def mean(self) -> float | None:
        return statistics.fmean(self.values) if self.values else None


def _fmt(x: float) -> str:
    if isinstance(x, int):
        return str(x)
    return f"{x:.3f}" if abs(x) < 1000 else f"{x:.4g}"


def _groups(rows: list[dict[str, Any]], metric: str) -> list[str]:
    suffix = ":" + metric
    return sorted({k.split(":")[1] for r in rows for k in r if k.startswith("group:") and k.endswith(suffix)})


def _group_spread(row: dict[str, Any], metric: str) -> tuple[float, float, float] | None:
    """(worst, mean, best) of `metric` over the row's groups; None without groups."""
    values = [v for k, v in row.items() if k.startswith("group:") and k.endswith(":" + metric) and v is not None]
    if not values:
        return None
    lo, hi = min(values), max(values)
    worst, best = (lo, hi) if higher_is_better(metric) else (hi, lo)
    return worst, statistics.fmean(values), best


def _by(rows: list[dict[str, Any]], key: str) -> dict[str, list[dict[str, Any]]]:
    out: dict[str, list[dict[str, Any]]] = {}
    for r in rows:
        out.setdefault(r[key], []).append(r)
    return out


def target_for(sweep: Sweep, conditions: dict[str, dict[str, list[dict[str, Any]]]], metric: str) -> tuple[float | None, str]:
    """(target, how it was chosen) for `metric`."""
    if metric in sweep.target:
        return sweep.target[metric], "given in the spec"
    if "main" in sweep.target:
        return sweep.target["main"], "given in the spec"
    finals = [m for m in (Stat([rs[-1][metric] for rs in pts.values() if rs[-1].get(metric) is not None]).mean
                          for pts in conditions.values()) if m is not None]
    if not finals:
        return None, ""
    if higher_is_better(metric):
        return 0.9 * max(finals), "fallback: 0.9 × the best final mean (no target in the spec)"
    return 1.1 * min(finals), "fallback: 1.1 × the best final mean (no target in the spec)"


def report(sweep: Sweep, resolved: list[Resolved]) -> list[Path]:
    """Write results.csv, summary.md and the plots; returns the files written."""
    rows = collect(sweep, resolved)
    sweep.out.mkdir(parents=True, exist_ok=True)
    written = [_write_csv(sweep.out / "results.csv", rows)]
    metric = main_metric(rows)
    conditions = {c: _by(rs, "point") for c, rs in _by(rows, "condition").items()}
    target, how = target_for(sweep, conditions, metric)
    written.append(_write_summary(sweep, resolved, conditions, metric, target, how))
    written += _plots(sweep.out, conditions, metric)
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


def _hit(rs: list[dict[str, Any]], metric: str, target: float | None) -> dict[str, Any] | None:
    """The first evaluated cloud round that reaches the target."""
    if target is None:
        return None
    return next((r for r in rs if r.get(metric) is not None and _reaches(metric, r[metric], target)), None)


def _write_summary(sweep: Sweep, resolved: list[Resolved], conditions: dict[str, dict[str, list[dict[str, Any]]]],
                   metric: str, target: float | None, how: str) -> Path:
    short = metric.removeprefix("eval_")
    done = sum(len(pts) for pts in conditions.values())
    seeds = max((len(pts) for pts in conditions.values()), default=0)
    lines = [f"# Sweep `{sweep.name}`: {done} of {len(resolved)} points finished", ""]
    lines += [f"- base run config: `{sweep.config or 'embedded defaults'}`" + (f"; for every point: `{' '.join(sweep.sets)}`" if sweep.sets else "")]
    lines += ["- axes: " + "; ".join(f"`{a.key}` = {', '.join(label for label, _ in a.values)}" for a in sweep.axes)]
    if seeds > 1:
        lines += [f"- each condition over its seeds (up to {seeds}): mean ± standard deviation (min–max)"]
    lines += ["- simulated time: the run's `sim.compute` pricing (FLOPs / device rate by default) plus the topology's link "
              "models carrying the ledger's bytes, per round (docs/launch.md, \"Simulated clock\")"]
    if target is not None:
        lines += [f"- target {short} for time-to-target: {target:.4g} ({how})"]
    worst = any(_groups(next(iter(pts.values())), metric) for pts in conditions.values())
    private = _private(conditions)
    if private:
        lines += ["- ε: the privacy accountant's ε after the last round, at the run's δ (`privacy.delta`); "
                  "\"no DP\" for points without noise"]
    head = f"| condition | seeds | {short} final |" + (" ε |" if private else "")
    head += f" worst group {short} | mean group {short} | best group {short} |" if worst else ""
    head += " reached | rounds to target | sim s to target | cloud MB to target | sim s total | cloud MB total |"
    lines += ["", head, "|---|---:|---|" + ("---:|" if private else "") + ("---|---|---|" if worst else "") + "---:|---|---|---|---|---|"]
    listed = set()
    for r in resolved:
        cond = ",".join(f"{k}={v}" for k, v in r.point.labels.items() if k != SEED_AXIS) or "base"
        if cond in listed:
            continue
        listed.add(cond)
        pts = conditions.get(cond)
        if not pts:
            lines.append(f"| {cond} | 0 | not finished |" + (" |" if private else "") + (" | | |" if worst else "") + "  |  |  |  |  |  |")
            continue
        finals = [rs[-1] for rs in pts.values()]
        hits = [h for h in (_hit(rs, metric, target) for rs in pts.values()) if h is not None]
        cells = [cond, str(len(pts)), str(Stat([f[metric] for f in finals if f.get(metric) is not None]))]
        if private:
            eps = condition_epsilon(pts)
            cells.append("no DP" if eps is None else f"{eps:.3g}")
        if worst:  # each seed's worst, mean and best group, then those over the seeds
            spreads = [sp for sp in (_group_spread(f, metric) for f in finals) if sp is not None]
            cells += [str(Stat([sp[i] for sp in spreads])) for i in range(3)]
        cells += [f"{len(hits)}/{len(pts)}",
                  str(Stat([h["round"] for h in hits])) if hits else "not reached",
                  str(Stat([h["sim_clock_s"] for h in hits])) if hits else "not reached",
                  str(Stat([h["cloud_link_bytes"] / 1e6 for h in hits])) if hits else "not reached",
                  str(Stat([f["sim_clock_s"] for f in finals])), str(Stat([f["cloud_link_bytes"] / 1e6 for f in finals]))]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "Time and bytes to target are over the seeds that reached it. Files: `results.csv` (a row per point and "
              f"cloud round), `{short}_vs_round.png`, `{short}_vs_sim_time.png`, `{short}_vs_cloud_bytes.png`, "
              f"`{short}_per_group.png` (when the workload has groups), `bytes_per_tier.png`; each point's own results in "
              "`points/<point>/`.", ""]
    path = sweep.out / "summary.md"
    path.write_text("\n".join(lines))
    return path


def _curve(pts: dict[str, list[dict[str, Any]]], x: str, metric: str) -> tuple[list[float], list[float], list[float], list[float]]:
    """Per evaluated cloud round, over the seeds: mean x, mean y, and the band (min, max) of y."""
    by_round: dict[int, list[dict[str, Any]]] = {}
    for rs in pts.values():
        for r in rs:
            if r.get(metric) is not None:
                by_round.setdefault(r["round"], []).append(r)
    xs, ys, lo, hi = [], [], [], []
    for t in sorted(by_round):
        rs = by_round[t]
        xs.append(statistics.fmean(r[x] for r in rs))
        vals = [r[metric] for r in rs]
        ys.append(statistics.fmean(vals))
        lo.append(min(vals))
        hi.append(max(vals))
    return xs, ys, lo, hi


def _plots(out: Path, conditions: dict[str, dict[str, list[dict[str, Any]]]], metric: str) -> list[Path]:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("hierfed: plots skipped: matplotlib is not installed (pip install 'hierfed[plots]')")
        return []
    short, ylabel = metric.removeprefix("eval_"), metric.replace("_", " ")
    files = []
    for x, xlabel, fname in (("round", "cloud round", f"{short}_vs_round.png"),
                             ("sim_clock_s", "simulated wall clock (s)", f"{short}_vs_sim_time.png"),
                             ("cloud_link_bytes", "cloud-link bytes (cumulative)", f"{short}_vs_cloud_bytes.png")):
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for cond, pts in conditions.items():
            xs, ys, lo, hi = _curve(pts, x, metric)
            (line,) = ax.plot(xs, ys, marker="o", markersize=3, label=f"{cond} (n={len(pts)})")
            if len(pts) > 1:
                ax.fill_between(xs, lo, hi, color=line.get_color(), alpha=0.2, linewidth=0)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel + (" (mean; band: min–max over seeds)" if any(len(p) > 1 for p in conditions.values()) else ""))
        if x == "cloud_link_bytes":
            ax.set_xscale("symlog")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(out / fname, dpi=120)
        plt.close(fig)
        files.append(out / fname)
    files += _group_plot(plt, out, conditions, metric, short)
    files += _epsilon_plot(plt, out, conditions, metric, short)
    files.append(_bytes_plot(plt, out, conditions))
    return files


def condition_epsilon(pts: dict[str, list[dict[str, Any]]]) -> float | None:
    """A condition's ε after its last round (mean over its seeds: the accountant's ε depends on the
    noise, sampling and rounds, not on the seed); None when its points have no DP."""
    values = [rs[-1]["epsilon"] for rs in pts.values() if rs[-1].get("epsilon") is not None]
    return statistics.fmean(values) if values else None


def _private(conditions: dict[str, dict[str, list[dict[str, Any]]]]) -> bool:
    return any(condition_epsilon(pts) is not None for pts in conditions.values())


def _epsilon_plot(plt, out: Path, conditions: dict[str, dict[str, list[dict[str, Any]]]], metric: str, short: str) -> list[Path]:
    """Final quality against ε: a point per condition with DP (error bars: the standard deviation over
    its seeds), conditions without DP as horizontal lines."""
    if not _private(conditions):
        return []
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for cond, pts in conditions.items():
        finals = Stat([rs[-1][metric] for rs in pts.values() if rs[-1].get(metric) is not None])
        eps = condition_epsilon(pts)
        if finals.mean is None:
            continue
        if eps is None:
            ax.axhline(finals.mean, linestyle="--", linewidth=1, color="grey", label=f"{cond} (no DP, n={len(pts)})")
            continue
        sd = statistics.stdev(finals.values) if len(finals.values) > 1 else 0.0
        ax.errorbar([eps], [finals.mean], yerr=[sd], marker="o", capsize=3, label=f"{cond} (n={len(pts)})")
    ax.set_xscale("log")
    ax.set_xlabel("ε after the last round (log scale)")
    ax.set_ylabel(f"final {metric.replace('_', ' ')}" + (" (mean ± sd over seeds)" if any(len(p) > 1 for p in conditions.values()) else ""))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    path = out / f"{short}_vs_epsilon.png"
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return [path]


def _group_plot(plt, out: Path, conditions: dict[str, dict[str, list[dict[str, Any]]]], metric: str, short: str) -> list[Path]:
    """Final quality per group (language, category shelf, edge) per condition, mean over seeds."""
    groups = sorted({g for pts in conditions.values() for rs in pts.values() for g in _groups(rs, metric)})
    if not groups:
        return []
    fig, ax = plt.subplots(figsize=(max(7, 0.6 * len(groups) * max(1, len(conditions)) / 2), 4.5))
    width = 0.8 / max(1, len(conditions))
    for i, (cond, pts) in enumerate(conditions.items()):
        finals = [rs[-1] for rs in pts.values()]
        means = [Stat([f[f"group:{g}:{metric}"] for f in finals if f.get(f"group:{g}:{metric}") is not None]).mean for g in groups]
        ax.bar([j + i * width for j in range(len(groups))], [m if m is not None else math.nan for m in means], width, label=cond)
    ax.set_xticks([j + width * (len(conditions) - 1) / 2 for j in range(len(groups))])
    ax.set_xticklabels(groups, rotation=30, ha="right", fontsize=7)
    ax.set_ylabel(f"final {metric.replace('_', ' ')} per group")
    ax.legend(fontsize=7)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    path = out / f"{short}_per_group.png"
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return [path]


def _bytes_plot(plt, out: Path, conditions: dict[str, dict[str, list[dict[str, Any]]]]) -> Path:
    fig, ax = plt.subplots(figsize=(7, 4.5))
    width = 0.8 / len(LINKS)
    names = list(conditions)
    for i, link in enumerate(LINKS):
        col = link.replace("-", "_")
        totals = [Stat([sum(r[f"bytes_{col}_up"] + r[f"bytes_{col}_down"] for r in rs) / 1e6
                        for rs in conditions[c].values()]).mean or 0.0 for c in names]
        ax.bar([j + (i - 1) * width for j in range(len(names))], totals, width, label=link)
    ax.set_xticks(range(len(names)))
    ax.set_xticklabels(names, rotation=30, ha="right", fontsize=7)
    ax.set_ylabel("MB sent (up + down, whole run; mean over seeds)")
    ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(out / "bytes_per_tier.png", dpi=120)
    plt.close(fig)
    return out / "bytes_per_tier.png"
