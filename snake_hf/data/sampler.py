"""Which examples each stage draws: every node reads its own shard, in an order seeded by (seed, node, node epoch).

A node's data is an endless stream of epochs over its shard; epoch `e` of node `n` is a permutation drawn with
`torch.randperm(len(shard), generator=Generator().manual_seed(seed + e + n * NODE_SEED_STRIDE))`, cut into batches
of `batch_size` (the last one partial unless `drop_last`). For node 0 this is exactly the order in which a plain
`Trainer` (Accelerate's seedable sampler) reads a dataset, which is what makes the one-node run match it step for
step. A stage of `steps` optimizer steps takes the next `steps * gradient_accumulation_steps` batches of its node's
stream, so a node's epochs follow from the plan alone — the same in simulation and in distributed mode.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Iterator, Sequence
from functools import partial

import torch
from torch.utils.data import DataLoader, Sampler
from transformers import TrainingArguments
from transformers.trainer_utils import seed_worker

from ..plan import Stage


__all__ = [
    "NODE_SEED_STRIDE",
    "EpochWindows",
    "PlanBatchSampler",
    "PlanDataLoader",
    "SkipBatches",
    "batches_per_epoch",
    "default_stage_steps",
    "plan_dataloader",
]

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


class EpochWindows(Sampler[list[int]]):
    """A plan's batches cut into `Trainer` epochs: epoch `e` yields the batches of optimizer steps
    `[e * epoch_steps, (e + 1) * epoch_steps)` of the whole stream (the last epoch may be shorter). `Trainer` calls
    `set_epoch` before each epoch, as it does for its own samplers.

    Args:
        sampler (`Sampler[list[int]]`): the batch sampler of the whole run (e.g. [`PlanBatchSampler`]).
        epoch_batches (`int`): micro-batches in one epoch (optimizer steps x gradient accumulation).

    Example:
        ```python
        >>> windows = EpochWindows([[0], [1], [2], [3], [4]], 2)
        >>> windows.set_epoch(2)
        >>> list(windows)
        [[4]]
        ```
    """

    def __init__(self, sampler: Sampler[list[int]], epoch_batches: int):
        self.sampler, self.epoch_batches, self.epoch = sampler, epoch_batches, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        start = self.epoch * self.epoch_batches
        return max(0, min(self.epoch_batches, len(self.sampler) - start))

    def __iter__(self):
        start = self.epoch * self.epoch_batches
        return itertools.islice(iter(self.sampler), start, start + self.epoch_batches)


class PlanDataLoader(DataLoader):
    """A `DataLoader` whose `set_epoch` reaches its batch sampler (`Trainer` calls it before every epoch)."""

    def set_epoch(self, epoch: int) -> None:
        if hasattr(self.batch_sampler, "set_epoch"):
            self.batch_sampler.set_epoch(epoch)


class SkipBatches(Sampler[list[int]]):
    """A batch sampler without its first `skip` batches (a resumed distributed rank's stages already trained).

    Args:
        sampler (`Sampler[list[int]]`): the batch sampler of the whole run (e.g. [`PlanBatchSampler`]).
        skip (`int`): number of batches (micro-batches, not optimizer steps) to leave out from its start.

    Example:
        ```python
        >>> list(SkipBatches([[0, 1], [2, 3], [4, 5]], 2))
        [[4, 5]]
        ```
    """

    def __init__(self, sampler: Sampler[list[int]], skip: int):
        self.sampler, self.skip = sampler, skip

    def __len__(self) -> int:
        return len(self.sampler) - self.skip

    def __iter__(self):
        return itertools.islice(iter(self.sampler), self.skip, None)


def plan_dataloader(
    dataset,
    collate_fn: Callable | None,
    node_indices: Sequence[Sequence[int]],
    stages: Sequence[Stage],
    args: TrainingArguments,
    skip_steps: int = 0,
    epoch_steps: int | None = None,
) -> DataLoader:
    """The training dataloader of a Snake run: `stages`' batches, each from its node's shard ([`PlanBatchSampler`]),
    less the first `skip_steps` optimizer steps' (a resumed distributed rank), cut into `Trainer` epochs of
    `epoch_steps` optimizer steps when given ([`EpochWindows`]). Never sharded across processes, and worker seeds do
    not mix in a rank (ranks must draw what the simulation draws).

    Args:
        dataset: the dataset holding every node's examples (`NodeData.dataset`).
        collate_fn (`Callable`, *optional*): the collator.
        node_indices (`Sequence[Sequence[int]]`): every node's indices into `dataset`.
        stages (`Sequence[Stage]`): the stages this process trains, in order.
        args (`TrainingArguments`): batch size, accumulation, seeds, `dataloader_*` settings.
        skip_steps (`int`, defaults to 0): optimizer steps to leave out from the start.
        epoch_steps (`int`, *optional*): optimizer steps of one `Trainer` epoch (default: the whole stream is one).
    """
    sampler = PlanBatchSampler(
        node_indices, stages, args.per_device_train_batch_size, args.gradient_accumulation_steps,
        args.data_seed if args.data_seed is not None else args.seed, args.dataloader_drop_last,
    )  # fmt: skip
    if skip_steps:
        sampler = SkipBatches(sampler, skip_steps * args.gradient_accumulation_steps)
    if epoch_steps is not None:
        sampler = EpochWindows(sampler, epoch_steps * args.gradient_accumulation_steps)
    return PlanDataLoader(
        dataset,
        batch_sampler=sampler,
        collate_fn=collate_fn,
        num_workers=args.dataloader_num_workers,
        pin_memory=args.dataloader_pin_memory,
        persistent_workers=args.dataloader_persistent_workers,
        multiprocessing_context=args.dataloader_multiprocessing_context,
        prefetch_factor=args.dataloader_prefetch_factor,
        in_order=args.dataloader_in_order,
        worker_init_fn=partial(seed_worker, num_workers=args.dataloader_num_workers, rank=0),
    )
