"""Reduced-precision payloads and recomputation above the group, distributed over real sockets: bit-identical to the
simulation. bfloat16: every node rounds what it trained to the wire values, so no node holds more precision than a
receiver; int8/int4: every node turns what it trained into base + its quantized delta, which receivers rebuild."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from _wire_run import run
from safetensors.torch import load_file


HERE = Path(__file__).parent


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.slow
@pytest.mark.parametrize(
    ("payload_dtype", "num_nodes", "topology"),
    [("bfloat16", 3, "p2p"), ("int8", 2, "p2p"), ("int8", 3, "p2p"), ("int4", 2, "p2p"), ("int4", 3, "p2p"),
     ("int4", 3, "cs")],
    ids=["bfloat16-3", "int8-2", "int8-3", "int4-2", "int4-3", "int4-3-cs"],
)  # fmt: skip
def test_reduced_payloads_give_the_same_adapters_distributed_and_simulated(
    tmp_path, payload_dtype, num_nodes, topology
):
    port = _free_port()
    threads = torch.get_num_threads()
    try:
        trainer = run(str(tmp_path / "sim"), topology, num_nodes, engine="simulation", payload_dtype=payload_dtype)
    finally:
        torch.set_num_threads(threads)
    expected = load_file(str(tmp_path / "sim" / "adapters-0.safetensors"))
    procs = []
    for rank in range(num_nodes):
        env = dict(os.environ, RANK=str(rank), WORLD_SIZE=str(num_nodes), LOCAL_RANK=str(rank),
                   MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1")  # fmt: skip
        command = [sys.executable, str(HERE / "_wire_run.py"), str(tmp_path), topology, str(num_nodes), payload_dtype]
        procs.append(subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    try:
        outputs = [proc.communicate(timeout=240)[0] for proc in procs]
    finally:
        for proc in procs:
            proc.kill()
    for rank, (proc, output) in enumerate(zip(procs, outputs)):
        assert proc.returncode == 0, f"rank {rank} failed:\n{output[-3000:]}"
        adapters = load_file(str(tmp_path / f"adapters-{rank}.safetensors"))
        assert adapters.keys() == expected.keys()
        assert all(torch.equal(adapters[k], expected[k]) for k in expected), f"rank {rank} differs"
        if payload_dtype == "bfloat16":
            assert all(torch.equal(v, v.to(torch.bfloat16).float()) for v in adapters.values()), "wire values only"
    report = json.loads((tmp_path / "report.json").read_text())
    if topology == "p2p":
        parts, hops = report["part_nbytes"], report["hops"]
        assert [h["tensor_nbytes"] for h in hops] == [sum(parts[p] for p in h["parts"]) for h in hops]
    assert [s["train_loss"] for s in report["stages"]] == [s.train_loss for s in trainer.snake_report.stages]
    if topology == "p2p":  # (cs: the real coordinator relays whole tensors; the simulation counts deltas)
        assert report["link_bytes"] == trainer.snake_report.link_bytes()
