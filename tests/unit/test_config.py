"""hierfed.config: defaults, YAML files, --set overrides, and one-line errors naming the field."""

from __future__ import annotations

import pytest

from hierfed.config import RunConfig, apply_overrides, dump_config, load_config, parse_override
from hierfed.errors import HierfedError


def error(path=None, overrides=None) -> str:
    with pytest.raises(HierfedError) as info:
        load_config(path, overrides)
    msg = str(info.value)
    assert "\n" not in msg and msg
    return msg


def test_defaults_validate() -> None:
    cfg = load_config()
    assert cfg == RunConfig()
    assert (cfg.topology, cfg.schedule.tau1, cfg.model.source, cfg.aggregation.cloud.name) == ("default", 5, "minilm", "fedavg")


def test_load_from_yaml(write_yaml) -> None:
    path = write_yaml("run.yaml", {"seed": 7, "schedule": {"tau1": 3, "rounds": 2}, "train": {"lr": 0.01}})
    cfg = load_config(path)
    assert (cfg.seed, cfg.schedule.tau1, cfg.schedule.rounds, cfg.train.lr) == (7, 3, 2, 0.01)
    assert cfg.schedule.tau2 == 2  # untouched fields keep their defaults


def test_empty_file_is_defaults(tmp_path) -> None:
    (tmp_path / "empty.yaml").write_text("")
    assert load_config(tmp_path / "empty.yaml") == RunConfig()


def test_overrides_nested_and_yaml_typed(write_yaml) -> None:
    path = write_yaml("run.yaml", {"schedule": {"tau1": 3}})
    cfg = load_config(path, ["schedule.tau1=10", "train.lr=1e-3", "runtime.progress=false",
                             "peft.target_modules=[c_attn, c_proj]", "aggregation.cloud.name=fedavgm"])
    assert cfg.schedule.tau1 == 10
    assert cfg.train.lr == 1e-3
    assert cfg.runtime.progress is False
    assert cfg.peft.target_modules == ["c_attn", "c_proj"]
    assert cfg.aggregation.cloud.name == "fedavgm" and cfg.aggregation.edge.name == "fedavg"


def test_parse_override() -> None:
    assert parse_override("schedule.tau1=10") == (["schedule", "tau1"], 10)
    assert parse_override("out=") == (["out"], None)
    assert parse_override("topology=a=b") == (["topology"], "a=b")
    for bad in ("foo", "=5", " =x"):
        with pytest.raises(HierfedError, match="expected KEY=VALUE"):
            parse_override(bad)


def test_override_into_a_scalar_is_an_error() -> None:
    with pytest.raises(HierfedError, match="'seed' is not a section"):
        apply_overrides({"seed": 1}, ["seed.x=2"])


def test_overrides_do_not_mutate_input() -> None:
    data = {"schedule": {"tau1": 3}}
    assert apply_overrides(data, ["schedule.tau1=4"]) == {"schedule": {"tau1": 4}}
    assert data == {"schedule": {"tau1": 3}}


@pytest.mark.parametrize(
    "override, field",
    [
        ("schedule.tau1=0", "schedule.tau1"),
        ("train.lr=-1", "train.lr"),
        ("schedule.client_fraction=1.5", "schedule.client_fraction"),
        ("model.source=path", "model.path"),
        ("model.max_length=lots", "model.max_length"),
        ("aggregation.edge.name=fedsgd", "aggregation.edge.name"),
    ],
)
def test_bad_field_names_its_path(override: str, field: str) -> None:
    msg = error(overrides=[override])
    assert msg.startswith("run config: ")
    assert field in msg


def test_bad_field_in_file_names_file_and_field(write_yaml) -> None:
    path = write_yaml("run.yaml", {"schedule": {"tau1": 0}})
    assert error(path) == f"{path}: schedule.tau1: must be >= 1 (got 0)"


@pytest.mark.parametrize("overrides, expected", [
    (["schedule.client_fraction=1.5"], "schedule.client_fraction: must be <= 1 (got 1.5)"),
    (["model.max_length=lots"], "model.max_length: must be an integer (got 'lots')"),
    (["aggregation.edge.name=fedsgd"], ("aggregation.edge.name: must be 'fedavg', 'fedavgm', 'fedadam', 'fedyogi', 'fedadagrad', "
                                        "'median', 'trimmed_mean', 'krum', 'multikrum', 'normclip' or 'lora_exact' (got 'fedsgd')")),
    (["schedule=[1]"], "schedule: must be a mapping (got a list)"),
    (["topology=null"], "topology: must be a string (got null)"),
    # a union (bool | 'auto') is one problem; its member types are not part of the path
    (["deepspeed.enabled=maybe"], "deepspeed.enabled: must be a boolean or 'auto' (got 'maybe')"),
    (["model.source=path"], "model: source=path needs model.path (a local transformers directory)"),
    (["schedule.tau1=0", "schedule.tau2=0"], "schedule.tau1: must be >= 1 (got 0) (and 1 more problem)"),
    # seeds feed numpy's SeedSequence, which takes no negative numbers
    (["seed=-1"], "seed: must be >= 0 (got -1)"),
    (["data.seed=-3"], "data.seed: must be >= 0 (got -3)"),
])
def test_bad_value_message(overrides: list[str], expected: str) -> None:
    assert error(overrides=overrides) == f"run config: {expected}"


def test_unknown_field() -> None:
    assert error(overrides=["x=1"]) == ("run config: top level: unknown field 'x' (allowed: topology, seed, out, model, peft, "
                                        "data, train, schedule, aggregation, client, compression, split, deepspeed, runtime, sim, privacy, checkpoint)")
    assert error(overrides=["schedule.foo=1"]).startswith("run config: schedule: unknown field 'foo' (allowed: rounds, tau1, tau2, ")
    assert error(overrides=["data.pth=x"]).startswith("run config: data: unknown field 'pth' (allowed: source, path, ")


@pytest.mark.parametrize("text, line", [("seed: 1\nschedule:\n  tau1: 1\n rounds: 2\n", 4), ("a: b: c\n", 1)])
def test_bad_yaml_names_the_line(tmp_path, text: str, line: int) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    assert error(path) == f"{path}: not valid YAML at line {line}"


def test_non_mapping_file(tmp_path) -> None:
    path = tmp_path / "list.yaml"
    path.write_text("- a\n- b\n")
    assert error(path) == f"{path}: a run config is a mapping of sections, got list"


def test_missing_file(tmp_path) -> None:
    assert "cannot read run config" in error(tmp_path / "nope.yaml")


def test_dump_round_trips(tmp_path) -> None:
    cfg = load_config(None, ["seed=3", "schedule.tau2=4", "peft.method=loha", "peft.target_modules=[q, v]",
                             "peft.options={use_effective_conv2d: true}", "data.partition=dirichlet",
                             "aggregation.cloud.name=fedavgm", "out=runs/x", "model.source=gpt2"])
    path = tmp_path / "dumped.yaml"
    path.write_text(dump_config(cfg))
    assert load_config(path) == cfg


def test_scaled_randk_with_error_feedback_is_refused_before_launch():
    """It used to pass validation and raise on every device after its first edge round."""
    with pytest.raises(HierfedError, match=r"compression: device_up='randk:0.1,scaled=true' with error_feedback.*use 'randk:0.1,scaled=false'") as e:
        load_config(None, ["compression.device_up=randk:0.1"])
    assert "\n" not in str(e.value)
    with pytest.raises(HierfedError, match="compression: edge_up="):
        load_config(None, ["compression.edge_up=randk:0.1 > int8"])
    # what works: unscaled rand-k, top-k, or scaled rand-k without error feedback
    load_config(None, ["compression.device_up=randk:0.1,scaled=false"])
    load_config(None, ["compression.device_up=topk:0.1"])
    load_config(None, ["compression.device_up=randk:0.1", "compression.error_feedback=false"])


def test_negative_seed_is_refused():
    with pytest.raises(HierfedError, match="seed"):
        load_config(None, ["seed=-1"])
