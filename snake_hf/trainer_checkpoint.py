"""Stage checkpoints for `SnakeTrainer`: when to take one, how to write it, and how to resume from it.

**Simulation**: `output_dir/checkpoint-<global step>` after every `save_stages` stages; it holds every node's state.

**Distributed**: every rank writes `output_dir/node-<rank>/checkpoint-<global step>` after each of its own stages
(`save_stages` is not used: a resume needs each rank's state as its last completed stage left it), before the stage's
payload leaves, so a completed stage's work is on disk before anyone depends on it. To resume, relaunch every rank
with `train(resume_from_checkpoint=True)`: the ranks tell each other (through the rendezvous store) the stage their
latest checkpoint resumes at; the largest, `R`, is where the run goes on. The rank that trained stage `R - 1` holds
the latest state of every part (a stage's node always does: every hop carries what the receiver lacks) and hands it
on again; every other rank restores its own latest checkpoint and replays the version bookkeeping of the stages in
between, so that the run continues exactly as the uninterrupted one would (bit-identical adapters on CPU). This holds
in p2p and in cs topology (the coordinator hands out turns from `R` on); a cs run that a node failure re-planned
(`snake_hf.failover`) is refused, since its checkpoints follow another plan than the relaunched ranks'.
"""

from __future__ import annotations

import itertools
from pathlib import Path

import torch
from torch.utils.data import Sampler
from transformers import Trainer
from transformers.utils import logging

from . import _compat
from .checkpoint import (
    CheckpointError,
    StageCheckpoint,
    latest_checkpoint,
    rotate_checkpoints,
    write_atomically,
)
from .plan import Stage
from .report import HopRecord, StageRecord


logger = logging.get_logger(__name__)


class SkipBatches(Sampler[list[int]]):
    """A batch sampler without its first `skip` batches (a resumed distributed rank's stages already trained)."""

    def __init__(self, sampler: Sampler[list[int]], skip: int):
        self.sampler, self.skip = sampler, skip

    def __len__(self) -> int:
        return len(self.sampler) - self.skip

    def __iter__(self):
        return itertools.islice(iter(self.sampler), self.skip, None)


class StageCheckpointing:
    """Mixin of [`SnakeTrainer`]: checkpoints at stage boundaries, atomic, and resume (simulation and distributed)."""

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

    @property
    def _checkpoint_root(self) -> Path:
        """Where this process's stage checkpoints live: `output_dir`, or `output_dir/node-<rank>` when distributed."""
        root = Path(self.args.output_dir)
        return root if self.launch is None else root / f"node-{self.launch.rank}"

    def _checkpoint_due(self, stage: Stage) -> bool:
        if self.args.save_strategy == "no" or stage.index + 1 >= len(self.plan):
            return False
        # Distributed: after every own stage, so that a resume finds every rank at its last completed stage.
        return self.launch is not None or (stage.index + 1) % self.args.save_stages == 0

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
            "rank": None if self.launch is None else self.launch.rank,
            "failures": getattr(self._relay, "failures", []),  # cs: node failures that re-planned the run
        }
        names = [name for part in self.part_map.parts for name in self.part_map.tensor_names(part)]
        checkpoint = StageCheckpoint(state, {n: named[n] for n in names}, dict(self._relay.rng))

        def write(folder: Path) -> None:
            # A standard adapter folder, for users (SnakeTrainer.save_model writes on the first rank only).
            if self.launch is None or self.launch.rank == 0:
                self.save_model(str(folder), _internal_call=True)
            else:
                Trainer.save_model(self, str(folder), _internal_call=True)
            self.state.save_to_json(str(folder / "trainer_state.json"))
            checkpoint.save(folder)  # snake_state.json last: a folder without it is never trusted

        root = self._checkpoint_root
        path = write_atomically(root, self.state.global_step, write)
        rotate_checkpoints(root, self.args.save_total_limit)
        if self.args.push_to_hub and (self.launch is None or self.launch.rank == 0):
            _compat.push_checkpoint(self, str(path))  # hub_strategy every_save / checkpoint / all_checkpoints
        logger.info(f"Saved stage checkpoint {path} (next stage {stage.index + 1}).")
        return path

    def _resume_point(self, resume_from_checkpoint) -> Path | None:
        """This process's checkpoint to resume from (None: none asked for, or none of this rank's yet)."""
        if resume_from_checkpoint in (None, False):
            return None
        if resume_from_checkpoint is not True:
            return Path(resume_from_checkpoint)
        path = latest_checkpoint(self._checkpoint_root)
        if path is None and self.launch is None:
            raise CheckpointError(
                f"No complete stage checkpoint in {self.args.output_dir}; train without resume_from_checkpoint, "
                "or pass the path of a checkpoint-N folder."
            )
        return path

    def _resume(self, resume_from_checkpoint) -> tuple[Path | None, int]:
        """Restores this process's checkpoint (if any); returns it and the stage at which the run goes on."""
        path = self._resume_point(resume_from_checkpoint)
        own_next = self._restore(path) if path is not None else 0
        if self.launch is None or resume_from_checkpoint in (None, False):
            return path, own_next
        # Distributed: the run goes on at the latest stage any rank's checkpoint reaches (see the module docstring).
        reached = [int(t) for t in self.transport.exchange_text("resume_stage", str(own_next))]
        resume_stage = max(reached)
        if resume_stage == 0:
            raise CheckpointError(
                f"No rank has a complete stage checkpoint under {self.args.output_dir}/node-<rank>; relaunch "
                "without resume_from_checkpoint."
            )
        rank = self.launch.rank
        done = [s.index for s in self.plan if s.node == rank and s.index < resume_stage]
        if (done[-1] + 1 if done else 0) != own_next:
            raise CheckpointError(
                f"Rank {rank} resumes at stage {own_next} ({path or 'no checkpoint'}), but the run goes on at stage "
                f"{resume_stage} and this rank trained stage {done[-1]} before it, whose checkpoint is missing; "
                f"restore {self._checkpoint_root} from the crashed run, or start again."
            )
        self._relay.resume_at(resume_stage)
        return path, resume_stage

    def _restore(self, path: Path) -> int:
        """Loads a stage checkpoint into the model, the relay and the report; returns the next stage's index."""
        checkpoint = StageCheckpoint.load(path)
        state = checkpoint.state
        if state["plan"] != [s.to_dict() for s in self.plan]:
            raise CheckpointError(f"Checkpoint {path} was written for another plan; resume with the same settings.")
        if state["fingerprint"] != self._spec.fingerprint:
            raise CheckpointError(f"Checkpoint {path} was written from another base model; load the same base.")
        rank = None if self.launch is None else self.launch.rank
        if state.get("rank") != rank:
            raise CheckpointError(
                f"Checkpoint {path} was written by rank {state.get('rank')}, not by this process (rank {rank}); "
                "resume each rank from its own node-<rank> folder."
            )
        if state.get("failures"):
            raise CheckpointError(
                f"Checkpoint {path} was written after node failures re-planned the run ({state['failures'][0]['rank']} "
                "failed first); resuming a re-planned cs run is not supported: start it again."
            )
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
        if self.launch is None:
            self._resume_step = int(state["global_step"])  # distributed: each stage seeks its own plan step
        else:
            own_steps = sum(s.steps for s in self.plan if s.node == self.launch.rank and s.index < next_stage)
            self._skip_own_steps = own_steps  # the sampler skips their batches (see SkipBatches)
        logger.info(f"Resuming from {path} at stage {next_stage} (global step {state['global_step']}).")
        return next_stage
