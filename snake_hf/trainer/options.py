"""`Trainer` options checked where a Snake run starts: those it refuses (with why and the fix), and an optimizer the
user passed (`optimizers=`), which each later stage rebuilds. See docs/trainer_conformance.md."""

from __future__ import annotations

from torch import nn
from transformers import EarlyStoppingCallback

from ..blocks import PartMap
from ..config import SnakeConfig
from ..engine.session import Session
from ..plan import Stage


__all__ = ["check_resume_options", "check_trainer_options", "check_user_optimizer"]

# `TrainingArguments` options that Snake refuses, with why and what to do instead: (field, refused values or a test,
# the reason and fix). Checked where the run starts, before any work.
_REFUSED = (
    ("auto_find_batch_size", lambda v: v is True,
     "it retries training with smaller batches, while the plan's stage lengths were cut for this batch size; set "
     "per_device_train_batch_size to one that fits"),
    ("train_sampling_strategy", lambda v: str(v) not in ("random", "TrainSamplingStrategy.RANDOM"),
     "each Snake node reads its shard in its own seeded random order (snake_hf.data.sampler); use 'random'"),
    ("fsdp", lambda v: bool(v),
     "each Snake node trains in one process and holds one group's trainable state; leave fsdp unset"),
    ("deepspeed", lambda v: v is not None,
     "each Snake node trains in one process and holds one group's trainable state; leave deepspeed unset"),
)  # fmt: skip
# Options that work in simulation but not with one process per node (each process's loop runs its own stages only).
_REFUSED_DISTRIBUTED = (
    ("eval_strategy", lambda v: str(v).endswith("epoch"),
     "a distributed process's loop holds only its own stages, so plan epochs do not end in it; use 'steps'"),
    ("save_strategy", lambda v: str(v).endswith(("epoch", "best")),
     "distributed ranks checkpoint after each of their own stages (save_stages does not apply); use 'steps' or 'no'"),
    ("load_best_model_at_end", lambda v: v is True,
     "distributed ranks keep stage checkpoints of their own stages only, so no rank can rank them all; load the best "
     "checkpoint yourself after the run, or use the simulation engine"),
)  # fmt: skip


def check_trainer_options(args: SnakeConfig, session: Session, callbacks) -> None:
    """Refuses, before any work, the `Trainer` options a Snake run cannot honour (docs/trainer_conformance.md)."""
    tables = [(_REFUSED, "")] + ([(_REFUSED_DISTRIBUTED, " in distributed mode")] if session.distributed else [])
    for table, where in tables:
        for name, refuses, why in table:
            value = getattr(args, name, None)
            if refuses(value):
                raise ValueError(f"`{name}` ({value!r}) is not supported by SnakeTrainer{where}: {why}.")
    if session.distributed:
        for callback in callbacks or ():
            if issubclass(callback if isinstance(callback, type) else type(callback), EarlyStoppingCallback):
                raise ValueError(
                    "EarlyStoppingCallback is not supported in distributed mode: a rank that stops early leaves the "
                    "next node waiting for its payload; stop by max_steps / num_train_epochs, or use the simulation "
                    "engine."
                )


def check_resume_options(args: SnakeConfig, plan: list[Stage], resume_from_checkpoint) -> None:
    """Refuses, before any work, a resume that `Trainer`'s options would make train one node on another's data."""
    resuming = resume_from_checkpoint not in (None, False)
    if resuming and args.ignore_data_skip and len({stage.node for stage in plan}) > 1:
        raise ValueError(
            "`ignore_data_skip` (True) is not supported when resuming a SnakeTrainer run of several nodes: each "
            "node's batches are tied to its stages, so restarting the data at its first batch would train the "
            "resumed stage on another node's (private) batches. Set ignore_data_skip=False: the resume skips "
            "exactly the batches already trained."
        )


def check_user_optimizer(optimizer, model: nn.Module, part_map: PartMap, plan: list[Stage]):
    """An optimizer passed as `optimizers=(optimizer, scheduler)`: trains the first stage as it is, and is rebuilt for
    each later stage as its class with its defaults over that stage's parameters. Returns `(class, defaults)` (None
    when none was passed); refuses one that cannot do that."""
    if optimizer is None:
        return None
    params = {id(p) for group in optimizer.param_groups for p in group["params"]}
    named = dict(model.named_parameters())
    first = plan[0].group if plan else 0
    if not any(id(named[n]) in params for n in part_map.trainable_names(first) if n in named):
        raise ValueError(
            f"The optimizer passed in `optimizers` ({type(optimizer).__name__}) holds none of the parameters that "
            "train (it was built before the model was wrapped with peft_config?); build it over the trainer's model "
            "(e.g. a PeftModel you wrap yourself), or pass optimizer_cls_and_kwargs instead."
        )
    stages_differ = len({stage.group for stage in plan}) > 1
    keys = set(optimizer.defaults)
    distinct = {tuple(sorted((k, repr(g.get(k))) for k in keys)) for g in optimizer.param_groups}
    if stages_differ and len(distinct) > 1:
        raise ValueError(
            f"The optimizer passed in `optimizers` has {len(optimizer.param_groups)} param groups with their own "
            "hyperparameters; Snake rebuilds it for each stage's group from its class and defaults, which would drop "
            "them. Pass one param group, or optimizer_cls_and_kwargs, or override create_optimizer."
        )
    return type(optimizer), dict(optimizer.defaults)
