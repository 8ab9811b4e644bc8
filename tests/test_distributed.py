"""Distributed Snake with real processes over real sockets: bit-identical to the simulation, in p2p and cs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from _snake_run import run
from safetensors.torch import load_file

from _matrix import DEFAULT, MATRIX
from conftest import free_port


HERE = Path(__file__).parent


def _launch_ranks(out_dir: Path, topology: str, num_nodes: int, timeout: float = 240, config: str = DEFAULT) -> None:
    """One process per node, joined through the rendezvous store (RANK/WORLD_SIZE/MASTER_* as a launcher sets).

    Every rank gets its own PYTHONHASHSEED (and the test process has yet another): whatever two processes must agree
    on cannot depend on a process's set order.
    """
    port = free_port()
    procs = []
    for rank in range(num_nodes):
        env = dict(os.environ, RANK=str(rank), WORLD_SIZE=str(num_nodes), LOCAL_RANK=str(rank),
                   MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1",
                   PYTHONHASHSEED=str(101 + 17 * rank), SNAKE_TEST_CONFIG=config)  # fmt: skip
        procs.append(
            subprocess.Popen(
                [sys.executable, str(HERE / "_snake_run.py"), str(out_dir), topology, str(num_nodes)],
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
            )  # fmt: skip
        )
    join_ranks(procs, timeout)


def collect_ranks(procs: list[subprocess.Popen], timeout: float) -> list[tuple[int, str]]:
    """Waits for every rank's process (killing the rest on a timeout); returns each one's (exit code, output)."""
    results = []
    try:
        for proc in procs:
            output = proc.communicate(timeout=timeout)[0]
            results.append((proc.returncode, output))
    finally:
        for proc in procs:
            proc.kill()
    return results


def join_ranks(procs: list[subprocess.Popen], timeout: float) -> list[str]:
    """Waits for every rank's process (killing the rest on a timeout) and checks each exited 0, showing a failed
    rank's output; returns the outputs."""
    results = collect_ranks(procs, timeout)
    for rank, (code, output) in enumerate(results):
        assert code == 0, f"rank {rank} failed:\n{output[-3000:]}"
    return [output for _, output in results]


@pytest.fixture(scope="module")
def simulated(tmp_path_factory):
    results = {}
    threads = torch.get_num_threads()
    try:
        for num_nodes in (2, 3):
            out = tmp_path_factory.mktemp(f"sim{num_nodes}")
            trainer = run(str(out), "p2p", num_nodes, engine="simulation")
            results[num_nodes] = (load_file(str(out / "adapters-0.safetensors")), trainer.snake_report)
    finally:
        torch.set_num_threads(threads)
    return results


@pytest.mark.slow
@pytest.mark.parametrize("topology", ["p2p", "cs"])
@pytest.mark.parametrize("num_nodes", [2, 3])
def test_distributed_adapters_are_bit_identical_to_the_simulation(tmp_path, simulated, num_nodes, topology):
    _launch_ranks(tmp_path, topology, num_nodes)
    expected, sim_report = simulated[num_nodes]
    for rank in range(num_nodes):
        adapters = load_file(str(tmp_path / f"adapters-{rank}.safetensors"))
        assert adapters.keys() == expected.keys()
        assert all(torch.equal(adapters[k], expected[k]) for k in expected), f"rank {rank} differs"
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["engine"] == "distributed"
    assert [s["train_loss"] for s in report["stages"]] == [s.train_loss for s in sim_report.stages]
    # the payloads are the same bytes: per-link byte counts match the simulation's
    assert report["link_bytes"] == sim_report.link_bytes()


@pytest.mark.slow
@pytest.mark.parametrize("topology", ["p2p", "cs"])
def test_plan_epochs_run_distributed_bit_identical_to_the_simulation(tmp_path, monkeypatch, topology):
    """num_train_epochs=2 with checkpoints on: `Trainer` epochs in the simulation, one loop per process distributed.
    The RNG draw of each new epoch's dataloader iterator is made by the rank that trained the epoch's last step."""
    monkeypatch.setenv("SNAKE_TEST_EPOCHS", "2")
    monkeypatch.setenv("SNAKE_TEST_SAVE", "steps")
    (tmp_path / "sim").mkdir()
    (tmp_path / "dist").mkdir()
    threads = torch.get_num_threads()
    try:
        simulation = run(str(tmp_path / "sim"), "p2p", 3, engine="simulation")
    finally:
        torch.set_num_threads(threads)
    assert simulation.state.epoch == 2 and simulation.epoch_steps * 2 == simulation.total_steps
    expected = load_file(str(tmp_path / "sim" / "adapters-0.safetensors"))
    _launch_ranks(tmp_path / "dist", topology, 3)
    for rank in range(3):
        adapters = load_file(str(tmp_path / "dist" / f"adapters-{rank}.safetensors"))
        assert all(torch.equal(adapters[k], expected[k]) for k in expected), f"rank {rank} differs"
    report = json.loads((tmp_path / "dist" / "report.json").read_text())
    assert [s["train_loss"] for s in report["stages"]] == [s.train_loss for s in simulation.snake_report.stages]


@pytest.mark.slow
@pytest.mark.parametrize(("topology", "num_nodes"), [("p2p", 2), ("cs", 3)], ids=["p2p-2", "cs-3"])
@pytest.mark.parametrize("config", MATRIX)
def test_every_user_configuration_runs_distributed_bit_identical_to_the_simulation(
    tmp_path, config, topology, num_nodes
):
    threads = torch.get_num_threads()
    try:
        simulation = run(str(tmp_path), "p2p", num_nodes, engine="simulation", config=config)
    finally:
        torch.set_num_threads(threads)
    expected = load_file(str(tmp_path / "adapters-0.safetensors"))
    distributed = tmp_path / "distributed"
    distributed.mkdir()
    _launch_ranks(distributed, topology, num_nodes, config=config)
    for rank in range(num_nodes):
        adapters = load_file(str(distributed / f"adapters-{rank}.safetensors"))
        assert adapters.keys() == expected.keys()
        assert all(torch.equal(adapters[k], expected[k]) for k in expected), f"rank {rank} differs"
    report = json.loads((distributed / "report.json").read_text())
    assert [s["train_loss"] for s in report["stages"]] == [s.train_loss for s in simulation.snake_report.stages]
    assert report["link_bytes"] == simulation.snake_report.link_bytes()


@pytest.mark.slow
def test_a_node_that_never_answers_raises_a_hop_timeout_naming_stage_ranks_and_topology(tmp_path):
    env = dict(os.environ, RANK="0", WORLD_SIZE="2", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
               MASTER_PORT=str(free_port()), OMP_NUM_THREADS="1", SNAKE_TEST_HOP_TIMEOUT="4")  # fmt: skip
    command = [sys.executable, str(HERE / "_snake_run.py"), str(tmp_path), "p2p", "2"]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=180)  # rank 1 never starts
    assert done.returncode != 0
    assert "HopTimeoutError" in done.stderr
    assert "stage 1: payload from rank 0 to rank 1 not delivered: rank 1 never joined" in done.stderr
    assert "(topology p2p)" in done.stderr


def _make_two_hosts(suffix: str) -> list[str] | None:
    """Two network namespaces joined by a veth pair, 10.231.0.1 and 10.231.0.2: two hosts on this machine."""
    names = [f"snake-a-{suffix}", f"snake-b-{suffix}"]
    commands = [
        ["ip", "netns", "add", names[0]],
        ["ip", "netns", "add", names[1]],
        ["ip", "link", "add", f"sva{suffix}", "type", "veth", "peer", "name", f"svb{suffix}"],
        ["ip", "link", "set", f"sva{suffix}", "netns", names[0]],
        ["ip", "link", "set", f"svb{suffix}", "netns", names[1]],
        ["ip", "-n", names[0], "addr", "add", "10.231.0.1/24", "dev", f"sva{suffix}"],
        ["ip", "-n", names[1], "addr", "add", "10.231.0.2/24", "dev", f"svb{suffix}"],
        *[["ip", "-n", n, "link", "set", dev, "up"] for n, dev in zip(names, (f"sva{suffix}", f"svb{suffix}"))],
        *[["ip", "-n", n, "link", "set", "lo", "up"] for n in names],
    ]
    for command in commands:
        if subprocess.run(command, capture_output=True).returncode != 0:
            _remove_hosts(names)
            return None
    return names


def _remove_hosts(names: list[str]) -> None:
    for name in names:
        subprocess.run(["ip", "netns", "del", name], capture_output=True)


@pytest.mark.slow
def test_two_hosts_in_network_namespaces_match_the_simulation(tmp_path, simulated):
    if os.geteuid() != 0:
        pytest.skip("network namespaces need root (ip netns add)")
    names = _make_two_hosts(str(os.getpid() % 10000))
    if names is None:
        pytest.skip("could not create network namespaces and a veth pair here (ip netns / ip link failed)")
    try:
        procs = []
        for rank, name in enumerate(names):
            # gloo binds its pairs to the address the hostname resolves to unless told the interface to use
            device = f"sv{'ab'[rank]}{name.rsplit('-', 1)[1]}"
            env = dict(os.environ, RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK="0", MASTER_ADDR="10.231.0.1",
                       MASTER_PORT="29611", OMP_NUM_THREADS="1", GLOO_SOCKET_IFNAME=device)  # fmt: skip
            command = [
                "ip",
                "netns",
                "exec",
                name,
                sys.executable,
                str(HERE / "_snake_run.py"),
                str(tmp_path),
                "p2p",
                "2",
            ]
            procs.append(
                subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
            )
        outputs = [proc.communicate(timeout=180)[0] for proc in procs]
        for rank, (proc, output) in enumerate(zip(procs, outputs)):
            assert proc.returncode == 0, f"host {rank} failed:\n{output[-3000:]}"
    finally:
        for proc in procs:
            proc.kill()
        _remove_hosts(names)
    expected, _ = simulated[2]
    for rank in range(2):
        adapters = load_file(str(tmp_path / f"adapters-{rank}.safetensors"))
        assert all(torch.equal(adapters[k], expected[k]) for k in expected)
