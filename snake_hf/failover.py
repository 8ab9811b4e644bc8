"""cs topology that survives a dead node: the coordinator drives the plan, re-plans around a node that stops answering.

In cs topology every payload passes through the coordinator (rank 0), so it can decide who trains next. Here it does
so explicitly, and that is what lets the run go on when a node dies:

* **Turns.** A node trains only when the coordinator publishes its turn in the rendezvous store
  (`snake/cs/turn/<rank>/<n>`: the stage to train, or "done"); a node's consecutive stages need no new turn. The
  coordinator walks the effective plan: it publishes the turn, delivers the payload into the node's run, and waits for
  the payload out of it. Every rank keeps waiting inside its `Trainer` loop until it is told it is done, so a stage can
  still be given to it late.
* **Authoritative state.** The coordinator loads every payload it passes on into its own model and keeps the version
  and checksum of each part it holds: at any moment it holds the newest version of every part (a stage's node holds
  the newest state, and everything that node learned came to it through the coordinator). Between its own stages
  this is ahead of its own node's version vector, which only ever costs it a receipt of the same tensors.
* **Failure.** When a node does not answer (no heartbeat for `hop_timeout` seconds, or its link breaks) while the
  coordinator delivers to it or waits for its payload, the coordinator marks it failed, logs a warning and rewrites
  the *effective plan* from the first stage of the failed node's unfinished run. The new plan and the failure list
  are published in the store (`snake/cs/plan/<generation>`); every rank replays its version bookkeeping over the
  effective plan, and the payload into the rewritten stage is rebuilt by the coordinator from its authoritative state,
  against the new receiver's version vector.
* **Re-plan rule** (`on_node_failure="replan"`, the default): every remaining stage of a failed node (from the first
  stage of its unfinished run on) goes to the node of the nearest earlier stage of the effective plan that runs on a
  live node (for the plan's first stage, the nearest later one; else the coordinator), with the same group, steps
  and global-step position, trained on that node's own shard. That node already holds the newest state, so the
  re-planned stage needs no hop, and a serpentine plan keeps its shape: the dead node's neighbours become neighbours.
  The re-planned run is what the simulation gives for the same effective plan (`SnakeReport.failures` lists it).
  `on_node_failure="drop"` removes those stages instead: the learning-rate schedule jumps over their steps.
* A stage counts as done once its payload reached the coordinator: a node that dies after training but before its
  payload left loses that run, which is then re-planned. **A dead coordinator is not survivable**: every other rank
  raises [`HopTimeoutError`] naming it.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import replace

from transformers import TrainerCallback
from transformers.utils import logging

from .payload import EncodedPayload, build_payload, decode_payload, encode_payload
from .plan import Stage
from .relay import Relay
from .report import HopRecord
from .transport import HopTimeoutError


logger = logging.get_logger(__name__)

__all__ = ["ON_NODE_FAILURE", "FailoverRelay", "StageBoundaryCallback", "replan_after_failure"]

ON_NODE_FAILURE = ("replan", "drop")
_FINAL = "final/cs"
_TURN, _PLAN, _REPORT = "snake/cs/turn/{}/{}", "snake/cs/plan/{}", "snake/cs/report/{}"


def replan_after_failure(
    effective: Sequence[Stage], position: int, failed: set[int], mode: str = "replan", fallback: int = 0
) -> tuple[list[Stage], list[dict], list[int]]:
    """Rewrites an effective plan from `position` on, for the failed nodes `failed` (pure; see the module docstring).

    Args:
        effective (`Sequence[Stage]`): the effective plan so far (stages keep their original `index`).
        position (`int`): position in `effective` of the first stage whose result did not reach the coordinator.
        failed (`set[int]`): every failed node.
        mode (`str`, defaults to `"replan"`): `"replan"` moves the failed nodes' stages, `"drop"` removes them.
        fallback (`int`, defaults to 0): the node that takes a stage when no live node runs any other (coordinator).

    Returns:
        `tuple[list[Stage], list[dict], list[int]]`: the new effective plan, the moves (`{"stage", "from", "to"}`)
        and the indices of dropped stages.

    Example:
        ```python
        >>> from snake_hf import serpentine_plan
        >>> plan, moved, dropped = replan_after_failure(serpentine_plan(3, 2, 1, 1), 1, {1})
        >>> [s.node for s in plan], moved
        ([0, 0, 2, 2, 2, 0], [{'stage': 1, 'from': 1, 'to': 0}, {'stage': 4, 'from': 1, 'to': 2}])
        ```
    """
    if mode not in ON_NODE_FAILURE:
        raise ValueError(f"`on_node_failure` ({mode!r}) is not valid; use one of {list(ON_NODE_FAILURE)}.")
    new, moved, dropped = list(effective[:position]), [], []
    tail = list(effective[position:])
    for stage in tail:
        if stage.node not in failed:
            new.append(stage)
        elif mode == "drop":
            dropped.append(stage.index)
        else:
            node = next((s.node for s in reversed(new) if s.node not in failed), None)
            if node is None:
                node = next((s.node for s in tail if s.node not in failed), fallback)
            new.append(replace(stage, node=node))
            moved.append({"stage": stage.index, "from": stage.node, "to": node})
    return new, moved, dropped


class StageBoundaryCallback(TrainerCallback):
    """Closes a stage at its last optimizer step and asks the relay for the next (or stops the loop when done)."""

    def __init__(self, trainer):
        self.trainer = trainer

    def on_step_end(self, args, state, control, **kwargs):
        self.trainer._failover_boundary(control)
        return control


class FailoverRelay(Relay):
    """The [`Relay`] of the cs topology in distributed mode: turns from the coordinator, and failover.

    Same arguments as [`Relay`], plus `on_node_failure` (`str`, defaults to `"replan"`). The transport must be a
    [`DistributedTransport`] in cs topology; this process runs one node (its rank).
    """

    def __init__(self, *args, on_node_failure: str = "replan", **kwargs):
        super().__init__(*args, **kwargs)
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
        # coordinator only
        self._frontier = 0  # position of the next stage to hand out
        self._awaiting: tuple[int, int] | None = None  # a node's run (first, last position) whose payload is due
        self._carry: tuple[EncodedPayload, object] | None = None  # the payload into the next run, decoded too
        self._held = self.ledger.state(self.rank)  # (version, checksum) of every part in the coordinator's model

    @property
    def _is_coordinator(self) -> bool:
        return self.rank == self.coordinator

    def _position(self, stage: Stage) -> int:
        return self._positions[stage.index]

    # -- the turn protocol --

    def next_stage(self) -> Stage | None:
        """The next stage this rank trains (None: the run is done). Blocks until the coordinator says which."""
        if self._current is not None:
            position = self._position(self._current) + 1
            if position < len(self.effective) and self.effective[position].node == self.rank:
                self._current = self.effective[position]  # a consecutive stage of the same node: no turn needed
                self._frontier = position + 1
                return self._current
        if self._is_coordinator:
            self._current = self._drive()
            return self._current
        self.transport.store.set(_REPORT.format(self.rank), json.dumps(self.report.to_dict(), default=str))
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
        turn = json.loads(self.transport.store.get(key).decode())
        self._adopt(turn["generation"])
        self._current = None if turn["stage"] is None else self.effective[self._positions[turn["stage"]]]
        return self._current

    def _drive(self) -> Stage | None:
        """Coordinator: hands out turns and payloads along the effective plan until its own next stage (or the end)."""
        while True:
            if self._awaiting is not None:
                first, last = self._awaiting
                node = self.effective[first].node
                hop = self.effective[last + 1].index if last + 1 < len(self.effective) else _FINAL
                try:
                    encoded = self.transport.recv_from(node, hop, src=node, dst=self.rank)
                except HopTimeoutError as error:
                    self._fail(node, first, error)
                    continue
                payload = decode_payload(encoded, self.spec)  # a refused payload is an error, not a dead node
                self._absorb(payload)
                self._carry = (encoded, payload) if hop != _FINAL else None
                self._awaiting, self._frontier = None, last + 1
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
            last = self._frontier
            while last + 1 < len(self.effective) and self.effective[last + 1].node == stage.node:
                last += 1
            self._awaiting = (self._frontier, last)

    def _publish_turn(self, node: int, stage: int | None) -> None:
        count = self._turns.get(node, 0)
        self._turns[node] = count + 1
        turn = {"stage": stage, "generation": self.generation}
        self.transport.store.set(_TURN.format(node, count), json.dumps(turn))

    def _absorb(self, payload) -> None:
        """Coordinator: keeps the newest version of every part in its model (the authoritative state)."""
        payload.load_into(self.model)
        state = payload.state
        for part in payload.parts:
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
        self.transport.store.set(_PLAN.format(self.generation), json.dumps(published))
        what = f"re-planned {moved}" if self.mode == "replan" else f"dropped stages {dropped}"
        logger.warning(f"Node {node} failed at stage {stage.index} ({error}); it is skipped from now on, {what}.")
        self._carry, self._awaiting, self._frontier = None, None, position

    def _adopt(self, generation: int) -> None:
        """A node: takes over the effective plan the coordinator published as `generation`."""
        if generation == self.generation:
            return
        published = json.loads(self.transport.store.get(_PLAN.format(generation)).decode())
        self.effective = [Stage.from_dict(s) for s in published["effective"]]
        self._positions = {s.index: i for i, s in enumerate(self.effective)}
        self.failures = published["failures"]
        self.failed = {f["rank"] for f in self.failures}
        self.report.failures = list(self.failures)
        self.generation = generation

    # -- stage boundaries over the effective plan --

    def enter(self, stage: Stage) -> tuple[int, float]:
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
        return nbytes, seconds

    def _take_carry(self, previous: Stage) -> int:
        """Coordinator entering its own stage: its model already holds the newest state; record the receipt."""
        lacking = self.ledger.lacking(self.rank, previous.node)
        if self._carry is None:  # after a failure: from the authoritative state
            self.ledger.record_receipt(self.rank, self._held, lacking)
            return 0
        encoded, payload = self._carry
        self._carry = None
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

    def gather_text(self, name: str, text: str) -> list[str] | None:
        """Every live rank's `text` on the coordinator, plus the last report each failed rank published."""
        final = f"{_REPORT.format(self.rank)}/{name}"
        if not self._is_coordinator:
            self.transport.store.set(final, text)
            return None
        others = [r for r in range(self.ledger.num_nodes) if r != self.rank]
        live = {r: f"{_REPORT.format(r)}/{name}" for r in others if r not in self.failed}
        self.transport.wait_for(live, lambda reason: f"gathering {name!r}: {reason} (topology cs)", drop_absent=True)
        texts = [text]
        store = self.transport.store
        for r in others:
            for key in (f"{_REPORT.format(r)}/{name}", _REPORT.format(r)):
                if store.check([key]):
                    texts.append(store.get(key).decode())
                    break
        return texts

    def restore(self, versions, checksums, rng: dict, next_stage: int) -> None:
        super().restore(versions, checksums, rng, next_stage)
        self._held = self.ledger.state(self.rank)  # a checkpoint is taken right after this rank's own stage

    def resume_at(self, stage: int) -> None:
        self._frontier = stage
        holder = self.effective[stage - 1]
        if self._is_coordinator and holder.node != self.rank:
            first = stage - 1
            while first > 0 and self.effective[first - 1].node == holder.node:
                first -= 1
            self._awaiting = (first, stage - 1)

    def _apply_until(self, event: int) -> None:
        """Applies, as metadata, the events of other ranks' stages over the effective plan (positions, not indices)."""
        while self.applied < event:
            position, hop = divmod(self.applied, 2)
            stage = self.effective[position]
            if not hop:
                self.ledger.record_training(stage.node, dict.fromkeys(self._trained_parts(stage), ""))
            elif position + 1 < len(self.effective) and self.effective[position + 1].node != stage.node:
                receiver = self.effective[position + 1].node
                lacking = self.ledger.lacking(receiver, stage.node)
                self.ledger.record_receipt(receiver, self.ledger.state(stage.node), lacking)
            self.applied += 1
