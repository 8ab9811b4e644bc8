"""End-of-run repairs against label skew (snake_hf.calibration) and the final pass that gathers their statistics
(snake_hf.trainer.final_pass): the statistics' algebra, the forgetting they undo, and their payloads."""

from __future__ import annotations

import copy
from types import SimpleNamespace

import datasets
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from transformers import set_seed

from snake_hf import SnakeConfig, SnakeTrainer
from snake_hf.calibration import (
    ClassFeatureStats,
    batchnorm_moments,
    calibrate_head,
    class_feature_stats,
    find_head,
    pool_batchnorm,
    pool_class_stats,
)
from snake_hf.engine.payload import PayloadError, decode_payload, encode_payload
from snake_hf.recipes.vision import BLOCK_LIST_PATH, VGG11, synthetic_image_dataset
from snake_hf.report import SnakeReport
from snake_hf.trainer.final_pass import FinalPass, check_final_pass, node_batches, run_final_pass, walk_order


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the pinned figures below were measured with one thread
    yield
    torch.set_num_threads(threads)


class FeatureNet(nn.Module):
    """Identity features, then a linear head: the head's input is the data itself."""

    def __init__(self, dim: int = 3, num_classes: int = 2):
        super().__init__()
        self.norm = nn.BatchNorm1d(dim)
        self.head = nn.Linear(dim, num_classes)

    def forward(self, pixel_values, labels=None):
        return {"logits": self.head(self.norm(pixel_values))}


def _batches(features: torch.Tensor, labels: torch.Tensor, size: int):
    return [
        {"pixel_values": features[i : i + size], "labels": labels[i : i + size]} for i in range(0, len(labels), size)
    ]


# ---- the statistics ----


@pytest.mark.parametrize("covariance", ["diagonal", "full"])
def test_pooled_class_stats_equal_the_stats_of_the_union(covariance):
    generator = torch.Generator().manual_seed(0)
    features = torch.randn(60, 3, generator=generator) * 2 + 1
    labels = torch.randint(0, 3, (60,), generator=generator)
    model = FeatureNet(3, 3).eval()
    model.norm = nn.Identity()
    union = class_feature_stats(model, model.head, _batches(features, labels, 7), 3, covariance)
    parts = [class_feature_stats(model, model.head, _batches(f, lab, 5), 3, covariance)
             for f, lab in ((features[:25], labels[:25]), (features[25:], labels[25:]))]  # fmt: skip
    pooled = pool_class_stats(parts)
    torch.testing.assert_close(pooled.counts, union.counts)
    torch.testing.assert_close(pooled.means, union.means)
    torch.testing.assert_close(pooled.spreads, union.spreads, atol=1e-5, rtol=1e-5)
    assert pooled.covariance == covariance
    torch.testing.assert_close(union.means[1], features[labels == 1].mean(0))


def test_pooled_batchnorm_mean_is_the_count_weighted_mean_and_buffers_stay():
    generator = torch.Generator().manual_seed(1)
    a, b = torch.randn(40, 3, generator=generator), torch.randn(10, 3, generator=generator) * 3 + 5
    model = FeatureNet(3)
    before = {k: v.clone() for k, v in model.norm.state_dict().items()}
    moments = [batchnorm_moments(model, _batches(x, torch.zeros(len(x), dtype=torch.long), len(x))) for x in (a, b)]
    assert [count for _, count in moments] == [40, 10]
    for key, value in model.norm.state_dict().items():
        assert torch.equal(value, before[key]), f"{key} changed"
    pooled = pool_batchnorm(moments)
    union = torch.cat([a, b])
    torch.testing.assert_close(pooled["norm.mean"], union.mean(0))
    # the nodes' (unbiased) variances plus the spread between their means: the union's variance, up to n/(n-1)
    torch.testing.assert_close(pooled["norm.var"], union.var(0, unbiased=False), rtol=0.03, atol=0.0)


def test_calibrate_head_refits_a_biased_head_on_the_pooled_gaussians():
    stats = ClassFeatureStats(
        counts=torch.tensor([50.0, 50.0]),
        means=torch.tensor([[-2.0, 0.0], [2.0, 0.0]]),
        spreads=torch.tensor([[0.5, 0.5], [0.5, 0.5]]),
    )
    head = nn.Linear(2, 2)
    with torch.no_grad():
        head.weight.zero_()
        head.bias.copy_(torch.tensor([-5.0, 5.0]))  # predicts class 1 everywhere
    rng = torch.get_rng_state()
    calibrate_head(head, stats, samples_per_class=200, steps=200, seed=0)
    assert torch.equal(rng, torch.get_rng_state()), "calibration draws from its own generator"
    probe = torch.tensor([[-2.0, 0.3], [2.0, -0.3]])
    assert head(probe).argmax(-1).tolist() == [0, 1]


def test_find_head_is_the_last_linear_that_travels():
    model = VGG11.from_preset("tiny", num_classes=4)
    names = [n for n, _ in model.named_parameters()]
    assert find_head(model, names)[0] == "stages.5.3"
    with pytest.raises(ValueError, match="head_calibration"):
        find_head(model, [n for n in names if "stages.5" not in n])


@pytest.mark.parametrize(
    ("num_nodes", "start", "expected"),
    [(1, 0, [0]), (3, 0, [0, 1, 2]), (3, 2, [2, 1, 0]), (5, 1, [1, 0, 2, 3, 4]), (5, 3, [3, 4, 2, 1, 0])],
    ids=["one", "first", "last", "near-first", "near-last"],
)
def test_walk_order_visits_every_node_once_from_the_last(num_nodes, start, expected):
    assert walk_order(num_nodes, start) == expected


# ---- the options ----


@pytest.mark.parametrize(
    ("field", "value"),
    [("head_calibration", "spherical"), ("head_calibration_samples", 1), ("head_calibration_steps", 0),
     ("proximal_mu", -0.1)],
    ids=["kind", "samples", "steps", "mu"],
)  # fmt: skip
def test_bad_final_pass_and_proximal_options_are_refused_by_name(tmp_path, field, value):
    with pytest.raises(ValueError, match=f"`{field}`"):
        SnakeConfig(output_dir=str(tmp_path), **{field: value})


@pytest.mark.parametrize("field", ["head_calibration", "recompute_batchnorm"])
def test_final_pass_is_refused_over_iterable_streams(tmp_path, field):
    args = SnakeConfig(output_dir=str(tmp_path), **{field: "full" if field == "head_calibration" else True})
    check_final_pass(args, streaming=False)
    with pytest.raises(ValueError, match=f"`{field}`.*iterable stream"):
        check_final_pass(args, streaming=True)


# ---- two nodes with disjoint classes: the first node's classes are forgotten ----


def _disjoint_image_shards():
    """Node 0 holds classes 0-1 (images scaled and shifted: other input statistics), node 1 classes 2-3; held-out
    images of node 0's classes."""
    data = synthetic_image_dataset(480, num_classes=4, noise=1.0, seed=0)[:]
    pixels, labels = data["pixel_values"], data["labels"]
    pixels = torch.where((labels < 2)[:, None, None, None], pixels * 2 + 2, pixels)

    def dataset(mask):
        return datasets.Dataset.from_dict(
            {"pixel_values": pixels[mask].numpy(), "labels": labels[mask].numpy()}
        ).with_format("torch")

    train = torch.arange(len(labels)) < 320
    return [dataset(train & (labels < 2)), dataset(train & (labels >= 2))], (pixels[~train & (labels < 2)],
                                                                             labels[~train & (labels < 2)])  # fmt: skip


def _first_node_forgetting(tmp_path, **options):
    """Cross-entropy and accuracy on node 0's held-out classes after node 0 then node 1 trained the whole model."""
    shards, (pixels, labels) = _disjoint_image_shards()
    set_seed(0)
    args = SnakeConfig(
        output_dir=str(tmp_path), num_nodes=2, num_block_groups=1, stage_steps=20, train_mode="full",
        block_list_path=BLOCK_LIST_PATH, per_device_train_batch_size=16, learning_rate=0.01,
        lr_scheduler_type="constant", num_train_epochs=1, report_to="none", use_cpu=True, disable_tqdm=True,
        save_strategy="no", logging_steps=1000, seed=0, **options,
    )  # fmt: skip
    trainer = SnakeTrainer(VGG11.from_preset("tiny", num_classes=4), args, train_dataset=shards)
    trainer.train()
    trainer.model.eval()
    with torch.no_grad():
        logits = trainer.model(pixel_values=pixels).logits
    accuracy = (logits.argmax(-1) == labels).float().mean().item()
    return F.cross_entropy(logits, labels).item(), accuracy, trainer


@pytest.fixture(scope="module")
def naive_forgetting(tmp_path_factory):
    return _first_node_forgetting(tmp_path_factory.mktemp("naive"))


def test_defaults_change_nothing_and_add_no_hop(tmp_path, naive_forgetting):
    loss, _, trainer = naive_forgetting
    off, _, explicit = _first_node_forgetting(
        tmp_path, proximal_mu=0.0, head_calibration=None, recompute_batchnorm=False
    )
    assert off == loss
    for a, b in zip(trainer.model.state_dict().values(), explicit.model.state_dict().values()):
        assert torch.equal(a, b)
    assert all(hop.to_stage < len(trainer.plan) for hop in trainer.snake_report.hops)


def test_head_calibration_recovers_the_first_nodes_classes(tmp_path, naive_forgetting):
    naive, naive_accuracy, _ = naive_forgetting
    loss, accuracy, trainer = _first_node_forgetting(tmp_path, head_calibration="full")
    # seed 0: naive predicts node 1's classes only (accuracy 0, ~31 nats); calibrated, node 0's classes come back
    assert naive_accuracy == 0.0 and naive > 10
    assert accuracy > 0.9 and loss < 1.0
    # one final-pass hop (node 1 -> node 0): the model parts node 0 lacks and node 1's statistics, counted
    final = [hop for hop in trainer.snake_report.hops if hop.to_stage == len(trainer.plan)]
    assert [(hop.sender, hop.receiver) for hop in final] == [(1, 0)]
    dim, classes = trainer.model.stages[5][3].in_features, 4
    stats_bytes = 4 * (classes + classes * dim + classes * dim * dim)  # counts, means, covariances in float32
    assert final[0].parts == ["g0", "features/node1"]
    assert final[0].tensor_nbytes == trainer.snake_report.part_nbytes["g0"] + stats_bytes


def test_recompute_batchnorm_reduces_forgetting_of_the_first_nodes_classes(tmp_path, naive_forgetting):
    naive, _, _ = naive_forgetting
    loss, _, trainer = _first_node_forgetting(tmp_path, recompute_batchnorm=True)
    assert loss < naive / 2  # seed 0: ~31 -> ~7 nats (node 0's inputs are normalised with statistics that know them)
    final = [hop for hop in trainer.snake_report.hops if hop.to_stage == len(trainer.plan)]
    assert [hop.parts for hop in final] == [["g0", "batchnorm/node1"]]


def test_proximal_term_reduces_forgetting_of_the_first_nodes_classes(tmp_path, naive_forgetting):
    naive, _, _ = naive_forgetting
    loss, _, _ = _first_node_forgetting(tmp_path, proximal_mu=10.0)
    assert loss < naive / 5  # seed 0: ~31 -> ~2 nats


# ---- the statistics payload ----


def test_statistics_payload_is_verified_and_a_corrupted_one_refused(tmp_path, naive_forgetting):
    _, _, trainer = naive_forgetting
    trainer.args.head_calibration, trainer.args.recompute_batchnorm = "diagonal", True
    final = FinalPass(
        trainer.args, trainer.model, trainer.part_map, trainer._relay, trainer.snake_report,
        lambda node: [], num_classes=4,
    )  # fmt: skip
    carried = {"features/node1.counts": torch.ones(4), "features/node1.means": torch.zeros(4, 16),
               "features/node1.spreads": torch.ones(4, 16)}  # fmt: skip
    payload = final._stats_payload(carried, ["features/node1"], 1, 0, 0)
    wire = encode_payload(payload, {n: n.split(".")[0] for n in carried})
    decoded = decode_payload(wire, final.stats_spec, expected_parts=["features/node1"])
    assert set(decoded.tensors) == set(carried)
    wire.data[5] ^= 1
    with pytest.raises(PayloadError, match="checksum"):
        decode_payload(wire, final.stats_spec, expected_parts=["features/node1"])
    trainer.args.head_calibration, trainer.args.recompute_batchnorm = None, False


# ---- the distributed walk's logic, in one process ----


@pytest.mark.parametrize(
    "options",
    [
        {"recompute_batchnorm": True},
        {"head_calibration": "full"},
        {"recompute_batchnorm": True, "head_calibration": "diagonal"},
    ],
    ids=["bn", "head", "both"],
)
def test_distributed_walk_in_one_process_repairs_as_the_simulated_final_pass(naive_forgetting, options):
    """`run_distributed` with every node local (the relay passes payloads on in memory): the same repaired model as
    `run`, and hops that carry the same statistics parts and bytes (without the model parts the simulation's carry)."""
    _, _, trainer = naive_forgetting
    args = copy.copy(trainer.args)
    for name, value in (options | {"head_calibration_samples": 50, "head_calibration_steps": 20}).items():
        setattr(args, name, value)
    last = trainer.plan[-1]
    results = {}
    for method in ("run", "run_distributed"):
        relay = copy.deepcopy(trainer._relay)  # with its own copy of the trained model and of the version ledger
        report = SnakeReport(num_nodes=2, num_groups=1, part_nbytes=trainer.snake_report.part_nbytes)
        batches = lambda node: node_batches(trainer, node)  # noqa: E731
        getattr(FinalPass(args, relay.model, trainer.part_map, relay, report, batches, 4), method)(
            last.index, last.node
        )
        results[method] = (relay.model.state_dict(), report.hops)
    (simulated, sim_hops), (state, hops) = results["run"], results["run_distributed"]
    assert all(torch.equal(state[k], simulated[k]) for k in simulated)
    assert any(not torch.equal(simulated[k], v) for k, v in trainer.model.state_dict().items()), "nothing repaired"
    assert [(h.sender, h.receiver) for h in hops] == [(h.sender, h.receiver) for h in sim_hops]
    for hop, sim in zip(hops, sim_hops):
        model_parts = [p for p in sim.parts if p.startswith("g")]
        assert hop.parts == [p for p in sim.parts if not p.startswith("g")]
        assert hop.tensor_nbytes == sim.tensor_nbytes - sum(trainer.snake_report.part_nbytes[p] for p in model_parts)


def test_distributed_final_pass_is_skipped_after_a_node_failure(naive_forgetting, monkeypatch):
    """cs failover: a failed node's statistics are missing, so the repairs are skipped and the trained model kept."""
    _, _, trainer = naive_forgetting
    monkeypatch.setattr(trainer.args, "head_calibration", "full")
    monkeypatch.setattr(trainer, "session", SimpleNamespace(distributed=True))
    monkeypatch.setattr(trainer._relay, "failed", {1}, raising=False)
    before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    hops = len(trainer.snake_report.hops)
    run_final_pass(trainer, len(trainer.plan) - 1, trainer.plan[-1].node)
    assert all(torch.equal(v, before[k]) for k, v in trainer.model.state_dict().items())
    assert len(trainer.snake_report.hops) == hops
