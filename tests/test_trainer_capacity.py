"""SnakeTrainer with node profiles: the designated cut, memory refusals and steps scaled by speed or data."""

from __future__ import annotations

import json

import pytest
from peft import LoraConfig, get_peft_model

from conftest import lm_dataset, tiny_gpt2
from snake_hf import SnakeConfig, SnakeTrainer
from snake_hf.blocks import BlockGroups, PartMap
from snake_hf.capacity.estimate import measure_block_costs


def lora():
    return LoraConfig(r=2, target_modules=["c_attn"], task_type="CAUSAL_LM")


def config(tmp_path, **fields):
    base = dict(output_dir=str(tmp_path), per_device_train_batch_size=4, report_to="none", use_cpu=True,
                disable_tqdm=True, save_strategy="no", seed=0, num_train_epochs=1)  # fmt: skip
    return SnakeConfig(**{**base, **fields})


@pytest.fixture(scope="module")
def block_costs():
    model = get_peft_model(tiny_gpt2(), lora())
    parts = PartMap.build(model, BlockGroups.from_model(model, 1), "lora")
    return measure_block_costs(model, "lora", parts)


def test_designated_schedule_places_a_low_memory_node_on_an_upper_group(tmp_path, block_costs):
    top = block_costs.estimate(3, 4, 4, 8).total
    bottom = block_costs.estimate(0, 1, 4, 8).total
    assert top < bottom, "an upper group needs less memory (a shorter backward)"
    budget = (top + bottom) // 2
    profiles = [{"memory_bytes": budget}, {}]  # node 0 is short of memory, node 1 unlimited
    args = config(tmp_path, num_nodes=2, schedule="designated", node_profiles=profiles, stage_steps=1)
    trainer = SnakeTrainer(tiny_gpt2(), args, train_dataset=lm_dataset(), peft_config=lora())
    designation = trainer.capacity.designation
    assert designation.owners == [1, 0], "node 0 owns the top group"
    assert trainer.groups.boundaries == designation.boundaries
    assert all(s.node == designation.owners[s.group] for s in trainer.plan)
    trainer.train()
    assert trainer.snake_report.designation["owners"] == [1, 0]
    assert all(r.extra["estimated_memory_bytes"] > 0 for r in trainer.snake_report.stages)
    assert json.loads(config(tmp_path, node_profiles=[{"speed": 2.0}], num_nodes=1).to_json_string())["node_profiles"]


def test_a_node_that_cannot_fit_any_group_is_refused_before_training(tmp_path, block_costs):
    tiny_budget = block_costs.estimate(3, 4, 4, 8).total // 4
    args = config(tmp_path, num_nodes=2, schedule="designated", node_profiles=[{}, {"memory_bytes": tiny_budget}])
    with pytest.raises(ValueError, match="node 1 cannot train any group"):
        SnakeTrainer(tiny_gpt2(), args, train_dataset=lm_dataset(), peft_config=lora())


def test_a_serpentine_plan_that_overflows_a_node_is_refused(tmp_path, block_costs):
    budget = block_costs.estimate(2, 4, 4, 8).total + 1  # fits the upper half, not the lower
    args = config(tmp_path, num_nodes=2, num_block_groups=2, node_profiles=[{}, {"memory_bytes": budget}])
    with pytest.raises(ValueError, match="node 1 cannot train group 0"):
        SnakeTrainer(tiny_gpt2(), args, train_dataset=lm_dataset(), peft_config=lora())


def test_faster_nodes_take_proportionally_more_steps(tmp_path):
    profiles = [{"speed": 1.0}, {"speed": 3.0}]
    args = config(tmp_path, num_nodes=2, num_block_groups=1, stage_steps=4, node_profiles=profiles,
                  scale_steps_by="speed")  # fmt: skip
    trainer = SnakeTrainer(tiny_gpt2(), args, train_dataset=lm_dataset(), peft_config=lora())
    assert [s.steps for s in trainer.plan] == [2, 6]  # mean speed 2: x0.5 and x1.5


def test_data_rich_nodes_take_more_steps_from_their_shard_sizes(tmp_path):
    shards = [lm_dataset(n=8, seed=1), lm_dataset(n=24, seed=2)]
    args = config(tmp_path, num_nodes=2, num_block_groups=1, stage_steps=4, scale_steps_by="data")
    trainer = SnakeTrainer(tiny_gpt2(), args, train_dataset=shards, peft_config=lora())
    assert [s.steps for s in trainer.plan] == [2, 6]


def test_profiles_load_from_a_yaml_file(tmp_path):
    path = tmp_path / "nodes.yaml"
    path.write_text("- {memory_bytes: 2GiB, speed: 1.0}\n- {speed: 2.0}\n")
    args = config(tmp_path, num_nodes=2, num_block_groups=1, stage_steps=3, node_profiles=str(path),
                  scale_steps_by="speed")  # fmt: skip
    trainer = SnakeTrainer(tiny_gpt2(), args, train_dataset=lm_dataset(), peft_config=lora())
    assert [s.steps for s in trainer.plan] == [2, 4]
