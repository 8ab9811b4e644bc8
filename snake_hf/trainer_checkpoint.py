"""Stage checkpoints for `SnakeTrainer`: when to take one, how to write it, and how to resume from it."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers.utils import logging

from . import _compat
from .checkpoint import CheckpointError, StageCheckpoint, latest_checkpoint, rotate_checkpoints, write_atomically
from .plan import Stage
from .report import HopRecord, StageRecord


logger = logging.get_logger(__name__)


class StageCheckpointing:
    """Mixin of [`SnakeTrainer`]: checkpoints at stage boundaries (every `save_stages`), atomic, and resume."""

    def create_scheduler(self, num_training_steps: int, optimizer=None):
        # A resumed run's schedule continues at the checkpoint's step (a schedule is a function of the step count).
        scheduler = super().create_scheduler(num_training_steps, optimizer)
        if getattr(self, "_resume_step", 0):
            _compat.advance_scheduler(scheduler, self._resume_step)
            self._resume_step = 0
        return scheduler

    def _save_checkpoint(self, model, trial) -> None:
        # Trainer._save_checkpoint (private, transformers 5.23) would checkpoint mid-stage; Snake checkpoints at
        # stage boundaries instead (`save_stages`), see _save_stage_checkpoint.
        return

    def _checkpoint_due(self, stage: Stage) -> bool:
        if self.args.save_strategy == "no" or self.launch is not None:
            return False  # distributed processes: resume from a stage checkpoint is simulation-only for now
        return (stage.index + 1) % self.args.save_stages == 0 and stage.index + 1 < len(self.plan)

    def _save_stage_checkpoint(self, stage: Stage) -> Path:
        """Writes `checkpoint-<step>` atomically, before the stage's payload is handed on."""
        named = dict(self.model.named_parameters()) | dict(self.model.named_buffers())
        ledger = self._relay.ledger
        state = {
            "next_stage": stage.index + 1,
            "global_step": self.state.global_step,
            "plan": [s.to_dict() for s in self.plan],
            "fingerprint": self._spec.fingerprint,
            "versions": ledger.versions,
            "checksums": ledger.checksums,
            "report": self.snake_report.to_dict(),
        }
        names = [name for part in self.part_map.parts for name in self.part_map.tensor_names(part)]
        checkpoint = StageCheckpoint(state, {n: named[n] for n in names}, dict(self._relay.rng))

        def write(folder: Path) -> None:
            self.save_model(str(folder), _internal_call=True)  # a standard adapter folder, for users
            self.state.save_to_json(str(folder / "trainer_state.json"))
            checkpoint.save(folder)  # snake_state.json last: a folder without it is never trusted

        path = write_atomically(self.args.output_dir, self.state.global_step, write)
        rotate_checkpoints(self.args.output_dir, self.args.save_total_limit)
        if self.args.push_to_hub:  # hub_strategy every_save / checkpoint / all_checkpoints, as Trainer does
            _compat.push_checkpoint(self, str(path))
        logger.info(f"Saved stage checkpoint {path} (next stage {stage.index + 1}).")
        return path

    def _resume_point(self, resume_from_checkpoint) -> Path | None:
        if resume_from_checkpoint in (None, False):
            return None
        if self.launch is not None:
            raise ValueError(
                "`resume_from_checkpoint` is not supported in distributed mode yet; resume the run as a simulation "
                "(one process) from its stage checkpoint, or start it again."
            )
        if resume_from_checkpoint is True:
            path = latest_checkpoint(self.args.output_dir)
            if path is None:
                raise CheckpointError(
                    f"No complete stage checkpoint in {self.args.output_dir}; train without resume_from_checkpoint, "
                    "or pass the path of a checkpoint-N folder."
                )
            return path
        return Path(resume_from_checkpoint)

    def _restore(self, path: Path) -> int:
        """Loads a stage checkpoint into the model, the relay and the report; returns the next stage's index."""
        checkpoint = StageCheckpoint.load(path)
        state = checkpoint.state
        if state["plan"] != [s.to_dict() for s in self.plan]:
            raise CheckpointError(f"Checkpoint {path} was written for another plan; resume with the same settings.")
        if state["fingerprint"] != self._spec.fingerprint:
            raise CheckpointError(f"Checkpoint {path} was written from another base model; load the same base.")
        expected = {name: meta for layout in self._spec.layout.values() for name, meta in layout.items()}
        if set(checkpoint.parts) != set(expected) or any(
            (str(t.dtype).removeprefix("torch."), tuple(t.shape)) != expected[n] for n, t in checkpoint.parts.items()
        ):
            raise CheckpointError(f"Checkpoint {path} holds other tensors than this run trains (names or shapes).")
        named = dict(self.model.named_parameters()) | dict(self.model.named_buffers())
        with torch.no_grad():
            for name, tensor in checkpoint.parts.items():
                named[name].copy_(tensor)
        next_stage = int(state["next_stage"])
        self._relay.restore(state["versions"], state["checksums"], checkpoint.rng, next_stage)
        holder = self.plan[next_stage - 1].node
        damaged = [
            p for p in self.part_map.parts if self._relay.checksum(p) != self._relay.ledger.checksums[holder][p]
        ]
        if damaged:
            raise CheckpointError(f"Checkpoint {path}: parts {damaged} do not match their recorded checksums.")
        report = state["report"]
        self.snake_report.stages = [StageRecord(**record) for record in report["stages"]]
        self.snake_report.hops = [HopRecord(**hop) for hop in report["hops"]]
        self._resume_step = int(state["global_step"])
        logger.info(f"Resuming from {path} at stage {next_stage} (global step {self._resume_step}).")
        return next_stage
