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
    (dict(num_train_epochs=0), "num_train_epochs"),
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


# ---- a config is pure data: building, copying and round trips change nothing outside it ----

LAUNCHED = {"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29999"}


def _copies(config):
    """Every way a user copies a config: replace, deepcopy, pickle, to_dict -> constructor, HfArgumentParser."""
    import copy
    import dataclasses
    import pickle

    data = {k: v for k, v in config.to_dict().items() if k in {f.name for f in dataclasses.fields(config) if f.init}}
    parsed = HfArgumentParser(SnakeConfig).parse_dict(data)[0]
    return {
        "replace": dataclasses.replace(config, seed=config.seed),
        "deepcopy": copy.deepcopy(config),
        "pickle": pickle.loads(pickle.dumps(config)),
        "to_dict": SnakeConfig(**data),
        "parser": parsed,
    }


def test_building_and_copying_a_config_under_a_launcher_leaves_the_environment_alone(tmp_path, monkeypatch):
    import os

    for name, value in LAUNCHED.items():
        monkeypatch.setenv(name, value)
    before = dict(os.environ)
    config = SnakeConfig(output_dir=str(tmp_path), num_nodes=2, use_cpu=True, report_to="none")
    copies = _copies(config)
    assert dict(os.environ) == before, "a config changed os.environ"
    for name, copied in {"original": config, **copies}.items():
        # each rank's Trainer stays single-process: no DDP wrap, no sharded loader, no per-step all-gathers
        assert copied.world_size == 1, name
        assert copied.parallel_mode.value != "distributed", name
        assert copied.to_dict() == config.to_dict(), name


def test_every_copy_of_a_config_resolves_the_same_launch_where_the_run_starts(tmp_path, monkeypatch):
    from snake_hf.launch import _forget_process_launch
    from snake_hf.trainer.setup import resolve_launch

    for name, value in LAUNCHED.items():
        monkeypatch.setenv(name, value)
    config = SnakeConfig(output_dir=str(tmp_path), use_cpu=True, report_to="none")  # num_nodes left at 1
    for name, copied in {"original": config, **_copies(config)}.items():
        _forget_process_launch()
        for variable, value in LAUNCHED.items():
            monkeypatch.setenv(variable, value)
        info = resolve_launch(copied)
        assert (info.rank, info.world_size, copied.num_nodes) == (1, 2, 2), name


def test_a_launch_is_read_once_per_process_and_hidden_from_trainer(tmp_path, monkeypatch):
    import os

    from snake_hf.launch import process_launch

    for name, value in LAUNCHED.items():
        monkeypatch.setenv(name, value)
    first = process_launch()
    assert (first.rank, first.world_size) == (1, 2)
    assert "RANK" not in os.environ and "WORLD_SIZE" not in os.environ  # later Trainers stay single-process
    assert process_launch() is first


def test_simulation_engine_never_reads_the_launcher(tmp_path, monkeypatch):
    import os

    from snake_hf.trainer.setup import resolve_launch

    for name, value in LAUNCHED.items():
        monkeypatch.setenv(name, value)
    config = SnakeConfig(output_dir=str(tmp_path), engine="simulation", use_cpu=True, report_to="none")
    assert resolve_launch(config) is None
    assert os.environ["RANK"] == "1" and config.num_nodes == 1


def test_num_nodes_that_differs_from_the_world_size_is_refused_where_the_run_starts(tmp_path, monkeypatch):
    from snake_hf.trainer.setup import resolve_launch

    for name, value in LAUNCHED.items():
        monkeypatch.setenv(name, value)
    config = SnakeConfig(output_dir=str(tmp_path), num_nodes=3, use_cpu=True, report_to="none")
    with pytest.raises(ValueError, match=r"`num_nodes` \(3\) differs from the 2 launched processes"):
        resolve_launch(config)


def test_a_launch_put_back_into_the_environment_is_read_again(monkeypatch):
    # A script that runs several distributed runs in one process puts the variables back, with a new port, each time.
    from snake_hf.launch import process_launch

    for name, value in LAUNCHED.items():
        monkeypatch.setenv(name, value)
    first = process_launch()
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("MASTER_PORT", "30001")
    second = process_launch()
    assert (first.master_port, second.master_port) == (29999, 30001)
    assert process_launch() is second


def test_every_snake_field_has_help_text_and_a_docstring_entry():
    import dataclasses

    from transformers import TrainingArguments

    inherited = {f.name for f in dataclasses.fields(TrainingArguments)}
    own = [f for f in dataclasses.fields(SnakeConfig) if f.name not in inherited]
    assert own, "SnakeConfig defines no fields of its own?"
    no_help = [f.name for f in own if not f.metadata.get("help")]
    undocumented = [f.name for f in own if f"        {f.name} (`" not in SnakeConfig.__doc__]
    assert no_help == [] and undocumented == [], f"no help: {no_help}; not in the docstring: {undocumented}"
