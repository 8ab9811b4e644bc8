"""SnakeConfig: every Snake field validated before any work, serialisable like TrainingArguments."""

from __future__ import annotations

import json

import pytest
from transformers import HfArgumentParser

from snake_hf import SnakeConfig, Stage, save_plan, serpentine_plan


BAD_FIELDS = [
    (dict(num_nodes=0), "num_nodes"),
    (dict(num_block_groups=0), "num_block_groups"),
    (dict(group_boundaries=[1, 2]), "group_boundaries"),
    (dict(group_boundaries=[0, 2, 2]), "group_boundaries"),
    (dict(num_block_groups=3, group_boundaries=[0, 2, 4]), "disagrees"),
    (dict(num_passes=0), "num_passes"),
    (dict(stage_steps=0), "stage_steps"),
    (dict(schedule="spiral"), "schedule"),
    (dict(schedule="designated", num_nodes=3, num_block_groups=2), "must equal `num_nodes`"),
    (dict(group_order="random"), "group_order"),
    (dict(train_mode="qlora"), "train_mode"),
    (dict(partition="zipf"), "partition"),
    (dict(engine="ray"), "engine"),
    (dict(topology="ring"), "topology"),
    (dict(hop_timeout=0), "hop_timeout"),
    (dict(max_steps=10), "max_steps"),
    (dict(gradient_checkpointing=True), "activation_checkpointing"),
    (dict(node_class_min_share=1.0), "node_class_min_share"),
]


@pytest.mark.parametrize("fields,message", BAD_FIELDS, ids=[m for _, m in BAD_FIELDS])
def test_bad_field_fails_naming_field_and_value(tmp_path, fields, message):
    with pytest.raises(ValueError, match=message) as error:
        SnakeConfig(output_dir=str(tmp_path), **fields)
    value = next(iter(fields.values()))
    assert repr(value) in str(error.value) or str(value) in str(error.value)


def test_schedule_list_of_stages_serialises_to_json(tmp_path):
    plan = serpentine_plan(2, 2)
    config = SnakeConfig(output_dir=str(tmp_path), num_nodes=2, schedule=plan)
    data = json.loads(config.to_json_string())
    assert [Stage.from_dict(s) for s in data["schedule"]] == plan


def test_schedule_dicts_become_stages(tmp_path):
    config = SnakeConfig(output_dir=str(tmp_path), schedule=[{"node": 0, "group": 0, "steps": 2}])
    assert config.schedule == [Stage(0, 0, 0, 0, 2)]


def test_schedule_path_loads_a_saved_plan(tmp_path):
    plan = serpentine_plan(2, 3, steps=4)
    path = save_plan(plan, tmp_path / "plan.json")
    assert SnakeConfig(output_dir=str(tmp_path), schedule=str(path)).schedule == plan


def test_hf_argument_parser_reads_snake_fields_from_the_command_line(tmp_path):
    (config,) = HfArgumentParser(SnakeConfig).parse_args_into_dataclasses(
        ["--output_dir", str(tmp_path), "--num_nodes", "4", "--group_boundaries", "0", "2", "6", "--topology", "cs"]
    )
    assert (config.num_nodes, config.group_boundaries, config.topology) == (4, [0, 2, 6], "cs")


def test_partition_kwargs_follow_the_partition_name(tmp_path):
    config = SnakeConfig(output_dir=str(tmp_path), partition="dirichlet", partition_alpha=0.1)
    assert config.partition_kwargs() == {"label_column": "label", "alpha": 0.1, "min_size": 1}
