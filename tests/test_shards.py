import json

import datasets
import numpy as np
import pytest

from snake_hf.data.shards import (
    PARTITIONERS,
    DirichletPartitioner,
    IidPartitioner,
    LengthPartitioner,
    PathologicalPartitioner,
    ShardPartitioner,
    make_partitioner,
)
from snake_hf.data.summary import ShardSummary, plot_shards, shard_summary


NUM_LABELS = 10


def _labelled(per_label: int = 30, num_labels: int = NUM_LABELS, seed: int = 0) -> datasets.Dataset:
    """`num_labels * per_label` rows with an int `label` (grouped, as many datasets ship), `text` and `row`."""
    rng = np.random.default_rng(seed)
    n = num_labels * per_label
    return datasets.Dataset.from_dict(
        {
            "label": np.repeat(np.arange(num_labels), per_label).tolist(),
            "text": ["x" * int(k) for k in rng.integers(1, 300, n)],
            "row": list(range(n)),
        }
    )


def _labels_of(dataset: datasets.Dataset, indices: list[list[int]], column: str = "label") -> list[set]:
    labels = np.asarray(dataset[column][:])
    return [set(labels[idx].tolist()) for idx in indices]


def _mean_entropy(dataset: datasets.Dataset, partitioner) -> float:
    return float(np.mean([row["entropy"] for row in shard_summary(partitioner.split(dataset)).rows]))


def _average_ranks(x: np.ndarray) -> np.ndarray:
    _, inverse, counts = np.unique(x, return_inverse=True, return_counts=True)
    ends = np.cumsum(counts)
    return (ends - (counts - 1) / 2)[inverse]


def _spearman(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.corrcoef(_average_ranks(a), _average_ranks(b))[0, 1])


# Every partitioner, built for a given seed, on `_labelled()` (300 rows, 10 labels).
ALL_PARTITIONERS = [
    pytest.param(lambda seed: IidPartitioner(5, seed=seed), id="iid"),
    pytest.param(lambda seed: DirichletPartitioner(5, alpha=0.5, seed=seed), id="dirichlet"),
    pytest.param(
        lambda seed: DirichletPartitioner(5, 0.5, min_size=20, self_balancing=True, seed=seed), id="dirichlet-balanced"
    ),
    pytest.param(lambda seed: ShardPartitioner(5, shards_per_node=2, seed=seed), id="shard"),
    pytest.param(lambda seed: PathologicalPartitioner(5, classes_per_node=2, seed=seed), id="pathological"),
    pytest.param(lambda seed: LengthPartitioner(5, strictness=0.5, seed=seed), id="length"),
]


@pytest.mark.parametrize("build", ALL_PARTITIONERS)
def test_split_is_disjoint_and_covering_for_every_partitioner(build):
    dataset = _labelled()
    partitioner = build(0)
    indices = partitioner.node_indices(dataset)
    shards = partitioner.split(dataset)

    assert len(indices) == len(shards) == 5
    assert sorted(i for idx in indices for i in idx) == list(range(len(dataset)))
    assert all(idx == sorted(idx) for idx in indices)
    assert [shard["row"][:] for shard in shards] == indices


@pytest.mark.parametrize("build", ALL_PARTITIONERS)
def test_split_is_identical_for_the_same_seed(build):
    dataset = _labelled()
    assert build(7).node_indices(dataset) == build(7).node_indices(dataset)


@pytest.mark.parametrize("build", ALL_PARTITIONERS)
def test_split_differs_for_another_seed(build):
    dataset = _labelled()
    assert build(0).node_indices(dataset) != build(1).node_indices(dataset)


@pytest.mark.parametrize(
    "feature",
    [None, datasets.Value("string"), datasets.ClassLabel(names=[f"c{i}" for i in range(NUM_LABELS)])],
    ids=["int", "str", "classlabel"],
)
@pytest.mark.parametrize("build", [p for p in ALL_PARTITIONERS if p.id not in ("iid", "length")])
def test_label_partitioners_accept_int_str_and_classlabel_labels(build, feature):
    dataset = _labelled()
    if feature is not None:
        dataset = dataset.cast_column("label", feature)
    as_int = build(0).node_indices(_labelled())

    assert build(0).node_indices(dataset) == as_int  # same order of labels, so the same split


# --- IID ---


@pytest.mark.parametrize("n, num_nodes", [(10, 3), (101, 7), (5, 5), (64, 1)], ids=["10/3", "101/7", "5/5", "64/1"])
def test_iid_sizes_differ_by_at_most_one(n, num_nodes):
    sizes = [len(s) for s in IidPartitioner(num_nodes).split(datasets.Dataset.from_dict({"x": list(range(n))}))]
    assert max(sizes) - min(sizes) <= 1
    assert sum(sizes) == n


def test_iid_shuffles_rather_than_cutting_contiguous_blocks():
    indices = IidPartitioner(4).node_indices(datasets.Dataset.from_dict({"x": list(range(400))}))
    for idx in indices:
        assert idx != list(range(idx[0], idx[0] + len(idx)))
        assert idx[-1] - idx[0] > 300  # each node draws from the whole range


# --- Dirichlet ---


def test_dirichlet_mean_entropy_falls_as_alpha_falls():
    dataset = _labelled(per_label=200)  # 2000 rows, 10 labels: at most log2(10) = 3.32 bits
    entropies = [_mean_entropy(dataset, DirichletPartitioner(10, alpha=a, seed=0)) for a in (100, 1.0, 0.1)]

    assert entropies[0] > entropies[1] > entropies[2]
    assert entropies[0] == pytest.approx(3.315, abs=0.01)  # close to IID
    assert entropies[1] == pytest.approx(2.685, abs=0.01)
    assert entropies[2] == pytest.approx(1.474, abs=0.01)  # strong skew


@pytest.mark.parametrize("alpha, min_size", [(0.1, 50), (0.3, 100), (1.0, 150)], ids=["a0.1-50", "a0.3-100", "a1-150"])
def test_dirichlet_respects_min_size(alpha, min_size):
    indices = DirichletPartitioner(10, alpha=alpha, min_size=min_size, max_retries=50).node_indices(_labelled(200))
    assert min(len(idx) for idx in indices) >= min_size


def test_dirichlet_self_balancing_narrows_the_size_spread():
    dataset = _labelled(per_label=200)

    def mean_std(self_balancing: bool) -> float:
        stds = []
        for seed in range(5):
            indices = DirichletPartitioner(10, 0.5, self_balancing=self_balancing, seed=seed).node_indices(dataset)
            stds.append(np.std([len(idx) for idx in indices]))
        return float(np.mean(stds))

    assert mean_std(True) < 0.85 * mean_std(False)


# --- Pathological ---


@pytest.mark.parametrize(
    "num_nodes, k",
    [(5, 2), (3, 4), (10, 1), (4, 3), (2, 3), (12, 10)],
    ids=["5x2", "3x4", "10x1", "4x3", "2x3", "12x10"],
)
def test_pathological_gives_each_node_exactly_k_labels(num_nodes, k):
    dataset = _labelled()
    held = _labels_of(dataset, PathologicalPartitioner(num_nodes, classes_per_node=k).node_indices(dataset))
    assert [len(labels) for labels in held] == [k] * num_nodes


@pytest.mark.parametrize("num_nodes, k", [(5, 2), (3, 4), (10, 1), (4, 3)], ids=["5x2", "3x4", "10x1", "4x3"])
def test_pathological_covers_all_labels_when_slots_suffice(num_nodes, k):
    dataset = _labelled()
    held = _labels_of(dataset, PathologicalPartitioner(num_nodes, classes_per_node=k).node_indices(dataset))
    assert set().union(*held) == set(range(NUM_LABELS))


def test_pathological_drops_unassigned_labels_when_slots_fall_short():
    dataset = _labelled()
    indices = PathologicalPartitioner(2, classes_per_node=3).node_indices(dataset)
    assert len(set().union(*_labels_of(dataset, indices))) == 6  # 2 * 3 slots < 10 labels
    assert sum(len(idx) for idx in indices) == 6 * 30


def test_pathological_splits_a_label_evenly_among_its_nodes():
    dataset = _labelled()
    indices = PathologicalPartitioner(10, classes_per_node=3).node_indices(dataset)
    labels = np.asarray(dataset["label"][:])
    for label in range(NUM_LABELS):
        counts = [int(np.sum(labels[idx] == label)) for idx in indices if label in labels[idx]]
        assert max(counts) - min(counts) <= 1


# --- Shard ---


# Each shard is a contiguous window of the label-sorted rows, so it holds 1 + (label boundaries strictly inside it)
# labels. Aligned: every label count is a multiple of the shard size, no boundary falls inside a shard, a node holds
# at most `shards_per_node` labels. Unaligned, but every label at least as frequent as a shard is long: a window holds
# at most one boundary, so a node holds at most 2 * shards_per_node labels; and since each of the L - 1 boundaries
# falls inside at most one shard, the label counts summed over nodes are at most num_shards + L - 1.
@pytest.mark.parametrize(
    "num_nodes, shards_per_node, per_node_bound",
    [(10, 2, 2), (5, 4, 4), (20, 1, 1), (7, 2, 4), (6, 3, 6), (11, 1, 2)],
    ids=["aligned-10x2", "aligned-5x4", "aligned-20x1", "unaligned-7x2", "unaligned-6x3", "unaligned-11x1"],
)
def test_shard_bounds_labels_per_node(num_nodes, shards_per_node, per_node_bound):
    dataset = _labelled(per_label=200)
    held = _labels_of(dataset, ShardPartitioner(num_nodes, shards_per_node=shards_per_node).node_indices(dataset))

    assert max(len(labels) for labels in held) <= per_node_bound
    assert sum(len(labels) for labels in held) <= num_nodes * shards_per_node + NUM_LABELS - 1


def test_shard_sizes_differ_by_at_most_one_shard_remainder():
    indices = ShardPartitioner(7, shards_per_node=2).node_indices(_labelled(per_label=200))
    sizes = [len(idx) for idx in indices]
    assert max(sizes) - min(sizes) <= 2  # two shards per node, each within one of the others


# --- Length ---


def test_length_means_increase_with_node_index_at_full_strictness():
    dataset = _labelled(per_label=100)
    lengths = np.array([len(t) for t in dataset["text"]])
    means = [lengths[idx].mean() for idx in LengthPartitioner(8, strictness=1.0).node_indices(dataset)]
    assert means == sorted(means) and means[0] < means[-1]


def test_length_spearman_rises_with_strictness():
    dataset = _labelled(per_label=100)
    lengths = np.array([len(t) for t in dataset["text"]])

    def rho(strictness: float) -> float:
        node = np.empty(len(dataset))
        for i, idx in enumerate(LengthPartitioner(8, strictness=strictness).node_indices(dataset)):
            node[idx] = i
        return _spearman(node, lengths)

    rhos = [rho(s) for s in (0.0, 0.5, 1.0)]
    assert rhos[0] < rhos[1] < rhos[2]
    assert abs(rhos[0]) < 0.1 and rhos[2] > 0.95


def test_length_prefers_length_column_over_text():
    dataset = _labelled()
    dataset = dataset.add_column("num_tokens", [-len(t) for t in dataset["text"]])  # reversed order
    indices = LengthPartitioner(3, length_column="num_tokens").node_indices(dataset)
    lengths = np.array([len(t) for t in dataset["text"]])
    assert lengths[indices[0]].mean() > lengths[indices[-1]].mean()


def test_length_counts_characters_not_bytes():
    dataset = datasets.Dataset.from_dict({"text": ["ééééé", "abc", "a", "abcd"]})  # "ééééé" is 10 bytes
    assert LengthPartitioner(4).node_indices(dataset) == [[2], [1], [3], [0]]


# --- make_partitioner ---


@pytest.mark.parametrize(
    "name, kwargs, cls",
    [
        ("iid", {}, IidPartitioner),
        ("dirichlet", {"alpha": 0.3, "min_size": 5}, DirichletPartitioner),
        ("shard", {"shards_per_node": 3}, ShardPartitioner),
        ("pathological", {"classes_per_node": 2}, PathologicalPartitioner),
        ("Length", {"strictness": 0.5}, LengthPartitioner),
    ],
    ids=["iid", "dirichlet", "shard", "pathological", "length-capitalised"],
)
def test_make_partitioner_builds_by_name_and_forwards_kwargs(name, kwargs, cls):
    partitioner = make_partitioner(name, num_nodes=4, seed=3, **kwargs)
    assert type(partitioner) is cls
    assert (partitioner.num_nodes, partitioner.seed) == (4, 3)
    assert all(getattr(partitioner, key) == value for key, value in kwargs.items())
    assert set(PARTITIONERS) == {"iid", "dirichlet", "shard", "pathological", "length"}


# --- errors ---

_NO_TEXT = datasets.Dataset.from_dict({"label": [0, 1, 0, 1]})
_WITH_NULL = datasets.Dataset.from_dict({"label": [0, None, 1, 1]})
_RARE_LABEL = datasets.Dataset.from_dict({"label": [0] * 20 + [1]})
_RARE_STR_LABEL = datasets.Dataset.from_dict({"label": ["a"] * 20 + ["b"]})

ERRORS = [
    pytest.param(
        lambda: DirichletPartitioner(3, 0.5, label_column="y").split(_labelled()),
        ValueError,
        ["`label_column` ('y')", "columns: ['label', 'text', 'row']"],
        id="label-column-missing-dirichlet",
    ),
    pytest.param(
        lambda: ShardPartitioner(3, label_column="y").split(_labelled()),
        ValueError,
        ["`label_column` ('y')", "'label'"],
        id="label-column-missing-shard",
    ),
    pytest.param(
        lambda: PathologicalPartitioner(3, 2, label_column="y").split(_labelled()),
        ValueError,
        ["`label_column` ('y')", "'label'"],
        id="label-column-missing-pathological",
    ),
    pytest.param(
        lambda: ShardPartitioner(2, shards_per_node=1).split(_WITH_NULL),
        ValueError,
        ["`label_column` ('label')", "1 missing"],
        id="label-column-has-nulls",
    ),
    pytest.param(
        lambda: LengthPartitioner(2).split(_NO_TEXT),
        ValueError,
        ["`text_column` ('text')", "`length_column`"],
        id="text-column-missing",
    ),
    pytest.param(
        lambda: LengthPartitioner(2, length_column="n").split(_NO_TEXT),
        ValueError,
        ["`length_column` ('n')", "'label'"],
        id="length-column-missing",
    ),
    pytest.param(
        lambda: DirichletPartitioner(3, alpha=0.0), ValueError, ["`alpha` (0.0)", "> 0", "0.1"], id="alpha-zero"
    ),
    pytest.param(lambda: DirichletPartitioner(3, alpha=-1), ValueError, ["`alpha` (-1)"], id="alpha-negative"),
    pytest.param(lambda: IidPartitioner(0), ValueError, ["`num_nodes` (0)", ">= 1"], id="num-nodes-zero"),
    pytest.param(
        lambda: IidPartitioner(5).split(_NO_TEXT),
        ValueError,
        ["`num_nodes` (5)", "4 examples", "fewer nodes"],
        id="more-nodes-than-examples",
    ),
    pytest.param(
        lambda: PathologicalPartitioner(3, 11).split(_labelled()),
        ValueError,
        ["`classes_per_node` (11)", "10 labels", "at most 10"],
        id="classes-per-node-too-many",
    ),
    pytest.param(
        lambda: PathologicalPartitioner(3, 0),
        ValueError,
        ["`classes_per_node` (0)", ">= 1"],
        id="classes-per-node-zero",
    ),
    pytest.param(
        lambda: PathologicalPartitioner(3, 2).split(_RARE_LABEL),
        ValueError,
        ["Label 1 has 1 examples", "`classes_per_node` (2)"],
        id="label-rarer-than-its-nodes",
    ),
    pytest.param(
        lambda: PathologicalPartitioner(3, 2).split(_RARE_STR_LABEL),
        ValueError,
        ["Label 'b' has 1 examples", "`num_nodes` (3)"],
        id="str-label-rarer-than-its-nodes",
    ),
    pytest.param(
        lambda: LengthPartitioner(2, strictness=-0.1),
        ValueError,
        ["`strictness` (-0.1)", "[0, 1]"],
        id="strictness-negative",
    ),
    pytest.param(
        lambda: LengthPartitioner(2, strictness=1.5),
        ValueError,
        ["`strictness` (1.5)", "[0, 1]"],
        id="strictness-above-one",
    ),
    pytest.param(
        lambda: ShardPartitioner(2, shards_per_node=0),
        ValueError,
        ["`shards_per_node` (0)", ">= 1"],
        id="shards-per-node-zero",
    ),
    pytest.param(
        lambda: ShardPartitioner(3, shards_per_node=2).split(_NO_TEXT),
        ValueError,
        ["`shards_per_node` (2)", "`num_nodes` (3)", "4 examples"],
        id="too-many-shards",
    ),
    pytest.param(
        lambda: DirichletPartitioner(3, 0.5, min_size=0), ValueError, ["`min_size` (0)", ">= 1"], id="min-size-zero"
    ),
    pytest.param(
        lambda: DirichletPartitioner(3, 0.5, max_retries=0), ValueError, ["`max_retries` (0)"], id="max-retries-zero"
    ),
    pytest.param(
        lambda: DirichletPartitioner(10, 0.5, min_size=31).split(_labelled()),
        ValueError,
        ["`min_size` (31)", "`num_nodes` (10)", "300 examples"],
        id="min-size-exceeds-data",
    ),
    pytest.param(
        lambda: DirichletPartitioner(10, 0.01, min_size=150).split(_labelled(200)),
        ValueError,
        ["`min_size` (150)", "`alpha` (0.01)", "larger `alpha`", "smaller `min_size`", "fewer nodes"],
        id="min-size-unreachable",
    ),
    pytest.param(
        lambda: make_partitioner("kmeans", 3),
        ValueError,
        ["`name` ('kmeans')", "'dirichlet'", "'iid'", "'length'", "'pathological'", "'shard'"],
        id="unknown-name",
    ),
    pytest.param(
        lambda: make_partitioner("dirichlet", 3, alpha=0.5, beta=2),
        TypeError,
        ["['beta']", "DirichletPartitioner", "'min_size'"],
        id="unknown-kwarg",
    ),
]


@pytest.mark.parametrize("action, error, fragments", ERRORS)
def test_bad_input_raises_naming_parameter_and_value(action, error, fragments):
    with pytest.raises(error) as info:
        action()
    for fragment in fragments:
        assert fragment in str(info.value)


# --- summary and plot ---


def test_shard_summary_counts_sizes_labels_and_entropy():
    shards = [
        datasets.Dataset.from_dict({"label": [0, 1, 1, 0]}),
        datasets.Dataset.from_dict({"label": [2, 2, 2]}),
    ]
    summary = shard_summary(shards)

    assert summary.labels == [0, 1, 2]
    assert summary.rows == [
        {"node": 0, "size": 4, "label_counts": {0: 2, 1: 2, 2: 0}, "entropy": 1.0},
        {"node": 1, "size": 3, "label_counts": {0: 0, 1: 0, 2: 3}, "entropy": 0.0},
    ]


@pytest.mark.parametrize(
    "counts, bits",
    [([50, 50], 1.0), ([25, 25, 25, 25], 2.0), ([100], 0.0), ([75, 25], 0.8112781244591328), ([1] * 8, 3.0)],
    ids=["50-50", "uniform-4", "single", "75-25", "uniform-8"],
)
def test_shard_summary_entropy_is_in_bits(counts, bits):
    labels = [label for label, count in enumerate(counts) for _ in range(count)]
    summary = shard_summary([datasets.Dataset.from_dict({"label": labels})])
    assert summary.rows[0]["entropy"] == pytest.approx(bits)


@pytest.mark.parametrize("label_column", [None, "missing"], ids=["none", "absent"])
def test_shard_summary_gives_sizes_only_without_labels(label_column):
    shards = [datasets.Dataset.from_dict({"label": [0, 1]}), datasets.Dataset.from_dict({"label": [1]})]
    summary = shard_summary(shards, label_column=label_column)
    assert summary.labels == []
    assert summary.rows == [{"node": 0, "size": 2}, {"node": 1, "size": 1}]
    assert summary.to_markdown().splitlines()[0] == "| node | size |"


def test_shard_summary_keeps_string_labels_sorted():
    shards = [datasets.Dataset.from_dict({"label": ["dog", "cat"]}), datasets.Dataset.from_dict({"label": ["ant"]})]
    summary = shard_summary(shards)
    assert summary.labels == ["ant", "cat", "dog"]
    assert summary.rows[1]["label_counts"] == {"ant": 1, "cat": 0, "dog": 0}


def test_shard_summary_to_dict_survives_json_round_trip():
    summary = shard_summary(DirichletPartitioner(4, alpha=0.5).split(_labelled()))
    as_dict = summary.to_dict()
    assert json.loads(json.dumps(as_dict)) == as_dict
    assert as_dict["labels"] == list(range(NUM_LABELS))
    assert as_dict["rows"][0]["label_counts"].keys() == {str(label) for label in range(NUM_LABELS)}


def test_shard_summary_to_markdown_has_a_row_per_node():
    summary = shard_summary(ShardPartitioner(5).split(_labelled()))
    lines = summary.to_markdown().splitlines()

    assert lines[0] == "| node | size | " + " | ".join(map(str, range(NUM_LABELS))) + " | entropy |"
    assert len(lines) == 2 + 5
    assert [line.split(" | ")[0] for line in lines[2:]] == [f"| {node}" for node in range(5)]
    assert str(summary) == summary.to_markdown()
    assert isinstance(summary, ShardSummary)


@pytest.mark.parametrize(
    "make_input, label_column",
    [
        (lambda: PathologicalPartitioner(4, 2).split(_labelled()), "label"),
        (lambda: shard_summary(IidPartitioner(3).split(_labelled())), "label"),
        (lambda: IidPartitioner(3).split(_labelled()), None),
        (lambda: shard_summary(IidPartitioner(2).split(_labelled(num_labels=25, per_label=4))), "label"),
    ],
    ids=["shards", "summary", "sizes-only", "many-labels"],
)
def test_plot_shards_writes_a_png(tmp_path, make_input, label_column):
    path = plot_shards(make_input(), tmp_path / "plots" / "shards.png", label_column=label_column, title="t")
    assert path == tmp_path / "plots" / "shards.png"
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert path.stat().st_size > 1000
