"""DistributedTransport over real processes and real loopback sockets (gloo), p2p and cs; launch environment helpers.

Ranks are spawned, never forked: forking a pytest process that already runs torch/gloo threads can abort or hang the
child. Rank targets are therefore module-level functions (parameters through `functools.partial`), which a spawned
child unpickles by re-importing this module. Each rank imports torch and snake_hf, reports ready, and waits until
every rank is ready before it builds its transport, so the ranks start together (as they would under a launcher) and
the test's timeout starts counting only then. Each rank writes its result to a JSON file, every wait is bounded, and
stragglers are killed.
"""

from __future__ import annotations

import functools
import json
import multiprocessing
import os
import subprocess
import sys
import time
import traceback
from pathlib import Path

import pytest
import torch

from conftest import free_port
from snake_hf.engine.payload import EncodedPayload, Payload, encode_payload
from snake_hf.engine.torch_dist import DistributedTransport, hide_launch_env, launch_info
from snake_hf.engine.transport import HopTimeoutError
from snake_hf.plan import Stage


pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="spawned ranks and loopback gloo need Linux")

FAST = {"hop_timeout": 5.0, "heartbeat_interval": 0.2, "heartbeat_timeout": 2.0}
STARTUP_TIMEOUT = 180.0  # seconds for spawned ranks to import torch and snake_hf, on a loaded 2-core machine


def _payload(stage: int, numel: int = 1000) -> EncodedPayload:
    """A deterministic payload per stage; `numel=0` gives one with no tensor data."""
    generator = torch.Generator().manual_seed(stage)
    tensors = {f"w{stage}": torch.randn(numel, generator=generator)} if numel else {}
    manifest = {"sender": 0, "receiver": 1, "stage": stage, "parts": ["g0"] if numel else []}
    return encode_payload(Payload(manifest, tensors), dict.fromkeys(tensors, "g0"))


def _same(a: EncodedPayload, b: EncodedPayload) -> bool:
    return a.to_bytes() == b.to_bytes()


def _entry(target, rank, world_size, port, out, kwargs, ready, go):
    torch.set_num_threads(1)  # one thread per rank on a loaded 2-core machine
    ready.release()  # imports are done (unpickling `target` imported this module, torch and snake_hf)
    if not go.wait(STARTUP_TIMEOUT):  # every rank builds its transport at the same time, as under a launcher
        os._exit(2)
    result = {}
    try:
        transport = DistributedTransport(rank, world_size, master_addr="127.0.0.1", master_port=port, **kwargs)
        try:
            result = target(transport) or {}
        finally:
            transport.close()
        result["link_bytes"] = [[a, b, n] for (a, b), n in transport.link_bytes.items()]
    except Exception as error:  # reported to the test, which asserts on it
        result = {"error": type(error).__name__, "message": str(error), "traceback": traceback.format_exc()}
    Path(out, f"rank{rank}.json").write_text(json.dumps(result))
    os._exit(0)


def _start(processes: dict, ready) -> None:
    """Starts the ranks and waits until every one has imported its modules; kills them all if one dies or hangs."""
    for process in processes.values():
        process.start()
    started, deadline = 0, time.monotonic() + STARTUP_TIMEOUT
    while started < len(processes):
        if ready.acquire(timeout=0.2):
            started += 1
            continue
        dead = [rank for rank, process in processes.items() if process.exitcode is not None]
        if dead or time.monotonic() > deadline:
            for process in processes.values():
                process.kill()
                process.join(5)
            pytest.fail(f"ranks did not start within {STARTUP_TIMEOUT} s (exited early: {dead})")


def _run(targets, world_size: int, tmp_path: Path, timeout: float = 60.0, **kwargs) -> dict[int, dict]:
    """Runs `targets[rank](transport)` in one spawned process per rank; returns each rank's result (None: none).

    `timeout` counts from the moment every rank has started (imported torch and snake_hf), not from the spawn.
    """
    port, context = free_port(), multiprocessing.get_context("spawn")
    ready, go = context.Semaphore(0), context.Event()
    processes = {
        rank: context.Process(
            target=_entry, args=(target, rank, world_size, port, tmp_path, {**FAST, **kwargs}, ready, go)
        )
        for rank, target in targets.items()
    }
    _start(processes, ready)
    go.set()
    deadline = time.monotonic() + timeout
    for process in processes.values():
        process.join(max(0.0, deadline - time.monotonic()))
    hung = [rank for rank, process in processes.items() if process.is_alive()]
    for rank in hung:
        processes[rank].kill()
        processes[rank].join(5)
    assert not hung, f"ranks {hung} still running after {timeout} s"
    files = {rank: tmp_path / f"rank{rank}.json" for rank in targets}
    return {rank: json.loads(f.read_text()) if f.exists() else None for rank, f in files.items()}


def _links(result: dict) -> dict[tuple[int, int], int]:
    return {(a, b): n for a, b, n in result["link_bytes"]}


def _idle(transport):
    """A rank that only joins and closes."""


def _chain_target(transport, world_size: int, stages: int, sizes: dict[int, int]):
    arrived = {}
    for stage in range(1, stages + 1):
        src, dst = (stage - 1) % world_size, stage % world_size
        if transport.rank == src:
            transport.send(src, dst, _payload(stage, sizes[stage]), stage)
        elif transport.rank == dst:
            arrived[stage] = _same(transport.recv(src, dst, stage), _payload(stage, sizes[stage]))
    return {"arrived": arrived}


def _chain(world_size: int, stages: int):
    """Rank targets that pass stage s's payload from rank (s-1) % N to rank s % N, checking every byte."""
    sizes = {s: (0 if s == 2 else 1000 * s) for s in range(1, stages + 1)}  # stage 2 carries no tensor data
    sizes[stages] = 1 << 20  # and the last one 4 MiB
    return functools.partial(_chain_target, world_size=world_size, stages=stages, sizes=sizes), sizes


def _assert_ok(results: dict[int, dict]) -> None:
    for rank, result in results.items():
        assert result is not None and "error" not in result, f"rank {rank}: {result}"


@pytest.mark.parametrize("world_size", [2, 3], ids=["2-ranks", "3-ranks"])
def test_p2p_chain_arrives_bit_identical_with_link_byte_counts(tmp_path, world_size):
    target, sizes = _chain(world_size, stages=4)
    results = _run(dict.fromkeys(range(world_size), target), world_size, tmp_path)
    _assert_ok(results)
    expected = {}
    for stage, numel in sizes.items():
        link = ((stage - 1) % world_size, stage % world_size)
        expected[link] = expected.get(link, 0) + _payload(stage, numel).nbytes
    for rank, result in results.items():
        assert all(result["arrived"].values()) and len(result["arrived"]) == sum(s % world_size == rank for s in sizes)
        assert _links(result) == {link: n for link, n in expected.items() if rank in link}


def _cs_training_coordinator_target(transport, hops):
    arrived = {}
    for src, dst, stage in hops:
        if transport.rank == transport.coordinator and transport.coordinator not in (src, dst):
            # as `FailoverRelay`'s coordinator passes on a hop between two other ranks: in with recv_from, on with send_to
            transport.send_to(dst, transport.recv_from(src, stage, src, dst), stage, src, dst)
        elif transport.rank == src:
            transport.send(src, dst, _payload(stage), stage)
        elif transport.rank == dst:
            arrived[stage] = _same(transport.recv(src, dst, stage), _payload(stage))
    return {"arrived": arrived}


def test_cs_hops_touching_a_training_coordinator_take_one_leg(tmp_path):
    """In cs a hop to or from the coordinator is one leg; `send` and `recv` between two other ranks go through it."""
    plan = [Stage(index=i, pass_index=0, node=n, group=0, steps=1) for i, n in enumerate([0, 1, 2, 0])]
    hops = [(a.node, b.node, b.index) for a, b in zip(plan, plan[1:]) if a.node != b.node]
    assert hops == [(0, 1, 1), (1, 2, 2), (2, 0, 3)]
    target = functools.partial(_cs_training_coordinator_target, hops=hops)
    results = _run(dict.fromkeys(range(3), target), 3, tmp_path, topology="cs")
    _assert_ok(results)
    n = _payload(1).nbytes
    assert results[0] | {"link_bytes": None} == {"arrived": {"3": True}, "link_bytes": None}
    assert _links(results[0]) == {(0, 1): n, (1, 0): n, (0, 2): n, (2, 0): n}
    assert results[1]["arrived"] == {"1": True} and results[2]["arrived"] == {"2": True}


def _broadcast_target(transport):
    transport.barrier("start")
    given = _payload(9) if transport.rank == 2 else None
    final = transport.broadcast_final(given, src=2)
    transport.barrier("end")
    return {"same": _same(final, _payload(9))}


@pytest.mark.parametrize("topology", ["p2p", "cs"])
def test_broadcast_final_and_barrier_reach_every_rank(tmp_path, topology):
    results = _run(dict.fromkeys(range(3), _broadcast_target), 3, tmp_path, topology=topology)
    _assert_ok(results)
    assert all(result["same"] for result in results.values())


def _slow_sender(transport):
    time.sleep(3.0)  # "training" for longer than the hop timeout (1 s) and the heartbeat timeout (2 s)
    transport.send(1, 0, _payload(4), 4)


def _patient_receiver(transport):
    return {"same": _same(transport.recv(1, 0, 4), _payload(4))}


def test_receiver_waits_through_long_stages_elsewhere(tmp_path):
    """Liveness is per hop: a sender that trains for longer than hop_timeout is waited for, not declared late."""
    results = _run({0: _patient_receiver, 1: _slow_sender}, 2, tmp_path, hop_timeout=1.0)
    _assert_ok(results)
    assert results[0]["same"]


def test_recv_from_rank_that_never_joins_raises_hop_timeout(tmp_path):
    port, start = free_port(), time.monotonic()
    transport = DistributedTransport(0, 3, master_addr="127.0.0.1", master_port=port, **{**FAST, "hop_timeout": 3.0})
    try:
        with pytest.raises(HopTimeoutError) as caught:
            transport.recv(1, 0, stage=4)
        elapsed = time.monotonic() - start
    finally:
        transport.close(wait=False)
    message = str(caught.value)
    assert "stage 4" in message and "rank 1 to rank 0" in message and "topology p2p" in message
    assert "never joined" in message and elapsed < FAST["heartbeat_timeout"] + 3


def _timed_receiver(transport):
    """Receives hop 1 -> 2 of stage 4; returns the `HopTimeoutError`'s message and how long the receive took."""
    start = time.monotonic()
    try:
        transport.recv(1, 2, 4)
    except HopTimeoutError as error:
        return {"message": str(error), "seconds": time.monotonic() - start}


def _stuck_sender(transport):
    transport._push = lambda *args: time.sleep(6)  # announces the hop, then delivers nothing for 6 s
    transport.send(1, 2, _payload(4), 4)


def test_sender_stuck_inside_hop_raises_hop_timeout_after_hop_timeout(tmp_path):
    results = _run({0: _idle, 1: _stuck_sender, 2: _timed_receiver}, 3, tmp_path, timeout=30, hop_timeout=3.0)
    message = results[2]["message"]
    assert "stage 4: no payload from rank 1 to rank 2" in message and "(topology p2p)" in message
    assert "within 3.0 s" in message and 2.5 < results[2]["seconds"] < 3.0 + 5


def _dying_sender(transport, when: str):
    if when == "before_hop":
        time.sleep(0.5)
        os._exit(3)
    transport._push = lambda *args: os._exit(3)
    transport.send(1, 2, _payload(4), 4)


@pytest.mark.parametrize("when", ["before_hop", "mid_hop"])
def test_sender_that_dies_raises_hop_timeout_promptly(tmp_path, when):
    dies = functools.partial(_dying_sender, when=when)
    # hop_timeout is long: the heartbeat (2 s) or the closed socket, not the hop timeout, must end the wait
    # timeout: rank 0 waits out the dead rank when it closes; 60 s leaves room on a loaded 2-core machine
    results = _run({0: _idle, 1: dies, 2: _timed_receiver}, 3, tmp_path, timeout=60, hop_timeout=20.0)
    assert results[1] is None
    assert "stage 4: no payload from rank 1 to rank 2" in results[2]["message"]
    assert results[2]["seconds"] < FAST["heartbeat_timeout"] + 3


def _late_receiver(transport):
    time.sleep(0.5)
    start = time.monotonic()
    try:
        transport.recv(1, 0, 4)
    except HopTimeoutError as error:
        return {"message": str(error), "seconds": time.monotonic() - start}


def test_recv_from_rank_that_closed_without_sending_fails_at_once(tmp_path):
    results = _run({0: _late_receiver, 1: _idle}, 2, tmp_path, hop_timeout=20.0, heartbeat_timeout=20.0)
    assert "rank 1 closed its transport first" in results[0]["message"] and results[0]["seconds"] < 3


def test_hide_launch_env_removes_launch_variables_and_returns_them(monkeypatch):
    launched = {"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2", "GROUP_RANK": "0"}
    for name, value in {**launched, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29555"}.items():
        monkeypatch.setenv(name, value)
    info = launch_info()
    assert (info.rank, info.world_size, info.local_rank, info.master_port) == (1, 2, 1, 29555)
    with hide_launch_env() as removed:
        assert removed == launched
        assert not set(launched) & set(os.environ) and launch_info() is None
        assert os.environ["MASTER_PORT"] == "29555"
    assert {name: os.environ[name] for name in launched} == launched


def test_launch_info_is_none_for_a_single_process(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert launch_info() is None
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert launch_info() is None


LAUNCHERS = {
    "torchrun": [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port"],
    "accelerate": [  # on a CPU-only machine `--multi_gpu` is what starts N processes (through torchrun); not `--cpu`
        *[sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2"],
        *["--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port"],
    ],
}


@pytest.mark.slow
@pytest.mark.parametrize("launcher", list(LAUNCHERS))
def test_launched_ranks_train_single_process_and_exchange_payloads(tmp_path, launcher):
    command = [*LAUNCHERS[launcher], str(free_port())]
    worker = Path(__file__).with_name("_dist_worker.py")
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])}
    subprocess.run([*command, str(worker), str(tmp_path)], check=True, timeout=240, env=env, cwd=tmp_path)
    results = [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in range(2)]
    for rank, result in enumerate(results):
        assert result["launch"] == {"rank": rank, "world_size": 2, "agent_store": True}
        assert {"RANK", "WORLD_SIZE", "LOCAL_RANK"} <= set(result["removed"])
        assert result["config_pure"], "a SnakeConfig under the launcher changed os.environ or saw a distributed world"
        assert result["parallel_mode"] == "ParallelMode.NOT_PARALLEL" and result["world_size"] == 1
        assert result["same"]
