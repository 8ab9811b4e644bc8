"""Checkpoints for `SnakeTrainer`: when to take one, what Snake adds to it, and how to resume from it.

**Simulation**: `Trainer`'s own checkpoints (`output_dir/checkpoint-<global step>` at `save_strategy`'s steps or epochs,
the end of training, `"best"`) plus one at every `save_stages` stage boundaries, each with the Snake state of every
node ([`StageCheckpoints.snapshot`]). One taken at a stage boundary resumes with the next stage's hop and a fresh
optimizer; one taken inside a stage resumes that stage where it was (`Trainer` restores its optimizer, scheduler and
RNG; the checkpoint keeps the stage's loss so far and record).

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

import dataclasses
import json
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from torch import nn
from transformers.utils import logging

from ..blocks import BlockGroups, PartMap
from ..config import SnakeConfig
from ..data.node_data import NodeData
from ..engine.payload import PayloadSpec
from ..engine.relay import Relay
from ..engine.session import Session
from ..identity import canonical, canonical_hash
from ..plan import Stage
from ..report import HopRecord, SnakeReport, StageRecord
from .checkpoint import (
    CheckpointError,
    StageCheckpoint,
    latest_checkpoint,
    rotate_checkpoints,
    write_atomically,
)


logger = logging.get_logger(__name__)

__all__ = ["ResumePoint", "StageCheckpoints"]

# Fields that existed, but were not signed, when earlier checkpoints were written: their values then are unknown, so
# a checkpoint without them resumes unchecked on them, with a warning.
_SIGNED_LATER = (
    "proximal_mu", "master_dtype", "recompute_batchnorm", "head_calibration", "head_calibration_samples",
    "head_calibration_steps",
)  # fmt: skip
# `SnakeConfig` (`TrainingArguments`) fields that change what a run computes, beyond its plan: a checkpoint written
# with other values would resume into a run that neither setting gives. (Output, logging, topology and timeout
# settings are left out: they do not change the adapters.)
_SIGNATURE_FIELDS = (
    "payload_dtype", "seed", "data_seed", "train_mode", "learning_rate", "head_learning_rate", "group_learning_rate_scale", "lr_scheduler_type",
    "lr_schedule_scope", "lr_scheduler_kwargs", "warmup_steps", "weight_decay", "optim", "optim_args", "adam_beta1", "adam_beta2",
    "adam_epsilon", "max_grad_norm", "per_device_train_batch_size", "gradient_accumulation_steps",
    "dataloader_drop_last", "bf16", "fp16", "label_smoothing_factor", "always_trainable_modules", "distill_alpha",
    "distill_temperature", "logit_adjustment", "restrict_to_node_classes", "node_class_min_share",
    "lm_loss_chunk_tokens", *_SIGNED_LATER,
)  # fmt: skip
# Fields added after checkpoints were written without them, with the value those runs had.
_SIGNATURE_ADDED = {"lr_schedule_scope": "run"}
# What to keep the same for the signature entries that are not fields of their own.
_SIGNATURE_FIXES = {
    "adapter": "the same peft_config (LoRA r, alpha, target modules) and trainable modules",
    "group_boundaries": "the same num_block_groups / group_boundaries",
    "shard_sizes": "the same train_dataset, partition settings and seed",
    "shard_members": "the same train_dataset, partition settings and seed",
}


@dataclass
class ResumePoint:
    """Where a run goes on, and what the trainer must do for it.

    Args:
        checkpoint (`Path`, *optional*): the checkpoint this process restored (`None`: a fresh run, or a distributed
            rank with no checkpoint of its own yet).
        next_stage (`int`): the plan stage the run goes on at.
        schedule_step (`int`): simulation: the global step whose learning rate the schedule resumes at.
        skip_own_steps (`int`): distributed: optimizer steps of this rank's stages already trained (their batches are
            skipped; each later stage seeks its own plan step).
        in_stage (`dict`, *optional*): simulation: the checkpoint was taken inside stage `next_stage`, which goes on
            where it was (its loss so far and record); `Trainer` restores its optimizer and scheduler.
        stage_start (`dict`): with `in_stage`, the values the stage started from that its objective keeps.
    """

    checkpoint: Path | None = None
    next_stage: int = 0
    schedule_step: int = 0
    skip_own_steps: int = 0
    in_stage: dict | None = None
    stage_start: dict = dataclasses.field(default_factory=dict)


class StageCheckpoints:
    """Stage checkpoints of one run: when to take one, how to write it atomically, and how to resume from it.

    Args:
        args ([`SnakeConfig`]): the run's settings (output folder, `save_strategy`, `save_stages`, the signature).
        session ([`Session`]): which process this is, and how ranks agree on a resume point.
        plan (`list[Stage]`), part_map (`PartMap`), spec (`PayloadSpec`), groups (`BlockGroups`),
        node_data (`NodeData`): what the run trains, as the trainer set it up.
    """

    def __init__(
        self,
        args: SnakeConfig,
        session: Session,
        plan: list[Stage],
        part_map: PartMap,
        spec: PayloadSpec,
        groups: BlockGroups,
        node_data: NodeData,
    ):
        self.args, self.session, self.plan = args, session, plan
        self.part_map, self.spec, self.groups, self.node_data = part_map, spec, groups, node_data
        self.run_id: str | None = None

    @property
    def root(self) -> Path:
        """Where this process's stage checkpoints live: `output_dir`, or `output_dir/node-<rank>` when distributed."""
        root = Path(self.args.output_dir)
        return root if self.session.rank is None else root / f"node-{self.session.rank}"

    def due(self, stage: Stage) -> bool:
        if self.args.save_strategy == "no" or stage.index + 1 >= len(self.plan):
            return False
        # Distributed: after every own stage, so that a resume finds every rank at its last completed stage.
        return self.session.distributed or bool(
            self.args.save_stages and (stage.index + 1) % self.args.save_stages == 0
        )

    def save(
        self,
        stage: Stage,
        model: nn.Module,
        relay: Relay,
        report: SnakeReport,
        global_step: int,
        write_outputs: Callable[[Path], None],
    ) -> Path:
        """Writes `checkpoint-<global_step>` atomically, before the stage's payload is handed on.

        `write_outputs(folder)` writes what users load from a checkpoint (a standard adapter or model folder and
        `trainer_state.json`); the Snake state (`snake_state.json`, written last) is what resume trusts.
        """
        checkpoint = self.snapshot(stage.index + 1, model, relay, report, global_step)

        def write(folder: Path) -> None:
            write_outputs(folder)
            relay.save_deltas(folder)  # quantized payloads: residuals and latest deltas (a no-op otherwise)
            checkpoint.save(folder)  # snake_state.json last: a folder without it is never trusted

        path = write_atomically(self.root, global_step, write)
        rotate_checkpoints(self.root, self.args.save_total_limit)
        logger.info(f"Saved stage checkpoint {path} (next stage {stage.index + 1}).")
        return path

    def snapshot(
        self,
        next_stage: int,
        model: nn.Module,
        relay: Relay,
        report: SnakeReport,
        global_step: int,
        in_stage: dict | None = None,
        live_node: int | None = None,
        stage_start: dict[str, torch.Tensor] | None = None,
    ) -> StageCheckpoint:
        """What a checkpoint restores: every part's tensors, the version vectors, each node's RNG stream, the report
        and where the run goes on — at a stage boundary (`next_stage`'s hop not yet handed on), or inside stage
        `next_stage` (`in_stage`: its loss so far and record; `live_node`: the node whose RNG stream is the global one
        now; `stage_start`: the values the stage started from that its objective keeps). Simulation: saved into the
        folder `Trainer._save_checkpoint` just wrote."""
        named = dict(model.named_parameters()) | dict(model.named_buffers())
        state = {
            "next_stage": next_stage,
            "global_step": global_step,
            "plan": [s.to_dict() for s in self.plan],
            "fingerprint": self.spec.fingerprint,
            "versions": relay.ledger.versions,
            "checksums": relay.ledger.checksums,
            "report": report.to_dict(),
            "rank": self.session.rank,
            "failures": getattr(relay, "failures", []),  # cs: node failures that re-planned the run
            "run_id": self.run_id,
            "signature": self.signature(),
            "in_stage": in_stage,
        }
        if in_stage is not None:  # the trained parts moved on since the ledger's checksums: record what they hold now
            state["part_checksums"] = {part: relay.checksum(part) for part in self.part_map.parts}
        rng = dict(relay.rng)
        if live_node is not None:
            rng[live_node] = torch.get_rng_state()
        names = [name for part in self.part_map.parts for name in self.part_map.tensor_names(part)]
        return StageCheckpoint(state, {n: named[n] for n in names}, rng, dict(stage_start or {}))

    def signature(self) -> dict:
        """Every setting besides the plan, the base model and the rank that decides what this run computes (as JSON
        gives it back, so that a saved signature compares equal in any later process)."""
        members = [self.node_data.node_indices[node] for node in sorted(self.session.local_nodes)]
        signature = {name: getattr(self.args, name) for name in _SIGNATURE_FIELDS} | {
            "adapter": self.spec.adapter_hash,
            "group_boundaries": list(self.groups.boundaries),
            "shard_sizes": list(self.node_data.sizes),
            "shard_members": canonical_hash(members, "shard members", length=16),  # this process's nodes' examples
        }
        return canonical(signature, "run signature")  # sets sorted: the same in a new process (snake_hf.identity)

    def _check_signature(self, path: Path, saved: dict) -> None:
        unsigned = [field for field in _SIGNED_LATER if field not in saved]
        if unsigned:
            logger.warning(
                f"Checkpoint {path} was written by a snake_hf that did not record {unsigned}; resuming it assumes this "
                "run's values of them are the ones it was written with."
            )
        for field, value in self.signature().items():
            if field in unsigned:
                continue
            had = saved.get(field, _SIGNATURE_ADDED.get(field))
            if had != value:
                fix = _SIGNATURE_FIXES.get(field, f"the same `{field}`")
                raise CheckpointError(
                    f"Checkpoint {path} was written by a run with `{field}` = {had!r}; this run has "
                    f"{value!r}. Resume with {fix}, or start a new run in a new output_dir."
                )

    def _new_run_id(self) -> str:
        """A fresh run's id (the same on every rank: the first rank's), stored in each of its checkpoints."""
        run_id = uuid.uuid4().hex[:16]
        if self.args.save_strategy == "no":
            return run_id  # no checkpoint will carry it: no need for the ranks to agree (nor to wait for each other)
        if self.session.distributed:
            run_id = self.session.exchange_text("run_id", run_id)[0]
        if latest_checkpoint(self.root) is not None:
            logger.warning(
                f"{self.root} already holds stage checkpoints of another run; a later "
                "resume_from_checkpoint=True picks the newest checkpoint there and refuses one of another run id. "
                "Start each run in its own output_dir."
            )
        return run_id

    def _resume_path(self, resume_from_checkpoint) -> Path | None:
        """This process's checkpoint to resume from (None: none of this rank's yet)."""
        if resume_from_checkpoint is not True:
            return Path(resume_from_checkpoint)
        path = latest_checkpoint(self.root)
        if path is None and not self.session.distributed:
            raise CheckpointError(
                f"No complete stage checkpoint in {self.args.output_dir}; train without resume_from_checkpoint, "
                "or pass the path of a checkpoint-N folder."
            )
        return path

    def resume(self, resume_from_checkpoint, model: nn.Module, relay: Relay, report: SnakeReport) -> ResumePoint:
        """Starts the run fresh (`resume_from_checkpoint` None or False: a new run id), or restores this process's
        checkpoint into `model`, `relay` and `report` and returns where the run goes on (distributed: the stage all
        ranks agree on, or the same [`CheckpointError`] on every rank)."""
        if resume_from_checkpoint in (None, False):
            self.run_id = self._new_run_id()
            return ResumePoint()
        path = self._resume_path(resume_from_checkpoint)
        if not self.session.distributed:
            return self._restore(path, model, relay, report)
        # Distributed: every rank tells the others where its checkpoint resumes, or why it cannot, so that all stop
        # on the same error (a rank that stopped alone would leave the others waiting for its payloads).
        try:
            point = self._restore(path, model, relay, report) if path is not None else ResumePoint()
            mine = {"next_stage": point.next_stage, "path": str(path or "")}
            mine["run_id"] = self.run_id if path is not None else None
        except CheckpointError as error:
            self.session.exchange_text("resume", json.dumps({"error": str(error)}))
            raise
        told = [json.loads(text) for text in self.session.exchange_text("resume", json.dumps(mine))]
        point.next_stage = self._agree_on_resume(told)
        self.run_id = next(t["run_id"] for t in told if t["run_id"] is not None)
        relay.resume_at(point.next_stage)
        return point

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

    def _restore(self, path: Path, model: nn.Module, relay: Relay, report: SnakeReport) -> ResumePoint:
        """Loads a stage checkpoint into the model, the relay and the report, once every check passed."""
        checkpoint = StageCheckpoint.load(path)
        state = checkpoint.state
        if state["plan"] != [s.to_dict() for s in self.plan]:
            raise CheckpointError(f"Checkpoint {path} was written for another plan; resume with the same settings.")
        if state["fingerprint"] != self.spec.fingerprint:
            raise CheckpointError(f"Checkpoint {path} was written from another base model; load the same base.")
        rank = self.session.rank
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
        expected = {name: meta for layout in self.spec.layout.values() for name, meta in layout.items()}
        if set(checkpoint.parts) != set(expected) or any(
            (str(t.dtype).removeprefix("torch."), tuple(t.shape)) != expected[n] for n, t in checkpoint.parts.items()
        ):
            raise CheckpointError(f"Checkpoint {path} holds other tensors than this run trains (names or shapes).")
        named = dict(model.named_parameters()) | dict(model.named_buffers())
        with torch.no_grad():
            for name, tensor in checkpoint.parts.items():
                named[name].copy_(tensor)
        next_stage = int(state["next_stage"])
        in_stage = state.get("in_stage")
        relay.restore(state["versions"], state["checksums"], checkpoint.rng, next_stage)
        try:  # quantized payloads: the error-feedback residuals and the deltas this process forwards
            relay.load_deltas(path)
        except (OSError, ValueError, SafetensorError) as error:
            raise CheckpointError(
                f"Checkpoint {path}: its quantized-payload state cannot be read ({error})."
            ) from error
        if in_stage is not None:
            relay.applied = 2 * next_stage  # the stage was entered (its hop arrived) and has not closed
            damaged = [p for p in self.part_map.parts if relay.checksum(p) != state["part_checksums"][p]]
        else:
            holder = self.plan[next_stage - 1].node
            damaged = [p for p in self.part_map.parts if relay.checksum(p) != relay.ledger.checksums[holder][p]]
        if damaged:
            raise CheckpointError(f"Checkpoint {path}: parts {damaged} do not match their recorded checksums.")
        report.stages = [StageRecord(**record) for record in state["report"]["stages"]]
        report.hops = [HopRecord(**hop) for hop in state["report"]["hops"]]
        self.run_id = state["run_id"]
        point = ResumePoint(
            checkpoint=path, next_stage=next_stage, in_stage=in_stage, stage_start=checkpoint.stage_start
        )
        if not self.session.distributed and in_stage is None:
            # A boundary: the next stage's fresh optimizer, on the schedule at the checkpoint's step. (Inside a stage
            # Trainer loads the optimizer and scheduler; distributed: each stage seeks its own plan step.)
            point.schedule_step = int(state["global_step"])
        else:  # the sampler skips the batches of this rank's stages already trained (see SkipBatches)
            point.skip_own_steps = sum(s.steps for s in self.plan if s.node == rank and s.index < next_stage)
        logger.info(f"Resuming from {path} at stage {next_stage} (global step {state['global_step']}).")
        return point
