"""Turning frozen dataclasses into Redis hashes and back (str fields, typed on read)."""

from dataclasses import asdict, fields
from typing import TypeVar

T = TypeVar("T")

_PARSERS = {int: int, float: float, str: str, bool: lambda raw: raw in ("1", "True", "true")}


def to_hash(record) -> dict[str, str]:
    """Every field of a dataclass as a string."""
    return {k: str(int(v)) if isinstance(v, bool) else str(v) for k, v in asdict(record).items()}


def from_hash(cls: type[T], data: dict[str, str]) -> T:
    """A dataclass from a hash; missing fields take their defaults, unknown fields are ignored."""
    values = {}
    for f in fields(cls):
        if f.name in data:
            values[f.name] = _PARSERS[f.type](data[f.name])
    return cls(**values)
