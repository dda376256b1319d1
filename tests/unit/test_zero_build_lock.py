"""A DeepSpeed op's JIT build lock left by a killed build ends the job with one line (it would
otherwise make every DeepSpeed rank wait forever in torch's FileBaton)."""

from __future__ import annotations

import os
import time

import pytest

from hierfed.errors import HierfedError
from hierfed.placement.zero import STALE_BUILD_LOCK_S, check_build_locks, stale_build_locks


def _lock(path, age_s: float):
    path.mkdir(parents=True)
    lock = path / "lock"
    lock.touch()
    then = time.time() - age_s
    os.utime(lock, (then, then))
    return lock


def test_only_old_locks_of_deepspeed_ops_are_stale(tmp_path):
    old = _lock(tmp_path / "py311_cpu" / "deepspeed_shm_comm", STALE_BUILD_LOCK_S + 60)  # torch's default layout
    _lock(tmp_path / "py311_cpu" / "deepspeed_cpu_adam", 60)  # a build in progress
    _lock(tmp_path / "py311_cpu" / "other_ext", 10 * STALE_BUILD_LOCK_S)  # not DeepSpeed's
    flat = _lock(tmp_path / "deepspeed_shm_comm", STALE_BUILD_LOCK_S + 1)  # TORCH_EXTENSIONS_DIR layout
    assert stale_build_locks(tmp_path, time.time()) == sorted([old, flat])
    assert stale_build_locks(tmp_path / "missing", time.time()) == []


def test_a_stale_lock_is_one_line_naming_it(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    check_build_locks()  # nothing there
    lock = _lock(tmp_path / "deepspeed_shm_comm", 2 * STALE_BUILD_LOCK_S)
    with pytest.raises(HierfedError, match="build lock left by a killed build") as e:
        check_build_locks()
    assert str(lock) in str(e.value) and "\n" not in str(e.value)
