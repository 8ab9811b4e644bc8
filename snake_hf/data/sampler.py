"""Which examples each stage draws: every node reads its own shard, in an order seeded by (seed, node, node epoch).

A node's data is an endless stream of epochs over its shard; epoch `e` of node `n` is a permutation drawn with
`torch.randperm(len(shard), generator=Generator().manual_seed(seed + e + n * NODE_SEED_STRIDE))`, cut into batches
of `batch_size` (the last one partial unless `drop_last`). For node 0 this is exactly the order in which a plain
`Trainer` (Accelerate's seedable sampler) reads a dataset, which is what makes the one-node run match it step for
step. A stage of `steps` optimizer steps takes the next `steps * gradient_accumulation_steps` batches of its node's
stream, so a node's epochs follow from the plan alone — the same in simulation and in distributed mode.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence

import torch
from torch.utils.data import Sampler

from ..plan import Stage


__all__ = ["NODE_SEED_STRIDE", "PlanBatchSampler", "batches_per_epoch", "default_stage_steps"]

NODE_SEED_STRIDE = 1 << 20


def batches_per_epoch(num_examples: int, batch_size: int, drop_last: bool = False) -> int:
    """Batches in one pass over `num_examples` examples."""
    return num_examples // batch_size if drop_last else math.ceil(num_examples / batch_size)


def default_stage_steps(num_examples: int, batch_size: int, accumulation: int, drop_last: bool = False) -> int:
    """One pass over a shard, counted the way `Trainer` counts an epoch: `ceil(batches / accumulation)`."""
    return max(1, math.ceil(batches_per_epoch(num_examples, batch_size, drop_last) / accumulation))


class PlanBatchSampler(Sampler[list[int]]):
    """Yields the batches of a plan's stages, in plan order, each from its node's shard.

    Args:
        node_indices (`Sequence[Sequence[int]]`): for every node, the indices of its shard in the dataset that the
            dataloader reads.
        plan (`Sequence[Stage]`): the stages to draw batches for (in distributed mode: this rank's stages only, with
            `skip` giving the other stages' batch counts of the same node so that epochs line up).
        batch_size (`int`), accumulation (`int`), seed (`int`), drop_last (`bool`): as in `TrainingArguments`.
    """

    def __init__(
        self,
        node_indices: Sequence[Sequence[int]],
        plan: Sequence[Stage],
        batch_size: int,
        accumulation: int,
        seed: int,
        drop_last: bool = False,
    ):
        self.node_indices = [torch.as_tensor(list(idx), dtype=torch.int64) for idx in node_indices]
        self.plan = list(plan)
        self.batch_size = batch_size
        self.accumulation = accumulation
        self.seed = seed
        self.drop_last = drop_last
        for stage in self.plan:
            if batches_per_epoch(len(self.node_indices[stage.node]), batch_size, drop_last) == 0:
                raise ValueError(
                    f"Node {stage.node} holds {len(self.node_indices[stage.node])} examples, fewer than one batch of "
                    f"{batch_size} with dataloader_drop_last=True; lower per_device_train_batch_size or give it more data."
                )

    def __len__(self) -> int:
        return sum(stage.steps for stage in self.plan) * self.accumulation

    def _epoch_batches(self, node: int, epoch: int) -> list[list[int]]:
        indices = self.node_indices[node]
        generator = torch.Generator().manual_seed(self.seed + epoch + node * NODE_SEED_STRIDE)
        order = indices[torch.randperm(len(indices), generator=generator)].tolist()
        batches = [order[i : i + self.batch_size] for i in range(0, len(order), self.batch_size)]
        if self.drop_last and len(batches[-1]) < self.batch_size:
            batches.pop()
        return batches

    def __iter__(self) -> Iterator[list[int]]:
        cursors: dict[int, tuple[int, int]] = {}  # node -> (epoch, next batch in that epoch)
        cached: dict[int, list[list[int]]] = {}
        for stage in self.plan:
            epoch, position = cursors.get(stage.node, (0, 0))
            for _ in range(stage.steps * self.accumulation):
                batches = cached.get(stage.node)
                if batches is None or position >= len(batches):
                    if batches is not None:
                        epoch, position = epoch + 1, 0
                    batches = cached[stage.node] = self._epoch_batches(stage.node, epoch)
                yield batches[position]
                position += 1
            cursors[stage.node] = (epoch, position)
