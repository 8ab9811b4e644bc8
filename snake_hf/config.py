"""`SnakeConfig`: `TrainingArguments` plus every Snake Learning setting, validated before any work is done."""

from __future__ import annotations

import copy
import os
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from transformers import TrainingArguments

from .calibration import FEATURE_COVARIANCES
from .capacity.planner import as_profiles, profiles_to_dicts
from .devices import place_rank
from .launch import TOPOLOGIES, current_launch, hide_launch_env
from .plan import GROUP_ORDERS, ON_NODE_FAILURE, Stage, load_plan
from .precision import PAYLOAD_DTYPES


__all__ = ["SnakeConfig"]

SCHEDULES = ("serpentine", "designated")
TRAIN_MODES = ("lora", "full")
ENGINES = ("auto", "simulation", "distributed")
PARTITIONS = ("iid", "dirichlet", "shard", "pathological", "length")
_REDACTED_SECRET = "<RUN_SECRET>"  # what dumps of a config show instead of its run_secret

# What `schedule` and `node_profiles` accept, for type checkers; `HfArgumentParser` (transformers 5.23-5.24) keeps the
# non-str member of a union and cannot parse a list of stages or dicts, so at run time the command line sees strings
# (a plan file, a profiles file) and Python callers may pass the lists, which __post_init__ converts.
if TYPE_CHECKING:
    ScheduleArg = str | list[Stage] | list[dict]
    ProfilesArg = str | list[dict] | None
else:
    ScheduleArg = str
    ProfilesArg = str | None


@dataclass
class SnakeConfig(TrainingArguments):
    r"""
    Configuration for [`SnakeTrainer`]: every field of `transformers.TrainingArguments`, plus the Snake Learning
    fields below. With one node, one group and one pass every `TrainingArguments` field means what it means for
    `Trainer`; with more, each has a Snake meaning (docs/trainer_conformance.md) or is refused where the run starts.

    **Length of training.** One *plan epoch* is `num_passes` passes over the (node, group) grid, each stage
    `stage_steps` optimizer steps (default: one epoch of its node's shard). `num_train_epochs` plan epochs run, as
    `Trainer` runs epochs (a fractional last one is cut short; `Trainer`'s epoch events, `eval_strategy="epoch"` and
    `save_strategy="epoch"` fall at plan-epoch ends). `max_steps > 0` fixes the length instead: the plan is cut at
    `max_steps` like `Trainer` cuts its epochs, or, when `max_steps` is shorter than one plan epoch and `stage_steps` is
    unset, every stage of one plan epoch is shortened in proportion so that every node still trains every group.

    Parameters:
        num_nodes (`int`, defaults to `1`):
            Number of nodes, each with a private shard. In distributed mode it must equal the world size; left at 1
            under a launcher, `SnakeTrainer` sets it to the world size where the run starts (rank = node).
        num_block_groups (`int`, *optional*):
            Number of contiguous block groups. Defaults to `num_nodes` (capped at the number of blocks); the
            designated schedule needs exactly `num_nodes`.
        group_boundaries (`list[int]`, *optional*):
            Explicit cut `[0, b1, ..., num_blocks]`: group g is blocks `[b_g, b_{g+1})`. Overrides `num_block_groups`.
        num_passes (`int`, defaults to `1`):
            Passes over the (node, group) grid in one plan epoch (`num_train_epochs` plan epochs run).
        stage_steps (`int`, *optional*):
            Optimizer steps per stage. `None` means one pass over the node's shard, counted the way `Trainer` counts
            an epoch: `ceil(batches / gradient_accumulation_steps)`.
        schedule (`str` or `list[Stage]`, defaults to `"serpentine"`):
            `"serpentine"`, `"designated"`, the path of a `snake_plan.json`, or a list of [`Stage`] (Python only).
        group_order (`str`, defaults to `"ascending"`):
            Serpentine group order per pass: `"ascending"`, `"alternate"` (reversed every other pass) or
            `"descending"` (top-down).
        group_learning_rate_scale (`list[float]`, *optional*):
            One factor per block group: a stage of group g trains its group at `learning_rate` x this list's g-th
            value (the always-trainable modules keep their own rate). Block-coordinate training gives each group a
            share of the steps, so larger steps than centralized training's often pay (benchmarks/lm_study.py).
        lr_schedule_scope (`str`, defaults to `"run"`):
            `"run"`: one `lr_scheduler_type` schedule over the whole plan, as `Trainer` runs it. `"group"`: each block
            group runs the whole schedule (warm-up and decay) over its own steps, as if each group were fine-tuned on
            its own; under one run-wide decay the group trained last trains at a fraction of the rate of the first.
            Needs a step-count schedule (not `"reduce_lr_on_plateau"`) built by the trainer.
        train_mode (`str`, *optional*):
            `"lora"`: the active group's LoRA adapters train and travel; `"full"`: the group's weights do. Unset, the
            trainer decides as `Trainer` would: `"lora"` for a `PeftModel` or with `peft_config`, else `"full"`. Either
            way only parameters that require grad train (a tensor the user froze stays frozen), and those outside the
            block list train in every stage as the `"shared"` part, which travels on every hop.
        block_list_path (`str`, *optional*):
            Dotted path of the block list for models where it is not found automatically (e.g. `"features"`).
        always_trainable_modules (`list[str]`, *optional*):
            Modules outside the blocks that train in every stage and travel when changed (a new head). In LoRA mode
            PEFT's `modules_to_save` are always included.
        partition (`str`, defaults to `"iid"`):
            How `train_dataset` is split over the nodes when it is one dataset: `"iid"`, `"dirichlet"`, `"shard"`,
            `"pathological"` or `"length"` (see `snake_hf.data.shards`). With one node the shard is the dataset itself.
        partition_label_column (`str`, defaults to `"label"`): label column for label-based partitions.
        partition_alpha (`float`, defaults to `0.5`): Dirichlet concentration (smaller = more skew).
        partition_min_size (`int`, defaults to `1`): smallest shard the Dirichlet partition accepts.
        partition_classes_per_node (`int`, defaults to `2`): labels per node for `"pathological"`.
        partition_shards_per_node (`int`, defaults to `2`): shards per node for `"shard"`.
        partition_strictness (`float`, defaults to `1.0`): 0 = IID, 1 = sorted by length, for `"length"`.
        partition_text_column (`str`, defaults to `"text"`): text column for `"length"` without a length column.
        engine (`str`, defaults to `"auto"`):
            `"simulation"` (all nodes in this process), `"distributed"` (one process per node over
            torch.distributed) or `"auto"` (distributed when launched with a world size above 1). The launcher's
            variables are read by `SnakeTrainer` where the run starts, once per process; a config holds no launch
            state, so copies and `to_dict()` round trips behave alike.
        topology (`str`, defaults to `"p2p"`):
            Distributed payload routing: `"p2p"` (straight to the next stage's node) or `"cs"` (through a
            coordinator rank).
        hop_timeout (`float`, defaults to `600.0`):
            Seconds a node waits for one payload before the hop fails.
        save_stages (`int`, defaults to `1`):
            With `save_strategy` other than `"no"`: besides `Trainer`'s own checkpoints (`save_strategy`, `save_steps`,
            the end of training, `"best"`), one at every this many stage boundaries; 0 adds none. Every checkpoint
            resumes exactly (mid-stage ones too). Distributed runs checkpoint per rank after each of its own stages
            instead (`output_dir/node-<rank>`; see `snake_hf.trainer.resume`).
        local_shard (`bool`, defaults to `False`):
            Distributed mode: `train_dataset` is this process's own shard (e.g. a per-node file only this node
            loaded); the nodes tell each other only their shard sizes. Otherwise every process gets the same dataset
            and takes its node's slice of the seeded partition.
        distill_alpha (`float`, defaults to `0.0`):
            Weight λ of distillation from the model as it arrived at the stage: loss = (1-λ)·task + λ·T²·KL.
            0 turns it off (no teacher forward at all).
        distill_temperature (`float`, defaults to `2.0`): distillation temperature T.
        logit_adjustment (`float`, defaults to `0.0`):
            Classification only: train on logits + τ·log(node label prior) (τ = this value); 0 turns it off.
        restrict_to_node_classes (`bool`, defaults to `False`):
            Classification only: mask the classes a node does not hold out of its softmax.
        node_class_min_share (`float`, defaults to `0.0`):
            With `logit_adjustment` or `restrict_to_node_classes`: a class below this share of a node's labels
            counts as absent there (masked out of its softmax; its few examples left out of the loss). 0.01 turns a
            shard of 2,638 negatives and 1 positive into a one-class shard, which then adds no gradient at all.
        head_learning_rate (`float`, *optional*):
            Learning rate of the always-trainable modules (e.g. a new head), scheduled like the others.
        proximal_mu (`float`, defaults to `0.0`):
            Weight μ of a proximal term μ/2·‖w − w_start‖² on the stage's trainable tensors, towards the values the
            stage started from (FedProx-like; `snake_hf.losses.ProximalTerm`). 0 turns it off.
        head_calibration (`str`, *optional*):
            Classification: after the last stage, a final pass over the nodes gathers per-class feature statistics of
            the classifier's input (count, mean and `"diagonal"` variances or `"full"` covariances) and re-fits the
            classifier (the last trainable `nn.Linear`) on virtual features drawn from the pooled Gaussians (CCVR,
            `snake_hf.calibration`). The statistics travel as counted payload parts; they reveal each node's class
            counts and per-class feature means and spreads. Simulation and distributed runs (p2p, cs). Unset: off.
        head_calibration_samples (`int`, defaults to `500`): virtual features drawn per class.
        head_calibration_steps (`int`, defaults to `200`): full-batch Adam steps (lr 0.01) of the re-fit.
        recompute_batchnorm (`bool`, defaults to `False`):
            After the last stage, a final pass over the nodes recomputes every batch-norm layer's running statistics
            on each node's shard with the final model and pools them, weighted by shard size (before a head
            calibration, which then sees them). Simulation and distributed runs (p2p, cs).
        node_profiles (`str` or `list[dict]`, *optional*):
            One profile per node — `memory_bytes` (e.g. "2GiB"), `speed` (relative), `num_examples` — or the path of
            a YAML/JSON file of them (see `snake_hf.capacity.planner.NodeProfile`). With the designated schedule the blocks
            are cut and placed by the profiles (a node with little memory owns an upper group); with any schedule a
            plan that does not fit a node's memory is refused before training.
        profile_size_by (`str`, defaults to `"memory"`):
            Designated cut: group sizes follow each node's `"memory"`, `"speed"`, or are `"equal"`.
        scale_steps_by (`str`, *optional*):
            `"speed"`: a faster node takes proportionally more steps per stage (stage wall times even out);
            `"data"`: a node with more examples takes more steps (data-rich nodes weigh more). Scaled around the mean.
        profile_seq_len (`int`, *optional*):
            Sequence length the memory estimate assumes (default: the longest `input_ids` in the training data).
        payload_dtype (`str`, defaults to `"float32"`):
            Widest floating-point dtype on the wire: `"float32"`, `"bfloat16"` or `"float16"`. Wider tensors are cast
            on encode and cast back into the model's dtype on receipt (the model trains in its own dtype); the trained
            parts are rounded to these values on the node that trained them too, so every node holds exactly what a
            receiver would. `"bfloat16"` halves the bytes of a float32 model's payloads. `"int8"` and `"int4"` send
            each part as a block-quantized delta (float16 scales) with error feedback, at 0.254x and 0.133x of float32
            tensor bytes; the trained parts take their reconstructed values when the stage closes, so again every node
            holds exactly what a receiver holds (docs/payload_compression.md).
        master_dtype (`str`, *optional*):
            `"float32"`: the group in training keeps float32 master copies of its half-precision weights for its
            stage; the optimizer steps the masters and the model takes their rounding after each step, so updates
            smaller than half a bfloat16 step accumulate instead of vanishing (what mixed-precision training does).
            The rounded weights travel (payload bytes unchanged); the masters are in the optimizer's state, so a
            resume inside a stage is exact. Unset: the group trains in the dtype the model was loaded in, as
            `Trainer` trains it. Float32 parameters (LoRA adapters) are unaffected (snake_hf.master_weights).
        recompute_above_group (`bool`, defaults to `False`):
            Wrap every block above the active group in non-reentrant `torch.utils.checkpoint` during its stage: their
            activations are recomputed in backward instead of stored (only each block's input is kept). Losses and
            gradients are unchanged; blocks below the group stay frozen without a graph. Not the same as
            `gradient_checkpointing`, which must stay off.
        lm_loss_chunk_tokens (`int`, defaults to `0`):
            Causal LM training: compute the next-token loss from the final hidden states in chunks of this many
            tokens, recomputing each chunk's logits in backward, so the full batch x sequence x vocabulary logits are
            never held (`snake_hf.lm_loss`). Same loss up to float rounding; 0 turns it off. Not with distillation,
            logit adjustment, class restriction or label smoothing (they need the logits).
        on_node_failure (`str`, defaults to `"replan"`):
            Distributed cs topology: what the coordinator does with the remaining stages of a node that stops
            answering within `hop_timeout`. `"replan"`: each goes to the node of the nearest earlier stage on a live
            node (it already holds the newest state; same group and steps, on its own shard); `"drop"`: they are
            skipped. Either way the run finishes on the live nodes and `snake_report.json` lists the failure (see
            `snake_hf.engine.coordinator`). A dead coordinator (rank 0) is not survivable; p2p runs stop with
            `HopTimeoutError` and resume from their stage checkpoints.
        run_secret (`str`, *optional*):
            Distributed mode: a secret shared by every rank of the run (at least 16 characters; when unset, the
            `SNAKE_RUN_SECRET` environment variable or the file `SNAKE_RUN_SECRET_FILE` names). Every rank then
            proves it holds it when it joins, and every payload and engine message is authenticated (HMAC-SHA256),
            so nobody without it can take part or have a forged payload loaded (docs/security.md). It is never
            logged or saved: `to_dict()`, `str()` and dumps show `"<RUN_SECRET>"`, and a pickled config
            (`training_args.bin`) holds `None`.
    """

    num_nodes: int = field(default=1, metadata={"help": "Number of nodes, each with a private data shard."})
    num_block_groups: int | None = field(
        default=None, metadata={"help": "Number of contiguous block groups (default: num_nodes, capped at blocks)."}
    )
    group_boundaries: list[int] | None = field(
        default=None, metadata={"help": "Explicit group cut [0, b1, ..., num_blocks]; overrides num_block_groups."}
    )
    num_passes: int = field(default=1, metadata={"help": "Passes over the (node, group) grid per plan epoch."})
    stage_steps: int | None = field(
        default=None, metadata={"help": "Optimizer steps per stage (default: one pass over the node's shard)."}
    )
    schedule: ScheduleArg = field(
        default="serpentine",
        metadata={"help": "'serpentine', 'designated', or the path of a snake_plan.json (a list of Stage in Python)."},
    )
    group_order: str = field(
        default="ascending",
        metadata={"help": "Serpentine group order per pass: 'ascending', 'alternate' or 'descending' (top-down)."},
    )
    group_learning_rate_scale: list[float] | None = field(
        default=None, metadata={"help": "One learning-rate factor per block group (the group's stages use lr x it)."}
    )
    lr_schedule_scope: str = field(
        default="run",
        metadata={"help": "'run': one LR schedule over the plan (as Trainer); 'group': one per block group."},
    )
    train_mode: str | None = field(
        default=None,
        metadata={"help": "'lora' (adapters train and travel), 'full', or unset: lora with a PEFT model, else full."},
    )
    block_list_path: str | None = field(
        default=None, metadata={"help": "Dotted path of the block list when it is not found automatically."}
    )
    always_trainable_modules: list[str] | None = field(
        default=None, metadata={"help": "Modules outside the blocks that train in every stage (e.g. a new head)."}
    )
    partition: str = field(
        default="iid", metadata={"help": "Node split of train_dataset: iid, dirichlet, shard, pathological, length."}
    )
    partition_label_column: str = field(default="label", metadata={"help": "Label column for label-based splits."})
    partition_alpha: float = field(default=0.5, metadata={"help": "Dirichlet concentration (smaller = more skew)."})
    partition_min_size: int = field(default=1, metadata={"help": "Smallest shard the Dirichlet split accepts."})
    partition_classes_per_node: int = field(default=2, metadata={"help": "Labels per node for 'pathological'."})
    partition_shards_per_node: int = field(default=2, metadata={"help": "Shards per node for 'shard'."})
    partition_strictness: float = field(default=1.0, metadata={"help": "Length skew: 0 = IID, 1 = sorted."})
    partition_text_column: str = field(default="text", metadata={"help": "Text column for the 'length' split."})
    engine: str = field(default="auto", metadata={"help": "'simulation', 'distributed' or 'auto'."})
    topology: str = field(default="p2p", metadata={"help": "Distributed payload routing: 'p2p' or 'cs'."})
    hop_timeout: float = field(default=600.0, metadata={"help": "Seconds to wait for one payload."})
    save_stages: int = field(
        default=1, metadata={"help": "Also checkpoint every this many stage boundaries (0: only Trainer's own)."}
    )
    local_shard: bool = field(
        default=False, metadata={"help": "Distributed: train_dataset is this process's own shard only."}
    )
    distill_alpha: float = field(default=0.0, metadata={"help": "Distillation weight λ (0 = off)."})
    distill_temperature: float = field(default=2.0, metadata={"help": "Distillation temperature T."})
    logit_adjustment: float = field(
        default=0.0, metadata={"help": "Classification: logits + τ·log(node label prior) in the loss (0 = off)."}
    )
    restrict_to_node_classes: bool = field(
        default=False, metadata={"help": "Classification: softmax only over the classes the node holds."}
    )
    node_class_min_share: float = field(
        default=0.0,
        metadata={"help": "Classes below this share of a node's labels count as absent for the label-skew losses."},
    )
    head_learning_rate: float | None = field(
        default=None, metadata={"help": "Learning rate of the always-trainable modules (e.g. a new head)."}
    )
    proximal_mu: float = field(
        default=0.0, metadata={"help": "Proximal term μ/2·‖w − w_stage_start‖² on the stage's tensors (0 = off)."}
    )
    head_calibration: str | None = field(
        default=None,
        metadata={"help": "After the last stage, re-fit the classifier on pooled class Gaussians: diagonal or full."},
    )
    head_calibration_samples: int = field(default=500, metadata={"help": "Virtual features per class (calibration)."})
    head_calibration_steps: int = field(default=200, metadata={"help": "Adam steps of the head re-fit (calibration)."})
    recompute_batchnorm: bool = field(
        default=False, metadata={"help": "After the last stage, pool batch-norm statistics over every node's shard."}
    )
    node_profiles: ProfilesArg = field(
        default=None, metadata={"help": "Node profiles (memory_bytes, speed, num_examples): a YAML/JSON file path."}
    )
    profile_size_by: str = field(default="memory", metadata={"help": "Designated cut by 'memory', 'speed', 'equal'."})
    scale_steps_by: str | None = field(
        default=None, metadata={"help": "Scale steps per node by 'speed' or by 'data' (shard size)."}
    )
    profile_seq_len: int | None = field(default=None, metadata={"help": "Sequence length of the memory estimate."})
    payload_dtype: str = field(
        default="float32",
        metadata={"help": "Wire format: float32, bfloat16, float16, or int8/int4 quantized deltas."},
    )
    master_dtype: str | None = field(
        default=None,
        metadata={"help": "'float32': float32 master weights for the group in training over a half-precision model."},
    )
    recompute_above_group: bool = field(
        default=False, metadata={"help": "Recompute (checkpoint) the blocks above the active group in backward."}
    )
    lm_loss_chunk_tokens: int = field(
        default=0, metadata={"help": "Causal LM: loss from hidden states in chunks of this many tokens (0 = off)."}
    )
    on_node_failure: str = field(
        default="replan", metadata={"help": "cs topology, a node stops answering: 'replan' its stages or 'drop' them."}
    )
    run_secret: str | None = field(
        default=None,
        repr=False,
        metadata={
            "help": "Distributed: secret shared by every rank, authenticating ranks and payloads (never saved)."
        },
    )

    def __post_init__(self):
        super().__post_init__()
        self._validate_snake_fields()

    @cached_property
    def _setup_devices(self) -> torch.device:
        # TrainingArguments builds accelerate's PartialState here, from the environment: under a launcher it would see
        # a distributed world (DDP wrap, sharded dataloader, all-gathers every step), which hangs a Snake run where one
        # rank trains at a time. Each rank trains single-process (DESIGN §5), so the launcher's variables are hidden
        # while the state is built and put back at once: a config changes nothing outside itself. The trainer reads the
        # launch where the run starts (`snake_hf.launch.process_launch`).
        # A launched rank then takes the GPU of its local rank, alone (`snake_hf.devices`).
        launch = current_launch()
        with hide_launch_env():
            device = super()._setup_devices
        return place_rank(self, device, launch.local_rank if launch is not None else None)

    def _validate_snake_fields(self) -> None:
        _require(self.num_nodes >= 1, "num_nodes", self.num_nodes, "use at least 1 node")
        if self.num_block_groups is not None:
            _require(self.num_block_groups >= 1, "num_block_groups", self.num_block_groups, "use at least 1 group")
        if self.group_boundaries is not None:
            bounds = list(self.group_boundaries)
            ok = len(bounds) >= 2 and bounds[0] == 0 and all(a < b for a, b in zip(bounds, bounds[1:]))
            _require(ok, "group_boundaries", bounds, "give [0, b1, ..., num_blocks], strictly increasing")
            if self.num_block_groups is not None and self.num_block_groups != len(bounds) - 1:
                raise ValueError(
                    f"`num_block_groups` ({self.num_block_groups}) disagrees with `group_boundaries` ({bounds}, "
                    f"{len(bounds) - 1} groups); set only one of them."
                )
        _require(self.num_passes >= 1, "num_passes", self.num_passes, "use at least 1 pass")
        if self.stage_steps is not None:
            _require(self.stage_steps >= 1, "stage_steps", self.stage_steps, "use None (one shard pass) or >= 1")
        self._validate_schedule()
        _require(self.save_stages >= 0, "save_stages", self.save_stages, "use 0 (none), 1 (every stage) or more")
        _require(
            self.group_order in GROUP_ORDERS,
            "group_order",
            self.group_order,
            f"use one of {', '.join(map(repr, GROUP_ORDERS))}",
        )
        _require(self.lr_schedule_scope in ("run", "group"), "lr_schedule_scope", self.lr_schedule_scope,
                 "use 'run' (one schedule over the plan) or 'group' (one per block group)")  # fmt: skip
        if self.group_learning_rate_scale is not None:
            scales = self.group_learning_rate_scale
            _require(
                _positive_numbers(scales),
                "group_learning_rate_scale",
                scales,
                "use a list of positive factors, one per block group",
            )
            self.group_learning_rate_scale = [float(x) for x in scales]
        self._validate_modes_and_losses()
        self._validate_profiles_wire_and_length()

    def _validate_modes_and_losses(self) -> None:
        _require(self.train_mode in (None, *TRAIN_MODES), "train_mode", self.train_mode,
                 "use 'lora', 'full', or leave it unset")  # fmt: skip
        _require(self.partition in PARTITIONS, "partition", self.partition, f"use one of {list(PARTITIONS)}")
        _require(self.engine in ENGINES, "engine", self.engine, f"use one of {list(ENGINES)}")
        _require(self.topology in TOPOLOGIES, "topology", self.topology, "use 'p2p' or 'cs'")
        _require(self.hop_timeout > 0, "hop_timeout", self.hop_timeout, "use a positive number of seconds")
        _require(0.0 <= self.distill_alpha <= 1.0, "distill_alpha", self.distill_alpha, "use a weight in [0, 1]")
        _require(self.distill_temperature > 0, "distill_temperature", self.distill_temperature, "use T > 0")
        _require(self.logit_adjustment >= 0, "logit_adjustment", self.logit_adjustment, "use τ >= 0 (1.0 is usual)")
        _require(0.0 <= self.node_class_min_share < 1.0, "node_class_min_share", self.node_class_min_share,
                 "use a share in [0, 1), e.g. 0.01")  # fmt: skip
        _require(self.proximal_mu >= 0, "proximal_mu", self.proximal_mu, "use μ >= 0 (e.g. 0.01), 0 turns it off")
        _require(self.head_calibration in (None, *FEATURE_COVARIANCES), "head_calibration", self.head_calibration,
                 "use 'diagonal', 'full', or leave it unset")  # fmt: skip
        _require(self.head_calibration_samples >= 2, "head_calibration_samples", self.head_calibration_samples,
                 "use at least 2 virtual features per class, e.g. 500")  # fmt: skip
        _require(self.head_calibration_steps >= 1, "head_calibration_steps", self.head_calibration_steps,
                 "use at least 1 step, e.g. 200")  # fmt: skip
        _require(self.profile_size_by in ("memory", "speed", "equal"), "profile_size_by", self.profile_size_by,
                 "use 'memory', 'speed' or 'equal'")  # fmt: skip
        _require(self.scale_steps_by in (None, "speed", "data"), "scale_steps_by", self.scale_steps_by,
                 "use 'speed', 'data' or leave it unset")  # fmt: skip

    def _validate_profiles_wire_and_length(self) -> None:
        if self.node_profiles is not None:
            # Values now; the count here when num_nodes is set (under a launcher num_nodes may come from the world
            # size, so the trainer checks the count again where the run starts).
            profiles = as_profiles(self.node_profiles, self.num_nodes if self.num_nodes > 1 else None)
            if not isinstance(self.node_profiles, (str, os.PathLike)):
                self.node_profiles = profiles_to_dicts(profiles)  # plain data keeps to_json_string working
            if self.schedule == "designated" and self.group_boundaries is not None:
                raise ValueError(
                    "`group_boundaries` is set with the designated schedule and `node_profiles`; the profiles decide "
                    "the cut: unset group_boundaries, or drop node_profiles."
                )
        if self.scale_steps_by == "speed" and self.node_profiles is None:
            raise ValueError("`scale_steps_by` is 'speed' but no `node_profiles` give the speeds; set node_profiles.")
        _require(self.payload_dtype in PAYLOAD_DTYPES, "payload_dtype", self.payload_dtype,
                 f"use one of {list(PAYLOAD_DTYPES)}")  # fmt: skip
        _require(self.master_dtype in (None, "float32"), "master_dtype", self.master_dtype,
                 "use 'float32' (float32 master weights for the group in training), or leave it unset")  # fmt: skip
        _require(self.lm_loss_chunk_tokens >= 0, "lm_loss_chunk_tokens", self.lm_loss_chunk_tokens,
                 "use 0 (off) or a number of tokens, e.g. 128")  # fmt: skip
        secret = self.run_secret  # the message never shows the secret, only what is wrong with it
        if secret is not None and (not isinstance(secret, str) or len(secret) < 16 or secret == _REDACTED_SECRET):
            raise ValueError(
                "`run_secret` is not valid: use a string of at least 16 random characters (not the "
                f"{_REDACTED_SECRET!r} a config dump shows), e.g. `python -c 'import secrets; "
                "print(secrets.token_hex(32))'`, the same on every rank."
            )
        _require(self.on_node_failure in ON_NODE_FAILURE, "on_node_failure", self.on_node_failure,
                 "use 'replan' (move a dead node's stages to a live node) or 'drop' (skip them)")  # fmt: skip
        if self.lm_loss_chunk_tokens and (
            self.distill_alpha > 0 or self.logit_adjustment > 0 or self.restrict_to_node_classes
            or self.label_smoothing_factor > 0 or self.proximal_mu > 0
        ):  # fmt: skip
            raise ValueError(
                f"`lm_loss_chunk_tokens` ({self.lm_loss_chunk_tokens}) never materialises the logits, which "
                "distillation, logit adjustment, restrict_to_node_classes and label smoothing need (and proximal_mu "
                "adds its term on that same path); set it to 0 or turn those off."
            )
        if self.head_learning_rate is not None:
            _require(self.head_learning_rate > 0, "head_learning_rate", self.head_learning_rate, "use a rate > 0")
        if (self.max_steps is None or self.max_steps <= 0) and not self.num_train_epochs > 0:
            raise ValueError(
                f"`num_train_epochs` ({self.num_train_epochs}) gives a run of no steps; use a positive number of plan "
                "epochs, or set `max_steps`."
            )
        if self.activation_checkpointing:
            raise ValueError(
                "`activation_checkpointing` (gradient_checkpointing) is True; through Trainer it makes the embedding "
                "outputs require grad, so backward runs through every frozen block and Snake's memory saving is lost. "
                "Set it to False."
            )

    def _validate_schedule(self) -> None:
        schedule = self.schedule
        if isinstance(schedule, (list, tuple)):
            self.schedule = [s if isinstance(s, Stage) else Stage.from_dict(s) for s in schedule]
            return
        if schedule in SCHEDULES:
            if schedule == "designated" and self.num_nodes > 1 and self.num_block_groups not in (None, self.num_nodes):
                raise ValueError(
                    f"`num_block_groups` ({self.num_block_groups}) must equal `num_nodes` ({self.num_nodes}) for the "
                    "designated schedule (one group per node); unset it or use schedule='serpentine'."
                )
            return
        if isinstance(schedule, (str, os.PathLike)) and Path(schedule).is_file():
            self.schedule = load_plan(schedule)
            return
        raise ValueError(
            f"`schedule` ({schedule!r}) must be 'serpentine', 'designated', the path of an existing snake_plan.json, "
            "or a list of Stage."
        )

    def to_dict(self) -> dict:
        # TrainingArguments.to_dict cannot serialise a list of Stage dataclasses (docs/pitfalls.md); store them as dicts.
        data = super().to_dict()
        if isinstance(self.schedule, list):
            data["schedule"] = [stage.to_dict() for stage in self.schedule]
        if self.run_secret is not None:  # as TrainingArguments hides `*_token` fields; every dump goes through here
            data["run_secret"] = _REDACTED_SECRET
        return data

    # The run secret never leaves the process: not in str()/repr() (logs), not in a pickle (`training_args.bin` in
    # every checkpoint), while copies made in the process keep it.
    def __str__(self) -> str:
        if self.run_secret is None:
            return super().__str__()
        shown = copy.copy(self)  # a shallow copy with the placeholder: this config is left as it is
        shown.run_secret = _REDACTED_SECRET
        return TrainingArguments.__str__(shown)

    __repr__ = __str__

    def __getstate__(self) -> dict:
        return {**self.__dict__, "run_secret": None}

    def __copy__(self) -> SnakeConfig:
        clone = type(self).__new__(type(self))
        clone.__dict__.update(self.__dict__)
        return clone

    def __deepcopy__(self, memo: dict) -> SnakeConfig:
        clone = type(self).__new__(type(self))
        memo[id(self)] = clone
        clone.__dict__.update(copy.deepcopy(self.__dict__, memo))
        return clone

    def partition_kwargs(self) -> dict:
        """Arguments of the partitioner named by `partition` (see `snake_hf.data.shards.make_partitioner`)."""
        label = {"label_column": self.partition_label_column}
        return {
            "iid": {},
            "dirichlet": {**label, "alpha": self.partition_alpha, "min_size": self.partition_min_size},
            "shard": {**label, "shards_per_node": self.partition_shards_per_node},
            "pathological": {**label, "classes_per_node": self.partition_classes_per_node},
            "length": {"text_column": self.partition_text_column, "strictness": self.partition_strictness},
        }[self.partition]


def _positive_numbers(values) -> bool:
    try:
        return isinstance(values, (list, tuple)) and len(values) > 0 and all(float(x) > 0 for x in values)
    except (TypeError, ValueError):
        return False


def _require(ok: bool, name: str, value, fix: str) -> None:
    if not ok:
        raise ValueError(f"`{name}` ({value!r}) is not valid; {fix}.")
