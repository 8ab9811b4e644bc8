"""snake_hf: Snake Learning for the Hugging Face stack.

Train a transformer's block groups one at a time, one node at a time, in a serpentine order over nodes that keep
their data private, handing only adapter tensors from node to node.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING


__version__ = "0.1.0"

# Public name -> the module that defines it. Imported on first use (PEP 562), as transformers does: `import snake_hf`
# costs nothing, and a process that needs one module (a spawned rank's transport) does not load the trainer.
_PUBLIC = {
    # blocks
    "BlockGroups": "blocks",
    "PartMap": "blocks",
    "find_block_list": "blocks",
    "group_boundaries": "blocks",
    "set_recompute": "blocks",
    # capacity
    "Designation": "capacity",
    "NodeProfile": "capacity",
    "designate": "capacity",
    "explain": "capacity",
    "load_profiles": "capacity",
    "scale_steps": "capacity",
    # checkpoint
    "CheckpointError": "checkpoint",
    # config
    "SnakeConfig": "config",
    # distributed
    "DistributedTransport": "distributed",
    "LaunchInfo": "distributed",
    "hide_launch_env": "distributed",
    "launch_info": "distributed",
    # failover
    "replan_after_failure": "failover",
    # lm_loss
    "check_chunkable": "lm_loss",
    "chunked_causal_lm_loss": "lm_loss",
    # payload
    "PAYLOAD_DTYPES": "payload",
    "Payload": "payload",
    "PayloadError": "payload",
    "PayloadSpec": "payload",
    "VersionLedger": "payload",
    "decode_payload": "payload",
    "encode_payload": "payload",
    "part_wire_nbytes": "payload",
    "round_to_wire": "payload",
    "wire_dtype": "payload",
    # plan
    "Stage": "plan",
    "designated_plan": "plan",
    "format_plan": "plan",
    "load_plan": "plan",
    "save_plan": "plan",
    "serpentine_plan": "plan",
    "validate_plan": "plan",
    # report
    "HopRecord": "report",
    "SnakeReport": "report",
    "StageRecord": "report",
    # shards
    "DirichletPartitioner": "shards",
    "IidPartitioner": "shards",
    "LengthPartitioner": "shards",
    "PathologicalPartitioner": "shards",
    "ShardPartitioner": "shards",
    "make_partitioner": "shards",
    "plot_shards": "shards",
    "shard_summary": "shards",
    # trainer
    "SnakeTrainer": "trainer",
    # transport
    "HopTimeoutError": "transport",
    "InMemoryTransport": "transport",
    "Transport": "transport",
    # vision
    "VGG11": "vision",
    "load_image_folder": "vision",
    "synthetic_image_dataset": "vision",
}

__all__ = sorted(_PUBLIC)


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
    from .blocks import BlockGroups, PartMap, find_block_list, group_boundaries, set_recompute
    from .capacity import Designation, NodeProfile, designate, explain, load_profiles, scale_steps
    from .checkpoint import CheckpointError
    from .config import SnakeConfig
    from .distributed import DistributedTransport, LaunchInfo, hide_launch_env, launch_info
    from .failover import replan_after_failure
    from .lm_loss import check_chunkable, chunked_causal_lm_loss
    from .payload import (
        PAYLOAD_DTYPES,
        Payload,
        PayloadError,
        PayloadSpec,
        VersionLedger,
        decode_payload,
        encode_payload,
        part_wire_nbytes,
        round_to_wire,
        wire_dtype,
    )
    from .plan import Stage, designated_plan, format_plan, load_plan, save_plan, serpentine_plan, validate_plan
    from .report import HopRecord, SnakeReport, StageRecord
    from .shards import (
        DirichletPartitioner,
        IidPartitioner,
        LengthPartitioner,
        PathologicalPartitioner,
        ShardPartitioner,
        make_partitioner,
        plot_shards,
        shard_summary,
    )
    from .trainer import SnakeTrainer
    from .transport import HopTimeoutError, InMemoryTransport, Transport
    from .vision import VGG11, load_image_folder, synthetic_image_dataset
