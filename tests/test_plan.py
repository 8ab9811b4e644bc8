"""Plans are pure data: properties checked over many (N, G, passes), in milliseconds."""

from __future__ import annotations

import itertools
from collections import Counter

import pytest

from snake_hf.plan import (
    Stage,
    cut_plan,
    designated_plan,
    fit_plan,
    format_plan,
    plan_from_json,
    plan_steps,
    plan_to_json,
    serpentine_plan,
    validate_plan,
)


GRID = [(n, g, p) for n, g, p in itertools.product([1, 2, 3, 5], [1, 2, 3, 4], [1, 2, 3])]


def _pairs(plan):
    return [(s.node, s.group) for s in plan]


def test_serpentine_matches_design_example_n3_g3_two_passes():
    plan = serpentine_plan(3, 3, num_passes=2)
    assert _pairs(plan) == [
        (0, 0), (1, 0), (2, 0), (2, 1), (1, 1), (0, 1), (0, 2), (1, 2), (2, 2),
        (2, 0), (1, 0), (0, 0), (0, 1), (1, 1), (2, 1), (2, 2), (1, 2), (0, 2),
    ]  # fmt: skip


@pytest.mark.parametrize("n,g,p", GRID, ids=[f"N{n}-G{g}-P{p}" for n, g, p in GRID])
@pytest.mark.parametrize("order", ["ascending", "alternate", "descending"])
def test_serpentine_visits_every_pair_steps_equal_per_pass(n, g, p, order):
    plan = serpentine_plan(n, g, num_passes=p, steps=[2 + k for k in range(n)], group_order=order)
    steps = Counter()
    for stage in plan:
        steps[(stage.node, stage.group)] += stage.steps
    # every (node, group) pair gets its node's steps once per pass, merged turns included
    assert steps == {(node, group): p * (2 + node) for node in range(n) for group in range(g)}


@pytest.mark.parametrize("n,g,p", GRID, ids=[f"N{n}-G{g}-P{p}" for n, g, p in GRID])
@pytest.mark.parametrize("order", ["ascending", "alternate", "descending"])
def test_serpentine_consecutive_stages_share_node_or_group_and_hop_to_neighbours(n, g, p, order):
    plan = serpentine_plan(n, g, num_passes=p, group_order=order)
    for a, b in zip(plan, plan[1:]):
        assert (a.node, a.group) != (b.node, b.group), "identical consecutive stages must be merged"
        assert a.node == b.node or a.group == b.group
        assert abs(a.node - b.node) <= 1, "the snake only talks to neighbours"
    assert [s.index for s in plan] == list(range(len(plan)))


@pytest.mark.parametrize("n,g,p", GRID[:12], ids=[f"N{n}-G{g}-P{p}" for n, g, p in GRID[:12]])
def test_serpentine_is_deterministic(n, g, p):
    assert serpentine_plan(n, g, p, steps=3) == serpentine_plan(n, g, p, steps=3)


def test_serpentine_alternate_merges_the_turn():
    plan = serpentine_plan(3, 3, num_passes=2, steps=1, group_order="alternate")
    turn = plan[8]
    assert (turn.node, turn.group, turn.steps) == (2, 2, 2)
    assert len(plan) == 17


def test_serpentine_single_group_is_ping_pong_over_nodes():
    assert _pairs(serpentine_plan(3, 1, num_passes=2)) == [(0, 0), (1, 0), (2, 0), (1, 0), (0, 0)]


def test_serpentine_single_node_cycles_blocks():
    assert _pairs(serpentine_plan(1, 3, num_passes=2)) == [(0, 0), (0, 1), (0, 2), (0, 0), (0, 1), (0, 2)]


@pytest.mark.parametrize("n,p", [(1, 1), (2, 3), (4, 2), (5, 4)], ids=str)
def test_designated_each_node_trains_only_its_group(n, p):
    owners = list(reversed(range(n)))
    plan = designated_plan(n, num_passes=p, steps=2, owners=owners)
    assert all(owners[s.group] == s.node for s in plan)
    steps = Counter()
    for stage in plan:
        steps[stage.group] += stage.steps
    assert steps == dict.fromkeys(range(n), 2 * p)


def test_designated_ping_pongs_over_owners():
    assert _pairs(designated_plan(3, num_passes=2)) == [(0, 0), (1, 1), (2, 2), (1, 1), (0, 0)]


def test_plan_json_round_trip():
    plan = serpentine_plan(3, 2, num_passes=2, steps=[1, 2, 3])
    assert plan_from_json(plan_to_json(plan)) == plan


def test_format_plan_shows_groups_and_passes():
    text = format_plan(serpentine_plan(2, 2))
    assert text == "pass 0: (n0,g0)x1 (n1,g0)x1 | (n1,g1)x1 (n0,g1)x1"


@pytest.mark.parametrize(
    "stages,message",
    [
        ([Stage(0, 0, 3, 0, 1)], "node 3"),
        ([Stage(0, 0, 0, 5, 1)], "group 5"),
        ([Stage(0, 0, 0, 0, 0)], "steps=0"),
        ([], "empty"),
    ],
    ids=["missing-node", "missing-group", "zero-steps", "empty"],
)
def test_validate_plan_refuses_bad_stages(stages, message):
    with pytest.raises(ValueError, match=message):
        validate_plan(stages, num_nodes=2, num_groups=2)


@pytest.mark.parametrize(
    "call,message",
    [
        (lambda: serpentine_plan(0, 2), "num_nodes"),
        (lambda: serpentine_plan(2, 2, group_order="random"), "group_order"),
        (lambda: serpentine_plan(2, 2, steps=[1]), "one per node"),
        (lambda: designated_plan(3, owners=[0, 0, 1]), "permutation"),
    ],
    ids=["no-nodes", "bad-order", "steps-length", "owners"],
)
def test_builders_refuse_bad_arguments(call, message):
    with pytest.raises(ValueError, match=message):
        call()


@pytest.mark.parametrize(
    "total,expected",
    [(12, [3, 6, 3]), (7, [3, 4]), (3, [3]), (1, [1])],
    ids=["whole", "inside-a-stage", "at-a-boundary", "one-step"],
)
def test_cut_plan_keeps_the_first_steps_like_trainer_at_max_steps(total, expected):
    plan = serpentine_plan(2, 1, num_passes=2, steps=3)  # (0, 3) (1, 6: the merged turn) (0, 3)
    cut = cut_plan(plan, total)
    assert [s.steps for s in cut] == expected
    assert [(s.index, s.node, s.group) for s in cut] == [(s.index, s.node, s.group) for s in plan[: len(cut)]]


def test_cut_plan_refuses_more_steps_than_the_plan_has():
    with pytest.raises(ValueError, match="fewer than the 13"):
        cut_plan(serpentine_plan(2, 1, num_passes=2, steps=3), 13)


@pytest.mark.parametrize(
    "steps,total,expected",
    [(10, 9, [2, 2, 2, 1, 1, 1]), (10, 6, [1] * 6), ([4, 1, 1], 12, [4, 1, 1, 1, 1, 4]), (2, 12, [2] * 6)],
    ids=["shrink", "one-each", "proportional", "unchanged"],
)
def test_fit_plan_scales_every_stage_to_the_total(steps, total, expected):
    plan = serpentine_plan(3, 2, steps=steps)
    fitted = fit_plan(plan, total)
    assert [s.steps for s in fitted] == expected and plan_steps(fitted) == total


def test_fit_plan_refuses_fewer_steps_than_stages():
    with pytest.raises(ValueError, match="each of the plan's 6 stages"):
        fit_plan(serpentine_plan(3, 2, steps=10), 5)


def test_serpentine_descending_trains_the_top_group_first_every_pass():
    plan = serpentine_plan(2, 3, num_passes=2, steps=1, group_order="descending")
    assert _pairs(plan) == [
        (0, 2),
        (1, 2),
        (1, 1),
        (0, 1),
        (0, 0),
        (1, 0),
        (1, 2),
        (0, 2),
        (0, 1),
        (1, 1),
        (1, 0),
        (0, 0),
    ]
