"""What `SnakeTrainer` adds when each process runs one node: shard sizes, the relay per topology, cs turns, reports.

In distributed mode (`SnakeConfig.launch`) every process runs its own node's stages of the same plan; in simulation
one process runs them all and these helpers reduce to the plain case:

* **Data**: with `local_shard`, each rank brings its own node's shard and the ranks tell each other the sizes.
* **Relay**: a [`Relay`] hands the trainable state on (simulation, p2p); in cs topology a [`FailoverRelay`] takes
  turns from the coordinator and re-plans around a dead node (`snake_hf.engine.coordinator`).
* **cs turns**: a stage closes inside the `Trainer` loop (`StageBoundaryCallback`) and the coordinator says which
  stage this rank trains next, or that the run is done.
* **Reports**: after the run the first process merges every process's stage and hop records.
"""

from __future__ import annotations

import json

from ..config import SnakeConfig
from ..data.node_data import NodeData
from ..engine.coordinator import FailoverRelay
from ..engine.relay import Relay
from ..plan import Stage
from ..report import HopRecord, StageRecord
from .setup import partitioner_for


class DistributedRun:
    """Mixin of [`SnakeTrainer`]: the parts of a run that differ between one process and one process per node."""

    def _split_data(self, train_dataset, args: SnakeConfig, partitioner) -> NodeData:
        """Every node's shard: `train_dataset` split by `partitioner` (or one dataset per node), or, with `local_shard`
        in distributed mode, this rank's own dataset with every rank's size (the plan needs them all)."""
        if args.local_shard and self.launch is not None:
            sizes = [int(t) for t in self.transport.exchange_text("shard_sizes", str(len(train_dataset)))]
            return NodeData.local(train_dataset, self.launch.rank, sizes)
        return NodeData.build(train_dataset, args.num_nodes, partitioner or partitioner_for(args))

    def _make_relay(self) -> Relay:
        """The relay for this run: a [`FailoverRelay`] in distributed cs topology, else a [`Relay`]."""
        relay, extra = (
            (FailoverRelay, {"on_node_failure": self.args.on_node_failure}) if self._failover else (Relay, {})
        )
        return relay(
            self.model,
            self.part_map,
            self._spec,
            self.plan,
            self.args.num_nodes,
            self.args.seed,
            self.transport,
            self.snake_report,
            self.local_nodes,
            **extra,
        )

    def _first_stage(self, next_stage: int) -> Stage | None:
        """The stage this process trains first, from plan stage `next_stage` on (None: it trains none)."""
        if (
            self._failover
        ):  # cs: the coordinator says which stage this rank trains next (see snake_hf.engine.coordinator)
            return self._relay.next_stage()
        return next((stage for stage in self._own_stages if stage.index >= next_stage), None)

    def _failover_boundary(self, control) -> None:
        """cs (StageBoundaryCallback, at each step's end): closes a finished stage and enters this node's next one,
        waiting for the coordinator's turn; stops the loop when the coordinator says the run is done."""
        if self._stage_closed or self.state.global_step < self._stage_end:
            return
        self._end_stage()
        following = self._relay.next_stage()
        if following is None:
            control.should_training_stop = True
        else:
            self._begin_stage(following)

    def _merge_reports(self) -> None:
        """Distributed: the first process collects every process's stage and hop records (plain JSON via the store)."""
        if self.launch is None:
            return
        texts = self._relay.gather_text("report", json.dumps(self.snake_report.to_dict(), default=str))
        if texts is None:
            return
        reports = [json.loads(text) for text in texts]
        self.snake_report.stages = sorted(
            (StageRecord(**record) for report in reports for record in report["stages"]), key=lambda r: r.stage
        )
        self.snake_report.hops = sorted(
            (HopRecord(**hop) for report in reports for hop in report["hops"]), key=lambda h: h.to_stage
        )
