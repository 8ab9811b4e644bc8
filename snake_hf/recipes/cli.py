"""Command-line plumbing shared by the recipes: a YAML file and/or flags into dataclasses, a `--help` that starts
with what the recipe does and Snake's own options, an offline default with no arguments, and quiet output."""

from __future__ import annotations

import argparse
import copy
import dataclasses
import sys
import warnings
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml
from transformers import HfArgumentParser, TrainingArguments


__all__ = ["COMMON_TRAINING_OPTIONS", "parse_recipe_args", "quiet_library_output", "recipe_help", "run_recipe"]

# The TrainingArguments a recipe user sets most; `--help` lists them, `--help-all` lists the other ~150.
COMMON_TRAINING_OPTIONS = (
    "output_dir",
    "per_device_train_batch_size",
    "per_device_eval_batch_size",
    "gradient_accumulation_steps",
    "learning_rate",
    "warmup_steps",
    "weight_decay",
    "lr_scheduler_type",
    "seed",
    "logging_steps",
    "save_strategy",
    "report_to",
    "use_cpu",
    "bf16",
    "disable_tqdm",
    "push_to_hub",
    "hub_model_id",
)


def parse_recipe_args(
    dataclass_types: Sequence[type],
    argv: Sequence[str] | None = None,
    defaults: Mapping[str, Any] | None = None,
    description: str | None = None,
    default_config: str | Path | None = None,
) -> tuple[Any, ...]:
    """Parses a recipe's command line into `dataclass_types` (e.g. script args, model args, `SnakeConfig`).

    The first argument may be a YAML file; flags after it override its values, so
    `python recipe.py configs/tiny.yaml --num_nodes 2` works, as do flags alone. `--help` prints `description`, the
    usage and the options grouped (Snake's first, then the recipe's, then the common `TrainingArguments`) and exits;
    `--help-all` adds every other `TrainingArguments` option. With no arguments at all, `default_config` is used.

    Args:
        dataclass_types (`Sequence[type]`): dataclasses for `HfArgumentParser`.
        argv (`Sequence[str]`, *optional*): defaults to `sys.argv[1:]`.
        defaults (`Mapping[str, Any]`, *optional*): the recipe's own defaults for fields of `dataclass_types`
            (e.g. the classification recipe's non-IID mitigations); the YAML file and the flags override them.
        description (`str`, *optional*): what the recipe does (its module docstring); the start of `--help`.
        default_config (`str` or `Path`, *optional*): the YAML file to run when `argv` is empty.

    Returns:
        `tuple`: one instance per dataclass type.

    Example:
        ```python
        >>> script_args, snake_args = parse_recipe_args([ScriptArguments, SnakeConfig], ["tiny.yaml", "--seed", "1"])
        ```
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = HfArgumentParser(list(dataclass_types))
    if "--help-all" in argv or "-h" in argv or "--help" in argv:
        sys.stdout.write(recipe_help(parser, dataclass_types, description, full="--help-all" in argv) + "\n")
        raise SystemExit(0)
    if not argv and default_config is not None:
        sys.stdout.write(f"No arguments: running {_shown_path(default_config)} (`--help` lists the options).\n")
        argv = [str(default_config)]
    if argv and argv[0].endswith((".yaml", ".yml")):
        config = yaml.safe_load(Path(argv[0]).read_text()) or {}
        argv = _flags_from_mapping(config) + argv[1:]
    argv = _flags_from_mapping(defaults or {}) + argv  # argparse keeps the last value given: defaults come first
    parsed = tuple(parser.parse_args_into_dataclasses(args=argv))
    for value in parsed:
        if isinstance(value, TrainingArguments):
            quiet_library_output(value)
    return parsed


def _shown_path(path: str | Path) -> str:
    path = Path(path)
    try:
        return str(path.resolve().relative_to(Path.cwd()))
    except ValueError:
        return str(path)


def recipe_help(
    parser: HfArgumentParser, dataclass_types: Sequence[type], description: str | None, full: bool = False
) -> str:
    """The text of a recipe's `--help`: `description`, the usage with the YAML file, then the options in groups.

    Snake's own options (the fields `SnakeConfig` adds to `TrainingArguments`) come first, then each recipe dataclass,
    then the common `TrainingArguments` (`COMMON_TRAINING_OPTIONS`); with `full`, every other `TrainingArguments`
    option follows (otherwise one line says `--help-all` lists them).
    """
    program = f"python {Path(sys.argv[0]).as_posix()}" if sys.argv and sys.argv[0].endswith(".py") else "recipe"
    actions = {action.dest: action for action in parser._actions}  # argparse keeps its actions in a private list
    trainer_fields = {f.name for f in dataclasses.fields(TrainingArguments)}
    groups: list[tuple[str, list[str]]] = []
    for cls in dataclass_types:
        names = [f.name for f in dataclasses.fields(cls) if f.init]
        if issubclass(cls, TrainingArguments):
            groups.insert(0, (f"Snake options ({cls.__name__})", [n for n in names if n not in trainer_fields]))
            common = [n for n in COMMON_TRAINING_OPTIONS if n in names]
            groups.append(("Common TrainingArguments", common))
            if full:
                rest = [n for n in names if n in trainer_fields and n not in common]
                groups.append(("Every other TrainingArguments option", rest))
        else:
            groups.append((f"{_title(cls)} ({cls.__name__})", names))
    text = argparse.ArgumentParser(
        prog=program,
        usage=f"{program} [CONFIG.yaml] [--OPTION VALUE ...]",
        formatter_class=lambda prog: argparse.HelpFormatter(prog, max_help_position=40, width=119),
        add_help=False,
    )
    for title, names in groups:
        group = text.add_argument_group(title)
        for name in names:
            if name in actions:  # a copy without HfArgumentParser's `--dashed-alias`: one line per option
                action = copy.copy(actions[name])
                action.option_strings = [o for o in action.option_strings if "-" not in o[2:]]
                group._add_action(action)
    epilog = "CONFIG.yaml sets options by name (see recipes/configs/); flags after it override it."
    if not full:
        hidden = len([n for n in trainer_fields if n in actions and n not in COMMON_TRAINING_OPTIONS])
        epilog += f"\n`--help-all` also lists the other {hidden} options of transformers.TrainingArguments."
    head = (description or "").strip()
    return (head + "\n\n" if head else "") + text.format_help().rstrip() + "\n\n" + epilog


def _title(cls: type) -> str:
    name = cls.__name__
    if "Model" in name:
        return "Model and LoRA options"
    return "Data options" if name.startswith(("Script", "Data")) else "Recipe options"


def quiet_library_output(args: TrainingArguments) -> None:
    """Keeps what means nothing to a recipe's user out of its output.

    Ignores transformers' `FutureWarning` about `is_gradient_checkpointing` (PEFT reads the deprecated property when it
    wraps a model; nothing the user can change) and PEFT's note that it could not fetch the base model's config while
    saving (offline), and, with `disable_tqdm`, turns off the `datasets` (`Map:`) and
    transformers (`Loading weights`) progress bars as `Trainer` turns off its own.
    """
    warnings.filterwarnings("ignore", message=r"`is_gradient_checkpointing` is deprecated", category=FutureWarning)
    # PEFT looks up the base model's config by its Hub id when saving, to see whether the vocabulary grew; offline (the
    # recipes' assets) it cannot, and says so. The recipes never resize the vocabulary.
    warnings.filterwarnings("ignore", message=r"Could not find a config file in", category=UserWarning)
    if args.disable_tqdm:
        import datasets
        from transformers.utils import logging as hf_logging

        datasets.disable_progress_bars()
        hf_logging.disable_progress_bar()


def run_recipe(main: Callable[[], Any]) -> None:
    """Runs a recipe's `main()`; a missing offline asset ends it with one line naming the install command."""
    from .assets import AssetNotFoundError

    try:
        main()
    except AssetNotFoundError as error:
        sys.stderr.write(f"error: {error}\n")
        raise SystemExit(2) from None


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
