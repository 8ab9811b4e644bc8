"""One SnakeSFTTrainer run on a tiny Llama (tests/test_trl.py), as a script: a simulation or one process per node.

    python tests/_sft_run.py OUT_DIR NUM_NODES MODE                 # simulation (one process)
    RANK=.. WORLD_SIZE=.. MASTER_ADDR=.. MASTER_PORT=.. python tests/_sft_run.py OUT_DIR NUM_NODES MODE

MODE "split": one prompt-completion dataset, split by Snake after TRL's preparation. MODE "local": one dataset per
node (simulation: the list; distributed: each rank its own, `local_shard=True`). Each process writes the adapter it
holds to OUT_DIR/adapters-<rank>.safetensors.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch
from peft import get_peft_model_state_dict
from safetensors.torch import save_file


sys.path.insert(0, str(Path(__file__).parent))
from test_trl import COMMON, char_tokenizer, lora, prompt_completion_data, tiny_llama  # noqa: E402

from snake_hf.trl import SnakeSFTConfig, SnakeSFTTrainer  # noqa: E402


def run(out_dir: str, num_nodes: int, mode: str, engine: str = "auto") -> SnakeSFTTrainer:
    torch.set_num_threads(1)  # bit-identical CPU results need the same thread count in every process
    rank = int(os.environ.get("RANK", "0")) if engine != "simulation" else 0
    distributed = engine != "simulation" and int(os.environ.get("WORLD_SIZE", "1")) > 1
    if mode == "local":
        shards = [prompt_completion_data(12, seed=10 + n) for n in range(num_nodes)]
        data = shards[rank] if distributed else shards
    else:
        data = prompt_completion_data(24)
    args = SnakeSFTConfig(
        output_dir=out_dir, **{**COMMON, "disable_tqdm": True}, num_nodes=num_nodes, num_block_groups=2,
        num_passes=2, engine=engine, local_shard=mode == "local" and distributed, distill_alpha=0.3,
    )  # fmt: skip
    trainer = SnakeSFTTrainer(tiny_llama(), args, train_dataset=data, processing_class=char_tokenizer(),
                              peft_config=lora())  # fmt: skip
    trainer.train()
    state = {k: v.detach().contiguous() for k, v in get_peft_model_state_dict(trainer.model).items()}
    save_file(state, os.path.join(out_dir, f"adapters-{rank}.safetensors"))
    Path(out_dir, f"engine-{rank}.txt").write_text(f"{trainer.snake_report.engine} {trainer.node_data.sizes}")
    trainer.transport.close()
    return trainer


if __name__ == "__main__":
    run(sys.argv[1], int(sys.argv[2]), sys.argv[3])
