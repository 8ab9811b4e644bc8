"""One rank of a launched run (`torchrun` or `accelerate launch --multi_gpu`): checks that a `SnakeConfig` built under
the launcher is single-process and leaves the environment alone, that the launch read where the run starts hides it
from every later `TrainingArguments`, then passes a payload 0 -> 1 -> 0 over the transport.

Usage: `torchrun --nproc_per_node 2 tests/_dist_worker.py OUT_DIR` (writes OUT_DIR/rank{RANK}.json).
"""

import json
import os
import sys
from pathlib import Path

import torch
from transformers import TrainingArguments

from snake_hf import SnakeConfig
from snake_hf.engine.payload import Payload, encode_payload
from snake_hf.engine.torch_dist import DistributedTransport
from snake_hf.launch import LAUNCH_ENV_VARS, process_launch


def payload(stage: int):
    tensors = {"w": torch.randn(64, generator=torch.Generator().manual_seed(stage))}
    return encode_payload(Payload({"sender": 0, "receiver": 1, "stage": stage, "parts": ["g0"]}, tensors), {"w": "g0"})


def main(out: Path) -> None:
    before = dict(os.environ)
    config = SnakeConfig(output_dir=str(out / "config"), use_cpu=True, report_to=[])  # as a user's script does first
    config_pure = dict(os.environ) == before and config.world_size == 1
    info = process_launch()  # what SnakeTrainer does where the run starts
    removed = [name for name in LAUNCH_ENV_VARS if name in before and name not in os.environ]
    args = TrainingArguments(output_dir=str(out / f"run{info.rank}"), use_cpu=True, report_to=[])
    transport = DistributedTransport.from_launch(info, hop_timeout=60.0)
    try:
        if info.rank == 0:
            transport.send(0, 1, payload(1), 1)
            same = transport.recv(1, 0, 2).to_bytes() == payload(2).to_bytes()
        else:
            received = transport.recv(0, 1, 1)
            same = received.to_bytes() == payload(1).to_bytes()
            transport.send(1, 0, payload(2), 2)
        transport.barrier("done")
    finally:
        transport.close()
    result = {
        "launch": {"rank": info.rank, "world_size": info.world_size, "agent_store": info.use_agent_store},
        "removed": sorted(removed),
        "config_pure": config_pure,
        "parallel_mode": str(args.parallel_mode),
        "world_size": args.world_size,
        "same": same,
    }
    (out / f"rank{info.rank}.json").write_text(json.dumps(result))


if __name__ == "__main__":
    main(Path(sys.argv[1]))
