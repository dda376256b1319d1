"""Every rule is registered by name, built from its AggregatorConfig fields, and its fields are checked in the run config."""

from __future__ import annotations

import typing

import pytest

from hierfed.config import AggregatorConfig, load_config
from hierfed.errors import HierfedError
from hierfed.strategy import STRATEGIES, FedAdagrad, FedAdam, FedYogi, Krum, Median, MultiKrum, NormClip, TrimmedMean, build_strategy


def test_config_names_are_the_registry() -> None:
    assert typing.get_args(AggregatorConfig.model_fields["name"].annotation) == tuple(STRATEGIES)
    assert set(STRATEGIES) == {"fedavg", "fedavgm", "fedadam", "fedyogi", "fedadagrad", "median", "trimmed_mean", "krum",
                               "multikrum", "normclip", "lora_exact"}
    assert {n for n, cls in STRATEGIES.items() if not cls.reducible} == {"median", "trimmed_mean", "krum", "multikrum", "normclip",
                                                                         "lora_exact"}


def test_adaptive_rules_read_their_fields() -> None:
    s = build_strategy(AggregatorConfig(name="fedyogi", server_lr=0.02, beta1=0.8, beta2=0.9, tau=1e-4))
    assert type(s) is FedYogi and (s.server_lr, s.beta1, s.beta2, s.tau) == (0.02, 0.8, 0.9, 1e-4)
    defaults = {name: build_strategy(AggregatorConfig(name=name)) for name in ("fedadam", "fedyogi", "fedadagrad")}
    assert [type(s) for s in defaults.values()] == [FedAdam, FedYogi, FedAdagrad]
    assert [(s.server_lr, s.tau, s.beta1, s.beta2) for s in defaults.values()] == [
        (0.1, 1e-9, 0.9, 0.99), (0.01, 1e-3, 0.9, 0.99), (0.1, 1e-9, 0.9, 0.99)]


def test_robust_rules_read_their_fields() -> None:
    assert type(build_strategy(AggregatorConfig(name="median"))) is Median
    t = build_strategy(AggregatorConfig(name="trimmed_mean", trim_beta=0.1, server_lr=0.5))
    assert type(t) is TrimmedMean and (t.beta, t.server_lr) == (0.1, 0.5)
    k = build_strategy(AggregatorConfig(name="krum", krum_f=2, multikrum_m=4))
    assert type(k) is Krum and (k.f, k.m, k.min_children()) == (2, 1, 7)  # Krum is Multi-Krum with m = 1
    m = build_strategy(AggregatorConfig(name="multikrum", krum_f=1, multikrum_m=6))
    assert type(m) is MultiKrum and (m.f, m.m, m.min_children()) == (1, 6, 6)
    assert build_strategy(AggregatorConfig(name="multikrum")).m is None  # n - f at aggregation time
    c = build_strategy(AggregatorConfig(name="normclip", clip_norm=0.3))
    assert type(c) is NormClip and (c.clip_norm, c.server_lr) == (0.3, 1.0)


@pytest.mark.parametrize(("override", "message"), [
    ("aggregation.cloud.name=normclip", "aggregation.cloud: name=normclip needs clip_norm (the L2 bound on each child's update)"),
    ("aggregation.edge.trim_beta=0.5", "aggregation.edge.trim_beta: must be < 0.5 (got 0.5)"),
    ("aggregation.edge.tau=0", "aggregation.edge.tau: must be > 0 (got 0)"),
    ("aggregation.edge.beta2=1", "aggregation.edge.beta2: must be < 1 (got 1)"),
    ("aggregation.cloud.krum_f=-1", "aggregation.cloud.krum_f: must be >= 0 (got -1)"),
    ("aggregation.cloud.multikrum_m=0", "aggregation.cloud.multikrum_m: must be >= 1 (got 0)"),
    ("aggregation.cloud.clip_norm=0", "aggregation.cloud.clip_norm: must be > 0 (got 0)"),
    ("aggregation.cloud.server_lr=0", "aggregation.cloud.server_lr: must be > 0 (got 0)"),
])
def test_bad_aggregator_fields_are_one_line_errors(override: str, message: str) -> None:
    with pytest.raises(HierfedError) as info:
        load_config(None, [override])
    assert str(info.value) == f"run config: {message}"


@pytest.mark.parametrize("name, tier, topology", [
    ("median", "edge", "default"), ("trimmed_mean", "cloud", "default"), ("normclip", "edge", "default"), ("lora_exact", "edge", "default"),
    ("lora_exact", "cloud", "default"), ("krum", "edge", "fanout-1x8"), ("multikrum", "cloud", "flat-8"), ("median", "cloud", "flat"),
])
def test_gathered_rules_pass_preflight_at_either_tier(name, tier, topology):
    """The MPI rounds carry the gathered path: a rule that must see every update is accepted at
    either tier when the fan-out allows it (Krum with f = 0 needs 3 updates a round)."""
    from hierfed.cluster.preflight import check_supported
    from hierfed.topology import load_topology

    sets = [f"aggregation.{tier}.name={name}"] + ([f"aggregation.{tier}.clip_norm=1.0"] if name == "normclip" else [])
    check_supported(load_topology(topology).placement(), load_config(None, sets))


def _readme_row(section: str) -> str:
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    return next(line for line in readme.splitlines() if line.startswith(f"| `{section}` |"))


def _shown(value) -> str:
    return "null" if value is None else str(value)


def test_readme_config_table_lists_every_aggregation_and_client_field_with_its_default() -> None:
    """README's run-config table (`aggregation`, `client` rows) and docs/aggregation.md's table of
    rules name every rule and every field the config has, each field with its default."""
    from pathlib import Path

    from hierfed.config import ClientConfig

    row = _readme_row("aggregation")
    for name in STRATEGIES:
        assert f"`{name}`" in row, name
    assert "`fedavg` (default)" in row
    for field, info in AggregatorConfig.model_fields.items():
        if field != "name":
            assert f"`{field}: {_shown(info.default)}`" in row, field
    row = _readme_row("client")
    assert "`algorithm: none`" in row
    for algorithm in typing.get_args(ClientConfig.model_fields["algorithm"].annotation)[1:]:
        assert f"`{algorithm}`" in row, algorithm
    for field, info in ClientConfig.model_fields.items():
        if field != "algorithm":
            assert f"`{field}: {_shown(info.default)}`" in row, field
    rules = (Path(__file__).resolve().parents[2] / "docs" / "aggregation.md").read_text()
    assert {name for name in STRATEGIES if f"\n| `{name}` |" in rules} == set(STRATEGIES)
