"""Heterogeneous nodes: per-block training memory measured on the real model (`estimate.py`), node profiles, the
designated cut, steps by speed or data, and `explain()` (`planner.py`)."""

from .planner import (
    BlockCosts,
    Designation,
    MemoryEstimate,
    NodeProfile,
    as_profiles,
    check_plan_memory,
    default_probe_inputs,
    designate,
    estimate_group_memory,
    explain,
    format_size,
    load_profiles,
    measure_block_costs,
    parse_size,
    profiles_to_dicts,
    scale_steps,
)


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
