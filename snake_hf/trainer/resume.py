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
(`snake_hf.engine.coordinator`) is refused, since its checkpoints follow another plan than the relaunched ranks'.

**A checkpoint resumes only the run that wrote it.** Besides the plan, the base-model fingerprint and the rank, a
checkpoint records the run's *signature* (every setting that changes what the run computes: `payload_dtype`, the
adapter config, seeds, group boundaries, shard sizes and members, optimizer and loss settings; see
`_SIGNATURE_FIELDS`) and a *run id* drawn when the run started. Resuming with another value of any of them is refused
with a [`CheckpointError`] naming the field and both values; distributed ranks whose checkpoints carry different run
ids (a leftover `node-<r>/checkpoint-N` of an older run) are refused too. In distributed mode each rank tells the
others through the store why its checkpoint cannot resume (or where it resumes), so every rank stops on the same
error at once instead of waiting for a payload that will not come.
"""

from __future__ import annotations

import itertools
import json
import uuid
from pathlib import Path

import torch
from torch.utils.data import Sampler
from transformers import Trainer
from transformers.utils import logging

from ..identity import canonical, canonical_hash
from ..plan import Stage
from ..report import HopRecord, StageRecord
from . import _compat
from .checkpoint import (
    CheckpointError,
    StageCheckpoint,
    latest_checkpoint,
    rotate_checkpoints,
    write_atomically,
)


logger = logging.get_logger(__name__)

__all__ = ["SkipBatches", "StageCheckpointing"]

# `SnakeConfig` (`TrainingArguments`) fields that change what a run computes, beyond its plan: a checkpoint written
# with other values would resume into a run that neither setting gives. (Output, logging, topology and timeout
# settings are left out: they do not change the adapters.)
_SIGNATURE_FIELDS = (
    "payload_dtype", "seed", "data_seed", "train_mode", "learning_rate", "head_learning_rate", "lr_scheduler_type",
    "lr_scheduler_kwargs", "warmup_steps", "weight_decay", "optim", "optim_args", "adam_beta1", "adam_beta2",
    "adam_epsilon", "max_grad_norm", "per_device_train_batch_size", "gradient_accumulation_steps",
    "dataloader_drop_last", "bf16", "fp16", "label_smoothing_factor", "always_trainable_modules", "distill_alpha",
    "distill_temperature", "logit_adjustment", "restrict_to_node_classes", "node_class_min_share",
    "lm_loss_chunk_tokens",
)  # fmt: skip
# What to keep the same for the signature entries that are not fields of their own.
_SIGNATURE_FIXES = {
    "adapter": "the same peft_config (LoRA r, alpha, target modules) and trainable modules",
    "group_boundaries": "the same num_block_groups / group_boundaries",
    "shard_sizes": "the same train_dataset, partition settings and seed",
    "shard_members": "the same train_dataset, partition settings and seed",
}


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
            "run_id": self._run_id,
            "signature": self._run_signature(),
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

    def _run_signature(self) -> dict:
        """Every setting besides the plan, the base model and the rank that decides what this run computes (as JSON
        gives it back, so that a saved signature compares equal in any later process)."""
        members = [self.node_data.node_indices[node] for node in sorted(self.local_nodes)]
        signature = {name: getattr(self.args, name) for name in _SIGNATURE_FIELDS} | {
            "adapter": self._spec.adapter_hash,
            "group_boundaries": list(self.groups.boundaries),
            "shard_sizes": list(self.node_data.sizes),
            "shard_members": canonical_hash(members, "shard members", length=16),  # this process's nodes' examples
        }
        return canonical(signature, "run signature")  # sets sorted: the same in a new process (snake_hf.identity)

    def _check_signature(self, path: Path, saved: dict) -> None:
        for field, value in self._run_signature().items():
            if saved.get(field) != value:
                fix = _SIGNATURE_FIXES.get(field, f"the same `{field}`")
                raise CheckpointError(
                    f"Checkpoint {path} was written by a run with `{field}` = {saved.get(field)!r}; this run has "
                    f"{value!r}. Resume with {fix}, or start a new run in a new output_dir."
                )

    def _new_run_id(self) -> str:
        """A fresh run's id (the same on every rank: the first rank's), stored in each of its checkpoints."""
        run_id = uuid.uuid4().hex[:16]
        if self.args.save_strategy == "no":
            return run_id  # no checkpoint will carry it: no need for the ranks to agree (nor to wait for each other)
        if self.launch is not None:
            run_id = self.transport.exchange_text("run_id", run_id)[0]
        if latest_checkpoint(self._checkpoint_root) is not None:
            logger.warning(
                f"{self._checkpoint_root} already holds stage checkpoints of another run; a later "
                "resume_from_checkpoint=True picks the newest checkpoint there and refuses one of another run id. "
                "Start each run in its own output_dir."
            )
        return run_id

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
        if resume_from_checkpoint in (None, False):
            self._run_id = self._new_run_id()
            return None, 0
        path = self._resume_point(resume_from_checkpoint)
        if self.launch is None:
            return path, self._restore(path)
        # Distributed: every rank tells the others where its checkpoint resumes, or why it cannot, so that all stop
        # on the same error (a rank that stopped alone would leave the others waiting for its payloads).
        try:
            mine = {"next_stage": self._restore(path) if path is not None else 0, "path": str(path or "")}
            mine["run_id"] = self._run_id if path is not None else None
        except CheckpointError as error:
            self.transport.exchange_text("resume", json.dumps({"error": str(error)}))
            raise
        told = [json.loads(text) for text in self.transport.exchange_text("resume", json.dumps(mine))]
        resume_stage = self._agree_on_resume(told)
        self._run_id = next(t["run_id"] for t in told if t["run_id"] is not None)
        self._relay.resume_at(resume_stage)
        return path, resume_stage

    def _agree_on_resume(self, told: list[dict]) -> int:
        """Distributed: the stage the run goes on at, from what every rank told (the same answer, or the same
        [`CheckpointError`], on every rank): the latest stage any rank's checkpoint reaches (module docstring)."""
        failed = [(rank, t["error"]) for rank, t in enumerate(told) if "error" in t]
        if failed:
            rank, error = failed[0]
            raise CheckpointError(f"Rank {rank} cannot resume, so the run cannot: {error}")
        resume_stage = max(t["next_stage"] for t in told)
        if resume_stage == 0:
            raise CheckpointError(
                f"No rank has a complete stage checkpoint under {self.args.output_dir}/node-<rank>; relaunch "
                "without resume_from_checkpoint."
            )
        runs: dict[str, list[int]] = {}
        for rank, t in enumerate(told):
            if t["run_id"] is not None:
                runs.setdefault(t["run_id"], []).append(rank)
        if len(runs) > 1:
            raise CheckpointError(
                f"The ranks' latest checkpoints come from different runs (run id: ranks {runs}); a node-<rank> folder "
                f"under {self.args.output_dir} holds a leftover of another run. Remove the stale checkpoint-N "
                "folders, or start a new run in a new output_dir."
            )
        for rank, t in enumerate(told):
            done = [s.index for s in self.plan if s.node == rank and s.index < resume_stage]
            if (done[-1] + 1 if done else 0) != t["next_stage"]:
                raise CheckpointError(
                    f"Rank {rank} resumes at stage {t['next_stage']} ({t['path'] or 'no checkpoint'}), but the run "
                    f"goes on at stage {resume_stage} and rank {rank} trained stage {done[-1]} before it, whose "
                    f"checkpoint is missing; restore {self.args.output_dir}/node-{rank} from the crashed run, or "
                    "start again."
                )
        return resume_stage

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
                f"Checkpoint {path} was written after node failures re-planned the run (rank "
                f"{state['failures'][0]['rank']} failed first); resuming a re-planned cs run is not supported: start "
                "it again."
            )
        self._check_signature(path, state["signature"])
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
        self._run_id = state["run_id"]
        if self.launch is None:
            self._resume_step = int(state["global_step"])  # distributed: each stage seeks its own plan step
        else:
            own_steps = sum(s.steps for s in self.plan if s.node == self.launch.rank and s.index < next_stage)
            self._skip_own_steps = own_steps  # the sampler skips their batches (see SkipBatches)
        logger.info(f"Resuming from {path} at stage {next_stage} (global step {state['global_step']}).")
        return next_stage
