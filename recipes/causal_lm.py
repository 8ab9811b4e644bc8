"""Snake Learning fine-tune of a causal language model with LoRA, over nodes that each hold part of a corpus.

Reports perplexity = exp(eval_loss) on a held-out tail of the corpus before and after training (no logits are kept),
prints the per-stage table and the shards, and writes the adapter (a PEFT folder), `snake_plan.json`,
`snake_report.json`, `results.json`, the plots and the model card to `output_dir`; `--push_to_hub` uploads them.

Usage:
    python recipes/causal_lm.py recipes/configs/smollm2_bible.yaml
    python recipes/causal_lm.py recipes/configs/tiny_causal_lm.yaml --num_nodes 3
    python recipes/causal_lm.py --model_name_or_path gpt2 --dataset_name my_corpus.txt --output_dir out/gpt2 \\
        --num_nodes 4 --partition length --stage_steps 10

The first argument may be a YAML file; flags after it override its values. With no arguments it runs
recipes/configs/smollm2_bible.yaml (needs `bash scripts/install_assets.sh smollm2 bible`). `--help` lists Snake's
options first, `--help-all` every option.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from transformers import default_data_collator, set_seed

from snake_hf import SnakeConfig, SnakeTrainer, format_plan
from snake_hf.recipes import (
    DataArguments,
    ModelArguments,
    build_lora_config,
    causal_lm_splits,
    load_model_and_tokenizer,
    report_and_save,
    run_summary,
    train_and_evaluate,
)
from snake_hf.recipes.cli import parse_recipe_args, run_recipe
from snake_hf.recipes.metrics import perplexity_from_eval_loss


@dataclass
class ScriptArguments(DataArguments):
    """Data settings (see `snake_hf.recipes.common.DataArguments`); `max_length` is the block size of the packed corpus."""

    dataset_name: str | None = field(default="hamlet", metadata={"help": "hamlet, bible, synthetic, or a .txt file."})
    max_length: int = field(default=128, metadata={"help": "Tokens per packed block."})


@dataclass
class CausalLMModelArguments(ModelArguments):
    """Model and LoRA settings (see `snake_hf.recipes.common.ModelArguments`)."""

    model_name_or_path: str | None = field(
        default="gpt2", metadata={"help": "Hub id, local folder, or 'smollm2' (offline asset)."}
    )


# What runs with no arguments: SmolLM2-135M on the King James Bible (offline assets).
DEFAULT_CONFIG = Path(__file__).resolve().parent / "configs" / "smollm2_bible.yaml"


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Runs the recipe; `argv` defaults to the command line. Returns the measured results (also in results.json)."""
    types = [ScriptArguments, CausalLMModelArguments, SnakeConfig]
    script_args, model_args, args = parse_recipe_args(types, argv, description=__doc__, default_config=DEFAULT_CONFIG)
    set_seed(args.seed)
    model, tokenizer = load_model_and_tokenizer(model_args, "causal_lm", seed=args.seed)
    splits = causal_lm_splits(script_args, tokenizer)
    print(f"train: {len(splits['train'])} blocks, held out: {len(splits['eval'])} blocks of {script_args.max_length}")

    peft_config = build_lora_config(model, "causal_lm", model_args) if args.train_mode != "full" else None
    trainer = SnakeTrainer(
        model,
        args,
        train_dataset=splits["train"],
        eval_dataset=splits["eval"],
        peft_config=peft_config,
        data_collator=default_data_collator,
        processing_class=tokenizer,
    )
    print(f"\nPlan ({len(trainer.plan)} stages, {trainer.total_steps} steps):\n{format_plan(trainer.plan)}")
    if trainer.shard_summary is not None:
        print(f"\nNode shards:\n{trainer.shard_summary.to_markdown()}")

    # Perplexity = exp(mean token cross-entropy); without compute_metrics, evaluate() keeps no logits.
    results = train_and_evaluate(trainer, perplexity_from_eval_loss)
    print(run_summary(trainer, results, ["eval_loss", "eval_perplexity"], f"tail ({len(splits['eval'])} blocks)"))
    results = report_and_save(trainer, results, model_args, script_args.dataset_name, "text-generation")
    print(f"Wrote the adapter, report, plots and model card to {trainer.args.output_dir}")
    return results


if __name__ == "__main__":
    run_recipe(main)
