"""`SnakeTrainer`: a drop-in `transformers.Trainer` that trains one block group at a time, one node at a time.

The whole plan runs inside a single `Trainer.train()` (DESIGN §4): one `TrainerState`, one learning-rate schedule,
one log history. The training dataloader yields the plan's batches stage after stage, each from its node's shard;
at every stage boundary (an optimizer-step boundary) the trainer closes the stage, lets the relay hand the
trainable state to the next node, makes exactly the next group trainable and builds a fresh optimizer for it.

The trainer decides what trains. Its collaborators, each given what it needs when it is built: the engine's
[`Session`] (which process, which transport, which relay; `snake_hf.engine.session`), [`StageCheckpoints`] (stage
checkpoints and resume; `resume.py`), and the set-up functions that run before `Trainer` sees the model (`setup.py`).
What one stage in training tracks lives in one small [`StageRun`].
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Callable, Sequence
from functools import partial
from typing import Any

import torch
from datasets import Dataset
from peft import PeftConfig
from torch import nn
from torch.utils.data import DataLoader
from transformers import EvalPrediction, Trainer, TrainerCallback
from transformers.trainer_utils import TrainOutput
from transformers.utils import logging

from ..blocks import SHARED, set_trainable, unwrap_model
from ..config import SnakeConfig
from ..data.sampler import plan_dataloader
from ..data.shards import Partitioner
from ..devices import load_adapters_in_place
from ..engine.payload import part_wire_nbytes
from ..engine.relay import Relay
from ..engine.session import Session
from ..launch import LaunchInfo
from ..lm_loss import chunked_causal_lm_loss
from ..master_weights import keep_master_weights
from ..memory import PeakMemory
from ..model_card import write_model_card
from ..plan import PLAN_FILE, Stage, format_plan, save_plan
from ..recompute import set_recompute
from ..report import SnakeReport, StageRecord
from . import _compat
from .final_pass import needs_final_pass, run_final_pass
from .options import check_resume_options, check_trainer_options, check_user_optimizer
from .resume import ResumePoint, StageCheckpoints
from .schedule import check_schedule_scope, scope_scheduler
from .setup import (
    Prepared,
    needs_priors,
    node_priors,
    prepare_model_only,
    prepare_run,
    resolve_launch,
    scale_group_learning_rate,
    split_head_groups,
    summarise_shards,
)
from .stage import StageBoundaries, StageBoundary, StageRun


logger = logging.get_logger(__name__)

__all__ = ["SnakeTrainer"]


class SnakeTrainer(StageBoundaries, Trainer):
    """Snake Learning on the Hugging Face `Trainer`.

    Cuts the model's blocks into groups and trains them one group and one node at a time along a plan, handing only
    the trainable state (LoRA adapters, or the group's weights in full mode) from node to node. With one node, one
    group and one pass it is `Trainer`, step for step; with more, every `Trainer` option keeps its meaning, has the
    Snake meaning docs/trainer_conformance.md gives it, or is refused before any work.

    Args:
        model (`PreTrainedModel`, `PeftModel` or `nn.Module`, *optional*):
            The model (or `model_init`). With a `PeftModel` or `peft_config` its adapters train (`train_mode`
            "lora"); otherwise its own parameters that require grad do ("full"), as with `Trainer`.
        args ([`SnakeConfig`], *optional*): training and Snake settings (default: `SnakeConfig("snake_output")`); the
            trainer keeps its own copy.
        data_collator, processing_class, model_init, compute_loss_func, compute_metrics, callbacks, optimizers,
        optimizer_cls_and_kwargs, preprocess_logits_for_metrics: as with `Trainer`, in `Trainer`'s order.
        train_dataset (`datasets.Dataset`, a list of examples, or a list of datasets, *optional*):
            One dataset, split over `args.num_nodes` nodes by `partitioner` or `args.partition`, or one dataset per
            node. `None`: an evaluate/predict-only trainer.
        eval_dataset (`datasets.Dataset`, *optional*): evaluated as with `Trainer`.
        peft_config (`peft.PeftConfig`, *optional*, keyword-only): wraps a plain model with `get_peft_model`.
        partitioner (`snake_hf.data.shards.Partitioner`, *optional*, keyword-only): overrides `args.partition`.

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
        data_collator: Callable | None = None,
        train_dataset: Dataset | Sequence[Dataset] | None = None,
        eval_dataset: Dataset | dict[str, Dataset] | None = None,
        processing_class=None,
        model_init: Callable[..., nn.Module] | None = None,
        compute_loss_func: Callable | None = None,
        compute_metrics: Callable[[EvalPrediction], dict] | None = None,
        callbacks: list[TrainerCallback] | None = None,
        optimizers: tuple[torch.optim.Optimizer | None, torch.optim.lr_scheduler.LRScheduler | None] = (None, None),
        optimizer_cls_and_kwargs: tuple[type[torch.optim.Optimizer], dict[str, Any]] | None = None,
        preprocess_logits_for_metrics: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
        *,
        peft_config: PeftConfig | None = None,
        partitioner: Partitioner | None = None,
    ):
        args = SnakeConfig(output_dir="snake_output") if args is None else args
        if not isinstance(args, SnakeConfig):
            raise TypeError(
                f"`args` is a {type(args).__name__}; SnakeTrainer needs a SnakeConfig (it subclasses "
                "TrainingArguments, so SnakeConfig(**your_args.to_dict()) carries your settings over)."
            )
        args = copy.copy(args)  # the trainer settles train_mode and num_nodes on its own copy, as Trainer keeps args
        if model is not None and model_init is not None:
            raise ValueError("`Trainer` requires either a `model` or `model_init` argument, but not both.")
        if model_init is not None and (optimizers[0] is not None or optimizers[1] is not None):
            raise RuntimeError(
                "Passing a `model_init` is incompatible with providing the `optimizers` argument. You should subclass "
                "`Trainer` and override the `create_optimizer_and_scheduler` method."
            )
        # A composed trainer (snake_hf.compose: SnakeMixin, a parent, SnakeTrainer) arrives here from the parent's
        # __init__, after its data preparation: its prepared datasets and Snake's own arguments.
        peft_config, partitioner, train_dataset = self._composed_inputs(args, peft_config, partitioner, train_dataset)
        self.session = Session(
            resolve_launch(args), args.num_nodes, args.topology, args.hop_timeout, run_secret=args.run_secret
        )
        check_trainer_options(args, self.session, callbacks)
        check_schedule_scope(args, optimizers[1])
        self._peft_config, self._partitioner, self._train_input = peft_config, partitioner, train_dataset
        if model is None and model_init is not None:  # as Trainer: seeded, then built once for the set-up
            _compat.seed_for_model_init(args)
            self.model_init = model_init
            model = Trainer.call_model_init(self)  # Trainer's (0 or 1 argument); ours would also prepare it
        prepared = self._prepare(model, args)
        super().__init__(
            model=prepared.model, args=args, data_collator=data_collator, train_dataset=self._train_dataset,
            eval_dataset=eval_dataset, processing_class=processing_class, compute_loss_func=compute_loss_func,
            compute_metrics=compute_metrics, callbacks=callbacks, optimizers=optimizers,
            optimizer_cls_and_kwargs=optimizer_cls_and_kwargs,
            preprocess_logits_for_metrics=preprocess_logits_for_metrics,
        )  # fmt: skip
        self.model_init = model_init  # Trainer.train re-initialises through call_model_init (see train)
        self._user_optimizer = check_user_optimizer(optimizers[0], self.model, self.part_map, self.plan)
        self.add_callback(StageBoundary(self))
        self._meter = PeakMemory(args.device)  # each stage resets it and reads its peak
        self._current: StageRun | None = None  # the stage in training
        self._handed_on: tuple[Stage, StageRecord] | None = None  # simulation: a closed stage whose hop is due
        self._relay: Relay | None = None  # the run's relay (built by train())
        self._resume_point = ResumePoint()
        self._memory_baseline: int | None = None  # memory held when train() began (set there)
        self.snake_report = self._new_report()
        if self.plan:
            logger.info(f"Snake plan ({len(self.plan)} stages, {self.total_steps} steps):\n{format_plan(self.plan)}")

    def _composed_inputs(self, args: SnakeConfig, peft_config, partitioner, train_dataset):
        """`(peft_config, partitioner, train_dataset)` as given; `snake_hf.compose.SnakeMixin` supplies its own."""
        return peft_config, partitioner, train_dataset

    def _prepare(self, model: nn.Module, args: SnakeConfig) -> Prepared:
        """Everything the run trains, decided before `Trainer` sees the model (again after a `model_init`)."""
        if self._train_input is None:  # an evaluate/predict-only trainer, as with Trainer
            prepared = prepare_model_only(model, args, self._peft_config)
        else:
            prepared = prepare_run(model, args, self._train_input, self._peft_config, self._partitioner, self.session)
        self.groups, self.node_data, self.capacity = prepared.groups, prepared.node_data, prepared.capacity
        self.plan, self.epoch_steps = prepared.plan, prepared.epoch_steps
        self.part_map, self._spec = prepared.part_map, prepared.spec
        self._trainable = {n for n, p in prepared.model.named_parameters() if p.requires_grad}  # restored after train
        self._own_stages = [stage for stage in self.plan if stage.node in self.session.local_nodes]
        self.checkpoints = StageCheckpoints(
            args, self.session, self.plan, self.part_map, self._spec, self.groups, self.node_data
        )
        data = self.node_data
        self.shard_summary = summarise_shards(data, args.partition_label_column) if data is not None else None
        priors = data is not None and needs_priors(args)
        self._node_priors = node_priors(data, args, prepared.model) if priors else None
        _tag_model(prepared.model)
        return prepared

    @property
    def _train_dataset(self):
        return self.node_data.dataset if self.node_data is not None else None

    def call_model_init(self, trial=None) -> nn.Module:
        """`Trainer.call_model_init`, then the same preparation as the first model's (wrapped for the mode, cut into
        the same groups), so a re-initialised model trains the same plan."""
        model = super().call_model_init(trial)
        return self._prepare(model, self.args).model

    # ---- set-up ----

    @property
    def launch(self) -> LaunchInfo | None:
        """This process's launch (`None` in simulation); the session's."""
        return self.session.launch

    @property
    def transport(self):
        """The session's transport (in-memory in simulation, gloo links in distributed mode)."""
        return self.session.transport

    @property
    def total_steps(self) -> int:
        return sum(stage.steps for stage in self.plan)

    def _new_report(self) -> SnakeReport:
        designation = self.capacity.designation if self.capacity is not None else None
        return SnakeReport(
            num_nodes=self.args.num_nodes,
            num_groups=self.groups.num_groups,
            train_mode=self.args.train_mode,
            engine="distributed" if self.session.distributed else "simulation",
            group_boundaries=list(self.groups.boundaries),
            part_nbytes=part_wire_nbytes(self.part_map, self.model, self.args.payload_dtype),
            shard_sizes=self.node_data.sizes if self.node_data is not None else [],
            shard_summary=self.shard_summary.to_dict() if self.shard_summary is not None else None,
            memory_kind=self._meter.kind,
            designation=designation.to_dict() if designation is not None else None,
        )

    # ---- the plan inside one Trainer.train() ----

    def train(
        self, resume_from_checkpoint: str | bool | None = None, trial=None, ignore_keys_for_eval=None, **kwargs
    ) -> TrainOutput:
        """Runs the whole plan inside one `Trainer.train()`; returns its `TrainOutput`.

        In distributed mode this process runs its own node's stages (waiting for the payload before each), and
        afterwards every process holds the final trainable state.
        """
        if self.node_data is None:
            raise ValueError("Trainer: training requires a train_dataset.")
        check_resume_options(self.args, self.plan, resume_from_checkpoint)
        model_init, self.model_init = self.model_init, None  # re-initialised here, before the relay holds the model
        try:
            if model_init is not None:
                _compat.seed_for_model_init(self.args)
                self.model_init = model_init
                self.model = self.model_wrapped = self.call_model_init(trial)
                self.optimizer, self.lr_scheduler = None, None
                self.model_init = None
                _compat.move_model_to_device(self)
            return self._train_plan(resume_from_checkpoint, trial, ignore_keys_for_eval, **kwargs)
        finally:
            self.model_init = model_init
            for name, param in self.model.named_parameters():  # as the user left them (Trainer changes none)
                param.requires_grad_(name in self._trainable)

    def _train_plan(self, resume_from_checkpoint, trial, ignore_keys_for_eval, **kwargs) -> TrainOutput:
        self.snake_report = self._new_report()
        self._memory_baseline = self._meter.current()  # the loaded model and data: stage peaks are reported above it
        relay = self._relay = self.session.make_relay(
            self.model, self.part_map, self._spec, self.plan, self.args.seed, self.snake_report,
            self.args.on_node_failure,
        )  # fmt: skip
        if self.shard_summary is not None:
            logger.info(f"Node shards:\n{self.shard_summary.to_markdown()}")
        point = self._resume_point = self.checkpoints.resume(
            resume_from_checkpoint, self.model, relay, self.snake_report
        )
        relay.start(self.plan[0], resumed=point.checkpoint is not None)
        if point.checkpoint is not None and point.in_stage is None:
            # Taken at a stage boundary, before the stage's payload left: hand it on (again, or as a record only when
            # the crashed run went on past it, so it had left).
            record = self.snake_report.stages[-1]
            record.bytes_sent = relay.hand_on(self.plan[record.stage], deliver=record.stage + 1 == point.next_stage)
        output = TrainOutput(self.state.global_step, 0.0, {})
        stage = self._first_stage(point.next_stage)
        # Distributed: no Trainer resume (each stage seeks its plan step; the sampler skips the trained batches).
        checkpoint = None if point.checkpoint is None or self.session.distributed else str(point.checkpoint)
        if stage is not None or checkpoint is not None:  # a checkpoint at the end: Trainer restores its state
            if stage is not None:
                self._begin_stage(stage, first=True, resumed=point.in_stage)
            output = super().train(checkpoint, trial, ignore_keys_for_eval, **kwargs)
            if self._current is not None and not self._current.closed:  # the loop stopped inside a stage (a
                self._end_stage()  # callback's should_training_stop)
            if self.args.recompute_above_group:
                set_recompute(self.model, self.groups, None)
        self._handed_on = None  # simulation: nothing follows the last stage trained
        relay.finish()
        if self.session.distributed and needs_final_pass(self.args):  # every process holds the final model now
            run_final_pass(self, len(self.plan) - 1, self.plan[-1].node)
        self.session.merge_reports(self.snake_report, relay)
        if self.session.distributed and self.session.is_main and (loss := self.snake_report.plan_loss()) is not None:
            # Each rank's loop averaged only its own stages; the first rank holds every stage's record.
            output = TrainOutput(output.global_step, loss, {**output.metrics, "train_loss": loss})
        self._current, self._resume_point = None, ResumePoint()
        logger.info(f"Snake run finished:\n{self.snake_report.to_markdown()}")
        return output

    def _first_stage(self, next_stage: int) -> Stage | None:
        """The stage this process trains first, from plan stage `next_stage` on (None: it trains none)."""
        if self.session.failover:  # cs: the coordinator says which stage this rank trains next
            return self._relay.next_stage()
        return next((stage for stage in self._own_stages if stage.index >= next_stage), None)

    def _step_end(self, control) -> None:
        """At each optimizer step's end (before `Trainer` logs, evaluates or saves): closes a finished stage. In cs
        topology it then enters this node's next stage, waiting for the coordinator's turn, and stops the loop when
        the coordinator says the run is done; otherwise the next stage begins at its first micro-batch."""
        current = self._current
        if current is None or current.closed:
            return
        if self.state.global_step < current.end:
            self._plan_epoch_draw()
            return
        should_log = control.should_log  # logging the stage's loss resets it (CallbackHandler.on_log)
        self._end_stage(control)
        control.should_log = should_log
        if self.session.failover:
            following = self._relay.next_stage()
            if following is None:
                control.should_training_stop = True
            else:
                self._begin_stage(following)
        self._plan_epoch_draw()

    def _plan_epoch_draw(self) -> None:
        """Distributed: the RNG draw a simulation makes when `Trainer` opens the next plan epoch's dataloader iterator
        (`torch.utils.data` draws its base seed from the global RNG), made by the process that trained the epoch's last
        step, from its node's stream, so that every node's stream (dropout) stays what the simulation's is."""
        step = self.state.global_step
        if self._plan_epochs or not self.epoch_steps or step % self.epoch_steps or step >= self.total_steps:
            return
        torch.empty((), dtype=torch.int64).random_()  # as _BaseDataLoaderIter.__init__ does (torch 2.13)

    def _own_steps(self) -> int:
        """Optimizer steps this process's loop runs: its own stages' (cs: up to the whole plan, since a failed node's
        stages may come to it; the coordinator stops the loop), less those a resume already trained."""
        steps = self.total_steps if self.session.failover else sum(stage.steps for stage in self._own_stages)
        return steps - self._resume_point.skip_own_steps

    @property
    def _plan_epochs(self) -> bool:
        """Whether `Trainer`'s epochs are the plan's (simulation); a distributed process's loop runs its own stages
        as one epoch."""
        return not self.session.distributed

    def set_initial_training_values(self, args, dataloader):
        # Simulation: Trainer's epochs are plan epochs (`epoch_steps` steps each; the plan is num_train_epochs of
        # them, or max_steps). Distributed: this process's one epoch holds only its own stages, while the schedule
        # spans the whole plan.
        values = super().set_initial_training_values(args, dataloader)
        if self.node_data.streaming:  # one node's stream: Trainer's own length rules (max_steps, restarted epochs)
            return values
        steps = self.epoch_steps if self._plan_epochs else self._own_steps()
        return _compat.plan_training_values(
            values, steps, self.total_steps, args.gradient_accumulation_steps, self._plan_epochs
        )

    def create_scheduler(self, num_training_steps: int, optimizer=None):
        # A run resumed at a stage boundary continues its schedule at the checkpoint's step (a schedule is a function
        # of the step count); one resumed inside a stage loads the scheduler's state as Trainer does.
        fresh = self.lr_scheduler is None
        scheduler = super().create_scheduler(num_training_steps, optimizer)
        if fresh and self.args.lr_schedule_scope == "group":  # each block group runs the schedule over its own steps
            scope_scheduler(scheduler, self.plan)
        if self._resume_point.schedule_step:
            _compat.advance_scheduler(scheduler, self._resume_point.schedule_step)
            self._resume_point.schedule_step = 0
        return scheduler

    def _load_optimizer_and_scheduler(self, checkpoint):
        # Trainer._load_optimizer_and_scheduler (private; transformers 5.23-5.24): a checkpoint at a stage boundary
        # holds the closed stage's optimizer, while the run goes on with a fresh one for the next group.
        if self._resume_point.in_stage is not None:
            super()._load_optimizer_and_scheduler(checkpoint)

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: nn.Module | None = None) -> None:
        # Trainer._load_from_checkpoint / _load_best_model (private; transformers 5.23-5.24) load adapters with
        # PeftModel.load_adapter, which re-dispatches an offloaded base: its adapters are loaded in place instead.
        if not load_adapters_in_place(model or self.model, resume_from_checkpoint):
            super()._load_from_checkpoint(resume_from_checkpoint, model)

    def _load_best_model(self) -> None:
        if not load_adapters_in_place(self.model, self.state.best_model_checkpoint):
            super()._load_best_model()

    def _save_checkpoint(self, model, trial) -> None:
        # Trainer._save_checkpoint (private; transformers 5.23-5.24), plus the Snake state that resumes the run
        # exactly from this step (inside a stage too). Distributed ranks checkpoint per rank at their own stage
        # boundaries instead (resume.py), where every rank's checkpoint agrees with the others'.
        if self.session.distributed:
            return
        super()._save_checkpoint(model, trial)
        folder = _compat.checkpoint_folder(self, trial)
        current = self._current
        if current is None or not folder.is_dir():
            return
        if current.closed:  # at a stage boundary: the next stage's hop has not left yet
            snapshot = self.checkpoints.snapshot(
                current.stage.index + 1, self.model, self._relay, self.snake_report, self.state.global_step
            )
        else:
            in_stage = {"loss": current.loss.item(), "record": dataclasses.asdict(current.record)}
            start = current.objective.start_values() if current.objective is not None else {}
            in_stage["start_values"] = sorted(start)  # what a resume must find (distillation, proximal_mu)
            snapshot = self.checkpoints.snapshot(
                current.stage.index, self.model, self._relay, self.snake_report, self.state.global_step, in_stage,
                live_node=current.stage.node, stage_start=start,
            )  # fmt: skip
        self._relay.save_deltas(folder)  # quantized payloads: residuals and latest deltas (a no-op otherwise)
        snapshot.save(folder)  # snake_state.json last: a folder without it is never trusted

    def get_train_dataloader(self) -> DataLoader:
        # Batches come stage by stage, each from its node's shard (snake_hf.data.sampler). Not passed through
        # accelerator.prepare: this loader must never be sharded across processes; Trainer moves batches to device.
        if self.node_data is None:
            raise ValueError("Trainer: training requires a train_dataset.")
        if self.node_data.streaming:  # one node reading a stream: Trainer's own loader, in the stream's order
            return super().get_train_dataloader()
        dataset, collator = self.node_data.dataset, self.data_collator
        if hasattr(dataset, "column_names"):
            dataset = _compat.remove_unused_columns(self, dataset)
        else:
            collator = _compat.collator_with_removed_columns(self)
        stages = self._own_stages
        if self.session.failover:  # this node's batches as one stream: whichever stages it trains take the next ones
            stages = [Stage(index=0, pass_index=0, node=self.session.rank, group=0, steps=self.total_steps)]
        return plan_dataloader(
            dataset, collator, self.node_data.node_indices, stages, self.args, self._resume_point.skip_own_steps,
            self.epoch_steps if self._plan_epochs else None,
        )  # fmt: skip

    def training_step(self, model, inputs, num_items_in_batch=None):
        # Stage boundaries fall on optimizer-step boundaries: the first micro-batch after a closed stage begins the
        # next one of this process.
        current = self._current
        if current is not None and current.closed and not self.session.failover:
            following = next((s for s in self._own_stages if s.index > current.stage.index), None)
            if following is not None:
                self._begin_stage(following)
                current = self._current
        if current is not None and not current.running:
            self._start_stage_clock()
        loss = super().training_step(model, inputs, num_items_in_batch)
        if current is not None:
            current.loss += loss.detach().float()
        return loss

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        current = self._current
        self._snake_loss_reached = True  # snake_hf.compose.SnakeMixin checks that a parent's compute_loss got here
        # Trainer calls model.train() every step; frozen groups' batch-norm statistics must not drift (full mode).
        for module in current.frozen_norms if current is not None else ():
            module.eval()
        objective = current.objective if current is not None else None
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
        # Trainer builds over the parameters that require grad now (from args, or optimizer_cls_and_kwargs); an
        # optimizer the user passed is rebuilt for each later stage as its class with its defaults. With
        # head_learning_rate the always-trainable modules get their own param groups (the schedule scales all alike).
        fresh = self.optimizer is None
        if fresh and self._current is not None:
            # Loading an adapter (resume) re-enables every LoRA layer (PEFT's set_adapter): freeze again first.
            set_trainable(self.model, self.part_map.trainable_names(self._current.stage.group))
        if fresh and self._user_optimizer is not None:
            kind, defaults = self._user_optimizer
            self.optimizer = kind([p for p in self.model.parameters() if p.requires_grad], **defaults)
        optimizer = super().create_optimizer(model)
        shared = set(self.part_map.params.get(SHARED, ()))
        if fresh and self.args.head_learning_rate is not None:
            split_head_groups(optimizer, self.model, shared, self.args)
        if fresh and self.args.group_learning_rate_scale is not None and self._current is not None:
            factor = self.args.group_learning_rate_scale[self._current.stage.group]
            scale_group_learning_rate(optimizer, self.model, shared, factor)
        if self.args.master_dtype is not None and not optimizer.state:  # last: the groups above match the model
            keep_master_weights(optimizer, getattr(torch, self.args.master_dtype))  # (the user's first one too)
        return optimizer

    # ---- outputs ----

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        """Saves like `Trainer.save_model` (a PEFT adapter folder in LoRA mode) plus `snake_plan.json` and
        `snake_report.json`."""
        if not self.session.is_main:
            return  # every process holds the final state; the first one writes it
        super().save_model(output_dir, _internal_call)
        if self.args.should_save:
            output_dir = output_dir or self.args.output_dir
            save_plan(self.plan, f"{output_dir}/{PLAN_FILE}")
            self.snake_report.to_json(f"{output_dir}/snake_report.json")

    def push_to_hub(self, *args, **kwargs):
        """`Trainer.push_to_hub`; in distributed mode only the first process uploads (every process holds the same
        final state, and each one's Trainer believes it is process zero)."""
        if not self.session.is_main:
            return None
        return super().push_to_hub(*args, **kwargs)

    def create_model_card(self, tags=None, **kwargs) -> None:
        """Writes `output_dir/README.md` for this run (what `push_to_hub` uploads): the base model's Hub id, the plan
        and hyperparameters that ran, evaluation before and after, and `communication` and `memory` metadata
        (`snake_hf.model_card`). Takes `Trainer.create_model_card`'s arguments (`finetuned_from`, `dataset`, `tasks`,
        `model_name`, ...)."""
        if self.session.is_main and self.is_world_process_zero():  # distributed: every rank holds the same state
            write_model_card(self, tags=tags, **kwargs)


def _tag_model(model: nn.Module) -> None:
    """Tags the model `snake-learning`: PEFT's model card takes its tags from the base model's `model_tags`."""
    base = unwrap_model(model)
    if hasattr(base, "add_model_tags"):
        base.add_model_tags(["snake-learning"])
