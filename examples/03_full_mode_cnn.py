"""03 — Full mode on any `nn.Module`: a small CNN whose stages are the blocks.

With `train_mode="full"` there are no adapters: the active group's own weights train and travel. `block_list_path`
names the module list that holds the blocks (here `features`) for models snake_hf does not know. Batch-norm layers
of frozen groups stay in eval mode, so their running statistics do not drift.

    python examples/03_full_mode_cnn.py
"""

from __future__ import annotations

import datasets
import torch
from torch import nn
from transformers import set_seed

from snake_hf import SnakeConfig, SnakeTrainer, format_plan


class SmallCNN(nn.Module):
    """Three stages in `features` (the blocks): two conv stages and the classifier."""

    def __init__(self, num_classes: int = 3):
        super().__init__()
        self.features = nn.Sequential(
            nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.MaxPool2d(2)),
            nn.Sequential(nn.Conv2d(8, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(), nn.MaxPool2d(2)),
            nn.Sequential(nn.Flatten(), nn.Linear(16 * 2 * 2, num_classes)),
        )

    def forward(self, pixel_values, labels=None):
        logits = self.features(pixel_values)
        loss = nn.functional.cross_entropy(logits, labels) if labels is not None else None
        return {"loss": loss, "logits": logits}


def main(output_dir: str = "outputs/03_full_mode_cnn") -> dict:
    set_seed(0)
    generator = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 3, (96,), generator=generator)
    images = torch.randn(96, 1, 8, 8, generator=generator) + labels.view(-1, 1, 1, 1)  # class shifts the pixels
    data = datasets.Dataset.from_dict({"pixel_values": images.tolist(), "labels": labels.tolist()}).with_format(
        "torch"
    )

    args = SnakeConfig(
        num_train_epochs=1,  # one plan epoch (Trainer's default is 3)
        output_dir=output_dir,
        train_mode="full",
        block_list_path="features",
        num_nodes=3,
        num_block_groups=3,
        stage_steps=2,
        partition="pathological",  # each node holds 2 of the 3 classes
        partition_label_column="labels",
        partition_classes_per_node=2,
        per_device_train_batch_size=8,
        learning_rate=1e-2,
        report_to="none",
        use_cpu=True,
        disable_tqdm=True,
        save_strategy="no",
        seed=0,
    )
    trainer = SnakeTrainer(SmallCNN(), args, train_dataset=data)
    print(f"Plan:\n{format_plan(trainer.plan)}\n")
    trainer.train()
    print(trainer.snake_report.to_markdown())
    return {"stages": len(trainer.plan), "total_bytes": trainer.snake_report.total_bytes}


if __name__ == "__main__":
    main()
