"""02 — Choose the block groups and the plan yourself.

`group_boundaries` cuts the blocks where you say (here a 1-block bottom group and a 3-block top group); `schedule`
takes any list of `Stage` (here: train the top group on both nodes first, then the bottom group once on node 1).

    python examples/02_custom_groups.py
"""

from __future__ import annotations

import datasets
import torch
from peft import LoraConfig
from transformers import BertConfig, BertForSequenceClassification, set_seed

from snake_hf import SnakeConfig, SnakeTrainer, Stage, format_plan


def main(output_dir: str = "outputs/02_custom_groups") -> dict:
    set_seed(0)
    config = BertConfig(
        vocab_size=64, hidden_size=16, num_hidden_layers=4, num_attention_heads=2, intermediate_size=32, num_labels=2
    )
    model = BertForSequenceClassification(config)
    generator = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 2, (64,), generator=generator)
    ids = torch.randint(3, 64, (64, 12), generator=generator)
    ids[:, 0] = labels + 1  # a signal to learn
    data = datasets.Dataset.from_dict({"input_ids": ids.tolist(), "label": labels.tolist()})

    plan = [
        Stage(index=0, pass_index=0, node=0, group=1, steps=3),
        Stage(index=1, pass_index=0, node=1, group=1, steps=3),
        Stage(index=2, pass_index=0, node=1, group=0, steps=2),
    ]
    args = SnakeConfig(
        num_train_epochs=1,  # one plan epoch (Trainer's default is 3)
        output_dir=output_dir,
        num_nodes=2,
        group_boundaries=[0, 1, 4],  # group 0 = block 0, group 1 = blocks 1..3
        schedule=plan,  # or "serpentine" / "designated" / the path of a snake_plan.json
        per_device_train_batch_size=8,
        learning_rate=1e-2,
        report_to="none",
        use_cpu=True,
        disable_tqdm=True,
        save_strategy="no",
        seed=0,
    )
    lora = LoraConfig(r=4, target_modules=["query", "value"], task_type="SEQ_CLS")  # the head trains in every stage
    trainer = SnakeTrainer(model, args, train_dataset=data, peft_config=lora)
    print(f"Groups (block boundaries): {list(trainer.groups.boundaries)}")
    print(f"Plan:\n{format_plan(trainer.plan)}\n")
    trainer.train()
    print(trainer.snake_report.to_markdown())
    return {"boundaries": list(trainer.groups.boundaries), "stages": len(trainer.plan)}


if __name__ == "__main__":
    main()
