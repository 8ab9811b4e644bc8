"""Capacity-aware planning for heterogeneous nodes (DESIGN §6): node profiles, the designated cut sized and placed
by each node's memory (estimated by `snake_hf.capacity.estimate`), and steps scaled by speed or by data."""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import yaml
from torch import nn
from transformers.utils import logging

from ..blocks import PartMap
from ..plan import Stage
from .estimate import (
    BlockCosts,
    MemoryEstimate,
    default_probe_inputs,
    estimate_group_memory,
    format_size,
    measure_block_costs,
    parse_size,
)


logger = logging.get_logger(__name__)

__all__ = [
    "BlockCosts",
    "Designation",
    "MemoryEstimate",
    "NodeProfile",
    "as_profiles",
    "check_plan_memory",
    "default_probe_inputs",
    "designate",
    "estimate_group_memory",
    "explain",
    "format_size",
    "load_profiles",
    "measure_block_costs",
    "parse_size",
    "profiles_to_dicts",
    "scale_steps",
]

_OPTIMIZER_STATES = {"adamw": 2, "adam": 2, "sgd_momentum": 1, "sgd": 0}
Fit = tuple[float, float, float, float]  # (c, k, a, q): bytes = c + batch * (k + a * seq + q * seq**2)
ProbeInputs = Callable[[int, int | None], dict]

# ---- profiles ----


@dataclass(frozen=True)
class NodeProfile:
    """What a node can do; every field is optional.

    Args:
        memory_bytes (`int` or `str`, *optional*): training memory budget, in bytes or human (`"2GiB"`); `None` =
            unlimited.
        speed (`float`, defaults to 1.0): relative speed (2.0 = twice as many steps per second).
        num_examples (`int`, *optional*): size of the node's shard, for steps scaled by data.

    Example:
        ```python
        >>> NodeProfile(memory_bytes="4GiB", speed=2.0)
        NodeProfile(memory_bytes=4294967296, speed=2.0, num_examples=None)
        ```
    """

    memory_bytes: int | None = None
    speed: float = 1.0
    num_examples: int | None = None

    def __post_init__(self):
        if self.memory_bytes is not None:
            object.__setattr__(self, "memory_bytes", parse_size(self.memory_bytes))
            if self.memory_bytes <= 0:
                raise ValueError(f"`memory_bytes` ({self.memory_bytes}) must be positive, or None for unlimited.")
        if not self.speed > 0:
            raise ValueError(f"`speed` ({self.speed}) must be positive (1.0 = the reference node).")
        if self.num_examples is not None and self.num_examples < 0:
            raise ValueError(f"`num_examples` ({self.num_examples}) must be >= 0.")

    @classmethod
    def from_dict(cls, data: Mapping | None) -> NodeProfile:
        """From a mapping (`memory` is accepted for `memory_bytes`); `None` is the default profile."""
        data = dict(data or {})
        if "memory" in data:
            data["memory_bytes"] = data.pop("memory")
        unknown = set(data) - {f.name for f in fields(cls)}
        if unknown:
            raise ValueError(f"Unknown node profile keys {sorted(unknown)}; use memory_bytes, speed, num_examples.")
        return cls(**data)


def load_profiles(path: str | os.PathLike) -> list[NodeProfile]:
    """Reads node profiles from a YAML or JSON file: a list of mappings (or `{"nodes": [...]}`), one per node.

    Example:
        ```python
        >>> # nodes.yaml:  - {memory: 2GiB, speed: 1.5}
        >>> #              - {memory: 512MiB, num_examples: 300}
        >>> load_profiles("nodes.yaml")[1].memory_bytes
        536870912
        ```
    """
    path = Path(path)
    text = path.read_text()
    data = json.loads(text) if path.suffix.lower() == ".json" else yaml.safe_load(text)
    if isinstance(data, Mapping):
        data = data.get("nodes", data.get("profiles"))
    if not isinstance(data, list):
        raise ValueError(f"{path} must hold a list of node profiles (one mapping per node), or {{'nodes': [...]}}.")
    return [NodeProfile.from_dict(entry) for entry in data]


def profiles_to_dicts(profiles: Sequence[NodeProfile]) -> list[dict]:
    """Plain JSON-serialisable dicts (for `SnakeConfig.to_dict()` or the report); `as_profiles` reads them back."""
    return [asdict(profile) for profile in profiles]


def as_profiles(value, num_nodes: int | None = None) -> list[NodeProfile] | None:
    """`None`, a YAML/JSON file path, or a list of `NodeProfile`s or mappings -> profiles, one per node (checked)."""
    if value is None:
        return None
    if isinstance(value, (str, os.PathLike)):
        profiles = load_profiles(value)
    else:
        profiles = [p if isinstance(p, NodeProfile) else NodeProfile.from_dict(p) for p in value]
    if num_nodes is not None and len(profiles) != num_nodes:
        raise ValueError(f"`node_profiles` has {len(profiles)} entries for {num_nodes} nodes; give one per node.")
    return profiles


# ---- the designated cut ----


@dataclass
class Designation:
    """The designated cut. `owners[g]` is the node that owns group g (for `designated_plan(owners=...)`),
    `boundaries` the cut (for `BlockGroups` / `group_boundaries`); `estimates`, `budgets` and `reasons` are per node."""

    boundaries: list[int]
    owners: list[int]
    estimates: list[MemoryEstimate]
    budgets: list[int | None]
    reasons: list[str]

    def group_of(self, node: int) -> int:
        return self.owners.index(node)

    def to_dict(self) -> dict:
        return asdict(self)


def _size_weights(profiles: Sequence[NodeProfile], size_by: str) -> list[float]:
    if size_by == "memory":
        finite = [p.memory_bytes for p in profiles if p.memory_bytes is not None]
        return [float(p.memory_bytes or max(finite, default=1)) for p in profiles]
    if size_by in ("speed", "equal"):
        return [p.speed if size_by == "speed" else 1.0 for p in profiles]
    raise ValueError(f"`size_by` ({size_by!r}) must be 'memory', 'speed' or 'equal'.")


def _best_cut(table: dict, owners: list[int], budgets: list, targets: list[float]) -> list[int] | None:
    """The cut whose group sizes are closest (least squares) to `targets` with every owner's estimate in budget."""
    num_blocks, num_groups = max(end for _, end in table), len(owners)
    best: dict[int, tuple[float, list[int]]] = {0: (0.0, [0])}  # first free block -> (cost, boundaries so far)
    for g, owner in enumerate(owners):
        reachable: dict[int, tuple[float, list[int]]] = {}
        for start in sorted(best, reverse=True):  # on a tie the lower group keeps the extra block
            cost, bounds = best[start]
            for end in range(start + 1, num_blocks - (num_groups - 1 - g) + 1):
                if budgets[owner] is None or table[start, end].total <= budgets[owner]:
                    candidate = cost + (end - start - targets[g]) ** 2
                    if end not in reachable or candidate < reachable[end][0]:
                        reachable[end] = (candidate, [*bounds, end])
        best = reachable
    return best[num_blocks][1] if num_blocks in best else None


def _refusal(table: dict, budgets: list, num_groups: int) -> ValueError:
    (start, end), smallest = min(table.items(), key=lambda item: item[1].total)
    short = [n for n, budget in enumerate(budgets) if budget is not None and budget < smallest.total]
    if short:
        return ValueError(
            "; ".join(
                f"node {n} cannot train any group: the smallest (blocks {start}-{end - 1}) needs "
                f"{format_size(smallest.total)}, it has {format_size(budgets[n])}"
                for n in short
            )
            + f" ({smallest.summary()}). Give it more memory, lower the batch size or sequence length, or leave it out."
        )
    num_blocks = max(e for _, e in table)
    lowest = ", ".join(
        f"node {n} ({format_size(budget)}) fits groups from block "
        f"{min((s for s in range(num_blocks) if table[s, s + 1].total <= budget), default=num_blocks - 1)} up"
        for n, budget in enumerate(budgets)
        if budget is not None
    )
    return ValueError(
        f"No cut of the {num_blocks} blocks into {num_groups} groups fits every node's memory (one group per node, "
        f"at least one block each; less memory needs a higher group): {lowest}. Give the smallest nodes more memory, "
        "lower the batch size or sequence length, or use fewer nodes."
    )


def designate(
    profiles: Sequence[NodeProfile],
    model: nn.Module | None = None,
    num_nodes: int | None = None,
    batch_size: int = 8,
    seq_len: int | None = 128,
    mode: str = "lora",
    *,
    costs: BlockCosts | None = None,
    size_by: str = "memory",
    optimizer: str = "adamw",
    part_map: PartMap | None = None,
    block_list_path: str | None = None,
    probe_inputs: ProbeInputs | None = None,
    dtype_bytes: int | None = None,
) -> Designation:
    """Cuts the blocks into one group per node, sized and placed by the node profiles (DESIGN §3 designated, §6).

    Placement: by memory budget (ties: the slower node, then the higher id, goes up), the smallest budget owns the top
    group (shortest backward, fewest stored activations) and the largest group 0. Sizes: as close as possible (least
    squares) to shares of the blocks proportional to `size_by` — `"memory"` (unlimited counts as the largest budget),
    `"speed"` or `"equal"` — with every node's estimate within its budget.

    Args:
        profiles (`Sequence[NodeProfile]`): one per node.
        model (`nn.Module`, *optional*): measured by [`measure_block_costs`] unless `costs` is given.
        num_nodes (`int`, *optional*): checked against `len(profiles)`.
        batch_size (`int`, defaults to 8), seq_len (`int`, *optional*, defaults to 128): one micro-batch.
        mode (`str`, defaults to `"lora"`): `"lora"` or `"full"`.
        costs (`BlockCosts`, *optional*): measured (or hand-made) costs; no measurement then.
        size_by (`str`, defaults to `"memory"`): see above. optimizer (`str`, defaults to `"adamw"`): see
            [`BlockCosts.estimate`].
        part_map, block_list_path, probe_inputs, dtype_bytes: passed to [`measure_block_costs`].

    Raises:
        `ValueError`: naming each node that cannot train even the smallest group, that group's estimate and the
            node's budget; or, when each node fits some group but no cut fits all, the lowest group each node fits.

    Example:
        ```python
        >>> profiles = [NodeProfile("8GiB"), NodeProfile("2GiB", speed=2.0), NodeProfile()]
        >>> designation = designate(profiles, model, batch_size=8, seq_len=128)
        >>> plan = designated_plan(3, num_passes=2, owners=designation.owners)
        >>> groups = BlockGroups.from_model(model, boundaries=designation.boundaries)
        ```
    """
    if num_nodes is not None and num_nodes != len(profiles):
        raise ValueError(f"`node_profiles` has {len(profiles)} entries for {num_nodes} nodes; give one per node.")
    if costs is None:
        if model is None:
            raise ValueError("`designate` needs the `model` to measure, or its measured `costs`.")
        costs = measure_block_costs(
            model, mode, part_map, block_list_path, probe_inputs=probe_inputs, dtype_bytes=dtype_bytes
        )
    num_nodes, num_blocks = len(profiles), costs.num_blocks
    if num_nodes > num_blocks:
        raise ValueError(
            f"The designated schedule gives each of the {num_nodes} nodes at least one block, but the model has "
            f"{num_blocks}; use fewer nodes or schedule='serpentine'."
        )
    spans = [(s, e) for s in range(num_blocks) for e in range(s + 1, num_blocks + 1)]
    table = {(s, e): costs.estimate(s, e, batch_size, seq_len, optimizer) for s, e in spans}
    budgets = [p.memory_bytes for p in profiles]
    order = sorted(range(num_nodes), key=lambda n: (budgets[n] or math.inf, profiles[n].speed, -n))
    owners = order[::-1]  # owners[g]: the largest budget owns group 0, the smallest the top group
    weights = _size_weights(profiles, size_by)
    targets = [num_blocks * weights[owner] / sum(weights) for owner in owners]
    boundaries = _best_cut(table, owners, budgets, targets)
    if boundaries is None:
        raise _refusal(table, budgets, num_nodes)
    estimates, reasons = [None] * num_nodes, [""] * num_nodes
    for g, owner in enumerate(owners):
        estimates[owner] = estimate = table[boundaries[g], boundaries[g + 1]]
        place = "the top group: shortest backward" if g == num_nodes - 1 else "bottom" if g == 0 else "middle"
        reasons[owner] = (
            f"budget {order.index(owner) + 1} of {num_nodes} from the smallest -> group {g} ({place}); "
            f"{boundaries[g + 1] - boundaries[g]} of {num_blocks} blocks (share by {size_by}: {targets[g]:.1f}); "
            f"needs {format_size(estimate.total)} of {format_size(budgets[owner])}"
        )
    logger.info(f"Designated cut {boundaries}, owners {owners}")
    return Designation(boundaries, owners, estimates, budgets, reasons)


def check_plan_memory(
    plan: Sequence[Stage],
    profiles: Sequence[NodeProfile],
    costs: BlockCosts,
    boundaries: Sequence[int],
    batch_size: int,
    seq_len: int | None,
    optimizer: str = "adamw",
) -> None:
    """Refuses any plan (e.g. serpentine) in which a node trains a group that does not fit its budget.

    Raises:
        `ValueError`: naming every such node and group, its estimate, the budget and the shortfall.
    """
    problems = []
    for node, group in sorted({(stage.node, stage.group) for stage in plan}):
        start, end, budget = boundaries[group], boundaries[group + 1], profiles[node].memory_bytes
        need = costs.estimate(start, end, batch_size, seq_len, optimizer).total
        if budget is not None and need > budget:
            problems.append(
                f"node {node} cannot train group {group} (blocks {start}-{end - 1}): it needs {format_size(need)}, "
                f"it has {format_size(budget)} (short by {format_size(need - budget)})"
            )
    if problems:
        raise ValueError("; ".join(problems) + ". Use schedule='designated', more groups, or a smaller batch.")


# ---- steps ----


def _step_factors(profiles: Sequence[NodeProfile], by: str) -> list[float]:
    if by == "speed":
        return [p.speed for p in profiles]
    if by != "data":
        raise ValueError(f"`by` ({by!r}) must be 'speed' or 'data'.")
    missing = [n for n, p in enumerate(profiles) if p.num_examples is None]
    if missing or not any(p.num_examples for p in profiles):
        raise ValueError(f"Steps by data need `num_examples` (not all 0) in every profile; nodes {missing} have none.")
    return [float(p.num_examples) for p in profiles]


def scale_steps(base_steps: Sequence[int], profiles: Sequence[NodeProfile], by: str = "speed") -> list[int]:
    """Scales each node's steps per stage by its profile over the mean (total about unchanged); at least 1 each.

    * `by="speed"`: steps ∝ speed, so a node twice as fast takes twice the steps and stage wall times even out
      (for equal work per step; in the designated plan a lower group also has a longer backward).
    * `by="data"`: steps ∝ `num_examples`, so data-rich nodes weigh more. Meant for a fixed `stage_steps`: default
      steps (one pass over the shard) already grow with the shard.

    Example:
        ```python
        >>> scale_steps([10, 10], [NodeProfile(speed=3.0), NodeProfile(speed=1.0)])
        [15, 5]
        >>> scale_steps([10, 10], [NodeProfile(num_examples=100), NodeProfile(num_examples=300)], by="data")
        [5, 15]
        ```
    """
    if len(base_steps) != len(profiles):
        raise ValueError(f"{len(base_steps)} step counts for {len(profiles)} profiles; give one per node.")
    factors = _step_factors(profiles, by)
    mean = sum(factors) / len(factors)
    return [max(1, math.floor(steps * f / mean + 0.5)) for steps, f in zip(base_steps, factors)]


def explain(
    plan: Sequence[Stage],
    profiles: Sequence[NodeProfile],
    designation: Designation | None = None,
    steps_by: str | None = None,
) -> str:
    """Says, node by node, why it got what it got: its group's blocks, estimate against budget, steps and why.

    Args:
        plan (`Sequence[Stage]`): the plan. profiles (`Sequence[NodeProfile]`): one per node.
        designation (`Designation`, *optional*): the designated cut, if any.
        steps_by (`str`, *optional*): `"speed"` or `"data"` when steps were scaled by [`scale_steps`].

    Example:
        ```python
        >>> print(explain(plan, profiles, designation, steps_by="speed"))
        node 1: memory 2 GiB, speed 2, examples ?
          group 2 = blocks 5-5: budget 1 of 3 from the smallest -> group 2 (the top group: shortest backward); ...
        ```
    """
    factors = _step_factors(profiles, steps_by) if steps_by else None
    lines = []
    for node, profile in enumerate(profiles):
        examples = "?" if profile.num_examples is None else profile.num_examples
        lines.append(
            f"node {node}: memory {format_size(profile.memory_bytes)}, speed {profile.speed:g}, examples {examples}"
        )
        if designation is not None:
            g, bounds, estimate = designation.group_of(node), designation.boundaries, designation.estimates[node]
            lines.append(f"  group {g} = blocks {bounds[g]}-{bounds[g + 1] - 1}: {designation.reasons[node]}")
            lines.append(f"  estimate {format_size(estimate.total)}: {estimate.summary()}")
        stages = [stage for stage in plan if stage.node == node]
        why = "not scaled by the profiles"
        if factors:
            why = f"scaled by {steps_by}: x{factors[node] * len(factors) / sum(factors):.2f} of the mean"
        groups = sorted({stage.group for stage in stages})
        lines.append(f"  {len(stages)} stages (groups {groups}), {sum(s.steps for s in stages)} steps; {why}")
    return "\n".join(lines)
