"""Shared test helpers: launching real MPI jobs with the venv's mpiexec."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from hierfed.cluster.mpi import mpiexec_command, rank_env

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent


def torch_extensions_dir() -> Path:
    """Where the jobs' DeepSpeed JIT-builds its op (docs/deepspeed.md, "The JIT-built op and its build
    lock"): inside this venv, so each venv keeps its own build. torch's default cache
    (~/.cache/torch_extensions) is shared by every venv of the user, and each venv rebuilds over the
    others (the build is keyed by the venv's paths) and can leave a lock the next start waits on.
    Outside a venv: .torch_extensions/ in the checkout (gitignored)."""
    in_venv = sys.prefix != sys.base_prefix
    return Path(sys.prefix) / "torch_extensions" if in_venv else ROOT / ".torch_extensions"


# The jobs and the tests that start DeepSpeed in this process (tests/unit/test_split_semantics.py)
# load the one build; a TORCH_EXTENSIONS_DIR already set wins.
os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(torch_extensions_dir()))


def job_env() -> dict[str, str]:
    """The ranks' environment as hierfed's launcher sets it (rank_env: MPICH's reduce algorithm,
    one thread per rank), plus the tests' own."""
    env = rank_env()
    env.update(OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1", MKL_NUM_THREADS="1", HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1")
    env.pop("HIERFED_INJECT_FAILURE", None)
    env.pop("HIERFED_INJECT_ATTACK", None)
    return env


def mpirun(n: int, *args: str, timeout: float = 300, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """`mpiexec -n N python -m hierfed ARGS` from the repository root; output captured. The mpiexec
    is the one hierfed's own launcher finds (HIERFED_MPIEXEC, beside this Python, or on PATH), with
    the flags it adds for Open MPI, so the MPI tests run with a site MPI too."""
    cmd = mpiexec_command(n, list(args))
    return subprocess.run(cmd, cwd=ROOT, env=env or job_env(), capture_output=True, text=True, timeout=timeout)


def topology_cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str]:
    """`hierfed topology ARGV` in this process: (exit code, stdout)."""
    import argparse

    from hierfed.commands.topology import add_parser

    parser = argparse.ArgumentParser(prog="hierfed")
    add_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["topology", *argv])
    code = args.func(args)
    return code, capsys.readouterr().out


def hierfed(*args: str, timeout: float = 300, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """The `hierfed` console command, as a user runs it."""
    return subprocess.run([str(BIN / "hierfed"), *args], cwd=ROOT, env=env or job_env(), capture_output=True, text=True, timeout=timeout)


@pytest.fixture
def write_yaml(tmp_path):
    def write(name: str, data: dict) -> str:
        path = tmp_path / name
        path.write_text(yaml.safe_dump(data))
        return str(path)

    return write


@pytest.fixture(scope="session")
def default_run(tmp_path_factory):
    """The main job exactly as README runs it under mpiexec (MiniLM + LoRA, 7 ranks), run once."""
    out = tmp_path_factory.mktemp("default") / "run"
    proc = mpirun(7, "run", "topologies/default.yaml", "--out", str(out))
    return out, proc


# The multilingual LM job: causal LM on three languages' fortunes (Debian's packages), clients by
# language (4 clients, 3 languages: de has two), a tiny GPT-2 fully fine-tuned. Its loss falls from
# ~ln|V| all along, so it tells a codec that learns less from one that does not (the topics task
# saturates near 0.99 accuracy with MiniLM, and a tiny GPT-2 does not learn the fortunes categories
# in a CI budget). tests/mpi/test_compression.py runs it by uplink compression, test_workloads.py
# reads its per-language metrics.
LM_DATA = {"source": "fortunes", "task": "lm", "languages": ["en", "de", "zh"], "partition": "shelves", "eval_samples": 48}
LM_ROUNDS = 3


@pytest.fixture(scope="session")
def lm_job(tmp_path_factory):
    """`lm_job(compression)`: the LM job's output directory with that `compression` section (same
    seed every time), each distinct job run once per session."""
    import json

    done: dict[str, Path] = {}

    def run(compression: dict) -> Path:
        key = json.dumps(compression, sort_keys=True)
        if key not in done:
            tmp = tmp_path_factory.mktemp("lm")
            cfg = {"model": {"source": "gpt2", "size": "tiny", "max_length": 32}, "peft": {"method": "none"}, "data": LM_DATA,
                   "train": {"lr": 0.01, "batch_size": 8}, "schedule": {"rounds": LM_ROUNDS, "tau1": 2, "tau2": 1},
                   "compression": compression, "runtime": {"progress": False}}
            (tmp / "run.yaml").write_text(yaml.safe_dump(cfg))
            proc = mpirun(7, "run", "--config", str(tmp / "run.yaml"), "--out", str(tmp / "out"))
            assert proc.returncode == 0, proc.stderr[-3000:]
            done[key] = tmp / "out"
        return done[key]

    return run

