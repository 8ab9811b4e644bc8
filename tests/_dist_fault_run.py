"""One rank of a distributed Snake run with stage checkpoints, for the fault tests (kill a rank, resume, fail over).

Started once per rank with RANK/WORLD_SIZE/MASTER_ADDR/MASTER_PORT set (each rank its own process, joined through the
rendezvous store; not torchrun, whose agent stops every worker when one dies):

    python tests/_dist_fault_run.py OUT_DIR TOPOLOGY run [KILL_RANK KILL_STEP]   # KILL_RANK SIGKILLs itself there
    python tests/_dist_fault_run.py OUT_DIR TOPOLOGY resume                      # resume_from_checkpoint=True

Same tiny GPT-2 run as `_snake_run.py` (3 nodes, 2 groups, 2 passes, 2 steps per stage). Each surviving rank writes
OUT_DIR/adapters-<rank>.safetensors, or OUT_DIR/error-<rank>.txt with the error it stopped on; the first rank saves
the model to OUT_DIR/final and the report to OUT_DIR/report.json. SNAKE_TEST_ON_NODE_FAILURE sets on_node_failure,
SNAKE_TEST_PAYLOAD_DTYPE payload_dtype.
`make_trainer(..., engine="simulation", schedule=plan)` builds the same run as a simulation (e.g. of a re-planned plan).
`SNAKE_TEST_CONFIG` picks the model and adapter configuration (`tests/_matrix.py`).
"""

from __future__ import annotations

import json
import os
import signal
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file
from transformers import TrainerCallback


sys.path.insert(0, str(Path(__file__).parent))
from _matrix import build, trained_state  # noqa: E402
from snake_hf import SnakeConfig, SnakeTrainer  # noqa: E402


class KillAt(TrainerCallback):
    def __init__(self, step: int):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            os.kill(os.getpid(), signal.SIGKILL)  # no cleanup, no flush: a real crash


def make_trainer(out_dir: str, topology: str, engine: str = "auto", schedule=None, callbacks=()) -> SnakeTrainer:
    torch.set_num_threads(1)  # bit-identical CPU results need the same thread count in every process
    model, dataset, peft_config, extra = build()
    if schedule is not None:
        extra["schedule"] = schedule
    if "SNAKE_TEST_ON_NODE_FAILURE" in os.environ:
        extra["on_node_failure"] = os.environ["SNAKE_TEST_ON_NODE_FAILURE"]
    if "SNAKE_TEST_PAYLOAD_DTYPE" in os.environ:
        extra["payload_dtype"] = os.environ["SNAKE_TEST_PAYLOAD_DTYPE"]
    args = SnakeConfig(
        num_train_epochs=1,
        output_dir=out_dir, num_nodes=3, num_block_groups=2, stage_steps=2, num_passes=2,
        per_device_train_batch_size=4, learning_rate=1e-2, warmup_steps=1, topology=topology, engine=engine,
        hop_timeout=float(os.environ.get("SNAKE_TEST_HOP_TIMEOUT", "60")), save_strategy="steps",
        report_to="none", use_cpu=True, disable_tqdm=True, logging_steps=1, seed=0, **extra,
    )  # fmt: skip
    return SnakeTrainer(model, args, train_dataset=dataset, peft_config=peft_config, callbacks=list(callbacks))


def adapters(trainer: SnakeTrainer) -> dict[str, torch.Tensor]:
    return trained_state(trainer.model)


def main(out_dir: str, topology: str, mode: str, kill_rank: int | None = None, kill_step: int | None = None) -> None:
    rank = int(os.environ["RANK"])
    trainer = make_trainer(out_dir, topology, callbacks=[KillAt(kill_step)] if kill_rank == rank else [])
    try:
        trainer.train(resume_from_checkpoint=True if mode == "resume" else None)
    except Exception as error:
        Path(out_dir, f"error-{rank}.txt").write_text(f"{type(error).__name__}: {error}")
        raise
    save_file(adapters(trainer), os.path.join(out_dir, f"adapters-{rank}.safetensors"))
    trainer.save_model(os.path.join(out_dir, "final"))
    if rank == 0:
        Path(out_dir, "report.json").write_text(json.dumps(trainer.snake_report.to_dict(), default=str))
    trainer.transport.close()


if __name__ == "__main__":
    numbers = [int(a) for a in sys.argv[4:6]]
    main(sys.argv[1], sys.argv[2], sys.argv[3], *numbers)
