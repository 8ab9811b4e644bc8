"""The learning-rate schedule's scope: one schedule over the whole plan (`"run"`, as `Trainer`), or one per block group.

With `lr_schedule_scope="group"` each group runs the whole schedule (its warm-up and its decay) over its own stages:
the step of the plan where group g has trained `t` of its `T_g` steps reads the schedule at `t * T / T_g`, `T` being
the plan's steps. Under one run-wide linear decay, the group that trains last in a one-pass plan trains at a sixth
of the peak rate on average, the first at five sixths; per group, each one sees the schedule a centralized run gives
every parameter. The always-trainable modules (a head) train in every stage, so they follow each stage's group.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from torch.optim.lr_scheduler import LambdaLR

from ..plan import Stage


SCOPES = ("run", "group")
# Schedules that are not a function of the step count (they follow the loss): a group's clock cannot drive them.
_NOT_STEP_FUNCTIONS = ("reduce_lr_on_plateau", "greedy")


def check_schedule_scope(args, user_scheduler) -> None:
    """Refuses, before any work, a per-group scope that could not take effect."""
    if args.lr_schedule_scope != "group":
        return
    kind = getattr(args.lr_scheduler_type, "value", args.lr_scheduler_type)
    if kind in _NOT_STEP_FUNCTIONS:
        raise ValueError(
            f"`lr_schedule_scope='group'` runs the schedule once per block group as a function of the group's own "
            f"steps, but `lr_scheduler_type` ({kind!r}) follows the loss, not the step count; use a step schedule "
            "(e.g. 'linear', 'cosine') or lr_schedule_scope='run'."
        )
    if user_scheduler is not None:
        raise ValueError(
            f"`lr_schedule_scope='group'` re-times the scheduler Trainer builds from `lr_scheduler_type`, but "
            f"`optimizers` passes a scheduler of its own ({type(user_scheduler).__name__}); leave the scheduler to "
            "the trainer (optimizers=(your_optimizer, None)) or use lr_schedule_scope='run'."
        )


def group_positions(plan: Sequence[Stage]) -> list[float]:
    """For each optimizer step of `plan`, where the run-wide schedule is read for it under the per-group scope.

    Example:
        >>> from snake_hf.plan import serpentine_plan
        >>> group_positions(serpentine_plan(1, 2, steps=2))  # group 0 then group 1, 2 steps each, 4 in all
        [0.0, 2.0, 0.0, 2.0]
    """
    total = sum(stage.steps for stage in plan)
    per_group: dict[int, int] = {}
    for stage in plan:
        per_group[stage.group] = per_group.get(stage.group, 0) + stage.steps
    done: dict[int, int] = dict.fromkeys(per_group, 0)
    positions = []
    for stage in plan:
        for _ in range(stage.steps):
            positions.append(done[stage.group] * total / per_group[stage.group])
            done[stage.group] += 1
    return positions


def scope_scheduler(scheduler, plan: Sequence[Stage]) -> None:
    """Re-times a `LambdaLR` built over the plan's steps so that each block group runs it over its own steps."""
    if not isinstance(scheduler, LambdaLR):
        raise ValueError(
            f"`lr_schedule_scope='group'` needs a step-count schedule (a LambdaLR); the trainer built a "
            f"{type(scheduler).__name__}. Use a step schedule for `lr_scheduler_type`, or lr_schedule_scope='run'."
        )
    positions = group_positions(plan)
    total = float(len(positions))

    def per_group(schedule: Callable[[float], float]) -> Callable[[int], float]:
        def at(step: int) -> float:  # a plain function: LambdaLR's state_dict leaves it out, create_scheduler rebuilds
            return schedule(positions[step] if step < len(positions) else total)

        return at

    # Built a moment ago, the scheduler set the rates of step 0, where every clock reads 0: nothing to set again.
    scheduler.lr_lambdas = [per_group(schedule) for schedule in scheduler.lr_lambdas]
