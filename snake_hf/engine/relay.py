"""The relay: what happens between two stages — version vectors, per-node RNG streams, and payload hops.

Under a quantized `payload_dtype` (`"int8"`, `"int4"`) the trained parts become their quantized values when a stage
closes and hops carry them as deltas; `deltas.py` keeps that state and says the rule.

The same code runs the simulation (every node is local, the transport is in memory) and the distributed engine
(one local node per process, a torch.distributed transport). At a stage boundary the node that trained sends the
parts the next stage's node lacks; the next node receives, verifies and loads them before it trains.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn
from transformers.utils import logging

from ..blocks import SHARED, PartMap, part_name
from ..plan import Stage
from ..precision import is_quantized, round_to_wire
from ..report import HopRecord, SnakeReport
from .deltas import DeltaBook
from .ledger import VersionLedger
from .payload import (
    EncodedPayload,
    PayloadError,
    PayloadSpec,
    build_payload,
    decode_payload,
    encode_payload,
    tensors_checksum,
)
from .transport import Transport


logger = logging.get_logger(__name__)

__all__ = ["Relay", "node_rng_state"]


def node_rng_state(seed: int, node: int) -> torch.Tensor:
    """Initial CPU RNG state of a node's private stream: the state `torch.manual_seed(seed + node)` gives."""
    return torch.Generator().manual_seed(seed + node).get_state()


class Relay:
    """Hands the trainable state along a plan.

    Version bookkeeping is a sequence of events that every process applies in plan order: "stage s trained" and "the
    hop after stage s arrived". A process applies the events of its own stages with real checksums and the others'
    as metadata when it catches up, so every process knows every node's version vector without seeing its tensors.

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
        # Every part starts at its wire values (a no-op for float32 payloads), on every process alike: the final
        # hand-over carries parts no stage trained too, and its receivers must end up holding what the sender holds.
        named = dict(model.named_parameters()) | dict(model.named_buffers())
        round_to_wire((named[name] for name in self.part_of), spec.payload_dtype)
        self.ledger = VersionLedger(num_nodes, {part: self.checksum(part) for part in part_map.parts})
        self.deltas = DeltaBook(model, part_map, spec.payload_dtype) if is_quantized(spec.payload_dtype) else None
        self.rng = {node: node_rng_state(seed, node) for node in range(num_nodes)}
        self.applied = 0  # events applied: 2s = "stage s trained", 2s+1 = "the hop after stage s arrived"
        self._active_rng: int | None = None
        self.last_load_seconds = 0.0  # of the last receive: decode + verify + load, without the wait

    def checksum(self, part: str) -> str:
        named = dict(self.model.named_parameters()) | dict(self.model.named_buffers())
        return tensors_checksum((name, named[name]) for name in self.part_map.tensor_names(part))

    def _trained_parts(self, stage: Stage) -> list[str]:
        return [part_name(stage.group)] + ([SHARED] if SHARED in self.ledger.parts else [])

    # -- RNG streams --

    def start(self, first: Stage, resumed: bool = False) -> None:
        """Before training: the global RNG holds the stream of the first stage's node (a fresh run), so that the one
        draw the dataloader iterator makes comes from it exactly as in a plain `Trainer` run. A resumed run leaves the
        global RNG alone: its iterator draw was already made before the checkpoint."""
        self._active_rng = None
        if not resumed:
            torch.set_rng_state(self.rng[first.node])
            self._active_rng = first.node

    def activate(self, node: int) -> None:
        """Makes `node`'s private stream the global RNG (a no-op when it already is). Called as a stage starts
        training (in every topology), so under a quantized scheme it also keeps the values the stage starts from: the
        base its deltas may use."""
        if self.deltas is not None:
            self.deltas.snapshot(self.part_map.parts, self.ledger.versions[node])
        if self._active_rng == node:
            return
        if self._active_rng is not None:
            self.rng[self._active_rng] = torch.get_rng_state()
        torch.set_rng_state(self.rng[node])
        self._active_rng = node

    # -- stage boundaries --

    def enter(self, stage: Stage) -> tuple[int, float]:
        """Makes `stage`'s node ready to train: catches up on the version bookkeeping and receives what it lacks.

        Returns:
            `tuple[int, float]`: bytes received and seconds spent waiting for and loading them.
        """
        self._apply_until(2 * stage.index - 1 if stage.index > 0 else 0)
        nbytes, seconds, self.last_load_seconds = 0, 0.0, 0.0
        previous = self.plan[stage.index - 1] if stage.index > 0 else None
        if previous is not None and previous.node != stage.node:
            nbytes, seconds = self._receive(previous, stage)
        self.applied = 2 * stage.index
        return nbytes, seconds

    def close_stage(self, stage: Stage) -> None:
        """Records that `stage` trained: its node holds new versions of the group and the shared part."""
        if self._active_rng == stage.node:
            self.rng[stage.node] = torch.get_rng_state()
        # The trained parts take their wire values (payload_dtype) here, on the node that trained them, so every node
        # (this one's later stages too) holds exactly what a receiver holds: simulation = distributed by construction.
        named = dict(self.model.named_parameters()) | dict(self.model.named_buffers())
        trained = [named[n] for part in self._trained_parts(stage) for n in self.part_map.tensor_names(part)]
        round_to_wire(trained, self.spec.payload_dtype)
        if self.deltas is not None:  # quantized schemes: each trained part becomes base + its quantized delta
            for part in self._trained_parts(stage):
                self.deltas.close(stage.node, part, self.ledger.latest(part) + 1, self._delta_base(stage, part))
        self.ledger.record_training(stage.node, {part: self.checksum(part) for part in self._trained_parts(stage)})
        self.applied = 2 * stage.index + 1

    def hand_on(self, stage: Stage, deliver: bool = True) -> int:
        """Sends the next stage's node the parts it lacks (nothing when it is the same node or there is none).

        With `deliver=False` the payload is built and recorded but not sent: a resumed rank's hop that left before
        the crash.
        """
        following = self.plan[stage.index + 1] if stage.index + 1 < len(self.plan) else None
        if following is None or following.node == stage.node:
            return 0
        return self._send(stage, following, deliver)

    def finish(self) -> None:
        """After this process's last stage: catches up on the version bookkeeping and hands every process the final
        state."""
        self._apply_until(2 * len(self.plan))
        if len(self.local_nodes) == self.ledger.num_nodes:
            return  # simulation: every node's tensors are in this model already
        last = self.plan[-1]
        spec_parts = self.part_map.parts
        encoded = None
        if last.node in self.local_nodes:
            payload = build_payload(
                self.model, self.part_map, spec_parts, self.ledger.state(last.node), self.spec, last.node, -1, -1
            )
            encoded = encode_payload(payload, self.part_of)
        encoded = self.transport.broadcast_final(encoded, last.node)
        if last.node not in self.local_nodes:
            payload = decode_payload(encoded, self.spec, expected_parts=spec_parts)
            payload.load_into(self.model)

    def _delta_base(self, stage: Stage, part: str) -> int:
        """The version the delta of `stage`'s new version of `part` is against: the one the stage started from when
        every node that will receive the new version (before `part` trains again) holds exactly it, else 0 (the
        initial values). Worked out from the plan and the ledger, so every process agrees."""
        start = self.ledger.versions[stage.node][part]
        if start == 0 or start not in self.deltas.start.get(part, {}):
            return 0
        versions = [held[part] for held in self.ledger.versions]
        versions[stage.node] = new = self.ledger.latest(part) + 1
        timeline, position = self._timeline, self._position(stage)
        for previous, following in zip(timeline[position:], timeline[position + 1 :]):
            sender, receiver = previous.node, following.node
            if sender != receiver and versions[receiver] < versions[sender]:
                if versions[sender] == new and versions[receiver] != start:
                    return 0
                versions[receiver] = versions[sender]
            if part in self._trained_parts(following):
                break
        return start

    def save_deltas(self, folder: Path) -> None:
        """Quantized schemes: writes this process's residuals and latest deltas into a stage checkpoint folder."""
        if self.deltas is not None:
            self.deltas.save(Path(folder), self.local_nodes)

    def load_deltas(self, folder: Path) -> None:
        """Quantized schemes: restores what [`save_deltas`] wrote."""
        if self.deltas is not None:
            self.deltas.load(Path(folder))

    def restore(self, versions, checksums, rng: dict, next_stage: int) -> None:
        """Puts back the bookkeeping a stage checkpoint saved before `next_stage`'s hop."""
        self.ledger.versions = [dict(v) for v in versions]
        self.ledger.checksums = [dict(c) for c in checksums]
        self.rng = dict(rng)
        self.applied = 2 * (next_stage - 1) + 1

    def resume_at(self, stage: int) -> None:
        """A resumed run goes on at `stage`. Nothing to do here: each rank receives its hops into later stages as they
        come, and `restore` put back the bookkeeping."""

    @property
    def _timeline(self) -> list[Stage]:
        """The stages whose events the ledger replays (the plan; failover replays its effective plan instead)."""
        return self.plan

    def _position(self, stage: Stage) -> int:
        """Where `stage` sits in `_timeline`."""
        return stage.index

    def _apply_until(self, event: int) -> None:
        """Applies, as metadata, the events of other processes' stages up to (not including) `event`: two events per
        stage of `_timeline` (its training, then its hop), counted by position."""
        timeline = self._timeline
        while self.applied < event:
            position, hop = divmod(self.applied, 2)
            stage = timeline[position]
            if not hop:
                self.ledger.record_training(stage.node, dict.fromkeys(self._trained_parts(stage), ""))
            elif position + 1 < len(timeline) and timeline[position + 1].node != stage.node:
                receiver = timeline[position + 1].node
                lacking = self.ledger.lacking(receiver, stage.node)
                self.ledger.record_receipt(receiver, self.ledger.state(stage.node), lacking)
            self.applied += 1

    def _send(self, stage: Stage, following: Stage, deliver: bool = True) -> int:
        start = time.perf_counter()
        lacking = self.ledger.lacking(following.node, stage.node)
        deltas = {}
        if self.deltas is not None:  # (in cs topology the coordinator forwards these bytes unchanged)
            held, mine = self.ledger.versions[following.node], self.ledger.versions[stage.node]
            deltas = {p: d for p in lacking if (d := self.deltas.delta_for(p, mine[p], held[p])) is not None}
        payload = build_payload(
            self.model,
            self.part_map,
            lacking,
            self.ledger.state(stage.node),
            self.spec,
            sender=stage.node,
            receiver=following.node,
            stage=following.index,
            deltas=deltas,
        )
        encoded = encode_payload(payload, self.part_of)
        if deliver:
            self._deliver(stage, following, encoded)
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

    def _deliver(self, stage: Stage, following: Stage, encoded) -> None:
        self.transport.send(stage.node, following.node, encoded, following.index)

    def gather_text(self, name: str, text: str) -> list[str] | None:
        """Every process's `text` on the first one (None elsewhere); see `Transport.gather_text`."""
        return self.transport.gather_text(name, text)

    # -- payloads outside the plan's stages (the final pass) --

    def pass_on(self, encoded: EncodedPayload | None, src: int, dst: int, hop: str) -> EncodedPayload | None:
        """Moves `encoded` (given on node `src`'s process) to node `dst`'s process, outside the plan's stages (the
        final pass's statistics); returns it there and None on every other process. Every process calls it for every
        such hop, in the same order (in cs topology the coordinator passes it on). `hop` names it uniquely in the run.
        In one process (simulation) it returns `encoded`: both ends are local."""
        local_src, local_dst = src in self.local_nodes, dst in self.local_nodes
        if local_src and local_dst:
            return encoded
        if local_src:
            self.transport.send_to(dst, encoded, hop, src=src, dst=dst)
        elif local_dst:
            return self.transport.recv_from(src, hop, src=src, dst=dst)
        return None

    def broadcast(self, encoded: EncodedPayload | None, src: int) -> EncodedPayload | None:
        """Hands `encoded` from node `src`'s process to every process (the final pass's repairs, after the run's final
        hand-over); returns it everywhere. In one process: `encoded`."""
        return self.transport.broadcast_final(encoded, src)

    def _receive(self, previous: Stage, stage: Stage) -> tuple[int, float]:
        start = time.perf_counter()
        lacking = self.ledger.lacking(stage.node, previous.node)
        encoded = self.transport.recv(previous.node, stage.node, stage.index)
        arrived = time.perf_counter()
        payload = decode_payload(encoded, self.spec, expected_parts=lacking)
        where = f"hop from node {previous.node} to node {stage.node} (stage {stage.index})"
        bases = self._delta_bases(payload, payload.parts, self.ledger.versions[stage.node], where)
        payload.load_into(self.model, bases)
        self._keep_deltas(payload, payload.parts)
        self.ledger.record_receipt(stage.node, payload.state, payload.parts)
        stale = self.ledger.mismatches(stage.node, payload.state)
        if stale:
            raise PayloadError(
                f"After the hop from node {previous.node} to node {stage.node} (stage {stage.index}) the receiver "
                f"does not hold the sender's state for parts {stale}: its version vector is out of step."
            )
        self.last_load_seconds = time.perf_counter() - arrived  # decode + verify + load, without the wait
        return encoded.nbytes, time.perf_counter() - start

    def _delta_bases(self, payload, parts: Sequence[str], held: dict[str, int], where: str) -> dict[str, torch.Tensor]:
        """The base values of the tensors of `parts` that `payload` carries as deltas, once each delta's base is 0 or
        the version this process holds (`held`: part -> version) and each rebuilt part is the sender's bits (its
        checksum in the manifest's state): all checked before anything loads."""
        deltas = {part: base for part, base in payload.deltas.items() if part in parts}
        bases = {}
        for part, base in deltas.items():
            if base not in (0, held[part]):
                raise PayloadError(
                    f"The {where} carries part {part!r} as a delta against version {base}, but the receiver holds "
                    f"version {held[part]}."
                )
            bases |= self.deltas.base_values(part, base)
        rebuilt = payload.rebuild(bases, deltas) if deltas else {}
        for part, base in deltas.items():
            values = ((n, rebuilt.get(n, payload.tensors.get(n))) for n in self.part_map.tensor_names(part))
            if tensors_checksum(values) != payload.state[part][1]:
                raise PayloadError(
                    f"The {where}: part {part!r} rebuilt on version {base} does not match the sender's checksum."
                )
        return bases

    def _keep_deltas(self, payload, parts: Sequence[str]) -> None:
        """Quantized schemes: remembers how `payload` brought each of `parts` (its delta, to forward unchanged, or
        whole)."""
        if self.deltas is None:
            return
        for part in parts:
            base = payload.deltas.get(part)
            delta = None if base is None else (base, {n: payload.quantized[n] for n in self.deltas.float_names[part]})
            self.deltas.received(part, payload.state[part][0], delta)
