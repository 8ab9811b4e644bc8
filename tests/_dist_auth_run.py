"""One rank of an authenticated Snake run that writes everything a run can write, for the "secret is nowhere" test.

    RANK=r WORLD_SIZE=2 MASTER_ADDR=... MASTER_PORT=... SNAKE_TEST_SECRET_IN_CONFIG=<secret> \
        python tests/_dist_auth_run.py OUT_DIR TOPOLOGY NUM_NODES

The secret is given as `SnakeConfig(run_secret=...)` when `SNAKE_TEST_SECRET_IN_CONFIG` is set, else the library reads
`SNAKE_RUN_SECRET`. With `SNAKE_TEST_WAIT_FOR_INTRUDER=<intruder.json>` each rank holds its first step until the intruder
has acted (so the run cannot end before the attack starts, however the processes are scheduled). INFO logging is on, with stage checkpoints (`training_args.bin` in each), `save_model`,
`save_state` and a model card. The same model, data and plan as tests/_snake_run.py, so the final adapters (each rank
writes them to OUT_DIR/adapters-<rank>.safetensors) must equal its simulation's; the first rank writes the report.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import save_file
from transformers import TrainerCallback
from transformers.utils import logging as hf_logging


sys.path.insert(0, str(Path(__file__).parent))
from _matrix import build, trained_state  # noqa: E402
from snake_hf import SnakeConfig, SnakeTrainer  # noqa: E402


class WaitForIntruder(TrainerCallback):
    """Holds the rank's first step until the intruder's record says it acted (at most `seconds`)."""

    def __init__(self, record: str, seconds: float = 120.0):
        self.record, self.seconds, self.waited = Path(record), seconds, False

    def on_step_begin(self, args, state, control, **kwargs):
        deadline = time.monotonic() + self.seconds
        while not self.waited and time.monotonic() < deadline:
            if self.record.is_file() and json.loads(self.record.read_text())["actions"] > 0:  # written atomically
                break
            time.sleep(0.05)
        self.waited = True


def main(out_dir: str, topology: str, num_nodes: int) -> None:
    torch.set_num_threads(1)
    hf_logging.set_verbosity_info()
    model, dataset, peft_config, fields = build()
    args = SnakeConfig(
        output_dir=out_dir, num_nodes=num_nodes, num_block_groups=2, stage_steps=2, num_passes=2, num_train_epochs=1,
        per_device_train_batch_size=4, learning_rate=1e-2, warmup_steps=1, topology=topology,
        hop_timeout=float(os.environ.get("SNAKE_TEST_HOP_TIMEOUT", "60")),
        report_to="none", use_cpu=True, disable_tqdm=True, save_strategy="steps", save_steps=1, logging_steps=1,
        seed=0, run_secret=os.environ.get("SNAKE_TEST_SECRET_IN_CONFIG"), **fields,
    )  # fmt: skip
    print(args)  # what a user's script may well print: the secret must not show
    print(repr(args), args.to_json_string())
    record = os.environ.get("SNAKE_TEST_WAIT_FOR_INTRUDER")
    callbacks = [WaitForIntruder(record)] if record else []
    trainer = SnakeTrainer(model, args, train_dataset=dataset, peft_config=peft_config, callbacks=callbacks)
    print(f"authenticated transport: {trainer.transport.authenticated}", flush=True)
    trainer.train()
    rank = trainer.launch.rank
    save_file(trained_state(trainer.model), os.path.join(out_dir, f"adapters-{rank}.safetensors"))
    if rank == 0:
        Path(out_dir, "report.json").write_text(json.dumps(trainer.snake_report.to_dict(), default=str))
    trainer.save_model(os.path.join(out_dir, "final"))
    trainer.save_state()
    if rank == 0:
        trainer.create_model_card(model_name="snake-auth-test")
    trainer.transport.close()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]))
