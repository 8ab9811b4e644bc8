"""benchmarks/non_iid.py on the tiny model: the table's shape, the variants' options reaching SnakeConfig, and the
per-run cache an interrupted benchmark resumes from."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import load_script


BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


def _module(name: str):
    return load_script(BENCH / f"{name}.py")


@pytest.fixture(scope="module")
def non_iid():
    return _module("non_iid")


@pytest.fixture(scope="module")
def tiny(non_iid, tmp_path_factory):
    folder = tmp_path_factory.mktemp("non_iid")
    argv = ["--tiny", "--in_process", "--alphas", "1.0,0.1", "--variants", "naive,distill,logit_adj+head_lr"]
    non_iid.main([*argv, "--output_dir", str(folder)])
    return json.loads((folder / "non_iid_tiny.json").read_text()), folder


def test_tiny_run_has_every_method_for_every_alpha(tiny):
    results, folder = tiny
    assert results["alphas"] == [1.0, 0.1]
    for alpha in ("1", "0.1"):
        assert list(results["results"][alpha]) == ["fedavg_lora", "naive", "distill", "logit_adj+head_lr"]
        for r in results["results"][alpha].values():
            assert 0.0 <= r["final_metric"] <= 1.0
            assert r["steps"] == results["total_steps"]
    assert 0.5 <= results["majority_accuracy"] <= 1.0
    assert results["centralized"]["steps"] == results["total_steps"]
    for suffix in ("md", "png"):
        assert (folder / f"non_iid_tiny.{suffix}").stat().st_size > 0


def test_variant_options_reach_the_trainer(tiny):
    results, _ = tiny
    runs = results["results"]["0.1"]
    assert runs["naive"]["options"] == {}
    assert runs["distill"]["options"] == {"distill_alpha": 0.5}
    lr = results["settings"]["learning_rate"]
    assert runs["logit_adj+head_lr"]["options"] == {"logit_adjustment": 1.0, "head_learning_rate": 2.5 * lr}
    # Only the distilling run records a distillation share of its loss.
    assert 0.0 < runs["distill"]["distill_share_mean"] < 1.0
    assert "distill_share_mean" not in runs["naive"]


def test_markdown_names_every_variant_and_the_best(tiny, non_iid):
    results, folder = tiny
    table = (folder / "non_iid_tiny.md").read_text()
    for name in ("fedavg_lora", "snake naive", "snake distill", "snake logit_adj+head_lr"):
        assert f"| {name} |" in table
    assert f"alpha=0.1: **{non_iid.best_variant(results, '0.1')}**" in table


def test_cached_runs_are_reused(tiny, non_iid, monkeypatch):
    _, folder = tiny

    def fail(*args, **kwargs):
        raise AssertionError("a cached run ran again")

    monkeypatch.setattr(non_iid.compare, "run_method", fail)
    again = non_iid.main(
        ["--tiny", "--in_process", "--alphas", "0.1", "--variants", "naive", "--output_dir", str(folder)]
    )
    assert list(again["results"]["0.1"]) == ["fedavg_lora", "naive"]


@pytest.mark.parametrize(
    "counts, expected",
    [
        ([{"0": 3, "1": 5}, {"0": 1, "1": 9}], True),
        ([{"0": 3, "1": 0}, {"0": 1, "1": 9}], False),
        ([{"0": 3}, {"1": 9}], False),
    ],
    ids=["both-everywhere", "zero-count", "missing-key"],
)
def test_restrict_is_skipped_only_when_every_node_holds_every_class(non_iid, counts, expected):
    rows = [{"node": n, "size": sum(c.values()), "label_counts": c} for n, c in enumerate(counts)]
    assert non_iid._every_node_holds_every_class({"shards": {"rows": rows}}) is expected


def test_min_share_variants_equal_their_base_only_when_no_class_is_under_the_share(non_iid):
    rows = [
        {"node": 0, "size": 200, "label_counts": {"0": 199, "1": 1}},
        {"node": 1, "size": 10, "label_counts": {"0": 5, "1": 5}},
    ]
    summary = {"shards": {"rows": rows}}
    assert non_iid._every_node_holds_every_class(summary, 0.0)
    assert not non_iid._every_node_holds_every_class(summary, 0.01)  # 1 of 200 is under 1%
    same, share = non_iid.EQUIVALENT["logit_adj+min_share"]
    assert (same, share) == ("logit_adj", 0.01)
