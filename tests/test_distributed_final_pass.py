"""The final pass (batch-norm recompute, head calibration) in distributed runs, with real processes over real sockets:
the repaired model on every rank is bit-identical to the simulation's, in p2p and cs, and its hops carry the same
statistics (the model parts the simulation's hops also carry reached every rank in the run's final hand-over)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from _final_pass_run import run
from safetensors.torch import load_file
from test_distributed import collect_ranks, join_ranks

from conftest import free_port


HERE = Path(__file__).parent
STATS_PARTS = ("batchnorm/", "features/")


def _start(out_dir: Path, topology: str, num_nodes: int, repairs: str, secret: str = "", **env_extra: str):
    """One process per node joined through the rendezvous store, each with its own PYTHONHASHSEED (and, with `secret`,
    authenticated: every store message and payload sealed and checked)."""
    port = free_port()
    procs = []
    for rank in range(num_nodes):
        env = dict(os.environ, RANK=str(rank), WORLD_SIZE=str(num_nodes), LOCAL_RANK=str(rank),
                   MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1",
                   PYTHONHASHSEED=str(211 + 13 * rank), **env_extra)  # fmt: skip
        env.pop("SNAKE_RUN_SECRET", None)
        if secret:
            env["SNAKE_RUN_SECRET"] = secret
        command = [sys.executable, str(HERE / "_final_pass_run.py"), str(out_dir), topology, str(num_nodes), repairs]
        procs.append(subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    return procs


def _launch(
    out_dir: Path, topology: str, num_nodes: int, repairs: str, secret: str = "", timeout: float = 240
) -> None:
    join_ranks(_start(out_dir, topology, num_nodes, repairs, secret), timeout)


def _simulate(out_dir: Path, num_nodes: int, repairs: str, schedule=None):
    threads = torch.get_num_threads()
    try:
        trainer = run(str(out_dir), "p2p", num_nodes, repairs, engine="simulation", schedule=schedule)
    finally:
        torch.set_num_threads(threads)
    return load_file(str(out_dir / "state-0.safetensors")), trainer.snake_report


def _final_hops(hops, num_stages: int) -> dict[tuple[int, int], dict]:
    return {(h["sender"], h["receiver"]): h for h in hops if h["to_stage"] == num_stages}


CASES = [
    pytest.param(topology, n, repairs, "", id=f"{topology}-{n}-{repairs}")
    for topology in ("p2p", "cs")
    for n, repairs in ((2, "both"), (3, "both"), (3, "bn"), (2, "head"))
] + [pytest.param("cs", 3, "both", "final-pass-secret", id="cs-3-both-authenticated")]


@pytest.mark.slow
@pytest.mark.parametrize(("topology", "num_nodes", "repairs", "secret"), CASES)
def test_distributed_final_pass_matches_the_simulation_bit_for_bit(tmp_path, topology, num_nodes, repairs, secret):
    (tmp_path / "sim").mkdir()
    expected, sim_report = _simulate(tmp_path / "sim", num_nodes, repairs)
    (tmp_path / "plain").mkdir()
    untouched, _ = _simulate(tmp_path / "plain", num_nodes, "none")
    _launch(tmp_path, topology, num_nodes, repairs, secret)
    for rank in range(num_nodes):
        state = load_file(str(tmp_path / f"state-{rank}.safetensors"))
        assert state.keys() == expected.keys()
        differ = [k for k in expected if not torch.equal(state[k], expected[k])]
        assert not differ, f"rank {rank} differs from the simulation in {differ}"
    repaired = [k for k in expected if not torch.equal(expected[k], untouched[k])]
    assert repaired, "the final pass changed nothing: the comparison would not show a missing repair"
    # the same walk, with the same statistics parts and bytes; the simulation's hops also carry the model parts a
    # node lacks (distributed, the final hand-over brought them to every rank)
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["authenticated"] == bool(secret)
    num_stages = len(report["stages"])
    sim_hops = _final_hops([vars(h) for h in sim_report.hops], num_stages)
    hops = _final_hops(report["hops"], num_stages)
    assert hops.keys() == sim_hops.keys() and len(hops) == (num_nodes - 1) * (2 if repairs == "both" else 1)
    for link, hop in hops.items():
        simulated = sim_hops[link]
        model_parts = [p for p in simulated["parts"] if not p.startswith(STATS_PARTS)]
        assert hop["parts"] == [p for p in simulated["parts"] if p.startswith(STATS_PARTS)]
        model_bytes = sum(sim_report.part_nbytes[p] for p in model_parts)
        assert hop["tensor_nbytes"] == simulated["tensor_nbytes"] - model_bytes
        assert 0 < hop["nbytes"] <= simulated["nbytes"] - model_bytes


@pytest.mark.slow
def test_cs_run_with_a_failed_node_skips_the_final_pass_and_ends_as_the_replanned_plan_unrepaired(tmp_path):
    """A cs run in which node 1 dies mid-stage finishes on the others (re-planned), and the final pass, which needs
    every node's statistics, is skipped with the named warning: the live ranks end with the trained model exactly as
    the simulation of the re-planned plan trains it, unrepaired."""
    from snake_hf import Stage

    # 3 nodes x 2 groups, one pass: stages on nodes 0 1 2 2 1 0, two steps each; node 1 dies after step 3 (stage 1).
    procs = _start(tmp_path, "cs", 3, "both", SNAKE_TEST_KILL="1:3", SNAKE_TEST_HOP_TIMEOUT="10")
    results = collect_ranks(procs, 240)
    assert results[1][0] == -signal.SIGKILL
    for rank in (0, 2):
        code, output = results[rank]
        assert code == 0, f"rank {rank} did not finish:\n{output[-3000:]}"
        assert "Final pass skipped: node(s) [1] failed" in output, output[-3000:]
    report = json.loads((tmp_path / "report.json").read_text())
    [failure] = report["failures"]
    assert (failure["rank"], failure["stage"], failure["action"]) == (1, 1, "replan")
    effective = [Stage.from_dict(s) for s in failure["effective_plan"]]
    assert 1 not in {s.node for s in effective[1:]}
    (tmp_path / "sim").mkdir()
    expected, _ = _simulate(tmp_path / "sim", 3, "none", schedule=effective)
    for rank in (0, 2):
        state = load_file(str(tmp_path / f"state-{rank}.safetensors"))
        differ = [k for k in expected if not torch.equal(state[k], expected[k])]
        assert state.keys() == expected.keys() and not differ, f"rank {rank} differs from the simulation in {differ}"
