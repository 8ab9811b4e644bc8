"""Plans: which node trains which block group, in what order, for how many steps.

A plan is plain data: an ordered list of [`Stage`]s. The builders here are pure functions (no torch) so that a
plan can be printed, saved to `snake_plan.json`, reviewed and tested in milliseconds.

Two built-in shapes (DESIGN §3):

* [`serpentine_plan`]: rows are groups, columns are nodes; the node direction flips on every row and carries on
  across pass boundaries, so consecutive stages share a node (no hop) or a group (a hop between neighbours).
* [`designated_plan`]: one group per node; each pass visits the owners in group order, the next pass in reverse.

Consecutive identical stages (same node, same group) are always merged into one stage with both stages' steps.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path


__all__ = [
    "GROUP_ORDERS",
    "ON_NODE_FAILURE",
    "Stage",
    "cut_plan",
    "designated_plan",
    "fit_plan",
    "format_plan",
    "load_plan",
    "plan_from_json",
    "plan_steps",
    "plan_to_json",
    "replan_after_failure",
    "save_plan",
    "serpentine_plan",
    "validate_plan",
]

PLAN_FILE = "snake_plan.json"


@dataclass(frozen=True)
class Stage:
    """One stage of a plan: node `node` trains block group `group` for `steps` optimizer steps on its own shard.

    Args:
        index (`int`): position of the stage in the plan (0-based, contiguous).
        pass_index (`int`): which pass over the (node, group) grid the stage belongs to.
        node (`int`): the node (rank, in distributed mode) that trains.
        group (`int`): the block group that trains, numbered bottom (0) to top.
        steps (`int`): optimizer steps, at least 1.

    Example:
        ```python
        >>> Stage(index=0, pass_index=0, node=1, group=2, steps=10)
        Stage(index=0, pass_index=0, node=1, group=2, steps=10)
        ```
    """

    index: int
    pass_index: int
    node: int
    group: int
    steps: int

    def to_dict(self) -> dict[str, int]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> Stage:
        missing = {"node", "group", "steps"} - set(data)
        if missing:
            raise ValueError(f"A stage needs the keys node, group and steps; {sorted(missing)} missing in {data}.")
        return cls(
            index=int(data.get("index", 0)),
            pass_index=int(data.get("pass_index", 0)),
            node=int(data["node"]),
            group=int(data["group"]),
            steps=int(data["steps"]),
        )


GROUP_ORDERS = ("ascending", "alternate", "descending")


def _per_node_steps(steps: int | Sequence[int], num_nodes: int) -> list[int]:
    if isinstance(steps, int):
        per_node = [steps] * num_nodes
    else:
        per_node = [int(s) for s in steps]
        if len(per_node) != num_nodes:
            raise ValueError(
                f"`steps` has {len(per_node)} entries but there are {num_nodes} nodes; give one per node."
            )
    for node, value in enumerate(per_node):
        if value < 1:
            raise ValueError(f"`steps` for node {node} is {value}; every stage needs at least 1 optimizer step.")
    return per_node


def _check_positive(name: str, value: int) -> None:
    if not isinstance(value, int) or value < 1:
        raise ValueError(f"`{name}` ({value!r}) must be a positive integer.")


def _merge_and_number(raw: list[tuple[int, int, int, int]]) -> list[Stage]:
    """Merges consecutive (node, group) repeats into one stage and numbers the result."""
    merged: list[list[int]] = []
    for pass_index, node, group, steps in raw:
        if merged and merged[-1][1] == node and merged[-1][2] == group:
            merged[-1][3] += steps  # the turn of a ping-pong: same node, same group, no reason to stop
        else:
            merged.append([pass_index, node, group, steps])
    return [Stage(index=i, pass_index=p, node=n, group=g, steps=s) for i, (p, n, g, s) in enumerate(merged)]


def serpentine_plan(
    num_nodes: int,
    num_groups: int,
    num_passes: int = 1,
    steps: int | Sequence[int] = 1,
    group_order: str = "ascending",
) -> list[Stage]:
    """Builds the serpentine plan of DESIGN §3.

    Each pass visits every (node, group) pair once. Groups follow `group_order`; the node direction alternates from
    one row (group) to the next and carries on across passes, so the snake never jumps.

    Args:
        num_nodes (`int`): number of nodes N.
        num_groups (`int`): number of block groups G.
        num_passes (`int`, defaults to 1): passes over the grid.
        steps (`int` or `Sequence[int]`, defaults to 1): optimizer steps per stage, or one value per node.
        group_order (`str`, defaults to `"ascending"`): `"ascending"` (0..G-1 every pass), `"alternate"`
            (0..G-1, then G-1..0, ...) or `"descending"` (top-down: G-1..0 every pass).

    Returns:
        `list[Stage]`: the plan, with consecutive identical stages merged.

    Example:
        ```python
        >>> [(s.node, s.group) for s in serpentine_plan(3, 2)]
        [(0, 0), (1, 0), (2, 0), (2, 1), (1, 1), (0, 1)]
        ```
    """
    _check_positive("num_nodes", num_nodes)
    _check_positive("num_groups", num_groups)
    _check_positive("num_passes", num_passes)
    if group_order not in GROUP_ORDERS:
        raise ValueError(f"`group_order` ({group_order!r}) must be one of {', '.join(map(repr, GROUP_ORDERS))}.")
    per_node = _per_node_steps(steps, num_nodes)
    raw = []
    row = 0
    for pass_index in range(num_passes):
        groups = list(range(num_groups))
        if group_order == "descending" or (group_order == "alternate" and pass_index % 2 == 1):
            groups.reverse()
        for group in groups:
            nodes = range(num_nodes) if row % 2 == 0 else range(num_nodes - 1, -1, -1)
            raw.extend((pass_index, node, group, per_node[node]) for node in nodes)
            row += 1
    return _merge_and_number(raw)


def designated_plan(
    num_nodes: int,
    num_passes: int = 1,
    steps: int | Sequence[int] = 1,
    owners: Sequence[int] | None = None,
) -> list[Stage]:
    """Builds the designated plan of DESIGN §3: the blocks are cut into exactly N groups, one owned by each node.

    Each pass visits the groups 0..N-1 (each trained by its owner), the next pass N-1..0 (a ping-pong; the turn is
    merged into one stage).

    Args:
        num_nodes (`int`): number of nodes N (and of groups).
        num_passes (`int`, defaults to 1): passes.
        steps (`int` or `Sequence[int]`, defaults to 1): optimizer steps per stage, or one value per node.
        owners (`Sequence[int]`, *optional*): `owners[g]` is the node that owns group g; defaults to node g.
            Must be a permutation of the nodes.

    Example:
        ```python
        >>> [(s.node, s.group) for s in designated_plan(3, num_passes=2, owners=[2, 0, 1])]
        [(2, 0), (0, 1), (1, 2), (0, 1), (2, 0)]
        ```
    """
    _check_positive("num_nodes", num_nodes)
    _check_positive("num_passes", num_passes)
    per_node = _per_node_steps(steps, num_nodes)
    owners = list(range(num_nodes)) if owners is None else [int(o) for o in owners]
    if sorted(owners) != list(range(num_nodes)):
        raise ValueError(
            f"`owners` ({owners}) must name each of the {num_nodes} nodes exactly once (a permutation of "
            f"0..{num_nodes - 1}): the designated plan gives every node one group."
        )
    raw = []
    for pass_index in range(num_passes):
        groups = range(num_nodes) if pass_index % 2 == 0 else range(num_nodes - 1, -1, -1)
        raw.extend((pass_index, owners[g], g, per_node[owners[g]]) for g in groups)
    return _merge_and_number(raw)


def plan_steps(plan: Sequence[Stage]) -> int:
    """Optimizer steps of a plan: the sum of its stages' steps."""
    return sum(stage.steps for stage in plan)


def cut_plan(plan: Sequence[Stage], total_steps: int) -> list[Stage]:
    """The first `total_steps` optimizer steps of `plan`: later stages dropped, the last one kept cut short (how
    `Trainer` ends a run at `max_steps` inside an epoch).

    Example:
        ```python
        >>> [s.steps for s in cut_plan(serpentine_plan(2, 1, num_passes=2, steps=3), 7)]
        [3, 4]
        ```
    """
    _check_positive("total_steps", total_steps)
    cut, left = [], total_steps
    for stage in plan:
        if left <= 0:
            break
        cut.append(replace(stage, steps=min(stage.steps, left)))
        left -= stage.steps
    if left > 0:
        raise ValueError(f"The plan has {plan_steps(plan)} steps, fewer than the {total_steps} asked for.")
    return cut


def fit_plan(plan: Sequence[Stage], total_steps: int) -> list[Stage]:
    """`plan` with every stage's steps scaled so that they add up to exactly `total_steps`, each stage keeping at
    least one (largest remainders get the leftover steps; ties go to the earlier stage).

    Example:
        ```python
        >>> [s.steps for s in fit_plan(serpentine_plan(3, 2, steps=10), 9)]
        [2, 2, 2, 1, 1, 1]
        ```
    """
    _check_positive("total_steps", total_steps)
    if total_steps < len(plan):
        raise ValueError(
            f"{total_steps} optimizer steps cannot give each of the plan's {len(plan)} stages one; use at least "
            f"{len(plan)} steps, or fewer nodes, groups or passes."
        )
    weights = [stage.steps for stage in plan]
    exact = [total_steps * w / sum(weights) for w in weights]
    steps = [max(1, math.floor(e)) for e in exact]
    while sum(steps) > total_steps:  # the floor of one step per stage overshot: take from the longest stages
        steps[max(range(len(steps)), key=lambda i: (steps[i], -i))] -= 1
    for i in sorted(range(len(plan)), key=lambda i: (-(exact[i] - math.floor(exact[i])), i))[
        : total_steps - sum(steps)
    ]:
        steps[i] += 1
    return [replace(stage, steps=n) for stage, n in zip(plan, steps)]


def validate_plan(plan: Sequence[Stage], num_nodes: int, num_groups: int) -> list[Stage]:
    """Checks a (possibly user-made) plan against the run and returns it renumbered 0..K-1.

    Raises:
        `ValueError`: naming the stage and field when a stage names a missing node or group, has fewer than one
            step, or the plan is empty.
    """
    if len(plan) == 0:
        raise ValueError("The plan (`schedule`) is empty; give at least one Stage or use 'serpentine'.")
    checked = []
    for position, stage in enumerate(plan):
        if isinstance(stage, dict):
            stage = Stage.from_dict(stage)
        if not 0 <= stage.node < num_nodes:
            raise ValueError(
                f"Stage {position} names node {stage.node}, but there are {num_nodes} nodes (0..{num_nodes - 1}); "
                "fix the stage or raise `num_nodes`."
            )
        if not 0 <= stage.group < num_groups:
            raise ValueError(
                f"Stage {position} names group {stage.group}, but the model is cut into {num_groups} groups "
                f"(0..{num_groups - 1}); fix the stage or change `num_block_groups`."
            )
        if stage.steps < 1:
            raise ValueError(f"Stage {position} has steps={stage.steps}; every stage needs at least 1 step.")
        checked.append(Stage(position, stage.pass_index, stage.node, stage.group, stage.steps))
    return checked


def plan_to_json(plan: Sequence[Stage], indent: int | None = 2) -> str:
    """Serialises a plan to JSON (`{"stages": [...]}`)."""
    return json.dumps({"stages": [stage.to_dict() for stage in plan]}, indent=indent)


def plan_from_json(text: str) -> list[Stage]:
    """Reads a plan written by [`plan_to_json`] (or a bare JSON list of stage objects)."""
    data = json.loads(text)
    stages = data["stages"] if isinstance(data, dict) else data
    return [Stage.from_dict(stage) for stage in stages]


def save_plan(plan: Sequence[Stage], path: str | os.PathLike) -> Path:
    """Writes `plan` as JSON to `path` (a file, or a folder that gets `snake_plan.json`)."""
    path = Path(path)
    if path.is_dir():
        path = path / PLAN_FILE
    path.write_text(plan_to_json(plan))
    return path


def load_plan(path: str | os.PathLike) -> list[Stage]:
    """Reads a plan saved by [`save_plan`]."""
    path = Path(path)
    if path.is_dir():
        path = path / PLAN_FILE
    return plan_from_json(path.read_text())


def format_plan(plan: Sequence[Stage]) -> str:
    """Renders the plan one line per pass: `(node,group)xsteps` per stage, `|` where the group changes.

    Example:
        ```python
        >>> print(format_plan(serpentine_plan(2, 2)))
        pass 0: (n0,g0)x1 (n1,g0)x1 | (n1,g1)x1 (n0,g1)x1
        ```
    """
    lines = []
    for pass_index in sorted({stage.pass_index for stage in plan}):
        cells = []
        previous_group = None
        for stage in (s for s in plan if s.pass_index == pass_index):
            if previous_group is not None and stage.group != previous_group:
                cells.append("|")
            cells.append(f"(n{stage.node},g{stage.group})x{stage.steps}")
            previous_group = stage.group
        lines.append(f"pass {pass_index}: " + " ".join(cells))
    return "\n".join(lines)


# ---- after a node failure (cs topology, snake_hf.engine.coordinator) ----

# What a cs coordinator does with the remaining stages of a node that stops answering (`SnakeConfig.on_node_failure`).
ON_NODE_FAILURE = ("replan", "drop")


def replan_after_failure(
    effective: Sequence[Stage], position: int, failed: set[int], mode: str = "replan", fallback: int = 0
) -> tuple[list[Stage], list[dict], list[int]]:
    """Rewrites an effective plan from `position` on, for the failed nodes `failed` (pure; see the module docstring).

    Args:
        effective (`Sequence[Stage]`): the effective plan so far (stages keep their original `index`).
        position (`int`): position in `effective` of the first stage whose result did not reach the coordinator.
        failed (`set[int]`): every failed node.
        mode (`str`, defaults to `"replan"`): `"replan"` moves the failed nodes' stages, `"drop"` removes them.
        fallback (`int`, defaults to 0): the node that takes a stage when no live node runs any other (coordinator).

    Returns:
        `tuple[list[Stage], list[dict], list[int]]`: the new effective plan, the moves (`{"stage", "from", "to"}`)
        and the indices of dropped stages.

    Example:
        ```python
        >>> from snake_hf.plan import serpentine_plan
        >>> plan, moved, dropped = replan_after_failure(serpentine_plan(3, 2, 1, 1), 1, {1})
        >>> [s.node for s in plan], moved
        ([0, 0, 2, 2, 2, 0], [{'stage': 1, 'from': 1, 'to': 0}, {'stage': 4, 'from': 1, 'to': 2}])
        ```
    """
    if mode not in ON_NODE_FAILURE:
        raise ValueError(f"`on_node_failure` ({mode!r}) is not valid; use one of {list(ON_NODE_FAILURE)}.")
    new, moved, dropped = list(effective[:position]), [], []
    tail = list(effective[position:])
    for stage in tail:
        if stage.node not in failed:
            new.append(stage)
        elif mode == "drop":
            dropped.append(stage.index)
        else:
            node = next((s.node for s in reversed(new) if s.node not in failed), None)
            if node is None:
                node = next((s.node for s in tail if s.node not in failed), fallback)
            new.append(replace(stage, node=node))
            moved.append({"stage": stage.index, "from": stage.node, "to": node})
    return new, moved, dropped
