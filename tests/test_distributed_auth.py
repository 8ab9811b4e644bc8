"""Authenticated distributed runs (run_secret), attacked, with real processes over real loopback sockets.

Payload attacks take over a sender's wire (tests/_dist_auth.py says how); the intruder is a separate process without
the secret on the run's rendezvous store. Every attack must be refused with the named `AuthenticationError` before
anything is returned to the relay (so nothing is loaded), and no rank may wait past its timeouts.
"""

from __future__ import annotations

import functools
import json
import multiprocessing
import os
import subprocess
import sys
import time
from pathlib import Path

import _dist_auth as attacks
import pytest
import torch
from _snake_run import run
from safetensors.torch import load_file
from test_distributed import collect_ranks

from conftest import free_port
from snake_hf.engine.auth import SEAL_NBYTES, AuthenticationError
from snake_hf.engine.transport import HopTimeoutError


pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(sys.platform != "linux", reason="spawned ranks and loopback gloo need Linux"),
]

HERE = Path(__file__).parent
SECRET = attacks.SECRET


def _run(targets: dict, kwargs: dict[int, dict], tmp_path: Path, timeout: float = 60.0) -> dict[int, dict]:
    """Runs `targets[rank](transport)` in one spawned process per rank, with that rank's transport `kwargs`."""
    port, context = free_port(), multiprocessing.get_context("spawn")
    ready, go = context.Semaphore(0), context.Event()
    world_size = len(targets)
    processes = {
        rank: context.Process(
            target=attacks.entry,
            args=(target, rank, world_size, port, tmp_path, {**attacks.FAST, **kwargs[rank]}, ready, go),
        )
        for rank, target in targets.items()
    }
    for process in processes.values():
        process.start()
    for _ in processes:
        assert ready.acquire(timeout=180), "ranks did not start"
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


def _secret(world_size: int, **overrides: str | None) -> dict[int, dict]:
    kwargs = {rank: {"run_secret": SECRET} for rank in range(world_size)}
    for rank, secret in overrides.items():
        kwargs[int(rank[1:])] = {"run_secret": secret}
    return kwargs


def _refused(result: dict, stage: int, claimed: int) -> None:
    assert result["error"] == "AuthenticationError", result
    message = result["message"]
    assert f"stage {stage}:" in message and f"refused the payload that claims to come from rank {claimed}" in message
    assert SECRET not in message and attacks.OTHER_SECRET not in message


# -- payloads ------------------------------------------------------------------------------------------------------


def test_authenticated_hops_arrive_bit_identical_with_seal_bytes_counted(tmp_path):
    stages = (1, 2, 3)
    targets = {
        0: functools.partial(attacks.send_genuine, stages=stages),
        1: functools.partial(attacks.receive_stages, stages=stages),
    }
    results = _run(targets, _secret(2), tmp_path)
    assert "error" not in results[0] and results[1]["arrived"] == {str(s): True for s in stages}, results
    sealed = sum(attacks.payload(s).nbytes + SEAL_NBYTES for s in stages)  # a 64-byte seal per payload
    assert results[0]["link_bytes"] == [[0, 1, sealed]] and results[1]["link_bytes"] == [[0, 1, sealed]]


def test_forged_payload_from_a_process_without_the_secret_is_refused(tmp_path):
    results = _run({0: attacks.send_forged, 1: attacks.receive_stages}, _secret(2), tmp_path)
    _refused(results[1], stage=1, claimed=0)
    assert "arrived" not in results[1]  # recv raised: nothing reached the relay, so nothing was loaded


def test_replayed_payload_of_an_earlier_stage_is_refused(tmp_path):
    receiver = functools.partial(attacks.receive_stages, stages=(1, 3))
    results = _run({0: attacks.replay_earlier_stage, 1: receiver}, _secret(2), tmp_path)
    _refused(results[1], stage=3, claimed=0)


def test_payload_readdressed_to_another_rank_is_refused(tmp_path):
    results = _run({0: attacks.readdress, 1: attacks.receive_stages, 2: attacks.idle}, _secret(3), tmp_path)
    _refused(results[1], stage=1, claimed=0)


# -- joining -------------------------------------------------------------------------------------------------------


def test_rank_with_a_different_secret_fails_at_start_on_both_sides(tmp_path):
    kwargs = _secret(3, r1=attacks.OTHER_SECRET)
    results = _run(dict.fromkeys(range(3), attacks.exchange), kwargs, tmp_path)
    for result in results.values():
        assert result["error"] == "AuthenticationError" and "Join check failed" in result["message"], result
        assert SECRET not in result["message"] and attacks.OTHER_SECRET not in result["message"]
        assert result["seconds"] < attacks.FAST["heartbeat_timeout"] + 5
    assert "ranks [0, 2] did not prove" in results[1]["message"]
    assert "this rank's run_secret differs from theirs" in results[1]["message"]
    assert "ranks [1] did not prove" in results[0]["message"] and "ranks [1] did not prove" in results[2]["message"]


def test_rank_without_a_secret_fails_on_both_sides(tmp_path):
    kwargs = _secret(2, r1=None)
    results = _run({0: attacks.exchange, 1: attacks.exchange}, kwargs, tmp_path)
    assert results[0]["error"] == "AuthenticationError"
    assert "rank 1 runs without a run_secret and this rank with one" in results[0]["message"]
    assert results[1]["error"] == "AuthenticationError"
    assert "rank 0 runs with a run_secret and this rank without one" in results[1]["message"]


def test_store_message_forged_by_an_intruder_is_refused_naming_it(tmp_path):
    """An intruder writes rank 1's exchanged text before rank 1 does: rank 0 refuses it rather than use it."""
    from datetime import timedelta

    from torch.distributed import TCPStore

    port, context = free_port(), multiprocessing.get_context("spawn")
    ready, go = context.Semaphore(0), context.Event()
    targets = {0: attacks.exchange, 1: attacks.idle_until_forged}
    processes = [
        context.Process(
            target=attacks.entry,
            args=(targets[r], r, 2, port, tmp_path, {**attacks.FAST, "run_secret": SECRET}, ready, go),
        )
        for r in targets
    ]
    for process in processes:
        process.start()
    for _ in processes:
        assert ready.acquire(timeout=180), "ranks did not start"
    go.set()
    intruder = TCPStore("127.0.0.1", port, None, False, timedelta(seconds=60))  # waits for rank 0's store
    intruder.set("snake/exchange/sizes/0/1", "hmac1:" + "ab" * 32 + "|size-of-1")
    for process in processes:
        process.join(60)
    assert not any(process.is_alive() for process in processes)
    result = json.loads((tmp_path / "rank0.json").read_text())
    assert result["error"] == "AuthenticationError", result
    assert (
        "refused the exchanged text 'sizes'" in result["message"] and "claims to come from rank 1" in result["message"]
    )


def test_message_deleted_from_the_store_stops_the_waiting_rank_instead_of_a_hang(tmp_path):
    targets = {0: attacks.exchange_then_send, 1: attacks.exchange_lost_then_receive}
    results = _run(targets, _secret(2), tmp_path, timeout=60)
    assert results[0]["error"] == "AuthenticationError", results[0]
    assert "published 'snake/exchange/sizes/0/1' but the store no longer holds it" in results[0]["message"]
    assert results[0]["seconds"] < attacks.FAST["heartbeat_timeout"] + 5
    assert results[1]["error"] == "HopTimeoutError" and "rank 0 closed its transport first" in results[1]["message"]


class _DeletedAfterCheck:
    """The store as a read sees it when the key is deleted between its check and its get: the check still finds the
    key, the get fails (as `TCPStore.get` does once its timeout is out); everything else is the real store."""

    def __init__(self, store):
        self.store, self.lied = store, False

    def check(self, keys):
        if not self.lied:
            self.lied = True
            return True
        return self.store.check(keys)

    def get(self, key):
        raise RuntimeError("wait timeout after 30000ms")

    def __getattr__(self, name):
        return getattr(self.store, name)


@pytest.mark.parametrize("window", ["before_check", "between_check_and_get"])
@pytest.mark.parametrize("secret", [SECRET, None], ids=["with_secret", "without_secret"])
def test_message_deleted_between_seen_and_read_is_named_at_once_not_after_the_store_timeout(secret, window):
    """A waiting rank can see a key in the moment between its publication and an intruder's deletion (a CI failure:
    the read then waited out the store's timeout and stopped unnamed). The read names the deletion at once, also when
    it falls between the read's own check and its get."""
    from snake_hf.engine.torch_dist import DistributedTransport

    kwargs = {**attacks.FAST, "hop_timeout": 30.0, "run_secret": secret}
    transport = DistributedTransport(0, 1, master_addr="127.0.0.1", master_port=free_port(), **kwargs)
    store = transport.store
    try:
        transport.publish("snake/exchange/sizes/0/0", "12")
        assert transport.read("snake/exchange/sizes/0/0", 0, "exchanged text 'sizes'") == "12"
        store.delete_key("snake/exchange/sizes/0/0")
        if window == "between_check_and_get":
            transport.store = _DeletedAfterCheck(store)
        start = time.monotonic()
        expected = AuthenticationError if secret else HopTimeoutError
        with pytest.raises(expected) as caught:
            transport.read("snake/exchange/sizes/0/0", 0, "exchanged text 'sizes'")
        assert time.monotonic() - start < 1.0
    finally:
        transport.store = store
        transport.close(wait=False)
    message = str(caught.value)
    assert "published 'snake/exchange/sizes/0/0' but the store no longer holds it" in message
    assert "exchanged text 'sizes'" in message and ("tampering" in message) == bool(secret)


# -- whole runs (SnakeTrainer, one process per node) ---------------------------------------------------------------


def _launch(out: Path, num_nodes: int, env_extra: dict, topology: str = "p2p"):
    """Starts one `_dist_auth_run.py` process per rank; returns the store's port and the processes."""
    port = free_port()
    procs = []
    for rank in range(num_nodes):
        env = dict(os.environ, RANK=str(rank), WORLD_SIZE=str(num_nodes), LOCAL_RANK=str(rank),
                   MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1",
                   PYTHONHASHSEED=str(101 + 17 * rank), **env_extra)  # fmt: skip
        procs.append(
            subprocess.Popen(
                [sys.executable, str(HERE / "_dist_auth_run.py"), str(out), topology, str(num_nodes)],
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
            )  # fmt: skip
        )
    return port, procs


@pytest.fixture(scope="module")
def simulated_2(tmp_path_factory):
    threads = torch.get_num_threads()
    out = tmp_path_factory.mktemp("sim2")
    try:
        run(str(out), "p2p", 2, engine="simulation")
    finally:
        torch.set_num_threads(threads)
    return load_file(str(out / "adapters-0.safetensors"))


def test_authenticated_run_matches_the_simulation_and_writes_the_secret_nowhere(tmp_path, simulated_2):
    """run_secret given in SnakeConfig; checkpoints, save_model, save_state and a model card are written, with INFO
    logging: neither a file under the output folder nor any log line holds the secret."""
    out = tmp_path / "run"
    out.mkdir()
    _, procs = _launch(out, 2, {"SNAKE_TEST_SECRET_IN_CONFIG": SECRET})
    outputs = collect_ranks(procs, timeout=300)
    for rank, (code, output) in enumerate(outputs):
        assert code == 0, f"rank {rank} failed:\n{output[-3000:]}"
        assert SECRET not in output, f"rank {rank} logged the secret"
        assert "authenticated transport: True" in output  # the config's secret reached the transport
    for rank in range(2):
        adapters = load_file(str(out / f"adapters-{rank}.safetensors"))
        assert all(torch.equal(adapters[k], simulated_2[k]) for k in simulated_2), f"rank {rank} differs"
    written = [path for path in out.rglob("*") if path.is_file()]
    assert any(p.name == "training_args.bin" for p in written) and any("checkpoint" in str(p) for p in written)
    secret = SECRET.encode()
    leaks = [str(p) for p in written if secret in p.read_bytes() or secret.hex().encode() in p.read_bytes()]
    assert not leaks, f"the secret is in {leaks}"
    loaded = torch.load(next(p for p in written if p.name == "training_args.bin"), weights_only=False)
    assert loaded.run_secret is None and loaded.num_nodes == 2


def test_authenticated_cs_run_matches_the_simulation(tmp_path):
    """cs topology: turns, plans, uploads, forwarding, the final hand-off and the report merge all sealed."""
    threads = torch.get_num_threads()
    try:
        simulation = run(str(tmp_path), "p2p", 3, engine="simulation")
    finally:
        torch.set_num_threads(threads)
    expected = load_file(str(tmp_path / "adapters-0.safetensors"))
    out = tmp_path / "run"
    out.mkdir()
    _, procs = _launch(out, 3, {"SNAKE_RUN_SECRET": SECRET}, topology="cs")
    for rank, (code, output) in enumerate(collect_ranks(procs, timeout=300)):
        assert code == 0, f"rank {rank} failed:\n{output[-3000:]}"
        assert "authenticated transport: True" in output
    for rank in range(3):
        adapters = load_file(str(out / f"adapters-{rank}.safetensors"))
        assert all(torch.equal(adapters[k], expected[k]) for k in expected), f"rank {rank} differs"
    report = json.loads((out / "report.json").read_text())
    assert [s["train_loss"] for s in report["stages"]] == [s.train_loss for s in simulation.snake_report.stages]


@pytest.mark.parametrize("mode", ["lurker", "forger"])
def test_intruder_on_the_store_cannot_make_a_rank_load_or_hang(tmp_path, simulated_2, mode):
    """An intruder without the secret on the rendezvous store during a run: the run completes bit-identical to the
    simulation (what it may do changes nothing a rank trusts), or every rank stops, at least one with the named
    `AuthenticationError`, none past its timeouts, and none holding final adapters."""
    out = tmp_path / "run"
    out.mkdir()
    hop_timeout = 20
    record = tmp_path / "intruder.json"  # each rank's first step waits until the intruder acted
    env = {
        "SNAKE_RUN_SECRET": SECRET,
        "SNAKE_TEST_HOP_TIMEOUT": str(hop_timeout),
        "SNAKE_TEST_WAIT_FOR_INTRUDER": str(record),
    }
    port, procs = _launch(out, 2, env)
    intruder = subprocess.Popen(
        [sys.executable, str(HERE / "_dist_auth.py"), str(port), mode, "2", str(tmp_path), "240"],
        env=dict(os.environ, OMP_NUM_THREADS="1"), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    try:
        start = time.monotonic()
        outputs = collect_ranks(procs, timeout=300)
        elapsed = time.monotonic() - start
    finally:
        intruder.kill()
        intruder_output = intruder.communicate(timeout=10)[0]
    acted = json.loads(record.read_text())
    assert acted["actions"] > 0 and acted["read"] == ["snake/alive/0", "snake/alive/1"], intruder_output
    if mode == "lurker":
        for rank, (code, output) in enumerate(outputs):
            assert code == 0, f"rank {rank} failed under a lurking intruder:\n{output[-3000:]}"
            assert "authenticated transport: True" in output
        for rank in range(2):
            adapters = load_file(str(out / f"adapters-{rank}.safetensors"))
            assert all(torch.equal(adapters[k], simulated_2[k]) for k in simulated_2), f"rank {rank} differs"
        return
    assert all(code != 0 for code, _ in outputs), f"a rank completed under a forging intruder: {intruder_output}"
    assert any("AuthenticationError" in output and "refused the" in output for _, output in outputs), outputs
    for _, output in outputs:  # the others stop because a peer stopped, named too; nothing else goes wrong
        assert "AuthenticationError" in output or "HopTimeoutError" in output, output[-3000:]
    assert not list(out.glob("adapters-*.safetensors")), "a rank finished with adapters under attack"
    assert elapsed < 240, f"the ranks took {elapsed:.0f} s to stop"
