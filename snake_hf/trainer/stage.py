"""Stage boundaries: what the trainer tracks for the stage it is training, the callback that ends stages, and the
methods of `SnakeTrainer` that begin and end one ([`StageBoundaries`])."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import torch
from torch import nn
from transformers import Trainer, TrainerCallback
from transformers.utils import logging

from ..blocks import frozen_batchnorms, set_trainable
from ..losses import StageObjective
from ..plan import Stage
from ..recompute import set_recompute
from ..report import StageRecord
from . import _compat
from .checkpoint import START_FILE, CheckpointError
from .final_pass import needs_final_pass, run_final_pass
from .setup import stage_objective


__all__ = ["StageBoundaries", "StageBoundary", "StageRun"]

logger = logging.get_logger(__name__)


@dataclass
class StageRun:
    """The stage this process trains now: its place in the plan's steps, its loss, record and timers."""

    stage: Stage
    start: int  # the plan's global step at which the stage starts, and (end) after its last step
    end: int
    record: StageRecord
    objective: StageObjective | None = None
    frozen_norms: list[nn.Module] = field(default_factory=list)
    loss: torch.Tensor | None = None
    running: bool = False  # its first micro-batch ran (node RNG stream active, clock started)
    closed: bool = False
    started: float = 0.0


class StageBoundary(TrainerCallback):
    """At each optimizer step's end, before `Trainer` logs, evaluates or saves: closes a finished stage (so its loss is
    logged and a checkpoint at this step sees it closed); in cs topology also asks the coordinator for the next one."""

    def __init__(self, trainer):
        self.trainer = trainer

    def on_step_end(self, args, state, control, **kwargs):
        self.trainer._step_end(control)


class StageBoundaries:
    """The stage-boundary half of [`SnakeTrainer`]: begin a stage (receive, make its group trainable, a fresh
    optimizer), start its clock on its first micro-batch, end it (record, checkpoint, hand on). A mixin: the state it
    reads and writes (`plan`, `part_map`, `_relay`, `_current`, `snake_report`, ...) is the trainer's."""

    def _begin_stage(self, stage: Stage, first: bool = False, resumed: dict | None = None) -> None:
        """Makes `stage` the one in training: receives what its node lacks (simulation: hands on the closed stage's
        payload first), makes exactly its group trainable, and builds its objective and a fresh optimizer. A stage
        resumed from a checkpoint taken inside it (`resumed`) receives nothing: the checkpoint holds its state."""
        if self._handed_on is not None:
            previous, previous_record = self._handed_on
            previous_record.bytes_sent = self._relay.hand_on(previous)
            self._handed_on = None
            self.log({"comm/bytes_sent": previous_record.bytes_sent, "comm/bytes_total": self.snake_report.total_bytes,
                      "stage": previous.index})  # fmt: skip
        if resumed is None:
            bytes_in, wait = self._relay.enter(stage)
            record = StageRecord(
                stage=stage.index, pass_index=stage.pass_index, node=stage.node, group=stage.group, steps=stage.steps,
                bytes_received=bytes_in, wait_seconds=wait, load_seconds=self._relay.last_load_seconds,
            )  # fmt: skip
        else:
            record = StageRecord(**resumed["record"])
        set_trainable(self.model, self.part_map.trainable_names(stage.group))
        if self.args.recompute_above_group:
            set_recompute(self.model, self.groups, stage.group)
        start = sum(s.steps for s in self.plan[: stage.index])
        if self._memory_baseline is not None:
            record.extra["memory_baseline_bytes"] = self._memory_baseline
        if resumed is None and self.capacity is not None and self.capacity.costs is not None:
            record.extra["estimated_memory_bytes"] = self.capacity.estimate(
                self.groups.boundaries, stage.group, self.args.per_device_train_batch_size
            )
        self._current = StageRun(
            stage=stage, start=start, end=start + stage.steps, record=record,
            objective=stage_objective(self.args, self.model, self.part_map, self.groups, stage, self._node_priors),
            frozen_norms=frozen_batchnorms(self.model, self.groups, stage.group) if self.args.train_mode == "full"
            else [],
            loss=torch.tensor(resumed["loss"] if resumed else 0.0, device=self.args.device),
        )  # fmt: skip
        if resumed is not None and self._current.objective is not None:
            self._restore_stage_start(resumed)
        if not first:
            self._fresh_optimizer()

    def _restore_stage_start(self, resumed: dict) -> None:
        """A stage resumed from a checkpoint inside it goes on towards the values it started from (distillation's
        teacher, the proximal term's anchor), which the checkpoint kept, not towards the values it resumed with."""
        objective, path = self._current.objective, self._resume_point.checkpoint
        if not objective.start_values():
            return
        if "start_values" not in resumed:  # written before snake_hf kept them
            logger.warning(
                f"Checkpoint {path} was taken inside stage {self._current.stage.index} by a snake_hf that did not keep "
                "the stage's start values: distillation's teacher and the proximal term's anchor are taken from the "
                "resumed values, so this resume is not bit-identical to an uninterrupted run."
            )
            return
        try:
            objective.restore_start_values(self._resume_point.stage_start)
        except ValueError as error:
            raise CheckpointError(
                f"Checkpoint {path} ({START_FILE}): {error}; resume from another checkpoint-N, or start again."
            ) from error

    def _start_stage_clock(self) -> None:
        """On the stage's first micro-batch: its node's RNG stream, its place in the schedule, timers, progress."""
        current = self._current
        stage = current.stage
        self._relay.activate(stage.node)
        _compat.seek_plan_step(self, current.start)  # distributed: skip the steps other nodes trained
        current.running = True
        self._meter.reset()
        current.started = time.perf_counter()
        bar = _compat.progress_bar(self)
        if bar is not None:
            bar.set_description(f"stage {stage.index + 1}/{len(self.plan)} node {stage.node} group {stage.group}")

    def _end_stage(self, control=None) -> None:
        """Closes the stage in training: records it, logs its loss, and hands its payload on (distributed: now, after
        the rank's stage checkpoint; simulation: when the next stage begins, so that a checkpoint `Trainer` takes at
        this step resumes exactly). `control` asks `Trainer` for a stage checkpoint at this step (simulation)."""
        current = self._current
        stage, record = current.stage, current.record
        record.wall_seconds = time.perf_counter() - current.started
        record.peak_memory_bytes = self._meter.read()
        record.train_loss = current.loss.item() / max(self.state.global_step - current.start, 1)
        if current.objective is not None and current.objective.distill_share is not None:
            record.extra["distill_share"] = current.objective.distill_share
        current.closed = True
        self._relay.close_stage(stage)
        self.snake_report.stages.append(record)
        if stage.index == len(self.plan) - 1 and needs_final_pass(self.args) and not self.session.distributed:
            run_final_pass(self, stage.index, stage.node)  # before Trainer's end-of-training evaluation and save
        metrics = self.snake_report.log_metrics(record)  # stage, node, group, comm/*, mem/peak to every report_to
        if self.session.distributed:
            if self.checkpoints.due(stage):
                self._save_stage_checkpoint(stage)
            metrics["comm/bytes_sent"] = record.bytes_sent = self._relay.hand_on(stage)
            metrics["comm/bytes_total"] = self.snake_report.total_bytes
        else:  # the hop leaves when the next stage begins: its bytes are logged then
            self._handed_on = (stage, record)
            if control is not None and self.checkpoints.due(stage):
                control.should_save = True
            metrics = {k: v for k, v in metrics.items() if not k.startswith("comm/")}
        self.log(metrics)

    def _save_stage_checkpoint(self, stage: Stage) -> Path:
        def write_outputs(folder: Path) -> None:
            # A standard adapter folder (SnakeTrainer.save_model writes on the first rank only) and Trainer's state.
            save = self.save_model if self.session.is_main else partial(Trainer.save_model, self)
            save(str(folder), _internal_call=True)
            self.state.save_to_json(str(folder / "trainer_state.json"))

        path = self.checkpoints.save(
            stage, self.model, self._relay, self.snake_report, self.state.global_step, write_outputs
        )
        if self.args.push_to_hub and self.session.is_main:
            _compat.push_checkpoint(self, str(path))  # hub_strategy every_save / checkpoint / all_checkpoints
        return path

    def _fresh_optimizer(self) -> None:
        """A new optimizer over exactly the trainable parameters; the schedule carries on where it was."""
        old = self.optimizer
        scheduled = old.param_groups[0]["lr"]  # where the schedule is now, for the first group's base rate
        base = old.param_groups[0].get("initial_lr", scheduled)
        self.optimizer = None
        optimizer = self.create_optimizer()
        for group in optimizer.param_groups:
            group["initial_lr"] = group["lr"]  # what the scheduler scales
            group["lr"] = scheduled * group["lr"] / base if base else 0.0
        _compat.replace_optimizer(self, old, optimizer)
