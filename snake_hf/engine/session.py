"""One run's engine: which process this is, which transport carries its payloads, which relay runs its hops.

The trainer decides what trains; the session decides what travels and when (DESIGN §5, §10). `SnakeTrainer` builds one
`Session` where the run starts, from the launch it read (`snake_hf.launch.process_launch`) and its config, and asks it
everything that differs between one process (simulation) and one process per node (distributed):

* **who** — `distributed`, `rank`, `local_nodes`, `is_main` (the process that writes outputs), `failover` (cs topology,
  where the coordinator hands out turns and survives a dead node);
* **wire** — the transport (`InMemoryTransport`, or `DistributedTransport` over gloo, imported only when a run is
  distributed), text exchanges between ranks (shard sizes, run id, resume agreement), and `close()`;
* **hops** — the relay of the run (`Relay`, or `FailoverRelay` in cs topology) and, after the run, the merged report.

In simulation every answer reduces to the one-process case: one rank holding every node, exchanges that return the
process's own text, no report to merge.
"""

from __future__ import annotations

import json
from collections.abc import Sequence

from torch import nn

from ..blocks import PartMap
from ..launch import LaunchInfo
from ..plan import Stage
from ..report import HopRecord, SnakeReport, StageRecord
from .auth import resolve_run_secret
from .coordinator import FailoverRelay
from .payload import PayloadSpec
from .relay import Relay
from .transport import InMemoryTransport, Transport


__all__ = ["Session"]


class Session:
    """Which process, which transport, which relay: everything about a run that is not training.

    Args:
        launch (`LaunchInfo`, *optional*): this process's launch (`None`: a one-process simulation of every node).
        num_nodes (`int`): number of nodes (in distributed mode, the world size).
        topology (`str`, defaults to `"p2p"`): `"p2p"` or `"cs"` (distributed only).
        hop_timeout (`float`, defaults to 600.0): seconds a transfer may take once both ends are at a hop.
        transport (`Transport`, *optional*): a transport to use instead of building one (tests, custom wires).
        run_secret (`str`, *optional*): the run's shared secret (`SnakeConfig.run_secret`); when None, the
            `SNAKE_RUN_SECRET` environment variable or the file `SNAKE_RUN_SECRET_FILE` names. Distributed runs with a
            secret authenticate every rank, store message and payload (`snake_hf.engine.auth`, docs/security.md).

    Example:
        ```python
        >>> session = Session(None, num_nodes=3)
        >>> session.distributed, session.local_nodes, session.exchange_text("sizes", "12")
        (False, {0, 1, 2}, ['12'])
        ```
    """

    def __init__(
        self,
        launch: LaunchInfo | None,
        num_nodes: int,
        topology: str = "p2p",
        hop_timeout: float = 600.0,
        transport: Transport | None = None,
        run_secret: str | None = None,
    ):
        self.launch = launch
        self.num_nodes = num_nodes
        self.topology = topology
        # Read once, and only where a run is distributed: the simulation's in-memory wire needs no secret.
        secret = resolve_run_secret(run_secret) if launch is not None and transport is None else None
        self.transport = transport if transport is not None else self._build_transport(hop_timeout, secret)

    def _build_transport(self, hop_timeout: float, secret: str | None) -> Transport:
        if self.launch is None:
            return InMemoryTransport()
        from .torch_dist import DistributedTransport  # torch.distributed only where a run is distributed

        return DistributedTransport.from_launch(
            self.launch, topology=self.topology, hop_timeout=hop_timeout, run_secret=secret
        )

    # -- who ---------------------------------------------------------------------------------------------------------

    @property
    def distributed(self) -> bool:
        return self.launch is not None

    @property
    def rank(self) -> int | None:
        """This process's rank (= node) in distributed mode; `None` in simulation."""
        return None if self.launch is None else self.launch.rank

    @property
    def local_nodes(self) -> set[int]:
        """The nodes whose tensors live in this process: its own in distributed mode, all in simulation."""
        return set(range(self.num_nodes)) if self.launch is None else {self.launch.rank}

    @property
    def is_main(self) -> bool:
        """Whether this process writes the run's outputs (every process holds the same final state)."""
        return self.launch is None or self.launch.rank == 0

    @property
    def failover(self) -> bool:
        """Distributed cs topology: the coordinator hands out turns and re-plans around a dead node."""
        return self.launch is not None and self.topology == "cs"

    # -- wire --------------------------------------------------------------------------------------------------------

    def exchange_text(self, name: str, text: str) -> list[str]:
        """Every process's `text`, in rank order, on every process (simulation: `[text]`)."""
        return self.transport.exchange_text(name, text)

    def shard_sizes(self, local_size: int) -> list[int]:
        """Distributed with local shards: every rank's shard size, told through the store."""
        return [int(text) for text in self.exchange_text("shard_sizes", str(local_size))]

    def close(self) -> None:
        """Releases the transport (a distributed rank 0 first waits for the others, whose store it serves)."""
        self.transport.close()

    # -- hops --------------------------------------------------------------------------------------------------------

    def make_relay(
        self,
        model: nn.Module,
        part_map: PartMap,
        spec: PayloadSpec,
        plan: Sequence[Stage],
        seed: int,
        report: SnakeReport,
        on_node_failure: str = "replan",
    ) -> Relay:
        """The relay for this run: a [`FailoverRelay`] in distributed cs topology, else a [`Relay`]."""
        common = (model, part_map, spec, plan, self.num_nodes, seed, self.transport, report, self.local_nodes)
        if self.failover:
            return FailoverRelay(*common, on_node_failure=on_node_failure)
        return Relay(*common)

    def merge_reports(self, report: SnakeReport, relay: Relay) -> None:
        """Distributed: the first process collects every process's stage and hop records into `report` (plain JSON
        through the store; nothing pickled). A no-op in simulation, where one report saw every stage."""
        if self.launch is None:
            return
        texts = relay.gather_text("report", json.dumps(report.to_dict(), default=str))
        if texts is None:
            return
        reports = [json.loads(text) for text in texts]
        report.stages = sorted(
            (StageRecord(**record) for each in reports for record in each["stages"]), key=lambda r: r.stage
        )
        report.hops = sorted((HopRecord(**hop) for each in reports for hop in each["hops"]), key=lambda h: h.to_stage)
