"""One Snake run on a tiny GPT-2, as a script: the same code runs as a simulation and as one process per node.

    python tests/_snake_run.py OUT_DIR TOPOLOGY NUM_NODES                      # simulation (one process)
    torchrun --nproc_per_node 3 tests/_snake_run.py OUT_DIR p2p 3              # distributed, rank = node

Each process writes the final adapters it holds to OUT_DIR/adapters-<rank>.safetensors (every weight in full mode); the
first writes the report. `SNAKE_TEST_CONFIG` picks the model and adapter configuration (`tests/_matrix.py`).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file


sys.path.insert(0, str(Path(__file__).parent))
from _matrix import build, trained_state  # noqa: E402
from snake_hf import SnakeConfig, SnakeTrainer  # noqa: E402


def run(out_dir: str, topology: str, num_nodes: int, engine: str = "auto", config: str | None = None) -> SnakeTrainer:
    torch.set_num_threads(1)  # bit-identical CPU results need the same thread count in every process
    model, dataset, peft_config, fields = build(config)
    epochs = int(os.environ.get("SNAKE_TEST_EPOCHS", "1"))  # 2: the same plan as two plan epochs of one pass
    args = SnakeConfig(
        num_train_epochs=epochs,
        output_dir=out_dir, num_nodes=num_nodes, num_block_groups=2, stage_steps=2, num_passes=2 // epochs,
        per_device_train_batch_size=4, learning_rate=1e-2, warmup_steps=1, topology=topology,
        hop_timeout=float(os.environ.get("SNAKE_TEST_HOP_TIMEOUT", "60")),
        engine=engine, report_to="none", use_cpu=True, disable_tqdm=True, logging_steps=1,
        save_strategy=os.environ.get("SNAKE_TEST_SAVE", "no"), save_steps=1,
        seed=0, **fields,
    )  # fmt: skip
    trainer = SnakeTrainer(model, args, train_dataset=dataset, peft_config=peft_config)
    trainer.train()
    rank = trainer.launch.rank if trainer.launch is not None else 0
    save_file(trained_state(trainer.model), os.path.join(out_dir, f"adapters-{rank}.safetensors"))
    if rank == 0:
        Path(out_dir, "report.json").write_text(json.dumps(trainer.snake_report.to_dict(), default=str))
    trainer.transport.close()
    return trainer


if __name__ == "__main__":
    run(sys.argv[1], sys.argv[2], int(sys.argv[3]))
