"""Canonical identities: one JSON form for everything two processes, or two runs, must agree on byte for byte.

An adapter-config hash, a checkpoint's run signature and a payload manifest's digest are compared across processes
(ranks of one run) and across time (a run and its resume). Python's own serialisations are not stable there:

* a `set`'s iteration order depends on the process's `PYTHONHASHSEED`, and PEFT keeps `target_modules` as a set, so
  `json.dumps(LoraConfig(...).to_dict(), default=str)` differs from one process to the next;
* `default=str` turns any object into whatever its `__str__` says (an address, a repr that changes between versions).

[`canonical`] maps a value onto plain JSON data by fixed rules, and refuses what it has no rule for, naming the type and
where it sits; [`canonical_json`] and [`canonical_hash`] are what every identity in snake_hf is computed from.
"""

from __future__ import annotations

import dataclasses
import enum
import hashlib
import json
import math
from collections.abc import Mapping
from pathlib import PurePath


__all__ = ["canonical", "canonical_hash", "canonical_json"]


def canonical(value, where: str = "value"):
    """`value` as plain JSON data (dict with str keys, list, str, int, float, bool, None), the same in every process.

    Rules: a set or frozenset becomes a list sorted by each element's canonical JSON; a tuple a list; an `Enum` its
    `value`; a path its POSIX string; a dataclass instance the dict of its fields; a mapping a dict whose keys
    (str, int, bool or Enum) become strings; `torch.dtype` its name (`"torch.float32"`). Floats must be finite.

    Args:
        value: what to convert.
        where (`str`, defaults to `"value"`): the name of `value` in error messages (nested keys are appended).

    Raises:
        `TypeError`: a value of a type without a rule (named, with its place), or a mapping key that is not a scalar.
        `ValueError`: a float that is NaN or infinite.

    Example:
        ```python
        >>> canonical({"target_modules": {"v_proj", "q_proj"}, "r": 8})
        {'target_modules': ['q_proj', 'v_proj'], 'r': 8}
        ```
    """
    if value is None or isinstance(value, (bool, str)) and not isinstance(value, enum.Enum):
        return value
    if isinstance(value, enum.Enum):
        return canonical(value.value, where)
    if isinstance(value, int):
        return int(value)
    if isinstance(value, float):
        if not math.isfinite(value):
            raise ValueError(f"`{where}` is {value}; an identity needs finite numbers.")
        return float(value)
    if isinstance(value, PurePath):
        return value.as_posix()
    if isinstance(value, Mapping):
        return {_key(key, where): canonical(item, f"{where}[{key!r}]") for key, item in value.items()}
    if isinstance(value, (set, frozenset)):
        items = [canonical(item, f"{where}{{...}}") for item in value]
        return sorted(items, key=lambda item: json.dumps(item, sort_keys=True))
    if isinstance(value, (list, tuple)):
        return [canonical(item, f"{where}[{i}]") for i, item in enumerate(value)]
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: canonical(getattr(value, f.name), f"{where}.{f.name}") for f in dataclasses.fields(value)}
    if type(value).__module__ == "torch" and type(value).__name__ == "dtype":
        return str(value)
    raise TypeError(
        f"`{where}` is a {type(value).__module__}.{type(value).__qualname__}, which has no canonical form; convert it "
        "to plain data (str, number, list, dict) before it enters an identity."
    )


def canonical_json(value, where: str = "value") -> str:
    """Compact JSON of [`canonical`]`(value)` with sorted keys: equal values give equal strings in every process.

    Example:
        ```python
        >>> canonical_json({"b": 1, "a": {"y", "x"}})
        '{"a":["x","y"],"b":1}'
        ```
    """
    return json.dumps(canonical(value, where), sort_keys=True, separators=(",", ":"), allow_nan=False)


def canonical_hash(value, where: str = "value", length: int | None = None) -> str:
    """SHA-256 (hex) of [`canonical_json`]`(value)`, cut to `length` characters when given.

    Example:
        ```python
        >>> canonical_hash({"target_modules": {"q_proj", "v_proj"}}, length=16)  # the same in every process
        '8c23e3ccd1e23629'
        ```
    """
    digest = hashlib.sha256(canonical_json(value, where).encode()).hexdigest()
    return digest if length is None else digest[:length]


def _key(key, where: str) -> str:
    if isinstance(key, enum.Enum):
        key = key.value
    if isinstance(key, bool) or not isinstance(key, (str, int)):
        raise TypeError(f"`{where}` has a key {key!r} of type {type(key).__name__}; keys must be str or int.")
    return str(key)
