"""Setting up a Snake run before `Trainer` sees it: the launch, the model for the mode, groups, shards, plan, priors.

Nothing here touches the network: the engine's [`Session`] tells the shard sizes of other ranks.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import datasets
import torch
from peft import PeftModel, get_peft_model
from torch import nn
from transformers import default_data_collator
from transformers.utils import logging

from ..blocks import SHARED, BlockGroups, PartMap, find_block_list, part_name, unwrap_model
from ..capacity.estimate import BlockCosts, measure_block_costs
from ..capacity.planner import (
    Designation,
    NodeProfile,
    as_profiles,
    check_plan_memory,
    designate,
    explain,
    scale_steps,
)
from ..config import SnakeConfig
from ..data.node_data import NodeData
from ..data.sampler import default_stage_steps
from ..data.shards import make_partitioner
from ..data.summary import shard_summary
from ..devices import check_offload, check_trainable_placed, materialize_offloaded_adapters, peft_on_offloaded_base
from ..engine.payload import PayloadSpec, model_fingerprint
from ..engine.session import Session
from ..frozen_base import base_weights, release_input_grads
from ..launch import LaunchInfo, process_launch
from ..lm_loss import check_chunkable
from ..losses import ProximalTerm, StageObjective, TeacherForward, node_label_priors
from ..plan import Stage, cut_plan, designated_plan, fit_plan, plan_steps, serpentine_plan, validate_plan
from .final_pass import check_final_pass


logger = logging.get_logger(__name__)


def resolve_launch(args: SnakeConfig) -> LaunchInfo | None:
    """Where the run starts: this process's launch (read once per process), checked against `args`.

    `engine="simulation"` never reads the launcher; `"distributed"` needs one. Under a launcher each process is one
    node: `num_nodes` left at 1 becomes the world size (its documented meaning), any other value must equal it.
    """
    if args.engine == "simulation":
        return None
    info = process_launch()
    if info is None:
        if args.engine == "distributed":
            raise ValueError(
                "`engine` is 'distributed' but this process was not started by a launcher (no WORLD_SIZE > 1); run "
                "`torchrun --nproc_per_node N script.py`, or use engine='simulation'."
            )
        return None
    if args.num_nodes == 1:
        args.num_nodes = info.world_size  # rank = node
    elif args.num_nodes != info.world_size:
        raise ValueError(
            f"`num_nodes` ({args.num_nodes}) differs from the {info.world_size} launched processes; in distributed "
            "mode each process is one node: launch num_nodes processes or leave num_nodes unset."
        )
    return info


def resolve_mode(model: nn.Module | None, args: SnakeConfig, peft_config) -> str:
    """`args.train_mode`, or when unset what `Trainer` would do: adapters for a `PeftModel` or with `peft_config`,
    else the model's own parameters (`"full"`: whatever requires grad). Refuses a model and adapter setup that does
    not fit the mode, and PEFT methods whose trainable state is not cut by blocks, without touching the model."""
    if model is None:
        raise ValueError("`model` is None; pass the model to fine-tune, or `model_init`.")
    mode = args.train_mode or ("lora" if isinstance(model, PeftModel) or peft_config is not None else "full")
    if mode == "full":
        if isinstance(model, PeftModel) or peft_config is not None:
            raise ValueError(
                "`train_mode` is 'full' but a PEFT model or `peft_config` was given; use train_mode='lora' (or leave "
                "it unset) to train adapters, or pass the plain model without peft_config."
            )
    elif isinstance(model, PeftModel):
        if peft_config is not None:
            raise ValueError("`model` is already a PeftModel and `peft_config` is also given; pass only one of them.")
    elif peft_config is None:
        raise ValueError(
            "`train_mode` is 'lora' but neither a PeftModel nor `peft_config` was given; pass "
            "peft_config=LoraConfig(...), or leave train_mode unset (or 'full') to train the model's own weights."
        )
    config = model.peft_config[model.active_adapter] if isinstance(model, PeftModel) else peft_config
    if config is not None:
        _check_peft_method(config, args)
    return mode


def _check_peft_method(config, args: SnakeConfig) -> None:
    """Refuses PEFT methods that Snake cannot cut into block groups or hand on as they are."""
    kind = str(getattr(config.peft_type, "value", config.peft_type))
    if getattr(config, "is_prompt_learning", False):
        raise ValueError(
            f"`peft_config` is {kind} (prompt learning): its virtual-token embedding sits outside every block, so a "
            "block-group split has nothing to cut and every stage would train the same one tensor. Use LoRA-family "
            "adapters (LoraConfig, DoRA via use_dora=True), or train it with plain Trainer."
        )
    if kind == "ADALORA":
        raise ValueError(
            "`peft_config` is AdaLoRA: its rank allocation (`update_and_allocate`) keeps a budget and importance "
            "scores over every layer at once, which no Snake node holds (each trains one group). Use LoraConfig (or "
            "use_dora=True); AdaLoRA's allocation per stage is not supported yet."
        )


def wrap_for_mode(model: nn.Module, args: SnakeConfig, peft_config) -> nn.Module:
    """The model that trains: in LoRA mode a `PeftModel` (wrapping a plain model with `peft_config`), every trainable
    tensor on a device (adapters of offloaded modules placed, [`materialize_offloaded_adapters`])."""
    if args.train_mode != "full" and not isinstance(model, PeftModel):
        with peft_on_offloaded_base():  # an offloaded module's adapters keep PEFT's draws, on its execution device
            model = get_peft_model(model, peft_config)
    if materialize_offloaded_adapters(model):  # a PeftModel wrapped outside: PEFT left them on `meta`
        logger.warning(
            "The PeftModel's adapters on offloaded modules were on the meta device: they were placed and drawn anew, so "
            "they differ from the adapters of the base loaded whole, and nodes with other device maps would start from "
            "other adapters (and be refused). Pass peft_config to SnakeTrainer, or build the PeftModel inside "
            "snake_hf.devices.peft_on_offloaded_base(), to keep PEFT's own draws."
        )
    check_trainable_placed(model)
    return model


def block_groups(model: nn.Module, args: SnakeConfig, num_groups: int | None, boundaries=None) -> BlockGroups:
    """The model's block groups; a model with no list of repeated blocks is one group (the whole model) when one group
    is asked for, and refused otherwise."""
    try:
        return BlockGroups.from_model(model, num_groups, boundaries, args.block_list_path)
    except ValueError:
        if args.block_list_path is not None or boundaries is not None or (num_groups or 1) > 1:
            raise
    uses = {
        "distill_alpha": args.distill_alpha > 0,
        "recompute_above_group": args.recompute_above_group,
        "node_profiles": args.node_profiles is not None,
    }
    used = [name for name, on in uses.items() if on]
    if used:
        raise ValueError(
            f"{type(unwrap_model(model)).__name__} has no list of repeated blocks, so it trains as one group, where "
            f"`{used[0]}` has no meaning; turn it off, or pass `block_list_path`."
        )
    logger.info(f"{type(unwrap_model(model)).__name__} has no list of repeated blocks: it trains as one group.")
    return BlockGroups.whole_model()


def default_num_groups(model: nn.Module, args: SnakeConfig) -> int | None:
    if args.group_boundaries is not None or args.num_block_groups is not None:
        return args.num_block_groups
    try:
        num_blocks = len(find_block_list(model, args.block_list_path)[1])
    except ValueError:
        return None  # no block list: one group (see block_groups)
    return min(args.num_nodes, num_blocks) if args.schedule != "designated" else args.num_nodes


def class_label_column(dataset, preferred: str) -> str | None:
    """The column holding one class id per example: `preferred`, else `label`, else `labels` (None if none)."""
    features = getattr(dataset, "features", None) or {}
    scalar = {c for c, f in features.items() if isinstance(f, (datasets.ClassLabel, datasets.Value))}
    return next((c for c in (preferred, "label", "labels") if c in scalar), None)


def summarise_shards(node_data: NodeData, label_column: str):
    """The shard summary table, when the data is a `datasets.Dataset` (label counts where a label column exists)."""
    dataset = node_data.dataset
    if not isinstance(dataset, datasets.Dataset):
        return None
    label = class_label_column(dataset, label_column)  # None for token-level labels (causal LM): sizes only
    return shard_summary([node_data.shard(n) for n in range(len(node_data.sizes))], label)


def needs_priors(args: SnakeConfig) -> bool:
    return args.logit_adjustment > 0 or args.restrict_to_node_classes


def node_priors(node_data: NodeData, args: SnakeConfig, model: nn.Module) -> torch.Tensor:
    """Each node's label frequencies (known to that node alone), for the label-skew-aware loss."""
    dataset = node_data.dataset
    label = class_label_column(dataset, args.partition_label_column)
    if label is None:
        raise ValueError(
            f"`logit_adjustment`/`restrict_to_node_classes` need a label column (one class id per example), but the "
            f"training data has {getattr(dataset, 'column_names', [])}; set `partition_label_column` to the label column, or turn these options off."
        )
    labels = dataset[label]
    base = unwrap_model(model)
    num_classes = getattr(getattr(base, "config", None), "num_labels", None) or getattr(base, "num_labels", None)
    num_classes = num_classes or (max(labels) + 1)
    node_labels = [[labels[i] for i in idx] for idx in node_data.node_indices]
    return node_label_priors(node_labels, num_classes, min_share=args.node_class_min_share)


def _split_groups(optimizer, model: nn.Module, names: set[str], **change) -> list[dict]:
    """Moves the parameters named `names` out of every param group into a group of their own (the same settings,
    updated with `change`); returns the groups left without them."""
    ids = {id(p) for n, p in model.named_parameters() if n in names}
    rest = []
    for group in list(optimizer.param_groups):
        moved = [p for p in group["params"] if id(p) in ids]
        kept = [p for p in group["params"] if id(p) not in ids]
        if moved:
            group["params"] = kept
            optimizer.add_param_group({**group, "params": moved, **change})
        if kept:
            rest.append(group)
    return rest


def scale_group_learning_rate(optimizer, model: nn.Module, shared_names: set[str], factor: float) -> None:
    """Multiplies the learning rate of every param group by `factor`, except for the always-trainable (shared)
    parameters, which move into their own groups at the rate they had."""
    for group in _split_groups(optimizer, model, shared_names):
        group["lr"] = group["lr"] * factor


def split_head_groups(optimizer, model: nn.Module, head_names: set[str], args: SnakeConfig) -> None:
    """Moves the always-trainable parameters into their own param groups at `head_learning_rate`."""
    _split_groups(optimizer, model, head_names, lr=args.head_learning_rate)


@dataclass
class Capacity:
    """What the node profiles decided: the measured block costs, the sequence length assumed, the designated cut."""

    profiles: list[NodeProfile]
    costs: BlockCosts | None = None
    seq_len: int | None = None
    designation: Designation | None = None

    def estimate(self, boundaries: list[int], group: int, batch_size: int) -> int | None:
        if self.costs is None:
            return None
        return self.costs.estimate(boundaries[group], boundaries[group + 1], batch_size, self.seq_len).total


def measure_capacity(model: nn.Module, args: SnakeConfig, node_data: NodeData) -> Capacity | None:
    """Reads the node profiles and, where memory matters, measures the model's block costs and designates the cut."""
    profiles = as_profiles(args.node_profiles, args.num_nodes)
    if profiles is None:
        return None
    capacity = Capacity(profiles)
    if args.schedule != "designated" and not any(p.memory_bytes for p in profiles):
        return capacity
    trainable = args.always_trainable_modules or ()
    probe_map = PartMap.build(
        model, BlockGroups.from_model(model, 1, None, args.block_list_path), args.train_mode, trainable
    )
    capacity.seq_len, probe = _probe_for(node_data.dataset, args, model)
    capacity.costs = measure_block_costs(
        model, args.train_mode, probe_map, args.block_list_path, trainable, probe_inputs=probe
    )
    logger.info(f"Block costs measured on the base as loaded: {base_weights(model).label}.")
    if args.schedule == "designated":
        capacity.designation = designate(
            profiles, num_nodes=args.num_nodes, batch_size=args.per_device_train_batch_size,
            seq_len=capacity.seq_len, mode=args.train_mode, costs=capacity.costs, size_by=args.profile_size_by,
        )  # fmt: skip
    return capacity


def _probe_for(dataset, args: SnakeConfig, model: nn.Module):
    """The sequence length the estimate assumes, and probe batches for models that do not take `input_ids`."""
    columns = getattr(dataset, "column_names", None) or list(dataset[0])
    if "input_ids" in columns:
        longest = args.profile_seq_len or max(len(ids) for ids in dataset["input_ids"])
        return longest, None
    device = next(model.parameters()).device

    def probe(batch_size: int, seq_len: int | None) -> dict:
        rows = [dataset[i] for i in range(min(batch_size, len(dataset)))]
        batch = default_data_collator(rows)
        return {k: v.to(device) for k, v in batch.items() if isinstance(v, torch.Tensor)}

    return None, probe


def scaled_steps(steps: list[int], args: SnakeConfig, capacity: Capacity | None, sizes: list[int]) -> list[int]:
    """Steps per node scaled by speed or by data (`scale_steps_by`), around the mean."""
    if args.scale_steps_by is None:
        return steps
    profiles = capacity.profiles if capacity is not None else [NodeProfile() for _ in sizes]
    if args.scale_steps_by == "data":
        profiles = [replace(p, num_examples=p.num_examples or size) for p, size in zip(profiles, sizes)]
    return scale_steps(steps, profiles, by=args.scale_steps_by)


def build_plan(
    args: SnakeConfig, sizes: list[int], groups: BlockGroups, capacity: Capacity | None, streaming: bool = False
) -> tuple[list[Stage], int]:
    """The plan `args` asks for over shards of `sizes` and the model's `groups`, and the optimizer steps of one plan
    epoch (`num_passes` passes); refuses one a node cannot fit.

    Its length follows `Trainer`'s rules (SnakeConfig's docstring): `num_train_epochs` plan epochs, or `max_steps`.
    An explicit `schedule` list is the whole plan (one plan epoch)."""
    if streaming and args.max_steps <= 0:
        raise ValueError(
            "`train_dataset` is an iterable stream of unknown length, so `max_steps` must say how long to train "
            f"(it is {args.max_steps}), as with Trainer; set max_steps."
        )
    if args.stage_steps is not None:
        steps = [args.stage_steps] * args.num_nodes
    elif streaming:  # stage lengths by max_steps alone (stages shrink to fit, below)
        steps = [args.max_steps] * args.num_nodes
    else:
        steps = [
            default_stage_steps(
                size, args.per_device_train_batch_size, args.gradient_accumulation_steps, args.dataloader_drop_last
            )
            for size in sizes
        ]
    steps = scaled_steps(steps, args, capacity, sizes)
    num_groups = groups.num_groups
    scales = args.group_learning_rate_scale
    if scales is not None and len(scales) != num_groups:
        raise ValueError(
            f"`group_learning_rate_scale` ({scales}) has {len(scales)} factors, but the model is cut into {num_groups} "
            f"block groups; give one factor per group."
        )
    if isinstance(args.schedule, list):
        if args.max_steps > 0:
            raise ValueError(
                f"`max_steps` ({args.max_steps}) is set with an explicit `schedule` list, which fixes every stage's "
                "steps itself; unset max_steps, or edit the stages' steps."
            )
        plan = validate_plan(args.schedule, args.num_nodes, num_groups)
        epoch_steps = plan_steps(plan)
    else:
        if args.schedule == "designated" and num_groups != args.num_nodes:
            raise ValueError(
                f"The designated schedule needs one group per node, but the model is cut into {num_groups} groups "
                f"for {args.num_nodes} nodes; set num_block_groups={args.num_nodes} or use 'serpentine'."
            )
        designation = capacity.designation if capacity is not None else None
        owners = designation.owners if designation is not None else None

        def passes(count: int) -> list[Stage]:
            if args.schedule == "designated":
                return designated_plan(args.num_nodes, count, steps, owners)
            return serpentine_plan(args.num_nodes, num_groups, count, steps, args.group_order)

        epoch = passes(args.num_passes)
        epoch_steps = plan_steps(epoch)
        plan = _plan_of_length(args, epoch, epoch_steps, passes)
    if capacity is not None:
        if capacity.costs is not None:  # refuse a plan that does not fit a node, before any training
            check_plan_memory(
                plan, capacity.profiles, capacity.costs, groups.boundaries,
                args.per_device_train_batch_size, capacity.seq_len,
            )  # fmt: skip
        logger.info(explain(plan, capacity.profiles, capacity.designation, args.scale_steps_by))
    return plan, epoch_steps


def _plan_of_length(args: SnakeConfig, epoch: list[Stage], epoch_steps: int, passes) -> list[Stage]:
    """`num_train_epochs` plan epochs (a fractional last one cut short, as `Trainer` does), or `max_steps` steps."""
    if args.max_steps > 0:
        total = args.max_steps
        if total < epoch_steps and len(epoch) > 1:
            if args.stage_steps is not None:
                raise ValueError(
                    f"`max_steps` ({total}) ends the run inside the first plan epoch ({epoch_steps} steps with "
                    f"stage_steps={args.stage_steps}), before every node trained every group; raise max_steps to "
                    f"{epoch_steps} or more, or unset stage_steps so that the stages shrink to fit."
                )
            plan = fit_plan(epoch, total)
            logger.info(f"`max_steps` ({total}) is shorter than one plan epoch ({epoch_steps} steps): every stage is "
                        f"shortened in proportion, to {[s.steps for s in plan]} steps.")  # fmt: skip
            return plan
    else:
        total = math.ceil(args.num_train_epochs * epoch_steps)
    return cut_plan(passes(args.num_passes * math.ceil(total / epoch_steps)), total)


def partitioner_for(args: SnakeConfig):
    if args.num_nodes == 1:
        return None
    return make_partitioner(args.partition, args.num_nodes, seed=args.seed, **args.partition_kwargs())


def split_data(train_dataset, args: SnakeConfig, partitioner, session: Session) -> NodeData:
    """Every node's shard: `train_dataset` split by `partitioner` (or one dataset per node), or, with `local_shard` in
    distributed mode, this rank's own dataset with every rank's size (the plan needs them all)."""
    if args.local_shard and session.distributed:
        return NodeData.local(train_dataset, session.rank, session.shard_sizes(len(train_dataset)))
    return NodeData.build(train_dataset, args.num_nodes, partitioner or partitioner_for(args))


@dataclass
class Prepared:
    """What a run trains, decided before `Trainer` sees the model (see [`prepare_run`])."""

    model: nn.Module
    groups: BlockGroups
    node_data: NodeData
    capacity: Capacity | None
    plan: list[Stage]
    epoch_steps: int
    part_map: PartMap
    spec: PayloadSpec


def prepare_run(
    model: nn.Module, args: SnakeConfig, train_dataset, peft_config, partitioner, session: Session
) -> Prepared:
    """Groups, shards, node capacity, plan, the model for the mode (a `PeftModel` in LoRA mode), its parts and the
    payload spec. Everything that can refuse the input runs before the model is wrapped (`get_peft_model` edits it
    in place). An unset `train_mode` is set to what the model asks for ([`resolve_mode`])."""
    args.train_mode = resolve_mode(model, args, peft_config)
    check_offload(model, args.train_mode, peft_config)
    release_input_grads(model)  # QLoRA's prepare_model_for_kbit_training: backward (and the probes) stop at the group
    base = base_weights(model)
    if args.train_mode == "full" and base.quantization is not None:
        raise ValueError(
            f"`train_mode` is 'full' but the base is quantized ({base.quantization}): its weights cannot train; train "
            "adapters on it (peft_config=LoraConfig(...), QLoRA), or load the base in bfloat16 for full mode."
        )
    if args.lm_loss_chunk_tokens:
        check_chunkable(model, args.lm_loss_chunk_tokens)
    designated_by_profiles = args.node_profiles is not None and args.schedule == "designated"
    if not designated_by_profiles:
        groups = block_groups(model, args, default_num_groups(model, args), args.group_boundaries)
    node_data = split_data(train_dataset, args, partitioner, session)
    capacity = None
    if args.node_profiles is not None:  # the estimate measures the model that trains
        model = wrap_for_mode(model, args, peft_config)
        capacity = measure_capacity(model, args, node_data)
    if designated_by_profiles:
        groups = block_groups(model, args, None, capacity.designation.boundaries)
    if node_data.streaming and needs_priors(args):
        raise ValueError(
            "`logit_adjustment`/`restrict_to_node_classes` need each node's label counts, which an iterable stream does "
            "not give before training; turn them off, or pass a Dataset."
        )
    check_final_pass(args, node_data.streaming)
    plan, epoch_steps = build_plan(args, node_data.sizes, groups, capacity, node_data.streaming)
    model = wrap_for_mode(model, args, peft_config)
    release_input_grads(model)  # what wrapping may have added back
    part_map = PartMap.build(model, groups, args.train_mode, args.always_trainable_modules or ())
    if not any(part_map.params.values()):
        raise ValueError(
            f"No parameter of {type(unwrap_model(model)).__name__} requires grad, so there is nothing to train; "
            "unfreeze what should train, or pass peft_config."
        )
    # Fingerprint the base as loaded, before training changes anything.
    adapter_config = model.peft_config[model.active_adapter].to_dict() if isinstance(model, PeftModel) else None
    spec = PayloadSpec.from_model(model, part_map, model_fingerprint(model), adapter_config, args.payload_dtype)
    return Prepared(model, groups, node_data, capacity, plan, epoch_steps, part_map, spec)


def stage_objective(
    args: SnakeConfig, model: nn.Module, part_map: PartMap, groups: BlockGroups, stage: Stage, priors
) -> StageObjective | None:
    """The stage's loss when it is not the model's own: distillation from the model as it arrived at the stage,
    and/or the label-skew losses with the node's label prior (None: the plain task loss)."""
    if not (args.distill_alpha > 0 or args.logit_adjustment > 0 or args.restrict_to_node_classes or args.proximal_mu):
        return None
    teacher = None
    if args.distill_alpha > 0:
        names = part_map.tensor_names(part_name(stage.group)) + part_map.tensor_names(SHARED)
        blocks = find_block_list(model, groups.path)[1]
        teacher = TeacherForward(model, blocks, groups.boundaries[stage.group], names)
    prior = priors[stage.node] if priors is not None else None
    proximal = None
    if args.proximal_mu > 0:
        named = dict(model.named_parameters())
        names = sorted(part_map.trainable_names(stage.group))
        proximal = ProximalTerm(args.proximal_mu, [named[n] for n in names if n in named and named[n].requires_grad])
    return StageObjective(
        args.distill_alpha, args.distill_temperature, teacher, prior, args.logit_adjustment,
        args.restrict_to_node_classes, proximal,
    )  # fmt: skip


def prepare_model_only(model: nn.Module, args: SnakeConfig, peft_config) -> Prepared:
    """An evaluate/predict-only trainer (`train_dataset=None`, as `Trainer` allows): the model for the mode and its
    parts, no shards and no plan (`train()` refuses, as `Trainer`'s does)."""
    args.train_mode = resolve_mode(model, args, peft_config)
    check_offload(model, args.train_mode, peft_config)
    groups = block_groups(model, args, default_num_groups(model, args), args.group_boundaries)
    model = wrap_for_mode(model, args, peft_config)
    part_map = PartMap.build(model, groups, args.train_mode, args.always_trainable_modules or ())
    adapter_config = model.peft_config[model.active_adapter].to_dict() if isinstance(model, PeftModel) else None
    spec = PayloadSpec.from_model(model, part_map, model_fingerprint(model), adapter_config, args.payload_dtype)
    return Prepared(model, groups, None, None, [], 0, part_map, spec)
