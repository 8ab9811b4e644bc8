"""One Snake run of a tiny VGG (full mode: batch norm, a linear head) with the final pass's repairs, as a script: the
same code runs as a simulation and as one process per node (tests/test_distributed_final_pass.py).

    python tests/_final_pass_run.py OUT_DIR TOPOLOGY NUM_NODES REPAIRS             # simulation (one process)
    RANK=.. WORLD_SIZE=.. MASTER_ADDR=.. MASTER_PORT=.. python tests/_final_pass_run.py OUT_DIR cs 3 both

REPAIRS: `none`, `bn` (recompute_batchnorm), `head` (head_calibration="full"), `both` (both, diagonal covariances). Each
process writes the whole model state it holds (weights and batch-norm buffers) to OUT_DIR/state-<rank>.safetensors;
the first writes the report. SNAKE_TEST_KILL=RANK:STEP makes that rank SIGKILL itself at the end of that global step
(the fault tests' `KillAt`); SNAKE_TEST_HOP_TIMEOUT sets hop_timeout (60 s by default).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch
from _dist_fault_run import KillAt  # noqa: E402
from safetensors.torch import save_file
from transformers import set_seed

from snake_hf import SnakeConfig, SnakeTrainer
from snake_hf.recipes.vision import BLOCK_LIST_PATH, VGG11, synthetic_image_dataset


REPAIRS = {
    "none": {},  # the same run without a final pass
    "bn": {"recompute_batchnorm": True},
    "head": {"head_calibration": "full"},
    "both": {"recompute_batchnorm": True, "head_calibration": "diagonal"},
}


def run(
    out_dir: str, topology: str, num_nodes: int, repairs: str, engine: str = "auto", schedule=None
) -> SnakeTrainer:
    torch.set_num_threads(1)  # bit-identical CPU results need the same thread count in every process
    data = synthetic_image_dataset(60, num_classes=4, image_size=32, seed=0)
    set_seed(0)
    model = VGG11.from_preset("tiny", num_classes=4)
    args = SnakeConfig(
        output_dir=out_dir, num_train_epochs=1, num_nodes=num_nodes, num_block_groups=2, stage_steps=2, num_passes=1, train_mode="full",
        block_list_path=BLOCK_LIST_PATH, partition="dirichlet", partition_alpha=0.3, partition_label_column="labels",
        per_device_train_batch_size=4, per_device_eval_batch_size=4, learning_rate=1e-2, topology=topology,
        head_calibration_samples=20, head_calibration_steps=10, engine=engine, report_to="none", use_cpu=True,
        hop_timeout=float(os.environ.get("SNAKE_TEST_HOP_TIMEOUT", "60")), disable_tqdm=True, save_strategy="no",
        seed=0, **REPAIRS[repairs], **({"schedule": schedule} if schedule is not None else {}),
    )  # fmt: skip
    callbacks = []
    if os.environ.get("SNAKE_TEST_KILL") and engine != "simulation":
        kill_rank, kill_step = map(int, os.environ["SNAKE_TEST_KILL"].split(":"))
        if kill_rank == int(os.environ["RANK"]):
            callbacks.append(KillAt(kill_step))
    trainer = SnakeTrainer(model, args, train_dataset=data, callbacks=callbacks)
    trainer.train()
    rank = trainer.launch.rank if trainer.launch is not None else 0
    state = {name: tensor.detach().contiguous() for name, tensor in trainer.model.state_dict().items()}
    save_file(state, os.path.join(out_dir, f"state-{rank}.safetensors"))
    if rank == 0:
        report = trainer.snake_report.to_dict() | {
            "authenticated": bool(getattr(trainer.transport, "authenticated", 0))
        }
        Path(out_dir, "report.json").write_text(json.dumps(report, default=str))
    trainer.transport.close()
    return trainer


if __name__ == "__main__":
    run(sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4])
