"""snake_hf: Snake Learning for the Hugging Face stack.

Train a transformer's block groups one at a time, one node at a time, in a serpentine order over nodes that keep
their data private, handing only adapter tensors from node to node.
"""

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


__version__ = "0.1.0"

__all__ = [
    "PAYLOAD_DTYPES",
    "VGG11",
    "Designation",
    "NodeProfile",
    "designate",
    "explain",
    "load_profiles",
    "scale_steps",
    "BlockGroups",
    "CheckpointError",
    "DistributedTransport",
    "HopTimeoutError",
    "InMemoryTransport",
    "LaunchInfo",
    "Transport",
    "hide_launch_env",
    "launch_info",
    "load_image_folder",
    "synthetic_image_dataset",
    "DirichletPartitioner",
    "HopRecord",
    "IidPartitioner",
    "LengthPartitioner",
    "PartMap",
    "PathologicalPartitioner",
    "Payload",
    "PayloadError",
    "PayloadSpec",
    "ShardPartitioner",
    "SnakeConfig",
    "SnakeReport",
    "SnakeTrainer",
    "Stage",
    "StageRecord",
    "VersionLedger",
    "check_chunkable",
    "chunked_causal_lm_loss",
    "decode_payload",
    "designated_plan",
    "encode_payload",
    "find_block_list",
    "format_plan",
    "group_boundaries",
    "load_plan",
    "make_partitioner",
    "part_wire_nbytes",
    "plot_shards",
    "replan_after_failure",
    "round_to_wire",
    "save_plan",
    "serpentine_plan",
    "set_recompute",
    "shard_summary",
    "validate_plan",
    "wire_dtype",
]
