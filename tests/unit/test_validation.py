"""hierfed.validation: the one formatter for pydantic errors (topology, run config, data config)."""

from __future__ import annotations

from typing import Literal

import pytest
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from hierfed.validation import field_path, first_error, one_line, show


class _Inner(BaseModel):
    model_config = ConfigDict(extra="forbid")
    speed: float = Field(1.0, gt=0)


class _Doc(BaseModel):
    model_config = ConfigDict(extra="forbid")
    mode: int | Literal["auto"] = "auto"
    limit: int | None = Field(None, ge=1, le=8)
    names: list[str] = Field(default_factory=list, min_length=1)
    classes: dict[str, _Inner] = {}


def message(data: dict) -> str:
    with pytest.raises(ValidationError) as e:
        _Doc.model_validate(data)
    line = first_error(e.value, "doc.yaml")
    assert line == f"doc.yaml: {one_line(e.value)}" and "\n" not in line
    return line


@pytest.mark.parametrize("data, expected", [
    ({"mode": "x"}, "doc.yaml: mode: must be an integer or 'auto' (got 'x')"),
    ({"limit": 9}, "doc.yaml: limit: must be <= 8 (got 9)"),
    ({"names": []}, "doc.yaml: names: must not be empty"),
    ({"names": ["a", 2]}, "doc.yaml: names[1]: must be a string (got 2)"),
    ({"colour": 1}, "doc.yaml: top level: unknown field 'colour'"),
    ({"classes": {"a": {"sped": 1}}}, "doc.yaml: classes.a: unknown field 'sped'"),
    ({"classes": {1: {}}}, "doc.yaml: classes[1] key: must be a string (got 1)"),
    # a mapping key that looks like a type name stays in the path (it is no union member)
    ({"classes": {"int": {"speed": 0}}}, "doc.yaml: classes.int.speed: must be > 0 (got 0)"),
    ({"mode": "x", "limit": 0, "names": []}, "doc.yaml: mode: must be an integer or 'auto' (got 'x') "
     "(and 2 more problems)"),
])
def test_one_line(data: dict, expected: str) -> None:
    assert message(data) == expected


def test_show_and_field_path() -> None:
    assert [show(v) for v in (None, True, {}, [1], "a", 2.5)] == ["null", "true", "a mapping", "a list", "'a'", "2.5"]
    assert show("x" * 60) == "'" + "x" * 36 + "..."
    assert field_path(("edges", 1, "devices", 0, "ranks")) == "edges[1].devices[0].ranks"
    assert field_path(("device_classes", 1, "[key]")) == "device_classes[1] key"
