"""A Snake run with reduced-precision payloads (bfloat16 by default, or int8/int4 deltas) and recomputation above
the group, as a script (simulation or one rank).

python tests/_wire_run.py OUT_DIR TOPOLOGY NUM_NODES [PAYLOAD_DTYPE]          # simulation
RANK=... WORLD_SIZE=... python tests/_wire_run.py OUT_DIR p2p 3 [PAYLOAD_DTYPE]  # one rank of a distributed run
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model_state_dict
from safetensors.torch import save_file


sys.path.insert(0, str(Path(__file__).parent))
from conftest import lm_dataset, tiny_gpt2  # noqa: E402
from snake_hf import SnakeConfig, SnakeTrainer  # noqa: E402


def run(
    out_dir: str, topology: str, num_nodes: int, engine: str = "auto", payload_dtype: str = "bfloat16"
) -> SnakeTrainer:
    torch.set_num_threads(1)
    args = SnakeConfig(
        num_train_epochs=1,
        output_dir=out_dir, num_nodes=num_nodes, num_block_groups=2, stage_steps=2, num_passes=2,
        per_device_train_batch_size=4, learning_rate=1e-2, warmup_steps=1, topology=topology, hop_timeout=60.0,
        engine=engine, report_to="none", use_cpu=True, disable_tqdm=True, save_strategy="no", logging_steps=1,
        seed=0, payload_dtype=payload_dtype, recompute_above_group=True,
    )  # fmt: skip
    lora = LoraConfig(r=4, target_modules=["c_attn"], task_type="CAUSAL_LM", lora_dropout=0.1)
    trainer = SnakeTrainer(tiny_gpt2(), args, train_dataset=lm_dataset(n=36), peft_config=lora)
    trainer.train()
    rank = trainer.launch.rank if trainer.launch is not None else 0
    state = {k: v.contiguous() for k, v in get_peft_model_state_dict(trainer.model).items()}
    save_file(state, os.path.join(out_dir, f"adapters-{rank}.safetensors"))
    if rank == 0:
        Path(out_dir, "report.json").write_text(json.dumps(trainer.snake_report.to_dict(), default=str))
    if trainer.launch is not None:  # the real wire: bytes this rank sent and received per link (cs: both hops)
        links = [[a, b, n] for (a, b), n in trainer.transport.link_bytes.items()]
        Path(out_dir, f"wire-{rank}.json").write_text(json.dumps(links))
    trainer.transport.close()
    return trainer


if __name__ == "__main__":
    run(sys.argv[1], sys.argv[2], int(sys.argv[3]), payload_dtype=sys.argv[4] if len(sys.argv) > 4 else "bfloat16")
