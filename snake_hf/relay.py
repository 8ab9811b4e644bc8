"""The relay: what happens between two stages — version vectors, per-node RNG streams, and payload hops.

The same code runs the simulation (every node is local, the transport is in memory) and the distributed engine
(one local node per process, a torch.distributed transport). At a stage boundary the node that trained sends the
parts the next stage's node lacks; the next node receives, verifies and loads them before it trains.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

import torch
from torch import nn
from transformers.utils import logging

from .blocks import SHARED, PartMap, part_name
from .payload import (
    PayloadError,
    PayloadSpec,
    VersionLedger,
    build_payload,
    decode_payload,
    encode_payload,
    tensors_checksum,
)
from .plan import Stage
from .report import HopRecord, SnakeReport
from .transport import Transport


logger = logging.get_logger(__name__)

__all__ = ["Relay", "node_rng_state"]


def node_rng_state(seed: int, node: int) -> torch.Tensor:
    """Initial CPU RNG state of a node's private stream: the state `torch.manual_seed(seed + node)` gives."""
    return torch.Generator().manual_seed(seed + node).get_state()


class Relay:
    """Hands the trainable state along a plan.

    Args:
        model (`nn.Module`): this process's model (shared by all virtual nodes in simulation).
        part_map (`PartMap`): which tensors belong to which part.
        spec (`PayloadSpec`): the run identity and tensor layout every payload is checked against.
        plan (`Sequence[Stage]`): the whole plan.
        num_nodes (`int`): number of nodes.
        seed (`int`): seed of the per-node RNG streams.
        transport (`Transport`): carries encoded payloads.
        report (`SnakeReport`): receives one [`HopRecord`] per hop.
        local_nodes (`set[int]`, *optional*): nodes whose tensors live in this process (default: all).
    """

    def __init__(
        self,
        model: nn.Module,
        part_map: PartMap,
        spec: PayloadSpec,
        plan: Sequence[Stage],
        num_nodes: int,
        seed: int,
        transport: Transport,
        report: SnakeReport,
        local_nodes: set[int] | None = None,
    ):
        self.model = model
        self.part_map = part_map
        self.spec = spec
        self.plan = list(plan)
        self.transport = transport
        self.report = report
        self.local_nodes = set(range(num_nodes)) if local_nodes is None else set(local_nodes)
        self.part_of = {name: part for part in part_map.parts for name in part_map.tensor_names(part)}
        self.ledger = VersionLedger(num_nodes, {part: self.checksum(part) for part in part_map.parts})
        self._rng = {node: node_rng_state(seed, node) for node in range(num_nodes)}
        self._replayed = 0  # stages whose version bookkeeping the ledger holds

    def checksum(self, part: str) -> str:
        named = dict(self.model.named_parameters()) | dict(self.model.named_buffers())
        return tensors_checksum((name, named[name]) for name in self.part_map.tensor_names(part))

    def start(self) -> None:
        """Before training: the global RNG holds the stream of the first stage's node.

        (Creating the dataloader iterator draws one number from it, in every engine alike.)
        """
        torch.set_rng_state(self._rng[self.plan[0].node])

    def enter(self, stage: Stage) -> tuple[int, float]:
        """Makes `stage`'s node ready to train: receives what it lacks, swaps in its RNG stream.

        Returns:
            `tuple[int, float]`: bytes received and seconds spent waiting for and loading them.
        """
        self._replay_until(stage.index)
        nbytes, seconds = 0, 0.0
        previous = self.plan[stage.index - 1] if stage.index > 0 else None
        if previous is not None and previous.node != stage.node:
            nbytes, seconds = self._receive(previous, stage)
        torch.set_rng_state(self._rng[stage.node])
        return nbytes, seconds

    def leave(self, stage: Stage) -> int:
        """Closes `stage` on its node: saves its RNG stream, bumps versions, sends the next stage what it lacks.

        Returns:
            `int`: bytes sent (0 when the next stage runs on the same node, or there is none).
        """
        self._rng[stage.node] = torch.get_rng_state()
        trained = [part_name(stage.group)] + ([SHARED] if SHARED in self.ledger.parts else [])
        self.ledger.record_training(stage.node, {part: self.checksum(part) for part in trained})
        self._replayed = stage.index + 1
        following = self.plan[stage.index + 1] if stage.index + 1 < len(self.plan) else None
        if following is None or following.node == stage.node:
            return 0
        return self._send(stage, following)

    def _replay_until(self, index: int) -> None:
        """Brings the version bookkeeping of stages run elsewhere (other processes) up to stage `index`."""
        while self._replayed < index:
            stage = self.plan[self._replayed]
            trained = [part_name(stage.group)] + ([SHARED] if SHARED in self.ledger.parts else [])
            self.ledger.record_training(stage.node, dict.fromkeys(trained, ""))
            following = self.plan[stage.index + 1]
            if following.node != stage.node and following.index < index:
                lacking = self.ledger.lacking(following.node, stage.node)
                self.ledger.record_receipt(following.node, self.ledger.state(stage.node), lacking)
            self._replayed += 1

    def _send(self, stage: Stage, following: Stage) -> int:
        start = time.perf_counter()
        lacking = self.ledger.lacking(following.node, stage.node)
        payload = build_payload(
            self.model,
            self.part_map,
            lacking,
            self.ledger.state(stage.node),
            self.spec,
            sender=stage.node,
            receiver=following.node,
            stage=following.index,
        )
        encoded = encode_payload(payload, self.part_of)
        self.transport.send(stage.node, following.node, encoded, following.index)
        self.report.hops.append(
            HopRecord(
                from_stage=stage.index,
                to_stage=following.index,
                sender=stage.node,
                receiver=following.node,
                parts=sorted(lacking),
                nbytes=encoded.nbytes,
                tensor_nbytes=encoded.data_nbytes,
                seconds=time.perf_counter() - start,
            )
        )
        return encoded.nbytes

    def _receive(self, previous: Stage, stage: Stage) -> tuple[int, float]:
        start = time.perf_counter()
        lacking = self.ledger.lacking(stage.node, previous.node)
        encoded = self.transport.recv(previous.node, stage.node, stage.index)
        payload = decode_payload(encoded, self.spec, expected_parts=lacking)
        payload.load_into(self.model)
        self.ledger.record_receipt(stage.node, payload.state, payload.parts)
        stale = self.ledger.mismatches(stage.node, payload.state)
        if stale:
            raise PayloadError(
                f"After the hop from node {previous.node} to node {stage.node} (stage {stage.index}) the receiver "
                f"does not hold the sender's state for parts {stale}: its version vector is out of step."
            )
        return encoded.nbytes, time.perf_counter() - start
