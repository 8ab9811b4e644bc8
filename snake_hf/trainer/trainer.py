"""`SnakeTrainer`: a drop-in `transformers.Trainer` that trains one block group at a time, one node at a time.

The whole plan runs inside a single `Trainer.train()` (DESIGN §4): one `TrainerState`, one learning-rate schedule,
one log history. The training dataloader yields the plan's batches stage after stage, each from its node's shard;
at every stage boundary (an optimizer-step boundary) the trainer closes the stage, lets the relay hand the
trainable state to the next node, makes exactly the next group trainable and builds a fresh optimizer for it.

Set-up helpers live in `trainer_setup.py`; stage checkpoints and resume in `trainer_checkpoint.py`; what changes when
each process runs one node (shard sizes, the relay per topology, cs turns, merged reports) in `trainer_distributed.py`.
"""

from __future__ import annotations

import time
from functools import partial
from pathlib import Path

import torch
from peft import PeftModel
from torch import nn
from torch.utils.data import DataLoader
from transformers import Trainer
from transformers.trainer_utils import TrainOutput, seed_worker
from transformers.utils import logging

from ..blocks import (
    SHARED,
    BlockGroups,
    PartMap,
    find_block_list,
    frozen_batchnorms,
    part_name,
    set_recompute,
    set_trainable,
    unwrap_model,
)
from ..config import SnakeConfig
from ..data.sampler import PlanBatchSampler
from ..engine.coordinator import StageBoundaryCallback
from ..engine.payload import PayloadSpec, model_fingerprint, part_wire_nbytes
from ..lm_loss import check_chunkable, chunked_causal_lm_loss
from ..losses import StageObjective, TeacherForward
from ..memory import PeakMemory
from ..plan import PLAN_FILE, Stage, format_plan, save_plan
from ..report import SnakeReport, StageRecord
from . import _compat
from .ranks import DistributedRun
from .resume import SkipBatches, StageCheckpointing
from .setup import (
    build_plan,
    check_mode,
    default_num_groups,
    make_transport,
    measure_capacity,
    needs_priors,
    node_priors,
    resolve_launch,
    split_head_groups,
    summarise_shards,
    wrap_for_mode,
)


logger = logging.get_logger(__name__)

__all__ = ["SnakeTrainer"]


class SnakeTrainer(StageCheckpointing, DistributedRun, Trainer):
    """Snake Learning on the Hugging Face `Trainer`.

    Cuts the model's blocks into groups and trains them one group and one node at a time along a plan, handing only
    the trainable state (LoRA adapters, or the group's weights in full mode) from node to node. Everything else
    behaves like `Trainer`: `train()`, `evaluate()`, `predict()`, `save_model()`, callbacks and `report_to`.

    Args:
        model (`PreTrainedModel`, `PeftModel` or `nn.Module`):
            The model. In LoRA mode, a plain model plus `peft_config`, or a `PeftModel`.
        args ([`SnakeConfig`]): training and Snake settings.
        train_dataset (`datasets.Dataset` or `list`):
            One dataset, split over `args.num_nodes` nodes by `partitioner` or `args.partition`, or one dataset per
            node.
        eval_dataset (`datasets.Dataset`, *optional*): evaluated as with `Trainer`.
        peft_config (`peft.PeftConfig`, *optional*): wraps a plain model with `get_peft_model` in LoRA mode.
        compute_metrics (`Callable`, *optional*): as with `Trainer`.
        partitioner (`snake_hf.data.shards.Partitioner`, *optional*): overrides `args.partition`.
        **kwargs: passed on to `Trainer` (`data_collator`, `processing_class`, `callbacks`, ...).

    Example:
        ```python
        >>> from peft import LoraConfig
        >>> trainer = SnakeTrainer(
        ...     model, SnakeConfig(output_dir="out", num_nodes=3, num_block_groups=2), train_dataset=dataset,
        ...     peft_config=LoraConfig(r=8, target_modules=["c_attn"]),
        ... )
        >>> trainer.train()
        >>> print(trainer.snake_report)
        >>> trainer.save_model("out/adapter")  # plain PeftModel.from_pretrained loads it
        ```
    """

    def __init__(
        self,
        model: nn.Module | None = None,
        args: SnakeConfig | None = None,
        train_dataset=None,
        eval_dataset=None,
        peft_config=None,
        compute_metrics=None,
        partitioner=None,
        **kwargs,
    ):
        if args is None:
            args = SnakeConfig(output_dir="snake_output")
        if not isinstance(args, SnakeConfig):
            raise TypeError(
                f"`args` is a {type(args).__name__}; SnakeTrainer needs a SnakeConfig (it subclasses "
                "TrainingArguments, so SnakeConfig(**your_args.to_dict()) carries your settings over)."
            )
        if kwargs.get("model_init") is not None:
            raise ValueError("`model_init` is not supported by SnakeTrainer; pass the model itself.")
        # Everything that can refuse the input runs before the model is touched (get_peft_model edits it in place).
        self.launch = resolve_launch(args)
        check_mode(model, args, peft_config)
        if args.lm_loss_chunk_tokens:
            check_chunkable(model, args.lm_loss_chunk_tokens)
        designated_by_profiles = args.node_profiles is not None and args.schedule == "designated"
        if not designated_by_profiles:
            self.groups = BlockGroups.from_model(
                model, default_num_groups(model, args), args.group_boundaries, args.block_list_path
            )
        self.transport = make_transport(self.launch, args)
        self.local_nodes = {self.launch.rank} if self.launch is not None else set(range(args.num_nodes))
        self.node_data = self._split_data(train_dataset, args, partitioner)
        self.capacity = None
        if args.node_profiles is not None:  # the estimate measures the model that trains
            model = wrap_for_mode(model, args, peft_config)
            self.capacity = measure_capacity(model, args, self.node_data)
        if designated_by_profiles:
            self.groups = BlockGroups.from_model(
                model, None, self.capacity.designation.boundaries, args.block_list_path
            )
        self.plan = build_plan(args, self.node_data.sizes, self.groups, self.capacity)
        model = wrap_for_mode(model, args, peft_config)
        _tag_model(model)
        self.part_map = PartMap.build(model, self.groups, args.train_mode, args.always_trainable_modules or ())
        # Fingerprint the base as loaded, before training changes anything.
        adapter_config = model.peft_config[model.active_adapter].to_dict() if isinstance(model, PeftModel) else None
        self._spec = PayloadSpec.from_model(
            model, self.part_map, model_fingerprint(model), adapter_config, args.payload_dtype
        )
        super().__init__(
            model=model,
            args=args,
            train_dataset=self.node_data.dataset,
            eval_dataset=eval_dataset,
            compute_metrics=compute_metrics,
            **kwargs,
        )
        self._failover = self.launch is not None and args.topology == "cs"
        if self._failover:  # the coordinator decides each rank's next stage when the last one ends
            self.add_callback(StageBoundaryCallback(self))
        self.shard_summary = summarise_shards(self.node_data, args.partition_label_column)
        self._node_priors = node_priors(self.node_data, args, model) if needs_priors(args) else None
        self.snake_report = self._new_report()
        logger.info(f"Snake plan ({len(self.plan)} stages, {self.total_steps} steps):\n{format_plan(self.plan)}")

    # ---- set-up ----

    @property
    def total_steps(self) -> int:
        return sum(stage.steps for stage in self.plan)

    def _new_report(self) -> SnakeReport:
        return SnakeReport(
            num_nodes=self.args.num_nodes,
            num_groups=self.groups.num_groups,
            train_mode=self.args.train_mode,
            engine="distributed" if self.launch is not None else "simulation",
            group_boundaries=list(self.groups.boundaries),
            part_nbytes=part_wire_nbytes(self.part_map, self.model, self.args.payload_dtype),
            shard_sizes=self.node_data.sizes,
            shard_summary=self.shard_summary.to_dict() if self.shard_summary is not None else None,
            memory_kind=PeakMemory(self.args.device).kind,
            designation=designation.to_dict()
            if (designation := getattr(self.capacity, "designation", None))
            else None,
        )

    # ---- the plan inside one Trainer.train() ----

    def train(self, resume_from_checkpoint=None, trial=None, ignore_keys_for_eval=None, **kwargs):
        """Runs the whole plan inside one `Trainer.train()`; returns its `TrainOutput`.

        In distributed mode this process runs its own node's stages (waiting for the payload before each), and
        afterwards every process holds the final trainable state.
        """
        self.snake_report = self._new_report()
        self._relay = self._make_relay()
        self._meter = PeakMemory(self.args.device)
        self._own_stages = [stage for stage in self.plan if stage.node in self.local_nodes]
        if self.shard_summary is not None:
            logger.info(f"Node shards:\n{self.shard_summary.to_markdown()}")
        self._skip_own_steps = 0
        checkpoint, next_stage = self._resume(resume_from_checkpoint)
        self._relay.start(self.plan[0], resumed=checkpoint is not None)
        if checkpoint is not None:  # taken before the stage's payload left: hand it on (again, or as a record only
            record = self.snake_report.stages[-1]  # when the crashed run went on past it, so it had left)
            record.bytes_sent = self._relay.hand_on(self.plan[record.stage], deliver=record.stage + 1 == next_stage)
        output = TrainOutput(self.state.global_step, 0.0, {})
        stage = self._first_stage(next_stage)
        if stage is not None:
            self._begin_stage(stage, first=True)
            # Distributed: no Trainer resume (each stage seeks its plan step; the sampler skips the trained batches).
            checkpoint = str(checkpoint) if checkpoint is not None and self.launch is None else None
            output = super().train(checkpoint, trial, ignore_keys_for_eval, **kwargs)
            if not self._stage_closed:  # cs: the stage-boundary callback closed it already
                self._end_stage()
            if self.args.recompute_above_group:
                set_recompute(self.model, self.groups, None)
        self._relay.finish()
        self._merge_reports()
        logger.info(f"Snake run finished:\n{self.snake_report.to_markdown()}")
        return output

    def set_initial_training_values(self, args, dataloader):
        # The plan fixes the length: one "epoch" holds every stage; num_train_epochs and max_steps are not used.
        # In distributed mode this process's epoch holds only its own stages; max_steps (the schedule) spans them all.
        values = list(super().set_initial_training_values(args, dataloader))
        # cs: this rank may be given a failed node's stages, so its loop may run up to the whole plan (it is stopped
        # when the coordinator says the run is done).
        own_steps = self.total_steps if self._failover else sum(stage.steps for stage in self._own_stages)
        own_steps -= self._skip_own_steps
        values[0] = 1
        values[1] = own_steps
        values[3] = own_steps * values[4]
        values[6] = self.total_steps
        return tuple(values)

    def get_train_dataloader(self) -> DataLoader:
        # Batches come stage by stage, each from its node's shard (snake_hf.data.sampler). Not passed through
        # accelerator.prepare: this loader must never be sharded across processes; Trainer moves batches to device.
        dataset = self.node_data.dataset
        collator = self.data_collator
        if hasattr(dataset, "column_names"):
            dataset = _compat.remove_unused_columns(self, dataset)
        else:
            collator = _compat.collator_with_removed_columns(self)
        stages = self._own_stages
        if self._failover:  # this node's batches as one stream: whichever stages it trains take the next ones
            stages = [Stage(index=0, pass_index=0, node=self.launch.rank, group=0, steps=self.total_steps)]
        sampler = PlanBatchSampler(
            self.node_data.node_indices,
            stages,
            self.args.per_device_train_batch_size,
            self.args.gradient_accumulation_steps,
            self.args.data_seed if self.args.data_seed is not None else self.args.seed,
            self.args.dataloader_drop_last,
        )
        skip = getattr(self, "_skip_own_steps", 0)  # a resumed distributed rank: its stages before the resume point
        if skip:
            sampler = SkipBatches(sampler, skip * self.args.gradient_accumulation_steps)
        return DataLoader(
            dataset,
            batch_sampler=sampler,
            collate_fn=collator,
            num_workers=self.args.dataloader_num_workers,
            pin_memory=self.args.dataloader_pin_memory,
            persistent_workers=self.args.dataloader_persistent_workers,
            worker_init_fn=partial(seed_worker, num_workers=self.args.dataloader_num_workers, rank=0),
        )

    def training_step(self, model, inputs, num_items_in_batch=None):
        # Stage boundaries fall on optimizer-step boundaries; the first micro-batch of a step checks for one.
        if self.state.global_step >= self._stage_end:
            self._end_stage()
            self._begin_stage(self._own_stages[self._own_position + 1])
        if not self._stage_running:
            self._start_stage_clock()
        loss = super().training_step(model, inputs, num_items_in_batch)
        self._stage_loss += loss.detach().float()
        return loss

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        # Trainer calls model.train() every step; frozen groups' batch-norm statistics must not drift (full mode).
        for module in getattr(self, "_frozen_norms", ()):
            module.eval()
        objective = getattr(self, "_objective", None)
        if self.args.lm_loss_chunk_tokens and objective is None and model.training and "labels" in inputs:
            # Mirrors Trainer.compute_loss: the model divides by num_items_in_batch when it accepts loss kwargs.
            count = num_items_in_batch if self.model_accepts_loss_kwargs else None
            loss = chunked_causal_lm_loss(model, inputs, self.args.lm_loss_chunk_tokens, count)
            return (loss, None) if return_outputs else loss
        if objective is None or not model.training:  # evaluation reports the plain task loss
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        base = partial(super().compute_loss, model, inputs, True, num_items_in_batch)
        scaled = bool(self.model_accepts_loss_kwargs and num_items_in_batch is not None)
        loss, outputs = objective(base, inputs, num_items_in_batch, scaled)
        return (loss, outputs) if return_outputs else loss

    def create_optimizer(self, model=None):
        # Trainer builds over the parameters that require grad now; with head_learning_rate the always-trainable
        # modules get their own param groups (the scheduler scales every group alike).
        fresh = self.optimizer is None
        if fresh and getattr(self, "_stage_index", None) is not None:
            # Loading an adapter (resume) re-enables every LoRA layer (PITFALLS): freeze again before building.
            set_trainable(self.model, self.part_map.trainable_names(self.plan[self._stage_index].group))
        optimizer = super().create_optimizer(model)
        if fresh and self.args.head_learning_rate is not None:
            split_head_groups(optimizer, self.model, set(self.part_map.params.get(SHARED, ())), self.args)
        return optimizer

    def _begin_stage(self, stage: Stage, first: bool = False) -> None:
        bytes_in, wait = self._relay.enter(stage)
        self._stage, self._stage_index, self._stage_closed = stage, stage.index, False
        set_trainable(self.model, self.part_map.trainable_names(stage.group))
        if self.args.recompute_above_group:
            set_recompute(self.model, self.groups, stage.group)
        self._frozen_norms = (
            frozen_batchnorms(self.model, self.groups, stage.group) if self.args.train_mode == "full" else []
        )
        if not first:
            self._fresh_optimizer()
        self._objective = self._stage_objective(stage)
        if stage in self._own_stages:  # cs failover may give this node another node's stage
            self._own_position = self._own_stages.index(stage)
        self._stage_start = sum(s.steps for s in self.plan[: stage.index])
        self._stage_end = self._stage_start + stage.steps
        self._stage_running = False
        self._stage_loss = torch.zeros((), device=self.args.device)
        self._stage_record = StageRecord(
            stage=stage.index,
            pass_index=stage.pass_index,
            node=stage.node,
            group=stage.group,
            steps=stage.steps,
            bytes_received=bytes_in,
            wait_seconds=wait,
            load_seconds=self._relay.last_load_seconds,
        )
        if self.capacity is not None and self.capacity.costs is not None:
            estimate = self.capacity.estimate(
                self.groups.boundaries, stage.group, self.args.per_device_train_batch_size
            )
            self._stage_record.extra["estimated_memory_bytes"] = estimate

    def _start_stage_clock(self) -> None:
        """On the stage's first micro-batch: its node's RNG stream, its place in the schedule, timers, progress."""
        stage = self._stage
        self._relay.activate(stage.node)
        _compat.seek_plan_step(self, self._stage_start)  # distributed: skip the steps other nodes trained
        self._stage_running = True
        self._meter.reset()
        self._stage_started = time.perf_counter()
        bar = _compat.progress_bar(self)
        if bar is not None:
            bar.set_description(f"stage {stage.index + 1}/{len(self.plan)} node {stage.node} group {stage.group}")

    def _end_stage(self) -> None:
        record = self._stage_record
        record.wall_seconds = time.perf_counter() - self._stage_started
        record.peak_memory_bytes = self._meter.read()
        done = self.state.global_step - self._stage_start
        record.train_loss = self._stage_loss.item() / max(done, 1)
        if self._objective is not None and self._objective.distill_share is not None:
            record.extra["distill_share"] = self._objective.distill_share
        stage = self._stage
        self._stage_closed = True
        self._relay.close_stage(stage)
        self.snake_report.stages.append(record)
        if self._checkpoint_due(stage):
            self._save_stage_checkpoint(stage)
        record.bytes_sent = self._relay.hand_on(stage)
        self.log({"stage_loss": record.train_loss, "stage": record.stage, "node": record.node, "group": record.group})

    def _stage_objective(self, stage: Stage) -> StageObjective | None:
        args = self.args
        if not (args.distill_alpha > 0 or args.logit_adjustment > 0 or args.restrict_to_node_classes):
            return None
        teacher = None
        if args.distill_alpha > 0:
            names = self.part_map.tensor_names(part_name(stage.group)) + self.part_map.tensor_names(SHARED)
            blocks = find_block_list(self.model, self.groups.path)[1]
            teacher = TeacherForward(self.model, blocks, self.groups.boundaries[stage.group], names)
        prior = self._node_priors[stage.node] if self._node_priors is not None else None
        return StageObjective(
            args.distill_alpha, args.distill_temperature, teacher, prior, args.logit_adjustment,
            args.restrict_to_node_classes,
        )  # fmt: skip

    def _fresh_optimizer(self) -> None:
        """A new optimizer over exactly the trainable parameters; the schedule carries on where it was."""
        old = self.optimizer
        scheduled = [group["lr"] for group in old.param_groups]
        self.optimizer = None
        optimizer = self.create_optimizer()
        for group in optimizer.param_groups:
            group["initial_lr"] = group["lr"]  # what the scheduler scales
            group["lr"] = scheduled[0] * group["lr"] / self.args.learning_rate if self.args.learning_rate else 0.0
        _compat.replace_optimizer(self, old, optimizer)

    # ---- outputs ----

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        """Saves like `Trainer.save_model` (a PEFT adapter folder in LoRA mode) plus `snake_plan.json` and
        `snake_report.json`."""
        if self.launch is not None and self.launch.rank != 0:
            return  # every process holds the final state; the first one writes it
        super().save_model(output_dir, _internal_call)
        if self.args.should_save:
            output_dir = output_dir or self.args.output_dir
            save_plan(self.plan, f"{output_dir}/{PLAN_FILE}")
            self.snake_report.to_json(f"{output_dir}/snake_report.json")

    def push_to_hub(self, *args, **kwargs):
        """`Trainer.push_to_hub`; in distributed mode only the first process uploads (every process holds the same
        final state, and each one's Trainer believes it is process zero)."""
        if self.launch is not None and self.launch.rank != 0:
            return None
        return super().push_to_hub(*args, **kwargs)

    def create_model_card(self, tags=None, **kwargs) -> None:
        """`Trainer.create_model_card` with the `snake-learning` tag and a section on the plan, shards, bytes moved,
        per-node peak memory and evaluation metrics (what `push_to_hub` uploads as README.md)."""
        tags = [tags] if isinstance(tags, str) else list(tags or [])
        super().create_model_card(tags=[*tags, "snake-learning"], **kwargs)
        if not self.is_world_process_zero():
            return
        card = Path(self.args.output_dir) / "README.md"
        metrics = {
            k: v
            for h in self.state.log_history
            for k, v in h.items()
            if k.startswith("eval_") and not k.endswith(("_runtime", "_per_second", "_preparation_time"))
        }
        self.snake_report.metrics = metrics
        summary = self.shard_summary.to_markdown() if self.shard_summary is not None else ""
        section = self.snake_report.model_card_section(plan=format_plan(self.plan), shards=summary)
        card.write_text(card.read_text().rstrip("\n") + "\n\n" + section + "\n")


def _tag_model(model: nn.Module) -> None:
    """Tags the model `snake-learning`: PEFT's model card takes its tags from the base model's `model_tags`."""
    base = unwrap_model(model)
    if hasattr(base, "add_model_tags"):
        base.add_model_tags(["snake-learning"])
