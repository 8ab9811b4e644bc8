"""01 — Simulate several nodes in one process.

A tiny GPT-2 (built from a config, random weights) is fine-tuned with LoRA by 4 simulated nodes that each keep a
private shard of the data. The 4 transformer blocks are cut into 2 groups; the snake visits every (node, group) pair
once per pass, and only the active group's adapters travel between nodes.

    python examples/01_simulate_nodes.py
"""

from __future__ import annotations

import datasets
import torch
from peft import LoraConfig
from transformers import GPT2Config, GPT2LMHeadModel, set_seed

from snake_hf import SnakeConfig, SnakeTrainer, format_plan


def main(output_dir: str = "outputs/01_simulate_nodes") -> dict:
    set_seed(0)
    model = GPT2LMHeadModel(
        GPT2Config(n_layer=4, n_embd=32, n_head=2, vocab_size=64, n_positions=32, bos_token_id=0, eos_token_id=0)
    )
    ids = torch.randint(0, 64, (96, 16), generator=torch.Generator().manual_seed(0)).tolist()
    data = datasets.Dataset.from_dict({"input_ids": ids, "labels": ids})

    args = SnakeConfig(
        num_train_epochs=1,  # one plan epoch (Trainer's default is 3)
        output_dir=output_dir,
        num_nodes=4,  # 4 nodes, each with a private shard of `data` (IID split here)
        num_block_groups=2,  # blocks [0, 2) and [2, 4)
        num_passes=2,  # two passes over the (node, group) grid
        stage_steps=2,  # optimizer steps per stage
        partition="iid",
        per_device_train_batch_size=8,
        learning_rate=1e-2,
        report_to="none",
        use_cpu=True,
        disable_tqdm=True,
        save_strategy="no",
        seed=0,
    )
    trainer = SnakeTrainer(
        model, args, train_dataset=data, peft_config=LoraConfig(r=4, target_modules=["c_attn"], task_type="CAUSAL_LM")
    )
    print(f"Plan:\n{format_plan(trainer.plan)}\n")
    trainer.train()
    print(trainer.snake_report.to_markdown())
    trainer.save_model()  # a PEFT adapter folder + snake_plan.json + snake_report.json
    return {"stages": len(trainer.plan), "total_bytes": trainer.snake_report.total_bytes}


if __name__ == "__main__":
    main()
