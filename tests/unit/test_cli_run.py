"""`hierfed run` with bad input: exit 2, one `hierfed: error:` line, before mpiexec starts."""

from __future__ import annotations

import pytest

from conftest import hierfed


def one_line_error(*args: str) -> str:
    """No timing bound here (it flaked on a loaded 2-core machine): "launching" not printed says it
    failed before mpiexec started, and the 60 s timeout turns a hang into a failure."""
    res = hierfed("run", *args, timeout=60)
    lines = [line for line in res.stderr.splitlines() if line.strip()]
    assert res.returncode == 2, (res.returncode, res.stdout, res.stderr)
    assert len(lines) == 1, res.stderr
    assert lines[0].startswith("hierfed: error: ")
    assert "Traceback" not in res.stderr + res.stdout
    assert "launching" not in res.stdout  # failed before mpiexec
    return lines[0]


def test_unknown_topology() -> None:
    assert "unknown topology 'no-such-topology'" in one_line_error("no-such-topology")


def test_topology_with_bad_field(write_yaml) -> None:
    path = write_yaml("topo.yaml", {"name": "bad", "edges": [{"name": "e0", "devices": [{"ranks": 0}]}]})
    assert f"{path}: edges[0].devices[0].ranks" in one_line_error(path)


def test_run_config_with_bad_field(write_yaml) -> None:
    path = write_yaml("run.yaml", {"schedule": {"tau1": 0}})
    assert f"{path}: schedule.tau1" in one_line_error("--config", path)


def test_set_without_equals() -> None:
    assert "--set 'foo': expected KEY=VALUE" in one_line_error("--set", "foo")


def test_missing_jsonl() -> None:
    msg = one_line_error("--set", "data.source=jsonl", "--set", "data.path=/nonexistent.jsonl")
    assert "/nonexistent.jsonl" in msg


def test_missing_model_directory() -> None:
    msg = one_line_error("--set", "model.source=path", "--set", "model.path=/nonexistent-model-dir")
    assert "model.path" in msg and "/nonexistent-model-dir" in msg


def test_resume_without_out() -> None:
    assert "--resume needs --out" in one_line_error("--resume")


@pytest.mark.parametrize("args, expected", [(["--version"], "hierfed "), (["run", "--help"], "--resume")])
def test_version_and_help(args: list[str], expected: str) -> None:
    res = hierfed(*args, timeout=60)
    assert res.returncode == 0, res.stderr
    assert expected in res.stdout


def test_shortcut_flags_stay_strings():
    """--out/--topology values are never re-read as YAML: numbers, booleans and '#' stay as typed."""
    from hierfed.cli import build_parser
    from hierfed.commands.run import overrides
    from hierfed.config import load_config

    args = build_parser().parse_args(["run", "yes", "--out", "runs/x #1", "--seed", "7"])
    cfg = load_config(None, overrides(args))
    assert (cfg.topology, cfg.out, cfg.seed) == ("yes", "runs/x #1", 7)
    args = build_parser().parse_args(["run", "--out", "2024"])
    assert load_config(None, overrides(args)).out == "2024"


@pytest.mark.parametrize(
    "edge, expected",
    [
        ({"ranks": 2, "devices": [{"ranks": 1}]}, "has ranks: 2 but trains nothing"),
        ({"train_locally": True, "devices": [{"ranks": 1, "split_layers": 1}]}, "has split devices and train_locally: true"),
        ({"ranks": 9, "train_locally": True, "devices": [{"ranks": 1}]}, "train.batch_size (8) must be at least 9"),
    ],
)
def test_edges_that_cannot_train_what_they_are_given(write_yaml, edge: dict, expected: str) -> None:
    topo = write_yaml("edges.yaml", {"name": "e", "edges": [{"name": "e0", **edge}]})
    run = write_yaml("run.yaml", {"train": {"batch_size": 8}})
    assert expected in one_line_error(topo, "--config", run)


def test_deepspeed_batch_arithmetic_is_checked_before_launch() -> None:
    msg = one_line_error("edge-clients", "--set", "deepspeed.config.train_batch_size=7")
    assert "deepspeed (edge0): train_batch_size 7 != micro-batch per rank" in msg


def test_deepspeed_clipping_of_a_split_edge_is_train_max_grad_norm() -> None:
    """A split edge clips across the cut itself (docs/split.md): DeepSpeed's own gradient_clipping
    would clip the upper stage a second time, by its own norm."""
    msg = one_line_error("zero-edges", "--set", "deepspeed.config.gradient_clipping=1.0")
    assert msg == ("hierfed: error: deepspeed (edge0): gradient_clipping in deepspeed.config: an edge with split devices clips "
                   "by train.max_grad_norm, across the cut (docs/split.md); set that instead")


def test_an_edge_client_smaller_than_its_edge_group(write_yaml) -> None:
    topo = write_yaml("edges.yaml", {"name": "e", "edges": [{"name": "e0", "ranks": 3, "train_locally": True, "devices": [{"ranks": 1}]}]})
    run = write_yaml("run.yaml", {"data": {"train_samples": 4}, "train": {"batch_size": 8}})  # 2 clients of 2 examples
    assert "edge 'e0' trains client 1 on 3 ranks, but the client has 2 examples" in one_line_error(topo, "--config", run)


def test_privacy_target_already_exceeded_at_round_one() -> None:
    line = one_line_error("default", "--set", "privacy.clip=1.0", "--set", "privacy.noise_multiplier=0.3",
                          "--set", "privacy.target_epsilon=0.5")
    assert "privacy.target_epsilon 0.5 is already exceeded at round 1" in line


def test_secagg_with_topk_is_refused() -> None:
    line = one_line_error("default", "--set", "privacy.secagg=true", "--set", "privacy.clip=1.0",
                          "--set", "compression.device_up=topk:0.1")
    assert "top-k is refused under secure aggregation" in line
