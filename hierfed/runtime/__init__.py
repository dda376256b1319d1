"""The MPI side of one run: communicators and waiting (world.py), failure handling (failure.py),
checkpoints (checkpoint.py), results (results.py: metrics.jsonl, summary.json, the console) and
what the run used (usage.py). Import the modules themselves: checkpoint and results need no MPI."""
