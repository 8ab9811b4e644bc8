"""cs topology that survives a dead node: the coordinator drives the plan, re-plans around a node that stops answering.

In cs topology every payload passes through the coordinator (rank 0), so it can decide who trains next. Here it does
so explicitly, and that is what lets the run go on when a node dies:

* **Turns.** A node trains only when the coordinator publishes its turn in the rendezvous store
  (`snake/cs/turn/<rank>/<n>`: the stage to train, or "done"); a node's consecutive stages need no new turn. The
  coordinator walks the effective plan: it publishes the turn, delivers the payload into the node's run, and waits for
  a payload after every stage of the run. Every rank keeps waiting inside its `Trainer` loop until it is told it is
  done, so a stage can still be given to it late.
* **Every stage reaches the coordinator.** After each stage that its node follows with another of its own, the node
  uploads the parts that stage trained to the coordinator (hop `<next stage>`, node -> coordinator) before it goes on;
  after the last stage of its run it sends the payload for the next node as usual (the coordinator passes it on).
  So a completed stage's work is never lost with its node (DESIGN §8). The uploads are cs wire traffic, like the
  forwarding through the coordinator: they count in the transport's `link_bytes`, not as Snake hops in the report
  (whose hops stay those of the plan, as in the simulation).
* **Authoritative state.** The coordinator loads every payload it receives into its own model and keeps the version
  and checksum of each part it holds: at any moment it holds the newest version of every part as of the last
  completed stage. Between its own stages this is ahead of its own node's version vector, which only ever costs it a
  receipt of the same tensors. Under `payload_dtype="int8"`/`"int4"` a payload carries deltas: the coordinator rebuilds
  each on its own version of the part (checked against the sender's checksum) and forwards the encoded bytes unchanged,
  so both wire hops carry the delta (docs/payload_compression.md).
* **Failure.** When a node does not answer (no heartbeat for `hop_timeout` seconds, or its link breaks) while the
  coordinator delivers to it or waits for its payload, the coordinator marks it failed, logs a warning and rewrites
  the *effective plan* from the first stage whose payload did not reach it. The new plan and the failure list
  are published in the store (`snake/cs/plan/<generation>`); every rank replays its version bookkeeping over the
  effective plan, and the payload into the rewritten stage is rebuilt by the coordinator from its authoritative state,
  against the new receiver's version vector.
* **Re-plan rule** (`on_node_failure="replan"`, the default): every remaining stage of a failed node (from the first
  one whose payload did not reach the coordinator) goes to the node of the nearest earlier stage of the effective
  plan that runs on a live node (for the plan's first stage, the nearest later one; else the coordinator), with the
  same group, steps and global-step position, trained on that node's own shard. When the failed node finished no
  stage of its run, that node already holds the newest state and the re-planned stage needs no hop; else the
  coordinator sends it what it lacks. A serpentine plan keeps its shape: the dead node's neighbours become neighbours.
  The re-planned run is what the simulation gives for the same effective plan (`SnakeReport.failures` lists it).
  `on_node_failure="drop"` removes those stages instead: the learning-rate schedule jumps over their steps.
* A stage counts as done once its payload reached the coordinator: a node that dies while training loses only that
  stage. **A dead coordinator is not survivable**: every other rank raises [`HopTimeoutError`] naming it; relaunching
  every rank with `resume_from_checkpoint=True` goes on from the stage checkpoints (`snake_hf.trainer.resume`).
  A run that a failure re-planned cannot be resumed that way (its checkpoints are refused, since they follow another
  plan than the relaunched ranks'). After a resume, the coordinator holds the newest state only of the parts that
  reached it since; a node failure that needs older parts from it stops the run with an error instead of re-planning.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence

from torch import nn
from transformers.utils import logging

from ..blocks import PartMap
from ..plan import Stage, replan_after_failure
from ..report import HopRecord, SnakeReport
from .payload import EncodedPayload, PayloadSpec, build_payload, decode_payload, encode_payload
from .relay import Relay
from .transport import CoordinatedTransport, HopTimeoutError


logger = logging.get_logger(__name__)

__all__ = ["FailoverRelay"]

_FINAL = "final/cs"
_TURN, _PLAN, _REPORT = "snake/cs/turn/{}/{}", "snake/cs/plan/{}", "snake/cs/report/{}"


class FailoverRelay(Relay):
    """The [`Relay`] of the cs topology in distributed mode: turns from the coordinator, and failover.

    Args:
        model (`nn.Module`), part_map (`PartMap`), spec (`PayloadSpec`), plan (`Sequence[Stage]`), num_nodes (`int`),
            seed (`int`), report (`SnakeReport`): as for [`Relay`].
        transport (`CoordinatedTransport`): e.g. a [`DistributedTransport`] in cs topology (its `coordinator`
            drives the plan; turns and plans go through its `store`).
        local_nodes (`set[int]`): this process's one node (its rank).
        on_node_failure (`str`, defaults to `"replan"`): `"replan"` a dead node's stages or `"drop"` them (see the
            module docstring).

    Example:
        ```python
        >>> relay = FailoverRelay(model, part_map, spec, plan, 3, 0, transport, report, {rank})  # rank = node
        >>> stage = relay.next_stage()  # blocks until the coordinator gives this rank a turn (None: done)
        ```
    """

    transport: CoordinatedTransport  # narrower than a `Relay`'s: turns, plans and the coordinator's own routing

    def __init__(
        self,
        model: nn.Module,
        part_map: PartMap,
        spec: PayloadSpec,
        plan: Sequence[Stage],
        num_nodes: int,
        seed: int,
        transport: CoordinatedTransport,
        report: SnakeReport,
        local_nodes: set[int],
        on_node_failure: str = "replan",
    ):
        super().__init__(model, part_map, spec, plan, num_nodes, seed, transport, report, local_nodes)
        self.mode = on_node_failure
        self.rank = next(iter(self.local_nodes))
        self.coordinator = self.transport.coordinator
        self.effective: list[Stage] = list(self.plan)
        self._positions = {stage.index: i for i, stage in enumerate(self.effective)}
        self.generation = 0
        self.failed: set[int] = set()
        self.failures: list[dict] = []
        self._current: Stage | None = None
        self._turns: dict[int, int] = {}  # turns published per rank (coordinator) / received (a node: its own)
        # The wait for the turn of the stage `next_stage` returned, which `enter` adds to that stage's wait: in cs a
        # rank waits through the other ranks' training here, not in the receive that follows (p2p waits in `recv`).
        self._turn_seconds = 0.0
        # coordinator only
        self._frontier = 0  # position of the next stage to hand out
        self._awaiting: int | None = None  # position of the stage on another node whose payload is due
        self._carry: tuple[EncodedPayload, object] | None = None  # the payload into the next run, decoded too
        self._carry_load_seconds = 0.0  # decoding and absorbing the carried payload: its receiver's load time
        self._held = self.ledger.state(self.rank)  # (version, checksum) of every part in the coordinator's model

    @property
    def _is_coordinator(self) -> bool:
        return self.rank == self.coordinator

    def _position(self, stage: Stage) -> int:
        return self._positions[stage.index]

    # -- the turn protocol --

    def next_stage(self) -> Stage | None:
        """The next stage this rank trains (None: the run is done). Blocks until the coordinator says which."""
        start, self._turn_seconds = time.perf_counter(), 0.0
        if not self._is_coordinator:  # the stages it trained so far, for the final report should it die
            self.transport.publish(_REPORT.format(self.rank), json.dumps(self.report.to_dict(), default=str))
        if self._current is not None:
            position = self._position(self._current) + 1
            if position < len(self.effective) and self.effective[position].node == self.rank:
                self._current = self.effective[position]  # a consecutive stage of the same node: no turn needed
                self._frontier = position + 1
                return self._current
        if self._is_coordinator:
            self._current = self._drive()  # forwards the other ranks' payloads while they train
            self._turn_seconds = time.perf_counter() - start
            return self._current
        count = self._turns.get(self.rank, 0)
        self._turns[self.rank] = count + 1
        key = _TURN.format(self.rank, count)
        self.transport.wait_for(
            {self.coordinator: key},
            lambda reason: (
                f"waiting for a turn from coordinator {self.coordinator}: {reason} (topology cs; a dead "
                "coordinator is not survivable)"
            ),
        )
        turn = json.loads(self.transport.read(key, self.coordinator, f"turn {count} of rank {self.rank}"))
        self._adopt(turn["generation"])
        self._current = None if turn["stage"] is None else self.effective[self._positions[turn["stage"]]]
        self._turn_seconds = time.perf_counter() - start
        return self._current

    def _drive(self) -> Stage | None:
        """Coordinator: hands out turns and payloads along the effective plan until its own next stage (or the end)."""
        while True:
            if self._awaiting is not None:
                position = self._awaiting
                node = self.effective[position].node
                following = self.effective[position + 1] if position + 1 < len(self.effective) else None
                hop = following.index if following is not None else _FINAL
                try:
                    encoded = self.transport.recv_from(node, hop, src=node, dst=self.rank)
                except HopTimeoutError as error:
                    self._fail(node, position, error)
                    continue
                arrived = time.perf_counter()
                payload = decode_payload(encoded, self.spec)  # a refused payload is an error, not a dead node
                self._absorb(payload)
                self._carry_load_seconds = time.perf_counter() - arrived
                if following is not None and following.node == node:  # an upload: the node goes on with its run
                    self._awaiting = position + 1
                    continue
                self._carry = (encoded, payload) if following is not None else None
                self._awaiting, self._frontier = None, position + 1
            if self._frontier >= len(self.effective):
                return None
            stage = self.effective[self._frontier]
            if stage.node == self.rank:
                self._frontier += 1
                return stage
            self._publish_turn(stage.node, stage.index)
            previous = self.effective[self._frontier - 1] if self._frontier > 0 else None
            if previous is not None and previous.node != stage.node:
                encoded = self._carry[0] if self._carry is not None else self._rebuilt(previous, stage)
                try:
                    self.transport.send_to(stage.node, encoded, stage.index, src=previous.node, dst=stage.node)
                except HopTimeoutError as error:
                    self._fail(stage.node, self._frontier, error)
                    continue
            self._carry = None
            self._awaiting = self._frontier

    def _publish_turn(self, node: int, stage: int | None) -> None:
        count = self._turns.get(node, 0)
        self._turns[node] = count + 1
        turn = {"stage": stage, "generation": self.generation}
        self.transport.publish(_TURN.format(node, count), json.dumps(turn))

    def _absorb(self, payload) -> None:
        """Coordinator: keeps the newest version of every part in its model (the authoritative state).

        Under a quantized scheme a part may come as a delta (which the coordinator forwards unchanged): it is rebuilt
        on the coordinator's own version of the part, checked against the sender's checksum, like any receiver's. In an
        unbroken run the coordinator always holds the delta's base (the version the part's trainer started from, the
        newest before it, or 0). After a resume it restored an older state and may not: such a part stays at its
        older version (a failover that would need it stops with an error, as for any part that did not reach it)."""
        state = payload.state
        held = {part: version for part, (version, _) in self._held.items()}
        new = [part for part in payload.parts if held[part] != state[part][0]]
        usable = [part for part in new if payload.deltas.get(part, 0) in (0, held[part])]
        if len(usable) < len(new):
            logger.info(f"The coordinator lacks the base of the deltas of {sorted(set(new) - set(usable))}; it keeps "
                        "its older versions of them.")  # fmt: skip
        where = f"payload from node {payload.manifest['sender']} through the coordinator"
        bases = self._delta_bases(payload, usable, held, where) if self.deltas is not None else None
        payload.load_into(self.model, bases, parts=usable)
        self._keep_deltas(payload, usable)
        for part in usable:
            self._held[part] = state[part]

    def _rebuilt(self, previous: Stage, stage: Stage) -> EncodedPayload:
        """Coordinator, after a failure: the payload into `stage`, from its authoritative state."""
        self._apply_until(2 * self._position(stage) - 1)
        lacking = self.ledger.lacking(stage.node, previous.node)
        stale = [p for p in lacking if self._held[p][0] != self.ledger.versions[previous.node][p]]
        if stale:
            raise RuntimeError(f"The coordinator's state of parts {stale} is older than the effective plan says.")
        payload = build_payload(
            self.model, self.part_map, lacking, self._held, self.spec, previous.node, stage.node, stage.index
        )
        encoded = encode_payload(payload, self.part_of)
        self.report.hops.append(
            HopRecord(
                from_stage=previous.index, to_stage=stage.index, sender=self.rank, receiver=stage.node,
                parts=sorted(lacking), nbytes=encoded.nbytes, tensor_nbytes=encoded.data_nbytes,
            )
        )  # fmt: skip
        return encoded

    def _fail(self, node: int, position: int, error: Exception) -> None:
        """Coordinator: `node` did not answer; rewrites the effective plan from `position` and publishes it."""
        self.failed.add(node)
        stage = self.effective[position]
        self.effective, moved, dropped = replan_after_failure(
            self.effective, position, self.failed, self.mode, self.coordinator
        )
        self._positions = {s.index: i for i, s in enumerate(self.effective)}
        self.generation += 1
        failure = {"rank": node, "stage": stage.index, "action": self.mode, "replanned": moved, "dropped": dropped,
                   "reason": str(error), "effective_plan": [s.to_dict() for s in self.effective]}  # fmt: skip
        self.failures.append(failure)
        self.report.failures = list(self.failures)
        published = {"effective": [s.to_dict() for s in self.effective], "failures": self.failures}
        self.transport.publish(_PLAN.format(self.generation), json.dumps(published))
        what = f"re-planned {moved}" if self.mode == "replan" else f"dropped stages {dropped}"
        logger.warning(f"Node {node} failed at stage {stage.index} ({error}); it is skipped from now on, {what}.")
        self._carry, self._awaiting, self._frontier = None, None, position

    def _adopt(self, generation: int) -> None:
        """A node: takes over the effective plan the coordinator published as `generation`."""
        if generation == self.generation:
            return
        published = json.loads(self.transport.read(_PLAN.format(generation), self.coordinator, f"plan {generation}"))
        self.effective = [Stage.from_dict(s) for s in published["effective"]]
        self._positions = {s.index: i for i, s in enumerate(self.effective)}
        self.failures = published["failures"]
        self.failed = {f["rank"] for f in self.failures}
        self.report.failures = list(self.failures)
        self.generation = generation

    # -- stage boundaries over the effective plan --

    def enter(self, stage: Stage) -> tuple[int, float]:
        """As [`Relay.enter`]; the seconds also hold the wait for `stage`'s turn in `next_stage` (0 for a node's
        consecutive stage), so that a stage's `wait_seconds` covers the same as in p2p: the wait, then the receipt."""
        position = self._position(stage)
        self._apply_until(2 * position - 1 if position > 0 else 0)
        nbytes, seconds, self.last_load_seconds = 0, 0.0, 0.0
        previous = self.effective[position - 1] if position > 0 else None
        if previous is not None and previous.node != stage.node:
            if self._is_coordinator:
                nbytes = self._take_carry(previous)
            else:
                nbytes, seconds = self._receive(previous, stage)  # always from the coordinator in cs
        self.applied = 2 * position
        seconds, self._turn_seconds = seconds + self._turn_seconds, 0.0
        return nbytes, seconds

    def _take_carry(self, previous: Stage) -> int:
        """Coordinator entering its own stage: its model already holds the newest state; record the receipt."""
        lacking = self.ledger.lacking(self.rank, previous.node)
        if self._carry is None:  # after a failure: from the authoritative state
            self.ledger.record_receipt(self.rank, self._held, lacking)
            return 0
        encoded, payload = self._carry
        self._carry = None
        self.last_load_seconds = self._carry_load_seconds  # received, decoded and loaded in `_drive`
        self.ledger.record_receipt(self.rank, payload.state, payload.parts)
        stale = self.ledger.mismatches(self.rank, payload.state)
        if sorted(payload.parts) != sorted(lacking) or stale:
            raise RuntimeError(f"The payload after stage {previous.index} does not match the version vectors.")
        return encoded.nbytes

    def close_stage(self, stage: Stage) -> None:
        super().close_stage(stage)
        self.applied = 2 * self._position(stage) + 1
        if self._is_coordinator:
            self._held = self.ledger.state(self.rank)  # it just trained: it holds the newest of everything

    def hand_on(self, stage: Stage, deliver: bool = True) -> int:
        position = self._position(stage)
        following = self.effective[position + 1] if position + 1 < len(self.effective) else None
        if following is not None and following.node == stage.node:
            if deliver and not self._is_coordinator:
                self._upload(stage, following)
            return 0
        if following is None:
            if deliver and not self._is_coordinator:  # the last stage: the whole state goes to the coordinator
                payload = build_payload(
                    self.model, self.part_map, self.part_map.parts, self.ledger.state(self.rank), self.spec,
                    self.rank, self.coordinator, -1,
                )  # fmt: skip
                encoded = encode_payload(payload, self.part_of)
                self.transport.send_to(self.coordinator, encoded, _FINAL, src=self.rank, dst=self.coordinator)
            return 0
        return self._send(stage, following, deliver)

    def _upload(self, stage: Stage, following: Stage) -> None:
        """A node going on with its own next stage: the parts `stage` trained go to the coordinator first, so that the
        stage's work survives this node (not a Snake hop: nobody else lacks them yet, and the report does not list it).
        Under a quantized scheme they go as the deltas the stage just made (against 0 or the version it started
        from, which the coordinator holds: see `_absorb`)."""
        trained, mine = self._trained_parts(stage), self.ledger.versions[self.rank]
        deltas = {}
        if self.deltas is not None:
            deltas = {p: d for p in trained if (d := self.deltas.delta_of(p, mine[p])) is not None}
        payload = build_payload(
            self.model, self.part_map, trained, self.ledger.state(self.rank), self.spec,
            self.rank, self.coordinator, following.index, deltas=deltas,
        )  # fmt: skip
        encoded = encode_payload(payload, self.part_of)
        self.transport.send_to(self.coordinator, encoded, following.index, src=self.rank, dst=self.coordinator)

    def _deliver(self, stage: Stage, following: Stage, encoded: EncodedPayload) -> None:
        if self._is_coordinator:
            self._carry = (encoded, None)  # _drive delivers it, after publishing the receiver's turn
        else:
            super()._deliver(stage, following, encoded)  # to the coordinator, which passes it on

    def finish(self) -> None:
        """Coordinator: tells every live node it is done and hands it the final state; a node: receives it."""
        parts = self.part_map.parts
        if not self._is_coordinator:
            encoded = self.transport.recv_from(self.coordinator, _FINAL, src=self.coordinator, dst=self.rank)
            decode_payload(encoded, self.spec, expected_parts=parts).load_into(self.model)
            return
        live = [r for r in range(self.ledger.num_nodes) if r != self.rank and r not in self.failed]
        for node in live:
            self._publish_turn(node, None)
        payload = build_payload(self.model, self.part_map, parts, self._held, self.spec, self.rank, -1, -1)
        encoded = encode_payload(payload, self.part_of)
        for node in live:
            try:
                self.transport.send_to(node, encoded, _FINAL, src=self.rank, dst=node)
            except HopTimeoutError as error:  # too late to re-plan: the run is done; the node just misses the end
                logger.warning(f"Node {node} did not take the final state: {error}")
                self.failures.append({"rank": node, "stage": None, "action": "none", "reason": str(error)})
                self.report.failures = list(self.failures)

    def pass_on(self, encoded: EncodedPayload | None, src: int, dst: int, hop: str) -> EncodedPayload | None:
        """As [`Relay.pass_on`], through the coordinator when neither end is it (it forwards the bytes unchanged; the
        receiver verifies them)."""
        path = [src] + ([self.coordinator] if self.coordinator not in (src, dst) else []) + [dst]
        if self.rank not in path:
            return None
        position = path.index(self.rank)
        if position > 0:
            encoded = self.transport.recv_from(path[position - 1], hop, src=src, dst=dst)
        if position < len(path) - 1:
            self.transport.send_to(path[position + 1], encoded, hop, src=src, dst=dst)
            return None
        return encoded

    def gather_text(self, name: str, text: str) -> list[str] | None:
        """Every live rank's `text` on the coordinator, plus the last report each failed rank published."""
        final = f"{_REPORT.format(self.rank)}/{name}"
        if not self._is_coordinator:
            self.transport.publish(final, text)
            return None
        others = [r for r in range(self.ledger.num_nodes) if r != self.rank]
        live = {r: f"{_REPORT.format(r)}/{name}" for r in others if r not in self.failed}
        self.transport.wait_for(live, lambda reason: f"gathering {name!r}: {reason} (topology cs)", drop_absent=True)
        texts = [text]
        store = self.transport.store
        for r in others:
            for key in (f"{_REPORT.format(r)}/{name}", _REPORT.format(r)):
                if store.check([key]):
                    texts.append(self.transport.read(key, r, f"report of rank {r}"))
                    break
        return texts

    def restore(self, versions, checksums, rng: dict, next_stage: int) -> None:
        super().restore(versions, checksums, rng, next_stage)
        self._held = self.ledger.state(self.rank)  # a checkpoint is taken right after this rank's own stage

    def resume_at(self, stage: int) -> None:
        """A resumed run goes on at `stage`. The rank that trained `stage - 1` hands its payload on again (to the
        coordinator: the hop into `stage`, or an upload when `stage` is its own too); the coordinator waits for it."""
        self._frontier = stage
        holder = self.effective[stage - 1]
        if holder.node == self.rank:
            self._current = holder  # as in an unbroken run: its own next stage needs no turn
        elif self._is_coordinator:
            self._awaiting = stage - 1

    @property
    def _timeline(self) -> list[Stage]:
        """The ledger replays other ranks' events over the effective (re-planned) plan."""
        return self.effective
