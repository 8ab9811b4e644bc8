"""What the trainer tracks for the stage it is training, and the callback that ends stages."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn
from transformers import TrainerCallback

from ..losses import StageObjective
from ..plan import Stage
from ..report import StageRecord


__all__ = ["StageBoundary", "StageRun"]


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
