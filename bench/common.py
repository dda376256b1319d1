"""Shared by the benchmark scripts (run as `python bench/<name>.py`, so this imports as `common`)."""

from __future__ import annotations

import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def git_state() -> str:
    """The commit the runs used, and the package files that differed from it (hierfed is editable)."""
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "hierfed"], cwd=ROOT, capture_output=True, text=True).stdout.split("\n")
    except OSError:
        return "unknown"
    dirty = [line[3:] for line in dirty if line.strip()]
    return head + (f" + uncommitted changes to {', '.join(dirty)}" if dirty else "")
