"""A simulated Snake run with stage checkpoints, for the kill-and-resume test.

python tests/_resume_run.py OUT_DIR run [KILL_AT_STEP]   # SIGKILLs itself mid-stage at that global step
python tests/_resume_run.py OUT_DIR resume               # resume_from_checkpoint=True

`SNAKE_TEST_CONFIG` picks the model and adapter configuration (`tests/_matrix.py`); `SNAKE_TEST_PAYLOAD_DTYPE` the
`payload_dtype` (default float32).
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


def main(out_dir: str, mode: str, kill_at: int | None = None) -> None:
    torch.set_num_threads(1)
    model, dataset, peft_config, fields = build()
    args = SnakeConfig(
        num_train_epochs=1,
        output_dir=out_dir, num_nodes=3, num_block_groups=2, stage_steps=3, num_passes=1,
        per_device_train_batch_size=4, learning_rate=1e-2, warmup_steps=2, save_strategy="steps", save_total_limit=2,
        report_to="none", use_cpu=True, disable_tqdm=True, logging_steps=1, seed=0,
        payload_dtype=os.environ.get("SNAKE_TEST_PAYLOAD_DTYPE", "float32"), **fields,
    )  # fmt: skip
    callbacks = [KillAt(kill_at)] if kill_at is not None else []
    trainer = SnakeTrainer(model, args, train_dataset=dataset, peft_config=peft_config, callbacks=callbacks)
    trainer.train(resume_from_checkpoint=True if mode == "resume" else None)
    save_file(trained_state(trainer.model), os.path.join(out_dir, "final.safetensors"))
    Path(out_dir, "final_report.json").write_text(json.dumps(trainer.snake_report.to_dict(), default=str))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]) if len(sys.argv) > 3 else None)
