"""cs failover protocol (`snake_hf.engine.coordinator`) over a fake wire: every rank's `FailoverRelay` runs in its own thread of
one process, joined by an in-memory store and mailboxes that behave like `DistributedTransport` (a dead rank's peers
get `HopTimeoutError`, a wait that never ends is a deadlock). Fast: no training, only the turn and payload protocol
and its version bookkeeping. Real processes over real sockets: tests/test_distributed_faults.py (slow)."""

from __future__ import annotations

import json
import threading
import time

import pytest
from peft import LoraConfig

from conftest import lm_dataset, tiny_gpt2
from snake_hf import SnakeConfig, SnakeTrainer
from snake_hf.engine.coordinator import FailoverRelay
from snake_hf.engine.transport import CoordinatedTransport, HopTimeoutError
from snake_hf.report import SnakeReport


WORLD = 3
COORDINATOR = 0
DEADLOCK_SECONDS = 10.0


class Deadlock(RuntimeError):
    """A wait that no rank will ever end."""


class _Killed(Exception):
    """The rank's process dies here (a SIGKILL mid-stage)."""


class FakeWire:
    """Store keys and payload mailboxes shared by every rank's `FakeTransport`; `dead` ranks never answer."""

    def __init__(self):
        self.cond = threading.Condition()
        self.keys: dict[str, str] = {}
        self.mail: dict[tuple, object] = {}
        self.dead: set[int] = set()
        self.sent: list[tuple] = []  # (src, dst, hop) of every payload put on the wire
        self.turn_waiting: set[int] = set()  # ranks inside `wait_for` for their turn, until `next_stage` returned

    def wait(self, ready, peers: list[int], what: str):
        deadline = time.monotonic() + DEADLOCK_SECONDS
        with self.cond:
            while not ready():
                if any(p in self.dead for p in peers):
                    raise HopTimeoutError(f"{what}: rank {peers} sent no heartbeat (topology cs)")
                if not self.cond.wait(timeout=max(0.0, deadline - time.monotonic())):
                    raise Deadlock(f"{what}: nobody will answer")

    def kill(self, rank: int) -> None:
        with self.cond:
            self.dead.add(rank)
            self.cond.notify_all()


class FakeStore:
    def __init__(self, wire: FakeWire):
        self.wire = wire

    def set(self, key: str, value: str) -> None:
        with self.wire.cond:
            self.wire.keys[key] = value
            self.wire.cond.notify_all()

    def get(self, key: str) -> bytes:
        return self.wire.keys[key].encode()

    def check(self, keys: list[str]) -> bool:
        return all(k in self.wire.keys for k in keys)


class FakeTransport(CoordinatedTransport):
    """One rank's end, with the routing of `DistributedTransport` in cs topology (hop keys by (sender, receiver, hop))."""

    coordinator = COORDINATOR

    def __init__(self, wire: FakeWire, rank: int):
        self.wire, self.rank, self.store = wire, rank, FakeStore(wire)

    def _put(self, peer: int, hop, encoded) -> None:
        with self.wire.cond:
            if peer in self.wire.dead:
                raise HopTimeoutError(f"hop {hop}: rank {peer} did not take it (topology cs)")
            self.wire.mail[(self.rank, peer, hop)] = encoded
            self.wire.sent.append((self.rank, peer, hop))
            self.wire.cond.notify_all()

    def _take(self, peer: int, hop):
        key = (peer, self.rank, hop)
        self.wire.wait(lambda: key in self.wire.mail, [peer], f"hop {hop}: no payload from rank {peer}")
        with self.wire.cond:
            return self.wire.mail.pop(key)

    def send(self, src: int, dst: int, encoded, stage: int) -> None:
        self._put(dst if COORDINATOR in (src, dst) else COORDINATOR, stage, encoded)

    def recv(self, src: int, dst: int, stage: int):
        return self._take(src if COORDINATOR in (src, dst) else COORDINATOR, stage)

    def send_to(self, peer: int, encoded, hop, src: int, dst: int) -> None:
        self._put(peer, hop, encoded)

    def recv_from(self, peer: int, hop, src: int, dst: int):
        return self._take(peer, hop)

    def wait_for(self, keys: dict[int, str], describe, drop_absent: bool = False) -> None:
        with self.wire.cond:
            self.wire.turn_waiting.add(self.rank)
            self.wire.cond.notify_all()
        self.wire.wait(lambda: self.store.check(list(keys.values())), list(keys), describe("waiting"))


@pytest.fixture(scope="module")
def trainer(tmp_path_factory):
    """Model, part map, payload spec and plan of a tiny 3-node cs run: stages on nodes 0 1 2 2 1 0."""
    args = SnakeConfig(
        num_train_epochs=1,
        output_dir=str(tmp_path_factory.mktemp("failover")), num_nodes=WORLD, num_block_groups=2, stage_steps=1,
        use_cpu=True, report_to="none", save_strategy="no", disable_tqdm=True,
    )  # fmt: skip
    lora = LoraConfig(r=2, target_modules=["c_attn"], task_type="CAUSAL_LM")
    trainer = SnakeTrainer(tiny_gpt2(), args, train_dataset=lm_dataset(n=12), peft_config=lora)
    assert [s.node for s in trainer.plan] == [0, 1, 2, 2, 1, 0]
    return trainer


def _relays(trainer, wire: FakeWire, resume_at: int | None = None) -> dict[int, FailoverRelay]:
    relays = {}
    for rank in range(WORLD):
        report = SnakeReport(num_nodes=WORLD, num_groups=2)
        relay = FailoverRelay(
            trainer.model, trainer.part_map, trainer._spec, trainer.plan, WORLD, 0, FakeTransport(wire, rank), report,
            {rank},
        )  # fmt: skip
        if resume_at is not None:  # as a restored checkpoint leaves it: bookkeeping up to the resume point
            relay._apply_until(2 * (resume_at - 1) + 1)
            relay.resume_at(resume_at)
        relays[rank] = relay
    return relays


def _run_ranks(
    relays,
    wire: FakeWire,
    resume_at: int | None = None,
    kill: tuple[int, int] | None = None,
    timings: dict | None = None,
    train_seconds: float = 0.0,
) -> dict:
    """Each rank's `SnakeTrainer.train()` loop in a thread (no training steps); returns {rank: [stages trained]}.

    With `timings`, a stage "trains" for `train_seconds` and `timings[stage]` gets its (wait, load, wall) seconds. A
    stage followed by one on another non-coordinator rank trains only once that rank waits for its turn, so that the
    follower's wait spans the stage by construction (the coordinator's does anyway: it hands out the turns)."""
    trained, errors = {rank: [] for rank in relays}, {}

    def next_stage(rank: int, relay: FailoverRelay):
        stage = relay.next_stage()
        with wire.cond:
            wire.turn_waiting.discard(rank)
        return stage

    def rank_loop(rank: int, relay: FailoverRelay) -> None:
        try:
            if resume_at is not None and relay.plan[resume_at - 1].node == rank:  # the checkpoint's hop, again
                relay.hand_on(relay.plan[resume_at - 1])
            stage = next_stage(rank, relay)
            while stage is not None:
                _, wait = relay.enter(stage)
                if kill == (rank, stage.index):
                    wire.kill(rank)
                    raise _Killed
                if timings is not None:
                    following = relay.plan[stage.index + 1] if stage.index + 1 < len(relay.plan) else None
                    if following is not None and following.node not in (rank, COORDINATOR):
                        node = following.node
                        wire.wait(lambda node=node: node in wire.turn_waiting, [node], f"rank {node} waits")
                    started = time.perf_counter()
                    time.sleep(train_seconds)
                    timings[stage.index] = (wait, relay.last_load_seconds, time.perf_counter() - started)
                relay.close_stage(stage)
                relay.hand_on(stage)
                trained[rank].append(stage.index)
                stage = next_stage(rank, relay)
            relay.finish()
        except _Killed:
            pass
        except Exception as error:  # noqa: BLE001 - reported by the test
            errors[rank] = error
            wire.kill(rank)

    threads = [threading.Thread(target=rank_loop, args=item, daemon=True) for item in relays.items()]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=3 * DEADLOCK_SECONDS)
    assert not any(t.is_alive() for t in threads), "a rank never finished"
    assert not errors, {rank: f"{type(e).__name__}: {e}" for rank, e in errors.items()}
    return trained


@pytest.mark.parametrize("resume_at", [1, 2, 3, 4, 5], ids=["from-coordinator", "node-to-node", "inside-a-run",
                                                          "after-a-run", "to-coordinator"])  # fmt: skip
def test_resume_goes_on_at_the_resume_stage_without_a_deadlock(trainer, resume_at):
    # inside-a-run: stages 2 and 3 run on node 2, whose checkpoint after stage 2 makes the run go on at stage 3 (the
    # coordinator used to wait for a hop into stage 3 while node 2 waited for a turn it needed none of).
    wire = FakeWire()
    relays = _relays(trainer, wire, resume_at=resume_at)
    trained = _run_ranks(relays, wire, resume_at=resume_at)
    expected = {rank: [s.index for s in trainer.plan[resume_at:] if s.node == rank] for rank in range(WORLD)}
    assert trained == expected
    holder = trainer.plan[resume_at - 1].node
    assert holder == COORDINATOR or (holder, COORDINATOR, resume_at) in wire.sent  # the checkpoint's hop, again
    _assert_consistent(relays, {"g0": 3, "g1": 3})


def _assert_consistent(relays: dict[int, FailoverRelay], newest: dict[str, int]) -> None:
    """Each rank's own version vector is what the coordinator's bookkeeping says; the coordinator holds the newest."""
    coordinator = relays[COORDINATOR]
    for rank, relay in relays.items():
        assert relay.ledger.versions[rank] == coordinator.ledger.versions[rank], f"rank {rank}"
    assert {part: version for part, (version, _) in coordinator._held.items()} == newest


def test_every_stage_of_a_run_reaches_the_coordinator_before_the_next(trainer):
    wire = FakeWire()
    relays = _relays(trainer, wire)
    trained = _run_ranks(relays, wire)
    assert trained == {0: [0, 5], 1: [1, 4], 2: [2, 3]}
    assert (2, COORDINATOR, 3) in wire.sent and (2, COORDINATOR, 4) in wire.sent  # after stage 2 (upload) and 3
    _assert_consistent(relays, {"g0": 3, "g1": 3})


def test_node_dying_in_the_second_stage_of_its_run_keeps_the_first_stages_work(trainer):
    # Node 2 trains stages 2 and 3 and dies in stage 3: stage 2's work reached the coordinator, so only stage 3 is
    # re-planned (to node 1, the nearest earlier live node), fed from the coordinator's copy of stage 2's result.
    wire = FakeWire()
    relays = _relays(trainer, wire)
    trained = _run_ranks(relays, wire, kill=(2, 3))
    assert trained == {0: [0, 5], 1: [1, 3, 4], 2: [2]}
    coordinator = relays[COORDINATOR]
    [failure] = coordinator.failures
    assert (failure["rank"], failure["stage"], failure["replanned"]) == (2, 3, [{"stage": 3, "from": 2, "to": 1}])
    assert [s.node for s in coordinator.effective] == [0, 1, 2, 1, 1, 0]
    [rebuilt] = [h for h in coordinator.report.hops if h.to_stage == 3]
    assert (rebuilt.from_stage, rebuilt.sender, rebuilt.receiver, rebuilt.parts) == (2, 0, 1, ["g0"])
    assert relays[1].ledger.versions[1]["g0"] == 3  # node 1 holds stage 2's version of group 0, not its own older one
    _assert_consistent({r: relays[r] for r in (0, 1)}, {"g0": 3, "g1": 3})
    assert json.loads(wire.keys["snake/cs/plan/1"])["failures"][0]["stage"] == 3


def test_a_stage_after_another_nodes_waits_through_its_training_then_loads(trainer):
    # cs ranks wait for their turn in next_stage (the coordinator: forwarding the others' payloads), not in the
    # receive that follows; the stage's wait holds both, as in p2p (it used to be 0 on the coordinator).
    wire, timings = FakeWire(), {}
    relays = _relays(trainer, wire)
    trained = _run_ranks(relays, wire, timings=timings, train_seconds=0.05)
    assert trained == {0: [0, 5], 1: [1, 4], 2: [2, 3]}
    for stage in trainer.plan[1:]:
        wait, load, _ = timings[stage.index]
        if trainer.plan[stage.index - 1].node == stage.node:
            assert (wait, load) == (0.0, 0.0)  # node 2's stage 3: no turn, no payload
        else:
            assert wait >= timings[stage.index - 1][2], f"stage {stage.index}"
            assert 0 < load <= wait, f"stage {stage.index}"  # stage 5: the coordinator's load of node 1's payload
