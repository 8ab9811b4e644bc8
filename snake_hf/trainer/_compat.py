"""Every use of a private `Trainer`/`Accelerate` member lives here, with the versions it was checked against.

Checked against transformers 5.23.0 and 5.24.0, accelerate 1.15.0 and 1.16.0, peft 0.21.2, torch 2.13.0 (CPU); the
upper bounds in `pyproject.toml` stop at the next releases, which nobody has checked yet. (transformers 5.25.0 exists
on PyPI but needs `kernels>=0.19.1`, which PyPI does not carry yet, so pip resolves 5.24.0.)
"""

from __future__ import annotations

import math
import warnings
from pathlib import Path

import torch
from transformers import Trainer
from transformers.trainer_callback import ProgressCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, enable_full_determinism, set_seed


def remove_unused_columns(trainer: Trainer, dataset, description: str = "Training"):
    """`Trainer._remove_unused_columns`: drops dataset columns the model's forward does not take."""
    return trainer._remove_unused_columns(dataset, description=description)


def collator_with_removed_columns(trainer: Trainer, description: str = "Training"):
    """`Trainer._get_collator_with_removed_columns`, for datasets that are not `datasets.Dataset`."""
    return trainer._get_collator_with_removed_columns(trainer.data_collator, description=description)


def replace_optimizer(trainer: Trainer, old, optimizer: torch.optim.Optimizer) -> None:
    """Swaps the trainer's optimizer mid-run, dropping every reference to the old one.

    The old optimizer stays in `Accelerator._optimizers` (and its Adam state in memory) unless removed there; the
    LR scheduler keeps stepping and must drive the new optimizer (docs/pitfalls.md, "Trainer").
    """
    accelerator = trainer.accelerator
    accelerator._optimizers = [opt for opt in accelerator._optimizers if opt is not old]
    prepared = accelerator.prepare_optimizer(optimizer)
    trainer.optimizer = prepared
    scheduler = trainer.lr_scheduler
    if scheduler is not None:
        # torch LRScheduler internals (torch 2.13): it scales `base_lrs` per param group, LambdaLR by `lr_lambdas`.
        scheduler.optimizer = prepared
        scheduler.base_lrs = [group["initial_lr"] for group in prepared.param_groups]
        if hasattr(scheduler, "lr_lambdas"):
            scheduler.lr_lambdas = [scheduler.lr_lambdas[0]] * len(prepared.param_groups)
    trainer.callback_handler.optimizer = prepared


def progress_bar(trainer: Trainer):
    """The tqdm bar of `ProgressCallback` (its `training_bar` attribute), or None."""
    for callback in trainer.callback_handler.callbacks:
        if isinstance(callback, ProgressCallback):
            return getattr(callback, "training_bar", None)
    return None


def seek_plan_step(trainer: Trainer, step: int) -> None:
    """Moves a distributed node's `global_step` and LR schedule forward to the plan step where its stage starts.

    Each process runs only its own node's stages, but the plan has one schedule: before a stage the process skips the
    steps other nodes trained. `_globalstep_last_logged` (private) moves along so the logged loss averages only
    this process's steps. A no-op in simulation, where the global step is already there.
    """
    gap = step - trainer.state.global_step
    if gap <= 0:
        return
    trainer.state.global_step = step
    trainer._globalstep_last_logged = step
    advance_scheduler(trainer.lr_scheduler, gap)


def advance_scheduler(scheduler, steps: int) -> None:
    """Steps an LR scheduler `steps` times without optimizer steps (a schedule is a function of the step count)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "lr_scheduler.step() before optimizer.step()": intended here
        for _ in range(steps):
            scheduler.step()


def push_checkpoint(trainer: Trainer, folder: str) -> None:
    """`Trainer._push_from_checkpoint`: uploads a checkpoint according to `hub_strategy`."""
    trainer._push_from_checkpoint(folder)


def plan_training_values(
    values: tuple, epoch_steps: int, total_steps: int, accumulation: int, plan_epochs: bool
) -> tuple:
    """The length of a Snake run in the terms of `Trainer.set_initial_training_values` (checked on transformers
    5.23-5.24, whose tuple is `(num_train_epochs, num_update_steps_per_epoch, num_examples, num_train_samples,
    total_train_batch_size, steps_in_epoch, max_steps)`): epochs of `epoch_steps` optimizer steps over a schedule of
    `total_steps` (the whole plan's). With `plan_epochs`, as many epochs as cover the plan; otherwise one (a
    distributed process's own stages)."""
    _, _, examples, _, batch_size, _, _ = values
    epochs = math.ceil(total_steps / epoch_steps) if plan_epochs else 1
    return (
        epochs,
        epoch_steps,
        examples,
        total_steps * batch_size,
        batch_size,
        epoch_steps * accumulation,
        total_steps,
    )


def seed_for_model_init(args) -> None:
    """Seeds as `Trainer` does before it calls `model_init` (`full_determinism` or `set_seed`)."""
    if args.full_determinism:
        enable_full_determinism(args.seed)
    else:
        set_seed(args.seed)


def move_model_to_device(trainer: Trainer) -> None:
    """`Trainer._move_model_to_device` after a re-initialised model, as `Trainer.train` does."""
    if trainer.place_model_on_device:
        trainer._move_model_to_device(trainer.model, trainer.args.device)


def checkpoint_folder(trainer: Trainer, trial) -> Path:
    """The folder `Trainer._save_checkpoint` just wrote (`_get_output_dir(trial)/checkpoint-<global step>`)."""
    return Path(trainer._get_output_dir(trial=trial)) / f"{PREFIX_CHECKPOINT_DIR}-{trainer.state.global_step}"
