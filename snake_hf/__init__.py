"""snake_hf: Snake Learning for the Hugging Face stack.

Train a transformer's block groups one at a time, one node at a time, in a serpentine order over nodes that keep
their data private, handing only adapter tensors from node to node.

The public names below cover what a user writes in a script: the config and trainer, plans, partitioners, node
profiles, the report and the errors to catch. Everything else is importable from its module (`snake_hf.blocks`,
`snake_hf.engine.payload`, `snake_hf.capacity`, ...). The package is laid out leaves first (see README "Layout"):
`plan`, `blocks`, `identity`, `precision`, `launch`, `losses`, `lm_loss`, `memory`, `report` -> `data/`, `capacity/`
-> `config` -> `engine/` -> `trainer/`; `recipes/` (models, data, assets, metrics for the recipes and benchmarks) sits
beside them and nothing in the library imports it.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING


__version__ = "0.1.0"

# Public name -> the module that defines it. Imported on first use (PEP 562), as transformers does: `import snake_hf`
# costs nothing, and a process that needs one module (a spawned rank's transport) does not load the trainer.
_PUBLIC = {
    "SnakeConfig": "config",
    "SnakeTrainer": "trainer",
    "Stage": "plan",
    "designated_plan": "plan",
    "format_plan": "plan",
    "load_plan": "plan",
    "replan_after_failure": "plan",
    "save_plan": "plan",
    "serpentine_plan": "plan",
    "validate_plan": "plan",
    "DirichletPartitioner": "data.shards",
    "IidPartitioner": "data.shards",
    "LengthPartitioner": "data.shards",
    "PathologicalPartitioner": "data.shards",
    "ShardPartitioner": "data.shards",
    "make_partitioner": "data.shards",
    "plot_shards": "data.summary",
    "shard_summary": "data.summary",
    "NodeProfile": "capacity.planner",
    "SnakeReport": "report",
    "CheckpointError": "trainer.checkpoint",
    "PayloadError": "engine.payload",
    "HopTimeoutError": "engine.transport",
}

__all__ = [
    "CheckpointError",
    "DirichletPartitioner",
    "HopTimeoutError",
    "IidPartitioner",
    "LengthPartitioner",
    "NodeProfile",
    "PathologicalPartitioner",
    "PayloadError",
    "ShardPartitioner",
    "SnakeConfig",
    "SnakeReport",
    "SnakeTrainer",
    "Stage",
    "designated_plan",
    "format_plan",
    "load_plan",
    "make_partitioner",
    "plot_shards",
    "replan_after_failure",
    "save_plan",
    "serpentine_plan",
    "shard_summary",
    "validate_plan",
]


def __getattr__(name: str):
    module = _PUBLIC.get(name)
    if module is None:
        raise AttributeError(f"module 'snake_hf' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_PUBLIC])


if TYPE_CHECKING:  # what type checkers and IDEs read
    from .capacity.planner import NodeProfile
    from .config import SnakeConfig
    from .data.shards import (
        DirichletPartitioner,
        IidPartitioner,
        LengthPartitioner,
        PathologicalPartitioner,
        ShardPartitioner,
        make_partitioner,
    )
    from .data.summary import plot_shards, shard_summary
    from .engine.payload import PayloadError
    from .engine.transport import HopTimeoutError
    from .plan import (
        Stage,
        designated_plan,
        format_plan,
        load_plan,
        replan_after_failure,
        save_plan,
        serpentine_plan,
        validate_plan,
    )
    from .report import SnakeReport
    from .trainer import SnakeTrainer
    from .trainer.checkpoint import CheckpointError
