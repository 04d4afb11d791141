"""The hot path's constructors build the same objects as the dataclasses' own."""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest

from agent.models import Incident, Member, new_incident, new_member


def distinct_values(cls: type[Any]) -> list[object]:
    # A different object per field: a field set from its neighbour's argument shows.
    return [f"{f.name}-value" for f in dataclasses.fields(cls)]


@pytest.mark.parametrize(("cls", "build"), [(Member, new_member), (Incident, new_incident)])
def test_fast_constructors_set_every_field_as_the_dataclass_does(
    cls: type[Any], build: Any
) -> None:
    values = distinct_values(cls)
    fast, slow = build(*values), cls(*values)
    assert type(fast) is cls
    assert fast == slow
    assert hash(fast) == hash(slow)
    for f, v in zip(dataclasses.fields(cls), values, strict=True):
        assert getattr(fast, f.name) == v
    with pytest.raises(dataclasses.FrozenInstanceError):
        fast.status = "resolved"


@pytest.mark.parametrize(("cls", "build"), [(Member, new_member), (Incident, new_incident)])
def test_fast_constructors_take_every_field(cls: type[Any], build: Any) -> None:
    # No defaults: a field added to the dataclass must be added to its constructor too.
    values = distinct_values(cls)
    with pytest.raises(TypeError):
        build(*values[:-1])
