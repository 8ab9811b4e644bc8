"""What a launcher told this process (`torchrun`, `accelerate launch --multi_gpu`, MPI, or one process per rank with
`RANK`/`WORLD_SIZE`/`MASTER_ADDR`/`MASTER_PORT` set), and hiding it from `Trainer` so each rank trains single-process.
"""

from __future__ import annotations

import os
from dataclasses import dataclass


__all__ = [
    "LAUNCH_ENV_VARS",
    "TOPOLOGIES",
    "HiddenLaunchEnv",
    "LaunchInfo",
    "current_launch",
    "hide_launch_env",
    "launch_info",
    "process_launch",
]

# How payloads travel between the processes of a distributed run: straight to the next stage's rank, or through a
# coordinator rank (client-server). See `snake_hf.engine.torch_dist` and `snake_hf.engine.coordinator`.
TOPOLOGIES = ("p2p", "cs")

# Variables by which torchrun, `accelerate launch --multi_gpu` or MPI tell Trainer/Accelerate "you are one of N". They
# are hidden so that each rank's Trainer runs single-process (no DDP wrap, no sharded dataloader, no all-gathers).
# fmt: off
LAUNCH_ENV_VARS = (
    "RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "NODE_RANK",  # torchrun, accelerate launch --multi_gpu
    "GROUP_RANK", "GROUP_WORLD_SIZE", "ROLE_RANK", "ROLE_WORLD_SIZE", "ROLE_NAME",
    "PMI_RANK", "PMI_SIZE", "MPI_LOCALNRANKS", "MPI_LOCALRANKID",  # Intel MPI (accelerate's multi-CPU mpirun)
    "OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_LOCAL_RANK", "OMPI_COMM_WORLD_LOCAL_SIZE",
    "MV2_COMM_WORLD_RANK", "MV2_COMM_WORLD_SIZE", "MV2_COMM_WORLD_LOCAL_RANK",
)
# fmt: on
@dataclass(frozen=True)
class LaunchInfo:
    """What a launcher (`torchrun`, `accelerate launch --multi_gpu`) told this process.

    Args:
        rank (`int`), world_size (`int`), local_rank (`int`): `RANK`, `WORLD_SIZE`, `LOCAL_RANK`.
        master_addr (`str`), master_port (`int`): the rendezvous store's address.
        use_agent_store (`bool`): the launcher's agent already serves the store (`TORCHELASTIC_USE_AGENT_STORE`).
        restart_count (`int`): `TORCHELASTIC_RESTART_COUNT`, so that a restarted attempt does not read stale keys.
    """

    rank: int
    world_size: int
    local_rank: int
    master_addr: str
    master_port: int
    use_agent_store: bool = False
    restart_count: int = 0


def launch_info() -> LaunchInfo | None:
    """Reads the launcher's environment; `None` when this process is not one of several (no or unit `WORLD_SIZE`).

    Launchers that start N ranks on one CPU-only host (checked with torch 2.13, accelerate 1.15):
    `torchrun --nproc_per_node N script.py`, and `accelerate launch --multi_gpu --num_processes N --num_machines 1
    script.py` (it runs torchrun; `--cpu` cannot be combined with `--multi_gpu`, and without `--multi_gpu` one process
    starts). Both kill every rank when one dies; to survive a dead rank (cs topology) start each rank as its own process
    with `RANK`, `WORLD_SIZE`, `MASTER_ADDR` and `MASTER_PORT` set (rank 0 then serves the store).

    Example:
        ```python
        >>> info = launch_info()  # under `torchrun --nproc_per_node 2 train.py`
        >>> info.rank, info.world_size
        (0, 2)
        ```
    """
    env = os.environ
    if int(env.get("WORLD_SIZE", "1")) <= 1:
        return None
    return LaunchInfo(
        rank=int(env["RANK"]),
        world_size=int(env["WORLD_SIZE"]),
        local_rank=int(env.get("LOCAL_RANK", env["RANK"])),
        master_addr=env.get("MASTER_ADDR", "127.0.0.1"),
        master_port=int(env.get("MASTER_PORT", "29500")),
        use_agent_store=env.get("TORCHELASTIC_USE_AGENT_STORE", "").lower() == "true",
        restart_count=int(env.get("TORCHELASTIC_RESTART_COUNT", "0")),
    )


class HiddenLaunchEnv(dict[str, str]):
    """The launch variables [`hide_launch_env`] removed; `restore()` (or leaving the `with` block) puts them back."""

    def restore(self) -> None:
        os.environ.update(self)

    def __enter__(self) -> HiddenLaunchEnv:
        return self

    def __exit__(self, *exc_info) -> None:
        self.restore()


def hide_launch_env() -> HiddenLaunchEnv:
    """Removes the launcher's rank and world-size variables from `os.environ` and returns them.

    Under `torchrun` (even with `use_cpu=True`) `TrainingArguments` sees a distributed world: `Trainer` wraps the
    model in DDP, shards the dataloader and all-gathers every step, which hangs a Snake run where one rank trains at a
    time. Call [`launch_info`] first, then this, before building `TrainingArguments` or any Accelerate object (its
    `PartialState` is a singleton that keeps what it saw first). `MASTER_ADDR`, `MASTER_PORT` and `TORCHELASTIC_*`
    stay: they do not make Trainer distributed.

    Example:
        ```python
        >>> info = launch_info()
        >>> removed = hide_launch_env()  # or: with hide_launch_env() as removed: ...
        >>> TrainingArguments(output_dir="out", use_cpu=True).world_size
        1
        ```
    """
    return HiddenLaunchEnv({name: os.environ.pop(name) for name in LAUNCH_ENV_VARS if name in os.environ})


_PROCESS_LAUNCH: list[LaunchInfo | None] = []  # what process_launch() read, once per process


def process_launch() -> LaunchInfo | None:
    """This process's launch, read once per process (accelerate's `PartialState` is the model): `None` when it is not
    one of several.

    The first call reads the launcher's variables ([`launch_info`]) and, when this process is one of several, hides
    them for the rest of the process ([`hide_launch_env`]), so that every `Trainer` and Accelerate object built later
    stays single-process (each rank runs an ordinary one-process `Trainer`; DESIGN §5). Later calls return the same
    answer, unless the launcher's variables are visible again (a script that runs several distributed runs in one
    process puts them back, with a new `MASTER_PORT`, before each): then they are read and hidden again. `SnakeTrainer`
    calls it where a run starts; building, copying or pickling a `SnakeConfig` never does.

    Example:
        ```python
        >>> info = process_launch()  # under `torchrun --nproc_per_node 2 train.py`
        >>> info.rank, info.world_size, "RANK" in os.environ
        (0, 2, False)
        >>> process_launch() is info
        True
        ```
    """
    info = launch_info()
    if info is not None:  # the first read, or a script that put the variables back for its next run
        hide_launch_env()
        _PROCESS_LAUNCH[:] = [info]
    elif not _PROCESS_LAUNCH:
        _PROCESS_LAUNCH.append(None)
    return _PROCESS_LAUNCH[0]


def current_launch() -> LaunchInfo | None:
    """The launch in the environment, else the one [`process_launch`] read (and hid) earlier; reads without hiding.

    For code that runs after the launcher's variables may have been hidden (e.g. choosing a rank's GPU when a
    `SnakeConfig` is built after the trainer started).
    """
    return launch_info() or (_PROCESS_LAUNCH[0] if _PROCESS_LAUNCH else None)


def _forget_process_launch() -> None:
    """Tests only: the next [`process_launch`] reads the environment again."""
    _PROCESS_LAUNCH.clear()
