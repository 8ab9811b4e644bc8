"""benchmarks/compare.py and benchmarks/baselines.py: the tiny run's JSON (every method, every field), Snake's bytes
equal to what its payloads carried, and the baselines' byte formulas against the adapter sizes."""

from __future__ import annotations

import dataclasses
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import load_script


BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
FIELDS = {
    "final_metric", "curve", "bytes_total", "bytes_to_target", "steps_to_target", "steps", "peak_memory_per_node",
    "peak_memory_max", "memory_kind", "wall_seconds", "samples_per_second", "gap_to_centralized", "messages",
}  # fmt: skip
SNAKE = ("snake_serpentine", "snake_designated", "snake_serpentine+mitigation")
TINY_HIDDEN = 16  # snake_hf.recipes.common.TINY_CONFIGS["bert"]


def _module(name: str):
    return load_script(BENCH / f"{name}.py")


@pytest.fixture(scope="module")
def compare():
    return _module("compare")


@pytest.fixture(scope="module")
def tiny(compare, tmp_path_factory):
    """The tiny minilm_rt benchmark on a label-skewed split, every method in this process (seconds)."""
    folder = tmp_path_factory.mktemp("bench")
    argv = ["--task", "minilm_rt", "--tiny", "--partition", "dirichlet", "--alpha", "1.0", "--in_process"]
    compare.main([*argv, "--output_dir", str(folder)])
    return json.loads((folder / "compare_minilm_rt_dirichlet1_tiny.json").read_text()), folder


def test_tiny_run_reports_every_method_with_every_field(tiny, compare):
    results, folder = tiny
    assert list(results["methods"]) == [*compare.LORA_METHODS, compare.MITIGATED]
    s = results["settings"]
    for name, r in results["methods"].items():
        assert set(r) >= FIELDS, (name, FIELDS - set(r))
        assert (
            r["steps"]
            == results["total_steps"]
            == s["num_nodes"] * s["num_groups"] * s["num_passes"] * s["stage_steps"]
        )
        steps = [p["step"] for p in r["curve"]]
        assert steps == sorted(steps) and steps[-1] == r["steps"], name
        assert r["final_metric"] == r["curve"][-1]["metric"]
        assert r["curve"][-1]["bytes"] == r["bytes_total"], name
        assert all(0.0 <= p["metric"] <= 1.0 for p in r["curve"])
        assert r["peak_memory_max"] == max(r["peak_memory_per_node"].values())
        nodes = 1 if name == "centralized" else s["num_nodes"]
        assert len(r["peak_memory_per_node"]) == nodes, name
        assert r["samples_per_second"] == pytest.approx(r["steps"] * s["batch_size"] / r["wall_seconds"])
    for suffix in ("md", "png"):
        assert (folder / f"compare_minilm_rt_dirichlet1_tiny.{suffix}").stat().st_size > 0


def test_curves_have_a_point_per_stage_or_round(tiny):
    methods, s = tiny[0]["methods"], tiny[0]["settings"]
    rounds = s["num_groups"] * s["num_passes"]
    assert len(methods["fedavg_lora"]["curve"]) == rounds
    assert len(methods["cyclic"]["curve"]) == len(methods["split"]["curve"]) == rounds * s["num_nodes"]
    for name in SNAKE:
        assert len(methods[name]["curve"]) == len(methods[name]["snake_report"]["stages"])


def test_snake_bytes_are_what_its_payloads_carried(tiny):
    for name in SNAKE:
        r = tiny[0]["methods"][name]
        report = r["snake_report"]
        assert sum(hop["nbytes"] for hop in report["hops"]) == report["total_bytes"] == r["bytes_total"] > 0
        for hop in report["hops"]:  # the tensors of exactly the parts it names, plus header and manifest
            assert hop["tensor_nbytes"] == sum(report["part_nbytes"][part] for part in hop["parts"])
            assert hop["nbytes"] > hop["tensor_nbytes"]
        assert r["tensor_bytes"] == sum(hop["tensor_nbytes"] for hop in report["hops"])


def test_fedavg_and_cyclic_bytes_follow_the_adapter_size(tiny):
    methods, s = tiny[0]["methods"], tiny[0]["settings"]
    adapter = sum(methods["snake_serpentine"]["snake_report"]["part_nbytes"].values())  # every group + head
    rounds, nodes = s["num_groups"] * s["num_passes"], s["num_nodes"]
    fedavg, cyclic = methods["fedavg_lora"], methods["cyclic"]
    assert fedavg["adapter_bytes"] == cyclic["adapter_bytes"] == adapter
    assert fedavg["bytes_total"] == rounds * 2 * nodes * adapter
    assert cyclic["bytes_total"] == (rounds * nodes - 1) * adapter


def test_split_bytes_are_the_cut_tensors(tiny):
    r, s = tiny[0]["methods"]["split"], tiny[0]["settings"]
    part_nbytes = tiny[0]["methods"]["snake_serpentine"]["snake_report"]["part_nbytes"]
    assert r["cut_layer"] == 2 and r["client_adapter_bytes"] == part_nbytes["g0"]  # blocks 0-1 are group 0
    assert len(r["step_bytes"]) == r["steps"]
    for forward, backward in r["step_bytes"]:
        batch = backward // (s["max_length"] * TINY_HIDDEN * 4)  # float32 activations, fixed-length rows
        assert backward == batch * s["max_length"] * TINY_HIDDEN * 4
        assert forward == backward + batch * s["max_length"] * 8 + batch * 8  # + attention mask and labels (int64)
    assert r["bytes_total"] == r["activation_bytes"] + r["handoffs"] * r["client_adapter_bytes"]


def test_bytes_to_target_is_the_first_curve_point_at_the_target(tiny):
    results = tiny[0]
    target = results["summary"]["target"]
    assert target == pytest.approx(results["methods"]["centralized"]["final_metric"] - 0.01)
    for r in results["methods"].values():
        reached = [p for p in r["curve"] if p["metric"] >= target]
        assert r["bytes_to_target"] == (reached[0]["bytes"] if reached else None)


def test_linear_lr_matches_transformers_schedule():
    from transformers import get_linear_schedule_with_warmup

    baselines = _module("baselines")
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
    schedule = get_linear_schedule_with_warmup(optimizer, num_warmup_steps=3, num_training_steps=20)
    for step in range(20):
        assert baselines.linear_lr(step, 20, 3, 0.1) == pytest.approx(optimizer.param_groups[0]["lr"])
        optimizer.step()
        schedule.step()


def test_weighted_average_weights_by_shard_size():
    baselines = _module("baselines")
    states = [
        {"w": torch.tensor([1.0, 3.0]), "n": torch.tensor(2)},
        {"w": torch.tensor([5.0, 7.0]), "n": torch.tensor(4)},
    ]
    average = baselines.weighted_average(states, [0.25, 0.75])
    assert torch.equal(average["w"], torch.tensor([4.0, 6.0])) and average["n"].item() == 4  # 3.5 rounds to 4


@pytest.mark.slow
def test_subprocess_runs_isolate_methods_and_memory_full_reports_the_ratio(tmp_path):
    """The real path: one process per method (tiny memory_full: Snake full mode vs full fine-tuning)."""
    argv = ["--task", "memory_full", "--tiny", "--output_dir", str(tmp_path)]
    subprocess.run([sys.executable, str(BENCH / "compare.py"), *argv], check=True, capture_output=True, timeout=600)
    results = json.loads((tmp_path / "compare_memory_full_tiny.json").read_text())
    assert results["isolated_processes"] and list(results["methods"]) == ["full_finetune", "snake_full"]
    full, snake = results["methods"]["full_finetune"], results["methods"]["snake_full"]
    assert len(snake["peak_memory_per_node"]) == results["settings"]["num_nodes"]
    assert results["summary"]["memory_ratio"] == pytest.approx(snake["peak_memory_max"] / full["peak_memory_max"])
    assert math.isfinite(results["summary"]["memory_ratio"])


def test_snake_library_options_are_flags_with_the_old_defaults(compare):
    default, _ = compare.parse_settings(["--task", "memory_full", "--tiny"])
    assert (default.payload_dtype, default.recompute, default.lm_loss_chunk) == ("float32", False, 0)
    argv = ["--task", "memory_full", "--tiny", "--recompute", "false", "--payload_dtype", "bfloat16"]
    assert compare.parse_settings(argv)[0].recompute is False  # not bool("false")
    assert compare.parse_settings([*argv[:3], "--recompute", "true", "--lm_loss_chunk", "64"])[0].lm_loss_chunk == 64


def test_memory_options_leave_the_tiny_memory_run_training_the_same(compare, tmp_path):
    losses = []
    for extra in ([], ["--recompute", "true", "--lm_loss_chunk", "8"]):
        argv = ["--task", "memory_full", "--tiny", "--in_process", "--output_dir", str(tmp_path), *extra]
        losses.append({name: r["train_loss"] for name, r in compare.main(argv)["methods"].items()})
    assert losses[1] == pytest.approx(losses[0], rel=1e-5)
    assert "recompute_above_group" in (tmp_path / "compare_memory_full_tiny.md").read_text()


@pytest.mark.parametrize(
    ("full_peak", "snake_peak", "reason"),
    [(0, 0, "0 bytes above the loaded model"), (None, None, "no peak memory was measured")],
    ids=["zero-peak", "not-measured"],
)
def test_memory_ratio_is_none_with_the_reason_when_full_finetuning_has_no_peak(
    compare, tmp_path, full_peak, snake_peak, reason
):
    s, _ = compare.parse_settings(["--task", "memory_full", "--tiny"])
    methods = {
        "full_finetune": {"peak_memory_max": full_peak, "peak_memory_per_node": {"0": full_peak}},
        "snake_full": {"peak_memory_max": snake_peak, "peak_memory_per_node": {"0": snake_peak, "1": snake_peak}},
    }
    summary = compare.summarise(s, methods)
    assert summary["memory_ratio"] is None and reason in summary["memory_ratio_missing"]
    for r in methods.values():
        r.update(steps=2, trainable_state_bytes=0, train_loss=4.0, wall_seconds=1.0)
    results = {"task": "memory_full", "settings": dataclasses.asdict(s), "device": "cpu", "methods": methods}
    results.update(total_steps=2, summary=summary)
    assert reason in compare.to_markdown(results)
    compare.plot(results, tmp_path / "memory.png")  # no ratio line, and the title says there is none
    assert (tmp_path / "memory.png").stat().st_size > 0


def test_each_method_result_is_cached_and_reused_only_under_the_same_settings(compare, tmp_path, monkeypatch):
    calls = []

    def fake_run_method(method, s):
        calls.append((method, s.seed))
        return {"final_metric": 0.5, "curve": [], "bytes_total": 0, "peak_memory_max": None}

    monkeypatch.setattr(compare, "run_method", fake_run_method)
    monkeypatch.setattr(compare, "summarise", lambda s, methods: {})
    s, _ = compare.parse_settings(["--tiny", "--methods", "centralized,cyclic"])
    cache = tmp_path / "runs"
    compare.run(s, in_process=True, cache=cache)
    assert calls == [("centralized", 42), ("cyclic", 42)]
    # Another subset, and another thread count (timing only): only the method not cached yet runs.
    more, _ = compare.parse_settings(["--tiny", "--methods", "centralized,cyclic,split", "--threads", "2"])
    assert list(compare.run(more, in_process=True, cache=cache)["methods"]) == ["centralized", "cyclic", "split"]
    assert calls[2:] == [("split", 42)]
    # A setting the results depend on: everything runs again.
    other, _ = compare.parse_settings(["--tiny", "--methods", "centralized", "--seed", "7"])
    compare.run(other, in_process=True, cache=cache)
    assert calls[3:] == [("centralized", 7)]
    compare.run(other, in_process=True, cache=None)  # no cache: always runs
    assert calls[4:] == [("centralized", 7)]


# ---- benchmarks/vision.py: the label-skew variants ----


def test_vision_balanced_last_puts_the_most_balanced_shard_on_the_last_node():
    vision = load_script(BENCH / "vision.py")
    import datasets

    shards = [datasets.Dataset.from_dict({"labels": labels}) for labels in ([0, 0, 0, 1], [0, 1, 2, 3], [1, 1, 1, 1])]
    s = vision.Settings(num_nodes=3, num_groups=3, stage_steps=2)
    # a serpentine plan of 2 passes over 3 groups ends on node 0, one of 1 pass on node 2
    for passes, last in ((2, 0), (1, 2)):
        ordered = vision._balanced_last(s, shards, passes)
        assert ordered[last]["labels"] == [0, 1, 2, 3]
        assert sorted(map(tuple, (d["labels"] for d in ordered))) == sorted(map(tuple, (d["labels"] for d in shards)))


def test_vision_variant_results_are_cached_under_the_same_settings_only(tmp_path):
    vision = load_script(BENCH / "vision.py")
    calls = []
    s = vision.Settings(workdir=str(tmp_path))
    compute = lambda value: calls.append(value) or {"value": value}  # noqa: E731
    assert vision._cached(s, "snake", compute, 1) == {"value": 1}
    assert vision._cached(dataclasses.replace(s, variants="none", threads=1), "snake", compute, 2) == {"value": 1}
    assert vision._cached(dataclasses.replace(s, seed=7), "snake", compute, 3) == {"value": 3}
    assert calls == [1, 3]
