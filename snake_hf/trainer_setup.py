"""Setting up a Snake run before `Trainer` sees it: the model for the mode, groups, shards, priors, transport."""

from __future__ import annotations

import datasets
import torch
from peft import PeftModel, get_peft_model
from torch import nn

from .blocks import find_block_list, unwrap_model
from .config import SnakeConfig
from .distributed import DistributedTransport
from .losses import node_label_priors
from .node_data import NodeData
from .shards import make_partitioner, shard_summary
from .transport import InMemoryTransport


def make_transport(args: SnakeConfig):
    if args.launch is None:
        return InMemoryTransport()
    return DistributedTransport.from_launch(args.launch, topology=args.topology, hop_timeout=args.hop_timeout)


def check_mode(model: nn.Module | None, args: SnakeConfig, peft_config) -> None:
    """Refuses a model and adapter setup that does not fit `train_mode`, without touching the model."""
    if model is None:
        raise ValueError("`model` is None; pass the model to fine-tune.")
    if args.train_mode == "full":
        if isinstance(model, PeftModel) or peft_config is not None:
            raise ValueError(
                "`train_mode` is 'full' but a PEFT model or `peft_config` was given; use train_mode='lora' to train "
                "adapters, or pass the plain model without peft_config."
            )
    elif isinstance(model, PeftModel):
        if peft_config is not None:
            raise ValueError("`model` is already a PeftModel and `peft_config` is also given; pass only one of them.")
    elif peft_config is None:
        raise ValueError(
            "`train_mode` is 'lora' but neither a PeftModel nor `peft_config` was given; pass "
            "peft_config=LoraConfig(...), or set train_mode='full'."
        )


def wrap_for_mode(model: nn.Module, args: SnakeConfig, peft_config) -> nn.Module:
    """The model that trains: in LoRA mode a `PeftModel` (wrapping a plain model with `peft_config`)."""
    if args.train_mode == "full" or isinstance(model, PeftModel):
        return model
    return get_peft_model(model, peft_config)


def default_num_groups(model: nn.Module, args: SnakeConfig) -> int | None:
    if args.group_boundaries is not None or args.num_block_groups is not None:
        return args.num_block_groups
    num_blocks = len(find_block_list(model, args.block_list_path)[1])
    return min(args.num_nodes, num_blocks) if args.schedule != "designated" else args.num_nodes


def summarise_shards(node_data: NodeData, label_column: str):
    """The shard summary table, when the data is a `datasets.Dataset` (label counts where a label column exists)."""
    dataset = node_data.dataset
    if not isinstance(dataset, datasets.Dataset):
        return None
    columns = dataset.column_names
    label = next((c for c in (label_column, "label", "labels") if c in columns), None)
    if label is not None and not isinstance(dataset.features[label], (datasets.ClassLabel, datasets.Value)):
        label = None  # token-level labels (causal LM): sizes only
    return shard_summary([node_data.shard(n) for n in range(len(node_data.sizes))], label)


def needs_priors(args: SnakeConfig) -> bool:
    return args.logit_adjustment > 0 or args.restrict_to_node_classes


def node_priors(node_data: NodeData, args: SnakeConfig, model: nn.Module) -> torch.Tensor:
    """Each node's label frequencies (known to that node alone), for the label-skew-aware loss."""
    dataset = node_data.dataset
    columns = getattr(dataset, "column_names", [])
    features = getattr(dataset, "features", {})
    scalar = [c for c in columns if isinstance(features.get(c), (datasets.ClassLabel, datasets.Value))]
    label = next((c for c in (args.partition_label_column, "label", "labels") if c in scalar), None)
    if label is None:
        raise ValueError(
            f"`logit_adjustment`/`restrict_to_node_classes` need a label column (one class id per example), but the "
            f"training data has {columns}; set `partition_label_column` to the label column, or turn these options off."
        )
    labels = dataset[label]
    base = unwrap_model(model)
    num_classes = getattr(getattr(base, "config", None), "num_labels", None) or getattr(base, "num_labels", None)
    num_classes = num_classes or (max(labels) + 1)
    return node_label_priors([[labels[i] for i in idx] for idx in node_data.node_indices], num_classes)


def split_head_groups(optimizer, model: nn.Module, head_names: set[str], args: SnakeConfig) -> None:
    """Moves the always-trainable parameters into their own param groups at `head_learning_rate`."""
    head_ids = {id(p) for n, p in model.named_parameters() if n in head_names}
    for group in list(optimizer.param_groups):
        head = [p for p in group["params"] if id(p) in head_ids]
        if head:
            group["params"] = [p for p in group["params"] if id(p) not in head_ids]
            optimizer.add_param_group({**group, "params": head, "lr": args.head_learning_rate})


def partitioner_for(args: SnakeConfig):
    if args.num_nodes == 1:
        return None
    return make_partitioner(args.partition, args.num_nodes, seed=args.seed, **args.partition_kwargs())
