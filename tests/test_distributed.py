"""Distributed Snake with real processes over real sockets: bit-identical to the simulation, in p2p and cs."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from _snake_run import run
from safetensors.torch import load_file


HERE = Path(__file__).parent


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _launch_ranks(out_dir: Path, topology: str, num_nodes: int, timeout: float = 240) -> None:
    """One process per node, joined through the rendezvous store (RANK/WORLD_SIZE/MASTER_* as a launcher sets)."""
    port = _free_port()
    procs = []
    for rank in range(num_nodes):
        env = dict(os.environ, RANK=str(rank), WORLD_SIZE=str(num_nodes), LOCAL_RANK=str(rank),
                   MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1")  # fmt: skip
        procs.append(
            subprocess.Popen(
                [sys.executable, str(HERE / "_snake_run.py"), str(out_dir), topology, str(num_nodes)],
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
            )  # fmt: skip
        )
    outputs = []
    try:
        for proc in procs:
            outputs.append(proc.communicate(timeout=timeout)[0])
    finally:
        for proc in procs:
            proc.kill()
    for rank, (proc, output) in enumerate(zip(procs, outputs)):
        assert proc.returncode == 0, f"rank {rank} failed:\n{output[-3000:]}"


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
