"""RunLog's console lines and summary for rounds the cloud did not evaluate (schedule.eval_every)."""

from __future__ import annotations

import json

from hierfed.runtime.results import RunLog


def _row(t: int, **metrics) -> dict:
    return {"round": t, "edge_round": None, "tier": "cloud", "loss": 1.0 / (t + 1), "clients": 2, "samples": 8,
            "seconds": {"round": 0.1, "compute": 0.05, "aggregate": 0.01}, "elapsed_s": float(t), **metrics}


def test_rounds_without_eval_print_and_summarise(tmp_path, capsys):
    log = RunLog(tmp_path, None, progress=True)
    log.write(_row(0, eval_loss=2.0, eval_accuracy=0.25))
    log.write(_row(1))  # not evaluated
    log.write(_row(2, eval_loss=1.0, eval_accuracy=0.75))
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("round")]
    assert len(lines) == 3
    assert "(no eval)" in lines[1] and "acc 0.750" in lines[2]
    summary = log.summary({"topology": "t", "world_size": 3, "clients": 2, "trainable_params": 10, "total_params": 100, "out": str(tmp_path)})
    assert summary["initial"]["eval_accuracy"] == 0.25 and summary["final"]["eval_accuracy"] == 0.75
    written = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert ["eval_loss" in r for r in written] == [True, False, True]
