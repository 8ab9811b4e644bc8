"""04 — One process per node: the same script under `torchrun`.

Each process is one node (rank = node) and trains only its own stages; the adapters travel between processes over
torch.distributed (gloo on CPU). Every rank builds the same data set and the seeded partitioner gives each rank its
own shard, so the run is identical to the one-process simulation with the same seed.

    torchrun --nproc_per_node 2 examples/04_distributed_launch.py            # 2 nodes, 2 processes
    torchrun --nproc_per_node 2 examples/04_distributed_launch.py --topology cs
    python examples/04_distributed_launch.py                                 # 2 simulated nodes, 1 process

`engine="auto"` picks the distributed engine when launched with a world size above 1, and the in-process simulation
otherwise. On several machines, give torchrun `--nnodes`, `--node_rank` and `--rdzv_endpoint` as usual.
"""

from __future__ import annotations

import argparse
import os

import datasets
import torch
from peft import LoraConfig
from transformers import GPT2Config, GPT2LMHeadModel, set_seed

from snake_hf import SnakeConfig, SnakeTrainer, format_plan


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--topology", default="p2p", choices=["p2p", "cs"])
    parser.add_argument("--output_dir", default="outputs/04_distributed_launch")
    cli = parser.parse_args(argv)
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))

    set_seed(0)  # the same base model and the same version-0 adapters on every rank
    model = GPT2LMHeadModel(
        GPT2Config(n_layer=4, n_embd=32, n_head=2, vocab_size=64, n_positions=32, bos_token_id=0, eos_token_id=0)
    )
    ids = torch.randint(0, 64, (64, 16), generator=torch.Generator().manual_seed(0)).tolist()
    data = datasets.Dataset.from_dict({"input_ids": ids, "labels": ids})

    args = SnakeConfig(
        num_train_epochs=1,  # one plan epoch (Trainer's default is 3)
        output_dir=cli.output_dir,
        num_nodes=max(world_size, 2),  # one node per process; 2 simulated nodes when run as one process
        engine="auto",
        topology=cli.topology,
        hop_timeout=120.0,
        num_block_groups=2,
        stage_steps=2,
        per_device_train_batch_size=8,
        learning_rate=1e-2,
        dataloader_num_workers=0,  # worker seeding mixes in the rank; keep the data order identical everywhere
        report_to="none",
        use_cpu=True,
        disable_tqdm=True,
        save_strategy="no",
        seed=0,
    )
    trainer = SnakeTrainer(
        model, args, train_dataset=data, peft_config=LoraConfig(r=4, target_modules=["c_attn"], task_type="CAUSAL_LM")
    )
    if rank == 0:
        print(f"{world_size} process(es), {args.num_nodes} nodes. Plan:\n{format_plan(trainer.plan)}\n")
    trainer.train()
    if rank == 0:  # the first process holds the merged report: the plan's loss over every node's stages
        print(trainer.snake_report.to_markdown())
        print(f"plan loss (every node's stages, weighted by steps): {trainer.snake_report.plan_loss():.4f}")
    trainer.save_model()
    return {"world_size": world_size, "stages": len(trainer.plan), "total_bytes": trainer.snake_report.total_bytes}


if __name__ == "__main__":
    main()
