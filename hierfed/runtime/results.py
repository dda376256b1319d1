"""Results of a run: metrics.jsonl (a row per edge round and per cloud round), summary.json, and what
the cloud prints while it runs (a line per cloud round) and at the end (a summary table)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from rich import filesize
from rich.console import Console
from rich.table import Table

from hierfed.comm.ledger import Key, by_link


def _sum_links(rows: list[dict[str, Any]], key: str) -> dict[str, dict[str, int]]:
    out: dict[str, dict[str, int]] = {}
    for r in rows:
        for link, d in r.get(key, {}).items():
            t = out.setdefault(link, {"up": 0, "down": 0})
            t["up"] += d["up"]
            t["down"] += d["down"]
    return out


def human_bytes(n: float) -> str:
    """Decimal units, 2 decimals: '18.53 kB', '6.06 MB' (rich's file sizes)."""
    return filesize.decimal(int(n), precision=2)


class RunLog:
    """Owned by the cloud: the only rank that writes results."""

    def __init__(self, out: Path, resume_round: int | None, progress: bool) -> None:
        self.out = out
        self.path = out / "metrics.jsonl"
        out.mkdir(parents=True, exist_ok=True)
        self.console = Console(highlight=False) if progress else None
        self.rows: list[dict[str, Any]] = []
        if resume_round is None:
            self.path.write_text("")
        else:  # keep what the checkpoint covers; later rows are replayed
            kept = [json.loads(line) for line in self.path.read_text().splitlines() if line.strip()] if self.path.exists() else []
            self.rows = [r for r in kept if r["round"] <= resume_round]
            self.path.write_text("".join(json.dumps(r) + "\n" for r in self.rows))

    @staticmethod
    def add_bytes(row: dict[str, Any], raw_bytes: dict[Key, int]) -> None:
        """The row's bytes per link, as sent (compressed) and before compression."""
        row["bytes"] = by_link(raw_bytes)
        row["bytes_uncompressed"] = by_link(raw_bytes, raw=True)
        secagg = by_link(raw_bytes, only="secagg")  # SecAgg's keys, shares and reveals (included in "bytes")
        if secagg:
            row["bytes_secagg"] = secagg

    def write(self, row: dict[str, Any], raw_bytes: dict[Key, int] | None = None) -> None:
        if raw_bytes is not None:
            self.add_bytes(row, raw_bytes)
        self.rows.append(row)
        with self.path.open("a") as f:
            f.write(json.dumps(row) + "\n")
        if self.console and row["tier"] == "cloud":
            self._print_round(row)

    def _print_round(self, row: dict[str, Any]) -> None:
        assert self.console is not None  # called only when self.console is set
        acc, eval_loss = row.get("eval_accuracy"), row.get("eval_loss")
        score = f"acc {acc:.3f}" if acc is not None else f"eval loss {eval_loss:.3f}" if eval_loss is not None else "(no eval)"
        loss = f"loss {row['loss']:.3f}" if row.get("loss") is not None else "loss   -  "
        sent = sum(d["up"] + d["down"] for d in row.get("bytes", {}).values())
        sim = f"  sim {row['sim_clock_s']:8.1f} s" if row.get("sim_clock_s") is not None else ""
        self.console.print(f"round {row['round']:>3}  {loss}  {score}  sent {human_bytes(sent):>9}  {row['elapsed_s']:7.1f} s{sim}")

    def cloud_rows(self) -> list[dict[str, Any]]:
        return [r for r in self.rows if r["tier"] == "cloud"]

    def summary(self, info: dict[str, Any]) -> dict[str, Any]:
        """Totals over the run (from the rows, so a resumed run reports the whole run)."""
        rounds = [r for r in self.cloud_rows() if r["round"] > 0]
        totals, uncompressed = _sum_links(self.cloud_rows(), "bytes"), _sum_links(self.cloud_rows(), "bytes_uncompressed")
        # The reference every experiment is measured against: flat FedAvg of the whole model in
        # fp32, each sampled client downloading and uploading every parameter every round.
        full = sum(r.get("clients", 0) for r in rounds) * info["total_params"] * 4
        cloud_link = "device-cloud" if "device-cloud" in totals else "edge-cloud"
        cloud_bytes = sum(totals.get(cloud_link, {"up": 0, "down": 0}).values())
        secs = {k: sum(r["seconds"].get(k, 0.0) for r in rounds) for k in ("round", "compute", "aggregate", "eval")}
        secs["communication"] = max(0.0, secs["round"] - secs["compute"] - secs["aggregate"])
        last = self.cloud_rows()[-1]
        first = self.cloud_rows()[0]
        summary = {
            **info,
            "rounds": len(rounds),
            "initial": {k: first.get(k) for k in ("eval_accuracy", "eval_loss", "eval_perplexity")},
            "final": {k: last.get(k) for k in ("eval_accuracy", "eval_loss", "eval_perplexity", "loss")},
            # per-group eval of the last evaluated round (a category shelf, a language): None without groups
            "groups": last.get("groups"),
            "bytes": totals,
            "bytes_uncompressed": uncompressed,
            "full_model_flat_fedavg": {"device-cloud": {"up": full, "down": full}},
            "cloud_link": cloud_link,
            "cloud_link_reduction": (2 * full / cloud_bytes) if cloud_bytes else None,
            "seconds": secs,
            "sim_seconds": last.get("sim_clock_s"),  # the simulated clock at the end (hierfed.sim.clock)
        }
        if any("bytes_secagg" in r for r in self.cloud_rows()):
            summary["bytes_secagg"] = _sum_links(self.cloud_rows(), "bytes_secagg")
        participation = self._participation()
        if participation:
            summary["participation"] = participation
        (self.out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        if self.console:
            self._print_summary(summary)
        return summary

    def _participation(self) -> dict[str, Any]:
        """Totals of what unreliable clients did (docs/heterogeneity.md), over the rows that say it
        (edge rows; a flat topology's cloud rows): sampled, available, dropped, late, partial;
        FedBuff: arrivals, discarded and the mean and largest staleness. Empty when no row says."""
        rows = [r for r in self.rows if r.get("round", 0) > 0 and ("sampled" in r or "arrivals" in r)]
        out: dict[str, Any] = {k: sum(r.get(k) or 0 for r in rows) for k in
                               ("sampled", "available", "dropped", "late", "partial", "arrivals", "discarded") if any(k in r for r in rows)}
        stale = [x for r in rows for x in r.get("staleness") or ()]
        if stale:
            out.update(staleness_mean=sum(stale) / len(stale), staleness_max=max(stale))
        return out

    def _print_summary(self, s: dict[str, Any]) -> None:
        assert self.console is not None  # called only when self.console is set
        t = Table(title=f"hierfed: {s['topology']} ({s['world_size']} ranks, {s['clients']} clients), {s['rounds']} cloud rounds")
        t.add_column("")
        t.add_column("value", justify="right")
        for key in ("eval_accuracy", "eval_loss", "eval_perplexity"):
            if s["final"].get(key) is not None:
                t.add_row(key.replace("_", " "), f"{s['initial'][key]:.4f} -> {s['final'][key]:.4f}")
        if s.get("groups"):  # the spread over the workload's groups, on its main metric
            key = "eval_accuracy" if s["final"].get("eval_accuracy") is not None else "eval_perplexity"
            vals = {g: m[key] for g, m in s["groups"].items() if m.get(key) is not None}
            if vals:
                worst = (min if key == "eval_accuracy" else max)(vals, key=vals.__getitem__)
                best = (max if key == "eval_accuracy" else min)(vals, key=vals.__getitem__)
                t.add_row(f"{key.replace('_', ' ')} per group: worst / mean / best",
                          f"{vals[worst]:.4f} ({worst}) / {sum(vals.values()) / len(vals):.4f} / {vals[best]:.4f} ({best})")
        for link, d in s["bytes"].items():
            t.add_row(f"{link} bytes up / down", f"{human_bytes(d['up'])} / {human_bytes(d['down'])}")
            raw = s["bytes_uncompressed"].get(link, d)
            if raw != d:
                t.add_row("  uncompressed it would be", f"{human_bytes(raw['up'])} / {human_bytes(raw['down'])}")
        if s["cloud_link_reduction"]:
            t.add_row("cloud link vs full-model flat FedAvg", f"{s['cloud_link_reduction']:,.0f}x fewer bytes")
        sec = s["seconds"]
        total = max(sec["round"], 1e-9)
        t.add_row("round time", f"{sec['round']:.1f} s")
        t.add_row("  local compute (critical path)", f"{sec['compute']:.1f} s ({100 * sec['compute'] / total:.0f}%)")
        t.add_row("  communication + waiting", f"{sec['communication']:.1f} s ({100 * sec['communication'] / total:.0f}%)")
        t.add_row("  aggregation", f"{sec['aggregate']:.3f} s")
        t.add_row("cloud eval + checkpoint (overlapped)", f"{sec['eval']:.1f} s")
        if s.get("sim_seconds") is not None:
            t.add_row("simulated time on the topology's cluster", f"{s['sim_seconds']:.1f} s")
        t.add_row("trainable / base-model parameters", f"{s['trainable_params']:,} / {s['total_params']:,}")
        t.add_row("results", str(self.out))
        self.console.print(t)
