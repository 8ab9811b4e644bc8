"""Reduced-precision payloads and recomputation above the group, distributed over real sockets: bit-identical to the
simulation. bfloat16: every node rounds what it trained to the wire values, so no node holds more precision than a
receiver; int8/int4: every node turns what it trained into base + its quantized delta, which receivers rebuild (in cs
topology the coordinator rebuilds it too and forwards the delta's bytes unchanged, so both wire hops carry it)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from _wire_run import run
from safetensors.torch import load_file

from conftest import free_port


HERE = Path(__file__).parent


def _distributed(out: Path, topology: str, num_nodes: int, payload_dtype: str) -> None:
    """One `_wire_run.py` process per rank (each its own PYTHONHASHSEED); every rank must finish."""
    port, procs = free_port(), []
    for rank in range(num_nodes):
        env = dict(os.environ, RANK=str(rank), WORLD_SIZE=str(num_nodes), LOCAL_RANK=str(rank),
                   MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1",
                   PYTHONHASHSEED=str(31 + 17 * rank))  # fmt: skip
        command = [sys.executable, str(HERE / "_wire_run.py"), str(out), topology, str(num_nodes), payload_dtype]
        procs.append(subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    try:
        outputs = [proc.communicate(timeout=240)[0] for proc in procs]
    finally:
        for proc in procs:
            proc.kill()
    for rank, (proc, output) in enumerate(zip(procs, outputs)):
        assert proc.returncode == 0, f"rank {rank} failed:\n{output[-3000:]}"


def _wire_bytes(out: Path, num_nodes: int) -> dict[tuple[int, int], int]:
    """Bytes sent over each directed link, as the sending rank's transport counted them."""
    links = {}
    for rank in range(num_nodes):
        for a, b, n in json.loads((out / f"wire-{rank}.json").read_text()):
            if a == rank:
                links[(a, b)] = n
    return links


@pytest.mark.slow
@pytest.mark.parametrize(
    ("payload_dtype", "num_nodes", "topology"),
    [("bfloat16", 3, "p2p"), ("int8", 2, "p2p"), ("int8", 3, "p2p"), ("int4", 2, "p2p"), ("int4", 3, "p2p"),
     ("int8", 2, "cs"), ("int8", 3, "cs"), ("int4", 2, "cs"), ("int4", 3, "cs")],
    ids=["bfloat16-3", "int8-2", "int8-3", "int4-2", "int4-3", "int8-2-cs", "int8-3-cs", "int4-2-cs", "int4-3-cs"],
)  # fmt: skip
def test_reduced_payloads_give_the_same_adapters_distributed_and_simulated(
    tmp_path, payload_dtype, num_nodes, topology
):
    threads = torch.get_num_threads()
    try:
        trainer = run(str(tmp_path / "sim"), topology, num_nodes, engine="simulation", payload_dtype=payload_dtype)
    finally:
        torch.set_num_threads(threads)
    expected = load_file(str(tmp_path / "sim" / "adapters-0.safetensors"))
    _distributed(tmp_path, topology, num_nodes, payload_dtype)
    for rank in range(num_nodes):
        adapters = load_file(str(tmp_path / f"adapters-{rank}.safetensors"))
        assert adapters.keys() == expected.keys()
        assert all(torch.equal(adapters[k], expected[k]) for k in expected), f"rank {rank} differs"
        if payload_dtype == "bfloat16":
            assert all(torch.equal(v, v.to(torch.bfloat16).float()) for v in adapters.values()), "wire values only"
    report = json.loads((tmp_path / "report.json").read_text())
    parts, hops = report["part_nbytes"], report["hops"]
    assert [h["tensor_nbytes"] for h in hops] == [sum(parts[p] for p in h["parts"]) for h in hops]  # one delta each
    assert [s["train_loss"] for s in report["stages"]] == [s.train_loss for s in trainer.snake_report.stages]
    assert report["link_bytes"] == trainer.snake_report.link_bytes()  # cs too: the coordinator forwards the bytes


@pytest.mark.slow
@pytest.mark.parametrize(("payload_dtype", "ratio"), [("int8", 0.26), ("int4", 0.14)], ids=["int8", "int4"])
def test_cs_wire_carries_quantized_deltas_on_both_hops_of_each_relayed_payload(tmp_path, payload_dtype, ratio):
    # 3 ranks, coordinator 0, plan nodes 0 1 2 2 1 0 | 0 1 2 2 1 0: the hops 1 -> 2 and 2 -> 1 cross two links through
    # rank 0, rank 2 uploads after the first stage of each of its runs, rank 0 hands every rank the final state.
    float32, quantized = tmp_path / "float32", tmp_path / payload_dtype
    _distributed(float32, "cs", 3, "float32")
    _distributed(quantized, "cs", 3, payload_dtype)
    wire, reference = _wire_bytes(quantized, 3), _wire_bytes(float32, 3)
    assert wire.keys() == reference.keys() == {(0, 1), (0, 2), (1, 0), (2, 0)}
    for link, nbytes in wire.items():  # real wire bytes: header, manifest, codes and scales, uploads, final state
        assert nbytes < reference[link], f"link {link}: {nbytes} bytes, float32 {reference[link]}"
    hops = json.loads((quantized / "report.json").read_text())["hops"]
    float32_hops = json.loads((float32 / "report.json").read_text())["hops"]
    assert any(0 not in (h["sender"], h["receiver"]) for h in hops), "the plan relays hops through the coordinator"
    for hop, whole in zip(hops, float32_hops, strict=True):
        assert hop["parts"] == whole["parts"] and hop["tensor_nbytes"] <= ratio * whole["tensor_nbytes"]
