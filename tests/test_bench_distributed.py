"""benchmarks/distributed_overhead.py: its hop accounting, and its `--quick` run's JSON (shape, bytes, parity)."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest


BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "distributed_overhead.py"


def _bench_module():
    spec = importlib.util.spec_from_file_location("distributed_overhead", BENCH)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the class is built
    spec.loader.exec_module(module)  # stdlib imports only at module level: milliseconds
    return module


def _synthetic_run(receiver_ready: float):
    """Rank 0 trains stage 0 (from t=10), then sends to rank 1, which has waited for its turn since `receiver_ready`."""
    report = {
        "num_nodes": 2,
        "part_nbytes": {"group_0": 1000},
        "stages": [
            {"stage": 0, "node": 0, "wall_seconds": 3.0, "wait_seconds": 0.0},
            {
                "stage": 1,
                "node": 1,
                "wall_seconds": 3.0,
                "wait_seconds": 13.1 - receiver_ready + 0.03,
                "load_seconds": 0.03,
            },
        ],
        "hops": [
            {
                "to_stage": 1,
                "sender": 0,
                "receiver": 1,
                "parts": ["group_0"],
                "nbytes": 1100,
                "tensor_nbytes": 1000,
                "seconds": 0.02 + 0.09,
            },
        ],  # fmt: skip
    }
    records = [
        {"rank": 0, "train_start": 10.0, "train_end": 16.5, "bytes_sent": 1100,
         "events": [{"kind": "send", "stage": 1, "start": 13.02, "end": 13.11}]},
        {"rank": 1, "train_start": 10.0, "train_end": 16.5, "bytes_sent": 0,
         "events": [{"kind": "recv", "stage": 1, "start": receiver_ready, "end": 13.1}]},
    ]  # fmt: skip
    return report, records


@pytest.mark.parametrize(
    "receiver_ready, turn_wait, wire",
    [(8.0, 5.02, 0.08), (13.05, 0.0, 0.05)],
    ids=["receiver-waited-for-its-turn", "receiver-ready-after-the-send-began"],
)
def test_hop_cost_excludes_the_wait_for_a_turn_when_the_receiver_waited(receiver_ready, turn_wait, wire):
    bench = _bench_module()
    report, records = _synthetic_run(receiver_ready)
    (hop,) = bench.hop_costs(report, records, distributed=True)
    assert hop["encode_s"] == pytest.approx(0.02)
    assert hop["wire_s"] == pytest.approx(wire)
    assert hop["load_s"] == pytest.approx(0.03)
    assert hop["hop_s"] == pytest.approx(0.05 + wire)
    assert hop["turn_wait_s"] == pytest.approx(turn_wait)
    assert hop["min_nbytes"] == 1000


def test_cs_coordinator_encode_excludes_its_send_which_leaves_after_the_hop_record():
    bench = _bench_module()
    report, records = _synthetic_run(8.0)
    (hop,) = bench.hop_costs(report, records, distributed=True, topology="cs")
    assert hop["encode_s"] == pytest.approx(0.11)  # the whole HopRecord.seconds: the send_to came later
    assert hop["load_s"] == pytest.approx(0.03)


@pytest.fixture(scope="module")
def quick_result(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    command = [sys.executable, str(BENCH), "--quick", "--out_dir", str(out)]
    proc = subprocess.run(command, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, f"{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    assert (out / "distributed_overhead.md").read_text().startswith("# Distributed Snake overhead (quick)")
    return json.loads((out / "distributed_overhead.json").read_text())


@pytest.mark.slow
def test_quick_benchmark_json_has_machine_config_and_a_run_per_world_size_and_topology(quick_result):
    assert {"date", "cpu_count", "torch_version"} <= quick_result["machine"].keys()
    config = quick_result["config"]
    expected = [(n, t, a) for n in config["world_sizes"] for t in config["topologies"] for a in config["auth"]]
    assert [(run["world_size"], run["topology"], run["auth"]) for run in quick_result["runs"]] == expected
    assert [cost["nbytes"] for cost in quick_result["seal_costs"]] == [64 << 10, 1 << 20, 16 << 20, 64 << 20]
    for run in quick_result["runs"]:
        for engine in ("distributed", "simulation"):
            summary = run[engine]
            assert 0 <= summary["hop_share"] < 1
            assert summary["num_hops"] == len(summary["hops"]) == len(run["report"]["hops"]) > 0
            assert len(summary["ranks"]) == run["world_size"]
        assert run["report"]["engine"] == "distributed"
        assert run["simulation_report"]["engine"] == "simulation"


@pytest.mark.slow
def test_quick_benchmark_hop_bytes_equal_the_payload_bytes_in_the_report(quick_result):
    for run in quick_result["runs"]:
        report, summary = run["report"], run["distributed"]
        payloads = [hop["nbytes"] for hop in report["hops"]]
        assert [hop["nbytes"] for hop in summary["hops"]] == payloads
        assert summary["hop_nbytes"] == sum(payloads) == report["total_bytes"]
        assert sum(s["bytes_received"] for s in report["stages"]) == sum(payloads)
        assert sum(s["bytes_sent"] for s in report["stages"]) == sum(payloads)
        # each hop carries exactly the tensors of the parts the receiver lacked, plus header and manifest
        assert summary["hop_tensor_nbytes"] == summary["hop_min_nbytes"] < summary["hop_nbytes"]
        # every hop's bytes crossed a link; the final hand-off (and cs forwarding) adds to that
        assert summary["wire_nbytes"] > summary["hop_nbytes"]


@pytest.mark.slow
def test_quick_benchmark_hop_times_add_up_and_runs_match_the_simulation(quick_result):
    for run in quick_result["runs"]:
        stages = {s["stage"]: s for s in run["report"]["stages"]}
        for hop in run["distributed"]["hops"]:
            assert min(hop["encode_s"], hop["wire_s"], hop["load_s"], hop["turn_wait_s"]) >= 0
            assert hop["hop_s"] == pytest.approx(hop["encode_s"] + hop["wire_s"] + hop["load_s"])
            wait = stages[hop["to_stage"]]["wait_seconds"]
            assert wait >= hop["wire_s"] + hop["load_s"] - 1e-9
            # the receiver's wait holds its whole recv call, then the load (a cs coordinator's used to read 0)
            assert wait - hop["load_s"] >= hop["recv_call_s"] - 1e-9
        if run["topology"] == "cs":  # the coordinator's wait for its turn spans every stage since its previous one
            since = 0.0
            for stage in run["report"]["stages"]:
                if stage["node"] == 0:
                    assert stage["wait_seconds"] >= since
                    since = 0.0
                else:
                    since += stage["wall_seconds"]
        assert run["losses_match_simulation"] and run["hop_bytes_match_simulation"]
