"""Which examples belong to which node: one dataset for the dataloader plus every node's indices into it."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import datasets
import torch
from torch.utils.data import ConcatDataset, Dataset


__all__ = ["NodeData"]


@dataclass
class NodeData:
    """A dataset and each node's shard of it, as index lists.

    Args:
        dataset: what the training dataloader reads (the user's dataset, or the per-node datasets concatenated).
        node_indices (`list[list[int]]`): node n's examples are `dataset[i] for i in node_indices[n]`.
        known_sizes (`list[int]`, *optional*): every node's size, when this process does not hold every shard.
        streaming (`bool`): one node's data as an iterable stream of unknown length (`Trainer` reads it; the plan's
            length comes from `max_steps`).
    """

    dataset: Dataset | datasets.Dataset
    node_indices: list[list[int]]
    known_sizes: list[int] | None = None
    streaming: bool = False

    @property
    def sizes(self) -> list[int]:
        """Examples per node (in distributed mode with local shards, as each node reported it)."""
        return list(self.known_sizes) if self.known_sizes is not None else [len(idx) for idx in self.node_indices]

    @classmethod
    def local(cls, dataset, node: int, sizes: list[int]) -> NodeData:
        """Distributed mode with `local_shard`: `dataset` is this node's own shard; the others only told their sizes."""
        indices = [[] for _ in sizes]
        indices[node] = list(range(len(dataset)))
        data = cls(dataset, indices, known_sizes=sizes)
        data._check_not_empty()
        return data

    def shard(self, node: int):
        """Node `node`'s examples as a dataset (a `datasets.Dataset` when the data is one)."""
        if isinstance(self.dataset, datasets.Dataset):
            return self.dataset.select(self.node_indices[node])
        return [self.dataset[i] for i in self.node_indices[node]]

    @classmethod
    def build(cls, train_dataset, num_nodes: int, partitioner=None) -> NodeData:
        """Splits `train_dataset` over `num_nodes` nodes.

        Args:
            train_dataset: one dataset (split by `partitioner`; with one node it is the node's shard as it is), or a
                sequence of per-node datasets. A plain list of examples (dicts), which `Trainer` takes as a dataset,
                is one dataset too.
            num_nodes (`int`): number of nodes.
            partitioner (`snake_hf.data.shards.Partitioner`, *optional*): required for one dataset over several nodes.
        """
        if train_dataset is None:
            raise ValueError("`train_dataset` is None; SnakeTrainer needs training data for every node.")
        if isinstance(train_dataset, torch.utils.data.IterableDataset | datasets.IterableDataset):
            if num_nodes == 1:  # one node reads the stream as Trainer would
                return cls(train_dataset, [[]], streaming=True)
            raise TypeError(
                f"`train_dataset` is an {type(train_dataset).__name__}, which has no length: Snake splits a dataset over "
                f"{num_nodes} nodes by index and sizes its stages by shard length. Materialise it "
                "(datasets.Dataset.from_generator, or .take(n) then Dataset.from_list), or pass one Dataset per node."
            )
        if _is_per_node_list(train_dataset):
            return cls._from_shards(list(train_dataset), num_nodes)
        if num_nodes == 1:
            data = cls(train_dataset, [list(range(len(train_dataset)))])
        else:
            data = cls(train_dataset, [list(map(int, idx)) for idx in partitioner.node_indices(train_dataset)])
        data._check_not_empty()
        return data

    @classmethod
    def _from_shards(cls, shards: list, num_nodes: int) -> NodeData:
        if len(shards) != num_nodes:
            raise ValueError(
                f"`train_dataset` is a list of {len(shards)} per-node datasets but `num_nodes` is {num_nodes}; give "
                "one dataset per node or change `num_nodes`."
            )
        offsets, indices = 0, []
        for shard in shards:
            indices.append(list(range(offsets, offsets + len(shard))))
            offsets += len(shard)
        if all(isinstance(s, datasets.Dataset) for s in shards):
            dataset = datasets.concatenate_datasets(shards)
        else:
            dataset = ConcatDataset(shards)
        data = cls(dataset, indices)
        data._check_not_empty()
        return data

    def _check_not_empty(self) -> None:
        for node, size in enumerate(self.sizes):
            if size == 0:
                raise ValueError(
                    f"Node {node}'s shard is empty; every node needs training data. Use fewer nodes, a larger "
                    "dataset, or a partition with a minimum shard size (`partition_min_size`)."
                )


def _is_per_node_list(train_dataset) -> bool:
    """A list or tuple of datasets (one per node), as opposed to one dataset, which may itself be a list of examples."""
    if not isinstance(train_dataset, Sequence) or isinstance(train_dataset, (datasets.Dataset, str)):
        return False
    if len(train_dataset) == 0 or isinstance(train_dataset[0], Mapping):
        return False  # examples (dicts): one dataset, as Trainer reads it
    return all(hasattr(shard, "__len__") and hasattr(shard, "__getitem__") for shard in train_dataset)
