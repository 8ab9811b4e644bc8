"""Command-line plumbing shared by the recipes: a YAML file and/or flags into dataclasses."""

from __future__ import annotations

import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml
from transformers import HfArgumentParser


__all__ = ["parse_recipe_args"]


def parse_recipe_args(
    dataclass_types: Sequence[type], argv: Sequence[str] | None = None, defaults: Mapping[str, Any] | None = None
) -> tuple[Any, ...]:
    """Parses a recipe's command line into `dataclass_types` (e.g. script args, model args, `SnakeConfig`).

    The first argument may be a YAML file; flags after it override its values, so
    `python recipe.py configs/tiny.yaml --num_nodes 2` works, as do flags alone.

    Args:
        dataclass_types (`Sequence[type]`): dataclasses for `HfArgumentParser`.
        argv (`Sequence[str]`, *optional*): defaults to `sys.argv[1:]`.
        defaults (`Mapping[str, Any]`, *optional*): the recipe's own defaults for fields of `dataclass_types`
            (e.g. the classification recipe's non-IID mitigations); the YAML file and the flags override them.

    Returns:
        `tuple`: one instance per dataclass type.

    Example:
        ```python
        >>> script_args, snake_args = parse_recipe_args([ScriptArguments, SnakeConfig], ["tiny.yaml", "--seed", "1"])
        ```
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = HfArgumentParser(list(dataclass_types))
    if argv and argv[0].endswith((".yaml", ".yml")):
        config = yaml.safe_load(Path(argv[0]).read_text()) or {}
        argv = _flags_from_mapping(config) + argv[1:]
    argv = _flags_from_mapping(defaults or {}) + argv  # argparse keeps the last value given: defaults come first
    return tuple(parser.parse_args_into_dataclasses(args=argv))


def _flags_from_mapping(config: dict) -> list[str]:
    """`{"a": 1, "b": [0, 2], "c": True}` -> `["--a", "1", "--b", "0", "2", "--c", "true"]` (later flags win)."""
    flags = []
    for key, value in config.items():
        if value is None:
            continue
        flags.append(f"--{key}")
        if isinstance(value, (list, tuple)):
            flags.extend(str(v) for v in value)
        elif isinstance(value, bool):
            flags.append("true" if value else "false")
        else:
            flags.append(str(value))
    return flags
