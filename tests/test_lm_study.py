"""benchmarks/lm_study.py and the causal-LM parts of benchmarks/compare.py: perplexity with a standard error, curves
with training seconds, the sweep's edge extension, the levers and the gaps at equal steps, wall time and bytes."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, default_data_collator

from conftest import load_script
from snake_hf.recipes import synthetic_causal_lm, tiny_config


BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.fixture(scope="module")
def study():
    return load_script(BENCH / "lm_study.py")


@pytest.fixture(scope="module")
def baselines():
    return load_script(BENCH / "baselines.py")


def test_per_example_losses_give_the_same_perplexity_as_the_models_own_loss(baselines):
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_config("llama", "causal_lm"))
    data = synthetic_causal_lm(12, length=16, seed=0)
    losses = []
    ppl = baselines.evaluate(model, data, default_data_collator, 4, "perplexity", losses)
    with torch.no_grad():
        batch = default_data_collator([data[i] for i in range(12)])
        reference = math.exp(float(model(**batch).loss))
    assert len(losses) == 12
    assert ppl == pytest.approx(reference, rel=1e-5)
    assert math.exp(sum(losses) / 12) == pytest.approx(ppl, rel=1e-5)  # equally long blocks


def test_perplexity_standard_error_is_the_delta_method_over_blocks(baselines):
    losses = [2.0, 2.2, 1.8, 2.4]
    mean, sd = 2.1, math.sqrt(sum((x - 2.1) ** 2 for x in losses) / 3)
    assert baselines.perplexity_standard_error(losses) == pytest.approx(math.exp(mean) * sd / 2)
    assert math.isnan(baselines.perplexity_standard_error([2.0]))


def test_curve_points_carry_training_seconds_without_the_time_spent_measuring(baselines, monkeypatch):
    clock = iter([0.0, 10.0, 13.0, 20.0, 21.0])  # made, point 1 (3 s to measure), point 2 (1 s to measure)
    monkeypatch.setattr(baselines.time, "perf_counter", lambda: next(clock))
    curve = baselines.Curve(lambda: 1.0)
    curve.add(1, 0)
    curve.add(2, 0)
    assert [p["seconds"] for p in curve.points] == [10.0, 17.0]
    assert curve.seconds == 4.0


def test_sweep_extends_the_grid_towards_a_best_value_on_its_edge_until_it_is_inside(study, monkeypatch, tmp_path):
    ran = []

    def fake(s, folder, part=""):
        ran.append(s.learning_rate)
        return {"final_metric": abs(math.log2(s.learning_rate) - 4)}  # best at 16

    monkeypatch.setattr(study, "run_one", fake)
    monkeypatch.setitem(study.GRIDS, "tiny", {"lora": [1.0, 2.0, 4.0]})
    results = study.sweeps(["centralized"], study.base_settings("tiny", 1), "tiny", tmp_path, 2)["centralized"]
    assert list(results) == [1.0, 2.0, 4.0, 8.0, 16.0, 32.0]  # 16 is inside once 32 ran
    assert sorted(ran) == list(results)


def test_sweep_extends_at_most_extensions_points(study, monkeypatch, tmp_path):
    monkeypatch.setattr(study, "run_one", lambda s, folder, part="": {"final_metric": s.learning_rate})
    monkeypatch.setattr(study, "EXTENSIONS", 3)
    monkeypatch.setitem(study.GRIDS, "tiny", {"lora": [8.0, 16.0, 32.0]})
    results = study.sweeps(["centralized"], study.base_settings("tiny", 1), "tiny", tmp_path, 1)["centralized"]
    assert list(results) == [1.0, 2.0, 4.0, 8.0, 16.0, 32.0]  # downwards, 3 points


def test_sweep_keeps_each_methods_own_grid_when_the_best_value_is_inside(study, monkeypatch, tmp_path):
    monkeypatch.setattr(
        study, "run_one", lambda s, folder, part="": {"final_metric": abs(s.learning_rate - 2.0) + s.lora}
    )
    monkeypatch.setitem(study.GRIDS, "tiny", {"lora": [9.0], "cyclic": [1.0, 2.0, 4.0], "full": [0.5, 2.0, 3.0]})
    assert list(study.sweeps(["cyclic"], study.base_settings("tiny", 1), "tiny", tmp_path, 2)["cyclic"]) == [1, 2, 4]
    full = study.sweeps(["snake_serpentine"], study.base_settings("tiny", 1), "tiny", tmp_path, 1, lora=False)
    assert list(full["snake_serpentine"]) == [0.5, 2.0, 3.0]  # the full-mode grid, its best inside


def test_best_on_edge_names_the_methods_whose_best_rate_ends_their_sweep(study):
    swept = {"a": {1: {"final_metric": 3.0}, 2: {"final_metric": 2.0}, 4: {"final_metric": 1.0}},
             "b": {1: {"final_metric": 3.0}, 2: {"final_metric": 1.0}, 4: {"final_metric": 2.0}},
             "c": {1: {"final_metric": 1.0}, 2: {"final_metric": 2.0}, 4: {"final_metric": 3.0}}}  # fmt: skip
    assert study.best_on_edge(swept) == ["a", "c"]


def test_only_runs_the_named_parts_and_takes_the_rest_from_the_cache(study, monkeypatch, tmp_path):
    ran = []

    def fake_run(s, **kw):
        ran.append(s.learning_rate)
        return {"methods": {s.methods: {"final_metric": abs(s.learning_rate - 2.0)}}}

    monkeypatch.setattr(study.compare, "run", fake_run)
    monkeypatch.setattr(study, "RUN_ONLY", {"fedavg_lora"})
    monkeypatch.setitem(study.GRIDS, "tiny", {"lora": [1.0, 2.0, 4.0]})
    s = study.base_settings("tiny", 1)
    assert study.sweeps(["centralized"], s, "tiny", tmp_path, 1) == {"centralized": {}}  # nothing cached, not run
    assert ran == []
    assert list(study.sweeps(["fedavg_lora"], s, "tiny", tmp_path, 1)["fedavg_lora"]) == [1.0, 2.0, 4.0]
    assert ran == [1.0, 2.0, 4.0]


def test_cache_key_leaves_out_a_later_setting_at_its_default():
    compare = load_script(BENCH / "compare.py")
    s = compare.Settings(task="smollm2_lm")
    assert "base_dtype" not in compare._cache_key(s)  # the committed caches of lm_study_runs/ predate it
    assert compare._cache_key(compare.Settings(task="smollm2_lm", base_dtype="bfloat16"))["base_dtype"] == "bfloat16"


def test_levers_keep_the_step_budget_except_the_longer_runs(study):
    s = study.base_settings("cpu", 1)
    longer = {"1.5x steps": 1.5, "2x steps": 2}
    names = list(study.levers(s))
    assert "2 groups, descending, one schedule per group" in names and "one schedule per group" in names
    for name, change in study.levers(s).items():
        varied = {**vars(s), **{k: v for k, v in change.items() if k not in ("methods", "lr_factor")}}
        steps = varied["num_nodes"] * varied["num_groups"] * varied["num_passes"] * varied["stage_steps"]
        factor = next((f for prefix, f in longer.items() if name.startswith(prefix)), 1)
        assert steps == s.total_steps * factor, name


def test_gaps_are_read_at_equal_steps_wall_time_and_bytes(study):
    def result(final, curve, losses, seconds):
        return {"final_metric": final, "curve": curve, "bytes_total": curve[-1]["bytes"], "wall_seconds": seconds,
                "peak_memory_max": 1, "eval_example_losses": losses}  # fmt: skip

    central = result(10.0, [{"step": 2, "metric": 12.0, "bytes": 100, "seconds": 5.0},
                            {"step": 4, "metric": 10.0, "bytes": 100, "seconds": 10.0}], [2.0, 2.4], 10.0)  # fmt: skip
    snake = result(11.0, [{"step": 2, "metric": 13.0, "bytes": 5, "seconds": 3.0},
                          {"step": 4, "metric": 11.0, "bytes": 10, "seconds": 6.0}], [2.1, 2.6], 6.0)  # fmt: skip
    summary = study.summarise({"centralized": central, "snake_serpentine": snake}, num_nodes=2)
    rows = summary["methods"]
    assert rows["snake_serpentine"]["gap_at_equal_steps"] == pytest.approx(0.1)
    assert rows["centralized"]["perplexity_at_snake_wall_time"] == 12.0  # its point at 5 s, before Snake's 6 s
    assert rows["centralized"]["perplexity_at_snake_bytes"] is None  # its data moved before its first step
    assert rows["centralized"]["bytes_to_target"] == 100 and rows["snake_serpentine"]["bytes_to_target"] is None
    assert rows["snake_serpentine"]["gap_standard_error"] == pytest.approx(
        study.paired_standard_error([2.1, 2.6], [2.0, 2.4])
    )


def test_compare_parses_list_options_for_the_snake_methods():
    compare = load_script(BENCH / "compare.py")
    options = compare._parse_options("group_order=descending,group_learning_rate_scale=0.5;1;2")
    assert options == {"group_order": "descending", "group_learning_rate_scale": [0.5, 1.0, 2.0]}


def test_compare_trains_the_lm_in_full_mode_top_down_with_a_standard_error(tmp_path):
    compare = load_script(BENCH / "compare.py")
    s = compare.Settings(
        task="smollm2_lm", size="tiny", num_nodes=2, num_groups=2, num_passes=1, stage_steps=1, batch_size=2,
        max_length=16, train_size=8, eval_size=4, learning_rate=1e-3, threads=1, lora=False,
        methods="snake_serpentine", snake_options="group_order=descending",
    )  # fmt: skip
    result = compare.run(s, in_process=True)["methods"]["snake_serpentine"]
    report = result["snake_report"]
    assert [stage["group"] for stage in report["stages"]] == [1, 1, 0, 0]
    assert result["options"] == {"group_order": "descending"}
    assert result["trainable_state_bytes"] > 0 and result["perplexity_standard_error"] > 0
