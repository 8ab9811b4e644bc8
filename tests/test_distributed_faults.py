"""Faults in distributed runs, with real processes over real sockets: a rank SIGKILLed mid-run.

p2p: the other ranks stop with the named `HopTimeoutError`; relaunching all ranks with `resume_from_checkpoint=True`
finishes the run with adapters bit-identical to an uninterrupted one.
cs: a dead node is re-planned around (or its stages dropped) and the run finishes on the others, bit-identical to the
simulation of the re-planned plan (also when it dies in the second stage of its run: the first one's work is kept); a dead coordinator stops the run, and resuming finishes it bit-identically.

Each rank is its own process joined through the rendezvous store (not torchrun: its agent stops every worker when one
dies). Every run is bounded in time and every process is killed at the end.
"""

from __future__ import annotations

import json
import os
import signal
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
WORLD = 3
HOP_TIMEOUT = "6"  # seconds without a heartbeat before a rank counts as dead


def _launch(
    out: Path,
    topology: str,
    *args: str,
    timeout: float = 150,
    config: str = DEFAULT,
    hash_base: int = 101,
    **env_extra: str,
) -> dict[int, tuple]:
    """Starts one `_dist_fault_run.py` process per rank; returns {rank: (returncode, output)}.

    Every rank has its own PYTHONHASHSEED (`hash_base + 17 * rank`; a relaunch passes another base).
    """
    port, procs = free_port(), {}
    for rank in range(WORLD):
        env = dict(os.environ, RANK=str(rank), WORLD_SIZE=str(WORLD), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                   MASTER_PORT=str(port), OMP_NUM_THREADS="1", SNAKE_TEST_HOP_TIMEOUT=HOP_TIMEOUT,
                   PYTHONHASHSEED=str(hash_base + 17 * rank), SNAKE_TEST_CONFIG=config)  # fmt: skip
        env.update(env_extra)
        command = [sys.executable, str(HERE / "_dist_fault_run.py"), str(out), topology, *args]
        procs[rank] = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    results = {}
    try:
        for rank, proc in procs.items():
            output = proc.communicate(timeout=timeout)[0]
            results[rank] = (proc.returncode, output)
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait(10)
    return results


def _adapters(path: Path) -> dict[str, torch.Tensor]:
    return load_file(str(path))


def _equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture(scope="module")
def simulate(tmp_path_factory):
    """`simulate(config)`: the same run as a simulation (bit-identical to the distributed engine,
    tests/test_distributed.py), once per configuration."""
    cache = {}

    def simulate(config: str = DEFAULT):
        if config not in cache:
            out = tmp_path_factory.mktemp(f"sim-{config}")
            threads = torch.get_num_threads()
            try:
                trainer = run(str(out), "p2p", WORLD, engine="simulation", config=config)
            finally:
                torch.set_num_threads(threads)
            cache[config] = (_adapters(out / "adapters-0.safetensors"), trainer.snake_report)
        return cache[config]

    return simulate


@pytest.fixture(scope="module")
def uninterrupted(simulate):
    return simulate(DEFAULT)


# fmt: off
REPLANS = [  # (plan nodes, failure position, failed nodes, mode) -> (new nodes, moved as (stage, to), dropped)
    ([0, 1, 2, 2, 1, 0], 1, {1}, "replan", [0, 0, 2, 2, 2, 0], [(1, 0), (4, 2)], []),
    ([0, 1, 2, 2, 1, 0], 4, {1}, "replan", [0, 1, 2, 2, 2, 0], [(4, 2)], []),
    ([0, 1, 2, 2, 1, 0], 0, {0}, "replan", [1, 1, 2, 2, 1, 1], [(0, 1), (5, 1)], []),  # first stage: next live node
    ([0, 1, 2, 2, 1, 0], 2, {1, 2}, "replan", [0, 1, 0, 0, 0, 0], [(2, 0), (3, 0), (4, 0)], []),  # skips dead ones
    ([0, 1, 2, 2, 1, 0], 1, {1}, "drop", [0, 2, 2, 0], [], [1, 4]),
    ([1, 1, 1], 0, {1}, "replan", [0, 0, 0], [(0, 0), (1, 0), (2, 0)], []),  # no live node in the plan: fallback
]
# fmt: on


@pytest.mark.parametrize(("nodes", "position", "failed", "mode", "new", "moved", "dropped"), REPLANS,
                         ids=["mid-pass", "late", "first-stage", "two-dead", "drop", "fallback"])  # fmt: skip
def test_replan_moves_a_failed_nodes_stages_to_the_nearest_earlier_live_node(
    nodes, position, failed, mode, new, moved, dropped
):
    from snake_hf import Stage
    from snake_hf.engine.coordinator import replan_after_failure

    plan = [Stage(index=i, pass_index=0, node=n, group=i % 2, steps=i + 1) for i, n in enumerate(nodes)]
    effective, got_moved, got_dropped = replan_after_failure(plan, position, failed, mode, fallback=0)
    assert [s.node for s in effective] == new
    assert [(m["stage"], m["to"]) for m in got_moved] == moved and got_dropped == dropped
    kept = {s.index: s for s in plan}
    assert all((s.group, s.steps, s.pass_index) == (kept[s.index].group, kept[s.index].steps, kept[s.index].pass_index)
               for s in effective)  # fmt: skip
    assert effective[:position] == plan[:position]  # what already ran is never rewritten


def test_on_node_failure_is_validated_naming_field_value_and_fix(tmp_path):
    from snake_hf import SnakeConfig

    with pytest.raises(ValueError, match=r"`on_node_failure` \('skip'\) is not valid; use 'replan' .* or 'drop'"):
        SnakeConfig(output_dir=str(tmp_path), on_node_failure="skip", use_cpu=True, report_to="none")


@pytest.mark.slow
@pytest.mark.parametrize("config", [DEFAULT, *MATRIX])
def test_p2p_rank_killed_mid_stage_stops_with_hop_timeout_then_resume_is_bit_identical(tmp_path, simulate, config):
    # Plan: stages 0..11 on nodes 0 1 2 2 1 0 | 0 1 2 2 1 0, two steps each. Rank 1 dies after step 9 (in stage 4).
    crashed = _launch(tmp_path, "p2p", "run", "1", "9", config=config)
    assert crashed[1][0] == -signal.SIGKILL
    for rank in (0, 2):
        code, output = crashed[rank]
        assert code != 0, f"rank {rank} should have stopped:\n{output[-2000:]}"
        error = (tmp_path / f"error-{rank}.txt").read_text()
        assert error.startswith("HopTimeoutError: stage "), error
        assert "(topology p2p)" in error
    assert "rank 1" in (tmp_path / "error-2.txt").read_text()  # rank 2 waited for the payload of stage 4 -> 5
    # every rank checkpointed after each of its own stages; the run goes on at stage 4 (rank 2's checkpoint-8)
    latest = {r: sorted(p.name for p in (tmp_path / f"node-{r}").glob("checkpoint-*")) for r in range(WORLD)}
    assert latest == {0: ["checkpoint-2"], 1: ["checkpoint-4"], 2: ["checkpoint-6", "checkpoint-8"]}

    resumed = _launch(tmp_path, "p2p", "resume", config=config, hash_base=202)  # other hash seeds than the crashed run
    for rank, (code, output) in resumed.items():
        assert code == 0, f"rank {rank} failed on resume:\n{output[-3000:]}"
    expected, sim_report = simulate(config)
    for rank in range(WORLD):
        assert _equal(_adapters(tmp_path / f"adapters-{rank}.safetensors"), expected), f"rank {rank} differs"
    report = json.loads((tmp_path / "report.json").read_text())
    assert [s["stage"] for s in report["stages"]] == list(range(12))
    assert [s["train_loss"] for s in report["stages"]] == [s.train_loss for s in sim_report.stages]
    assert report["link_bytes"] == sim_report.link_bytes()


# fmt: off
CS_KILLS = [  # (rank, after step) -> (failed stage, re-planned as (stage, to), effective plan's nodes)
    # rank 1 dies in stage 4 (its own run of one stage), before its payload left
    (1, 9, 4, [(4, 2), (7, 0), (10, 2)], [0, 1, 2, 2, 2, 0, 0, 0, 2, 2, 2, 0]),
    # rank 2 dies in stage 3, the second stage of its run 2-3: stage 2's work reached the coordinator and is kept
    (2, 7, 3, [(3, 1), (8, 1), (9, 1)], [0, 1, 2, 1, 1, 0, 0, 1, 1, 1, 1, 0]),
]
# fmt: on


@pytest.mark.slow
@pytest.mark.parametrize(("killed", "step", "stage", "replanned", "nodes"), CS_KILLS, ids=["run-of-one", "mid-run"])
def test_cs_rank_killed_mid_stage_run_finishes_on_the_others_as_the_replanned_plan(
    tmp_path, killed, step, stage, replanned, nodes
):
    from _dist_fault_run import adapters, make_trainer
    from peft import PeftModel, get_peft_model_state_dict

    from conftest import tiny_gpt2
    from snake_hf import Stage

    # Stages 0..11 on nodes 0 1 2 2 1 0 | 0 1 2 2 1 0, two steps each.
    results = _launch(tmp_path, "cs", "run", str(killed), str(step), SNAKE_TEST_HOP_TIMEOUT="10")
    assert results[killed][0] == -signal.SIGKILL
    live = [rank for rank in range(WORLD) if rank != killed]
    for rank in live:
        assert results[rank][0] == 0, f"rank {rank} did not finish:\n{results[rank][1][-3000:]}"
    assert f"Node {killed} failed at stage {stage}" in results[0][1]  # the coordinator's warning

    report = json.loads((tmp_path / "report.json").read_text())
    [failure] = report["failures"]
    assert (failure["rank"], failure["stage"], failure["action"]) == (killed, stage, "replan")
    # each of the dead node's remaining stages goes to the node of the nearest earlier stage on a live node
    assert failure["replanned"] == [{"stage": s, "from": killed, "to": to} for s, to in replanned]
    effective = [Stage.from_dict(s) for s in failure["effective_plan"]]
    assert [s.node for s in effective] == nodes
    assert [(s["stage"], s["node"]) for s in report["stages"]] == [(s.index, s.node) for s in effective]

    final = _adapters(tmp_path / f"adapters-{live[0]}.safetensors")
    assert _equal(_adapters(tmp_path / f"adapters-{live[1]}.safetensors"), final)
    loaded = PeftModel.from_pretrained(tiny_gpt2(), str(tmp_path / "final"))  # plain PEFT loads the saved adapter
    state = get_peft_model_state_dict(loaded)
    assert state.keys() == final.keys() and all(torch.equal(state[k], final[k]) for k in final)

    # The result is exactly what the simulation of the effective (re-planned) plan gives.
    threads = torch.get_num_threads()
    try:
        simulated = make_trainer(str(tmp_path / "sim"), "cs", engine="simulation", schedule=effective)
        simulated.train()
    finally:
        torch.set_num_threads(threads)
    assert _equal(adapters(simulated), final)
    assert [s["train_loss"] for s in report["stages"]] == [s.train_loss for s in simulated.snake_report.stages]


@pytest.mark.slow
def test_cs_drop_mode_skips_the_dead_nodes_stages_and_finishes(tmp_path):
    from peft import PeftModel

    from conftest import tiny_gpt2

    results = _launch(tmp_path, "cs", "run", "1", "9", SNAKE_TEST_HOP_TIMEOUT="10", SNAKE_TEST_ON_NODE_FAILURE="drop")
    assert results[1][0] == -signal.SIGKILL
    for rank in (0, 2):
        assert results[rank][0] == 0, f"rank {rank} did not finish:\n{results[rank][1][-3000:]}"
    report = json.loads((tmp_path / "report.json").read_text())
    [failure] = report["failures"]
    assert (failure["rank"], failure["stage"], failure["action"]) == (1, 4, "drop")
    assert failure["dropped"] == [4, 7, 10] and failure["replanned"] == []
    ran = [(s["stage"], s["node"], s["group"]) for s in report["stages"]]
    assert ran == [(0, 0, 0), (1, 1, 0), (2, 2, 0), (3, 2, 1), (5, 0, 1), (6, 0, 0), (8, 2, 0), (9, 2, 1), (11, 0, 1)]
    assert {group for _, _, group in ran[4:]} == {0, 1}  # both groups still train after the failure
    final = _adapters(tmp_path / "adapters-0.safetensors")
    assert _equal(_adapters(tmp_path / "adapters-2.safetensors"), final)
    PeftModel.from_pretrained(tiny_gpt2(), str(tmp_path / "final"))


@pytest.mark.slow
def test_cs_dead_coordinator_stops_the_run_then_resume_is_bit_identical(tmp_path, uninterrupted):
    # A dead coordinator is not survivable: rank 0 dies after step 11 (in its stage 5); the others stop naming it.
    crashed = _launch(tmp_path, "cs", "run", "0", "11")
    assert crashed[0][0] == -signal.SIGKILL
    for rank in (1, 2):
        assert crashed[rank][0] != 0, f"rank {rank} should have stopped:\n{crashed[rank][1][-2000:]}"
        error = (tmp_path / f"error-{rank}.txt").read_text()
        assert error.startswith("HopTimeoutError: "), error
        assert "coordinator 0" in error or "rendezvous store is unreachable" in error, error
    resumed = _launch(tmp_path, "cs", "resume")
    for rank, (code, output) in resumed.items():
        assert code == 0, f"rank {rank} failed on resume:\n{output[-3000:]}"
    expected, sim_report = uninterrupted
    for rank in range(WORLD):
        assert _equal(_adapters(tmp_path / f"adapters-{rank}.safetensors"), expected), f"rank {rank} differs"
    report = json.loads((tmp_path / "report.json").read_text())
    assert [s["train_loss"] for s in report["stages"]] == [s.train_loss for s in sim_report.stages]
