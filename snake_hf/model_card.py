"""The model card of a Snake run: metadata a Hub page and a program can read, and a body a person can.

`Trainer.create_model_card` writes a card from what `Trainer` knows about a plain run, and for a Snake run much of it
is wrong or empty (epochs that are not the plan's, "Model Preparation Time" as a result, an empty results table, the
local folder a model was loaded from as `base_model`). This module writes the whole card instead, from the run itself:
the base model's Hub id, the plan and the hyperparameters that ran, evaluation before and after training, and the
`communication` and `memory` blocks below (documented in docs/model_card.md).

`communication` (card metadata; no standard exists for this, so snake_hf defines it, `schema: 1`):

| key | meaning |
| --- | --- |
| `method` | `snake-learning` |
| `engine`, `topology` | `simulation` or `distributed`; `p2p` or `cs` |
| `num_nodes`, `num_block_groups`, `num_stages`, `total_steps` | the plan's shape |
| `num_hops`, `bytes_total`, `bytes_per_hop` | payloads between nodes: count, bytes on the wire in all, and per hop |
| `payload_dtype` | the dtype the trained tensors travel in (`float32`, `bfloat16`, `float16`) |
| `trainable_bytes` | bytes of every trained tensor in `payload_dtype`: one full copy of what travels |
| `fedavg_lora_bytes` | what FedAvg-LoRA would move for the same steps (see `fedavg_lora_bytes`) |

`memory`: `kind` (`cpu_rss_hwm` or `cuda_allocated`) and per node the largest measured stage peak above the loaded
model (`peak_above_model_bytes`) and, where the run had node profiles with a memory budget, the largest estimate.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

from .blocks import unwrap_model
from .plan import format_plan
from .report import SnakeReport


__all__ = [
    "COMMUNICATION_SCHEMA",
    "communication_metadata",
    "evaluations",
    "fedavg_lora_bytes",
    "hub_model_id",
    "memory_metadata",
    "model_card_text",
    "run_hyperparameters",
    "write_adapter_base_model",
    "write_model_card",
]

# Metrics `Trainer.evaluate` adds that describe the evaluation run, not the model.
_NOT_RESULTS = ("_runtime", "_per_second", "_preparation_time")

COMMUNICATION_SCHEMA = 1
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


def hub_model_id(name_or_path: str | None) -> str | None:
    """`name_or_path` if it reads as a Hub model id (`gpt2`, `org/name`), else `None` (a local folder, an empty name).

    Example:
        ```python
        >>> hub_model_id("sentence-transformers/all-MiniLM-L6-v2"), hub_model_id("/venv/lib/model"), hub_model_id("")
        ('sentence-transformers/all-MiniLM-L6-v2', None, None)
        ```
    """
    if not name_or_path or os.path.isabs(name_or_path) or name_or_path.startswith((".", "~")):
        return None
    if os.path.isdir(name_or_path) or not _HUB_ID.match(name_or_path):
        return None
    return name_or_path


def fedavg_lora_bytes(report: SnakeReport, num_stages: int) -> int:
    """Bytes FedAvg-LoRA would move for the same optimizer steps as the Snake run of `report`.

    FedAvg-LoRA with the same local steps per round as a Snake stage runs `num_stages / num_nodes` rounds (every node
    trains in every round, so the rounds cover the same total steps); in each round every node downloads and uploads
    the whole trainable state (every part's tensors in the payload dtype; message headers not counted, which favours
    FedAvg). This is how `benchmarks/baselines.py` counts it.

    Example:
        ```python
        >>> report = SnakeReport(num_nodes=4, num_groups=2, part_nbytes={"g0": 500, "g1": 500})
        >>> fedavg_lora_bytes(report, num_stages=8)  # 2 rounds x 4 nodes x (down + up) x 1,000 bytes
        16000
        ```
    """
    rounds = num_stages / max(report.num_nodes, 1)
    return round(rounds * report.num_nodes * 2 * sum(report.part_nbytes.values()))


def communication_metadata(report: SnakeReport, payload_dtype: str, topology: str) -> dict[str, Any]:
    """The card's `communication` block for the run of `report` (see the module docstring for each key)."""
    return {
        "schema": COMMUNICATION_SCHEMA,
        "method": "snake-learning",
        "engine": report.engine,
        "topology": topology,
        "num_nodes": report.num_nodes,
        "num_block_groups": report.num_groups,
        "num_stages": len(report.stages),
        "total_steps": sum(record.steps for record in report.stages),
        "num_hops": len(report.hops),
        "bytes_total": report.total_bytes,
        "bytes_per_hop": [hop.nbytes for hop in report.hops],
        "payload_dtype": payload_dtype,
        "trainable_bytes": sum(report.part_nbytes.values()),
        "fedavg_lora_bytes": fedavg_lora_bytes(report, len(report.stages)),
    }


def memory_metadata(report: SnakeReport) -> dict[str, Any]:
    """The card's `memory` block: per node, the largest stage peak above the loaded model and the largest estimate."""
    above = report.peak_above_model_per_node()
    estimates = report.estimated_memory_per_node()
    nodes = sorted(set(above) | set(estimates))
    per_node = []
    for node in nodes:
        entry: dict[str, Any] = {"node": node}
        if node in above:
            entry["peak_above_model_bytes"] = above[node]
        if node in estimates:
            entry["estimated_bytes"] = estimates[node]
        per_node.append(entry)
    return {"kind": report.memory_kind, "per_node": per_node}


def _mib(num_bytes: float) -> str:
    mib = num_bytes / 2**20
    return f"{mib:,.1f} MiB" if mib >= 1 else f"{mib:.3g} MiB"


def _metric_rows(before: Mapping[str, float], after: Mapping[str, float]) -> list[str]:
    rows = ["| metric | before training | after training |", "| --- | ---: | ---: |"]
    for key in after:
        value = f"{before[key]:.4f}" if key in before else ""
        rows.append(f"| {key.removeprefix('eval_')} | {value} | {after[key]:.4f} |")
    return rows


def model_card_text(
    report: SnakeReport,
    *,
    model_name: str,
    base_model: str | None,
    plan_text: str,
    shards_markdown: str,
    hyperparameters: Mapping[str, Any],
    metrics_before: Mapping[str, float],
    metrics_after: Mapping[str, float],
    payload_dtype: str,
    topology: str,
    tags: list[str],
    dataset: str | None = None,
    task: str | None = None,
    versions: Mapping[str, str] | None = None,
) -> str:
    """The whole `README.md` of a Snake run: YAML metadata, then the run in prose and tables.

    Args:
        report ([`SnakeReport`]): the finished run.
        model_name (`str`): the card's title (e.g. the output folder's name).
        base_model (`str`, *optional*): the base model; kept only when it is a Hub id (`hub_model_id`).
        plan_text (`str`), shards_markdown (`str`): `format_plan(plan)` and the shard table.
        hyperparameters (`Mapping`): what ran (name -> value), listed as given.
        metrics_before (`Mapping`), metrics_after (`Mapping`): evaluation before and after training (`eval_*`).
        payload_dtype (`str`), topology (`str`): the run's settings, for the `communication` block.
        tags (`list[str]`): card tags (`snake-learning` is added).
        dataset (`str`, *optional*), task (`str`, *optional*): e.g. `rotten_tomatoes`, `text-classification`.
        versions (`Mapping`, *optional*): framework versions to list.

    Returns:
        `str`: the card.
    """
    base_model = hub_model_id(base_model)
    communication = communication_metadata(report, payload_dtype, topology)
    memory = memory_metadata(report)
    metadata: dict[str, Any] = {"library_name": "peft" if report.train_mode == "lora" else "transformers"}
    if base_model:
        metadata["base_model"] = base_model
    standard = (
        ["lora", "peft", f"base_model:adapter:{base_model}"] if report.train_mode == "lora" and base_model else []
    )
    metadata["tags"] = sorted({*tags, *standard, "snake-learning"})
    if dataset:
        metadata["datasets"] = [dataset]
    if task:
        metadata["pipeline_tag"] = task
    if metrics_after and task and dataset:
        metadata["model-index"] = [
            {
                "name": model_name,
                "results": [
                    {
                        "task": {"type": task},
                        "dataset": {"name": dataset, "type": dataset, "split": "held-out"},
                        "metrics": [
                            {"type": key.removeprefix("eval_"), "value": float(value)}
                            for key, value in metrics_after.items()
                        ],
                    }
                ],
            }
        ]
    metadata["communication"] = communication
    metadata["memory"] = memory

    source = f"[{base_model}](https://huggingface.co/{base_model})" if base_model else "a model built from a config"
    lines = [
        "---",
        yaml.safe_dump(metadata, sort_keys=False, width=119).rstrip(),
        "---",
        "",
        f"# {model_name}",
        "",
        f"A {'LoRA' if report.train_mode == 'lora' else 'full'} fine-tune of {source}"
        + (f" on {dataset}" if dataset else "")
        + f", trained with [snake_hf](https://arxiv.org/abs/2405.03372) (Snake Learning) over {report.num_nodes} "
        f"nodes and {report.num_groups} block groups ({report.engine} engine): each node kept its data, trained one "
        "block group at a time, and handed only the trained tensors on to the next node.",
        "",
    ]
    if metrics_after:
        lines += ["## Results (held-out data)", "", *_metric_rows(metrics_before, metrics_after), ""]
    ratio = (
        communication["bytes_total"] / communication["fedavg_lora_bytes"] if communication["fedavg_lora_bytes"] else 0
    )
    lines += [
        "## Communication",
        "",
        f"{communication['bytes_total']:,} bytes ({_mib(communication['bytes_total'])}) moved between nodes in "
        f"{communication['num_hops']} hops, as {payload_dtype}; FedAvg-LoRA would move "
        f"{communication['fedavg_lora_bytes']:,} bytes for the same {communication['total_steps']} steps "
        f"(Snake: {ratio:.2f}x). The `communication` block of this card's metadata holds the figures (schema "
        f"{COMMUNICATION_SCHEMA}, see snake_hf's docs/model_card.md).",
        "",
    ]
    if memory["per_node"]:
        lines += ["## Memory per node", "", _memory_sentence(memory), ""]
    lines += ["## Plan", "", "```", plan_text, "```", ""]
    if shards_markdown:
        lines += ["## Data per node", "", shards_markdown, ""]
    lines += ["## Stages", "", report.to_markdown(), "", "## Training hyperparameters", ""]
    lines += [f"- {key}: {value}" for key, value in hyperparameters.items()]
    if versions:
        lines += ["", "## Framework versions", ""] + [f"- {name} {version}" for name, version in versions.items()]
    lines += [
        "",
        "## How to load",
        "",
        "```python",
        *_load_snippet(base_model, report.train_mode, task),
        "```",
        "",
    ]
    return "\n".join(lines)


def _memory_sentence(memory: Mapping[str, Any]) -> str:
    kind = {"cpu_rss_hwm": "resident-set high-water mark", "cuda_allocated": "CUDA allocated"}.get(
        memory["kind"], memory["kind"]
    )
    parts = []
    for entry in memory["per_node"]:
        figures = []
        if "peak_above_model_bytes" in entry:
            figures.append(f"measured {_mib(entry['peak_above_model_bytes'])}")
        if "estimated_bytes" in entry:
            figures.append(f"estimated {_mib(entry['estimated_bytes'])}")
        parts.append(f"node {entry['node']}: {', '.join(figures)}")
    return (
        f"Largest stage peak above the loaded model ({kind}), which is what a node needs besides the base model: "
        + "; ".join(parts)
        + "."
    )


def _load_snippet(base_model: str | None, train_mode: str, task: str | None) -> list[str]:
    auto = "AutoModelForSequenceClassification" if task == "text-classification" else "AutoModelForCausalLM"
    base = f'"{base_model}"' if base_model else '"<the base model>"'
    if train_mode != "lora":
        return [f"from transformers import {auto}", "", f'model = {auto}.from_pretrained("<this repository>")']
    return [
        "from peft import PeftModel",
        f"from transformers import {auto}",
        "",
        f"model = PeftModel.from_pretrained({auto}.from_pretrained({base}), " + '"<this repository>")',
    ]


def write_adapter_base_model(output_dir: str | os.PathLike, base_model: str | None) -> None:
    """Sets `base_model_name_or_path` in `output_dir/adapter_config.json` to `base_model` when that is a Hub id (PEFT
    writes the folder the model was loaded from, a path that means nothing on another machine)."""
    import json

    path = Path(output_dir) / "adapter_config.json"
    hub_id = hub_model_id(base_model)
    if hub_id is None or not path.is_file():
        return
    config = json.loads(path.read_text())
    if config.get("base_model_name_or_path") != hub_id:
        config["base_model_name_or_path"] = hub_id
        path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def evaluations(log_history: list[dict]) -> tuple[dict[str, float], dict[str, float]]:
    """The first evaluation logged before any training step and the last one logged, as `eval_*` metrics without
    the evaluation's own timings: (before, after). `before` is empty when no evaluation ran at step 0."""
    evals = [entry for entry in log_history if any(key.startswith("eval_") for key in entry)]

    def results(entry: dict) -> dict[str, float]:
        return {k: v for k, v in entry.items() if k.startswith("eval_") and not k.endswith(_NOT_RESULTS)}

    before = results(evals[0]) if evals and evals[0].get("step", 0) == 0 and len(evals) > 1 else {}
    return before, results(evals[-1]) if evals else {}


def run_hyperparameters(args: Any, plan: list, total_steps: int) -> dict[str, Any]:
    """What ran, for the card: the plan's shape and steps (which `num_train_epochs`/`max_steps` were turned into),
    the optimizer settings, and every Snake option set away from its default (never `run_secret`)."""
    import dataclasses

    from transformers import TrainingArguments

    steps = sorted({stage.steps for stage in plan})
    values: dict[str, Any] = {
        "num_nodes": args.num_nodes,
        "num_stages": len(plan),
        "steps_per_stage": steps[0] if len(steps) == 1 else steps,
        "total_steps": total_steps,
        "train_batch_size": args.per_device_train_batch_size,
        "gradient_accumulation_steps": args.gradient_accumulation_steps,
        "learning_rate": args.learning_rate,
        "lr_scheduler_type": str(getattr(args.lr_scheduler_type, "value", args.lr_scheduler_type)),
        "warmup_steps": args.warmup_steps,
        "weight_decay": args.weight_decay,
        "optimizer": str(getattr(args.optim, "value", args.optim)),
        "seed": args.seed,
    }
    base = {f.name for f in dataclasses.fields(TrainingArguments)}
    for f in dataclasses.fields(args):
        if f.name in base or f.name in values or not f.init or f.name == "run_secret":
            continue
        default = f.default if f.default is not dataclasses.MISSING else None
        value = getattr(args, f.name)
        if value != default and value is not None:
            values[f.name] = value
    return values


def write_model_card(
    trainer: Any,
    tags: str | list[str] | None = None,
    model_name: str | None = None,
    finetuned_from: str | None = None,
    tasks: str | list[str] | None = None,
    dataset: str | list[str] | None = None,
    metrics_before: dict[str, float] | None = None,
    **_: Any,
) -> Path:
    """Writes `trainer.args.output_dir/README.md` for a finished Snake run (`SnakeTrainer.create_model_card`).

    Args:
        trainer ([`SnakeTrainer`]): after `train()` (its report, plan, shard summary, log history and arguments).
        tags (`str` or `list[str]`, *optional*): card tags besides `snake-learning`.
        model_name (`str`, *optional*): the title (default: the output folder's name).
        finetuned_from (`str`, *optional*): the base model (default: the model's own `name_or_path`); a local folder
            is left out of the card, and a Hub id also replaces a local path in `adapter_config.json`.
        tasks (`str`, *optional*), dataset (`str`, *optional*): e.g. `text-classification`, `rotten_tomatoes`.
        metrics_before (`dict`, *optional*): evaluation before training (`Trainer.train` starts a new log history,
            so an evaluation before it is not in `trainer.state.log_history`).
        **_: other `Trainer.create_model_card` arguments (`language`, `license`, ...), not used.

    Returns:
        `Path`: the card's path.
    """
    import importlib.metadata

    output_dir = Path(trainer.args.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    tags = [tags] if isinstance(tags, str) else list(tags or [])
    base_model = finetuned_from or getattr(unwrap_model(trainer.model), "name_or_path", None)
    before, after = evaluations(trainer.state.log_history)
    before = dict(metrics_before or before)
    versions = {}
    for package in ("snake_hf", "peft", "transformers", "torch", "datasets"):
        try:
            versions[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            continue
    summary = trainer.shard_summary.to_markdown() if trainer.shard_summary is not None else ""
    text = model_card_text(
        trainer.snake_report,
        model_name=model_name or output_dir.resolve().name,
        base_model=base_model,
        plan_text=format_plan(trainer.plan),
        shards_markdown=summary,
        hyperparameters=run_hyperparameters(trainer.args, trainer.plan, trainer.total_steps),
        metrics_before={k: v for k, v in before.items() if k.startswith("eval_") and not k.endswith(_NOT_RESULTS)},
        metrics_after=after,
        payload_dtype=trainer.args.payload_dtype,
        topology=trainer.args.topology,
        tags=tags,
        dataset=dataset if isinstance(dataset, str) else (dataset[0] if dataset else None),
        task=tasks if isinstance(tasks, str) else (tasks[0] if tasks else None),
        versions=versions,
    )
    path = output_dir / "README.md"
    path.write_text(text)
    write_adapter_base_model(output_dir, base_model)
    return path


def snake_section(card_text: str) -> str:
    """The Snake part of a card [`write_model_card`] wrote, as one `## Snake Learning` section to append to another
    trainer's card (TRL's, `snake_hf.compose`): the YAML metadata and the title left out, every heading one level
    down."""
    body = card_text.split("---", 2)[2] if card_text.startswith("---") else card_text
    lines = [line for line in body.strip().splitlines() if not line.startswith("# ")]
    lines = ["#" + line if line.startswith("## ") else line for line in lines]
    return "\n".join(["## Snake Learning", "", *lines]).strip() + "\n"
