"""Dataclass <-> JSON dict helpers shared by the schema's dataclasses."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import numpy as np

from attnstore.errors import SchemaError


def jsonable(value: Any) -> Any:
    if isinstance(value, tuple):
        return [jsonable(v) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    return value


def pick(cls: type, data: Mapping[str, Any]) -> dict[str, Any]:
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = set(data) - names
    if unknown:
        raise SchemaError(f"{cls.__name__}: unknown fields {sorted(unknown)} (store written by a newer attnstore?)")
    return {k: tuple(v) if isinstance(v, list) else v for k, v in data.items()}

