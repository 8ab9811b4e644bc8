"""SnakeTrainer end to end on tiny models: parity with Trainer + PEFT, stage invariants, payloads, outputs."""

from __future__ import annotations

import json
import math

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model, get_peft_model_state_dict
from transformers import Trainer, TrainerCallback, TrainingArguments

from conftest import TinyCNN, cls_dataset, image_dataset, lm_dataset, tiny_bert, tiny_gpt2
from snake_hf import SnakeConfig, SnakeTrainer
from snake_hf.blocks import SHARED


def gpt2_lora(dropout=0.1):
    return LoraConfig(r=4, target_modules=["c_attn"], task_type="CAUSAL_LM", lora_dropout=dropout)


def bert_lora():
    return LoraConfig(r=4, target_modules=["query", "value"], task_type="SEQ_CLS")


QUIET = dict(report_to="none", use_cpu=True, disable_tqdm=True, logging_steps=1, save_strategy="no", seed=0)


@pytest.mark.parametrize(
    "n_examples,batch,accumulation", [(30, 4, 1), (32, 4, 2)], ids=["partial-last-batch", "accumulation"]
)
def test_one_node_one_group_matches_plain_trainer_step_for_step(tmp_path, n_examples, batch, accumulation):
    data = lm_dataset(n=n_examples)
    common = dict(
        per_device_train_batch_size=batch,
        gradient_accumulation_steps=accumulation,
        learning_rate=1e-2,
        warmup_steps=2,
        **QUIET,
    )
    plain = Trainer(
        get_peft_model(tiny_gpt2(), gpt2_lora()),
        TrainingArguments(output_dir=str(tmp_path / "plain"), **common),  # both at the default 3 epochs
        train_dataset=data,
    )
    plain.train()
    snake = SnakeTrainer(
        tiny_gpt2(),
        SnakeConfig(output_dir=str(tmp_path / "snake"), num_nodes=1, num_block_groups=1, **common),
        train_dataset=data,
        peft_config=gpt2_lora(),
    )
    snake.train()
    losses = [[h["loss"] for h in t.state.log_history if "loss" in h] for t in (plain, snake)]
    assert len(losses[0]) == 3 * math.ceil(math.ceil(n_examples / batch) / accumulation)
    assert losses[0] == losses[1]
    a, b = get_peft_model_state_dict(plain.model), get_peft_model_state_dict(snake.model)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_whole_plan_runs_in_one_trainer_state_and_one_schedule(snake_args):
    args = snake_args(num_nodes=3, num_block_groups=2, stage_steps=2, learning_rate=1e-2)
    trainer = SnakeTrainer(tiny_gpt2(), args, train_dataset=lm_dataset(), peft_config=gpt2_lora())
    trainer.train()
    total = 12  # 6 stages x 2 steps
    steps = [h["step"] for h in trainer.state.log_history if "loss" in h]
    assert steps == list(range(1, total + 1)) and trainer.state.global_step == total
    rates = [h["learning_rate"] for h in trainer.state.log_history if "loss" in h]
    expected = [1e-2 * (1 - k / total) for k in range(total)]  # linear decay over the whole plan, no restart
    assert rates == pytest.approx(expected)


class _Snapshots(TrainerCallback):
    """Parameters and buffers at the start and at the end of every stage; the optimizer's tensors per step."""

    def __init__(self, trainer):
        self.trainer = trainer
        self.ends = set()
        self.snapshots = []
        self.optimized = []

    def _snap(self):
        model = self.trainer.model
        state = {n: t.detach().clone() for n, t in model.state_dict().items()}
        self.snapshots.append(state)

    def on_train_begin(self, args, state, control, **kwargs):
        total = 0
        for stage in self.trainer.plan:
            total += stage.steps
            self.ends.add(total)
        self._snap()

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        ids = {id(p) for group in self.trainer.optimizer.param_groups for p in group["params"]}
        names = {n for n, p in self.trainer.model.named_parameters() if id(p) in ids}
        self.optimized.append((self.trainer._current.stage.index, names))

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step in self.ends:
            self._snap()


def _changed(before, after, names):
    return {n for n in names if not torch.equal(before[n], after[n])}


def test_stage_trains_exactly_its_group_and_leaves_everything_else_bit_identical(snake_args):
    args = snake_args(num_nodes=2, num_block_groups=2, stage_steps=3, learning_rate=1e-2)
    trainer = SnakeTrainer(tiny_bert(), args, train_dataset=cls_dataset(), peft_config=bert_lora())
    snaps = _Snapshots(trainer)
    trainer.add_callback(snaps)
    trainer.train()
    parts = trainer.part_map
    all_names = set(snaps.snapshots[0])
    for stage, before, after in zip(trainer.plan, snaps.snapshots, snaps.snapshots[1:]):
        own = set(parts.params[f"g{stage.group}"]) | set(parts.params[SHARED])
        assert _changed(before, after, own) == own, f"stage {stage.index}: every trainable tensor of the group moves"
        assert _changed(before, after, all_names - own) == set(), f"stage {stage.index}: nothing else moves"
    assert {s.group for s in trainer.plan} == {0, 1}, "after the group switch the new group trained too"


def test_each_stage_has_a_fresh_optimizer_over_exactly_its_group(snake_args):
    args = snake_args(num_nodes=2, num_block_groups=2, stage_steps=2)
    trainer = SnakeTrainer(tiny_bert(), args, train_dataset=cls_dataset(), peft_config=bert_lora())
    snaps = _Snapshots(trainer)
    trainer.add_callback(snaps)
    trainer.train()
    for stage_index, names in snaps.optimized:
        group = trainer.plan[stage_index].group
        assert names == set(trainer.part_map.params[f"g{group}"]) | set(trainer.part_map.params[SHARED])
    optimizers = trainer.accelerator._optimizers
    assert len(optimizers) == 1 and optimizers[0] is trainer.optimizer, "old optimizers (and their state) are dropped"
    state_tensors = list(trainer.optimizer.state)
    assert len(state_tensors) == len(snaps.optimized[-1][1])


def test_hops_carry_exactly_the_groups_the_receiver_lacks(snake_args):
    args = snake_args(num_nodes=3, num_block_groups=3, stage_steps=1)
    trainer = SnakeTrainer(tiny_gpt2(n_layer=3), args, train_dataset=lm_dataset(), peft_config=gpt2_lora())
    trainer.train()
    report = trainer.snake_report
    hops = [(h.sender, h.receiver, h.parts) for h in report.hops]
    assert hops == [
        (0, 1, ["g0"]),
        (1, 2, ["g0"]),
        (2, 1, ["g0", "g1"]),
        (1, 0, ["g0", "g1"]),
        (0, 1, ["g1", "g2"]),
        (1, 2, ["g1", "g2"]),
    ]
    for hop in report.hops:
        assert hop.tensor_nbytes == sum(report.part_nbytes[p] for p in hop.parts)
        assert hop.nbytes - hop.tensor_nbytes < 4096, "manifest and header stay small"
    sent = [r.bytes_sent for r in report.stages]
    received = [r.bytes_received for r in report.stages]
    assert sent[:-1] == received[1:] and sum(sent) == report.total_bytes
    assert received[0] == 0 and sent[2] == 0  # stage 2 -> 3 stays on node 2: no hop


def test_full_mode_trains_a_cnn_given_block_list_path(snake_args):
    args = snake_args(
        num_nodes=2, num_block_groups=3, stage_steps=3, train_mode="full", block_list_path="features",
        learning_rate=5e-2,
    )  # fmt: skip
    trainer = SnakeTrainer(TinyCNN(), args, train_dataset=image_dataset())
    snaps = _Snapshots(trainer)
    trainer.add_callback(snaps)
    trainer.train()
    parts = trainer.part_map
    every = set(snaps.snapshots[0])
    for stage, before, after in zip(trainer.plan, snaps.snapshots, snaps.snapshots[1:]):
        own = set(parts.tensor_names(f"g{stage.group}"))
        assert _changed(before, after, every - own) == set(), "frozen groups' weights and BN statistics stay put"
        moved = _changed(before, after, own)
        assert {n for n in own if n.endswith("weight") or "running" in n} <= moved
    first, last = trainer.snake_report.stages[0], trainer.snake_report.stages[-1]
    assert last.train_loss < first.train_loss


def test_saved_adapter_reloads_with_plain_peft_to_identical_logits(snake_args, tmp_path):
    args = snake_args(num_nodes=2, num_block_groups=2, stage_steps=2)
    trainer = SnakeTrainer(tiny_bert(), args, train_dataset=cls_dataset(), peft_config=bert_lora())
    trainer.train()
    trainer.save_model(str(tmp_path / "adapter"))
    for name in ("adapter_config.json", "adapter_model.safetensors", "snake_plan.json", "snake_report.json"):
        assert (tmp_path / "adapter" / name).is_file()
    reloaded = PeftModel.from_pretrained(tiny_bert(), str(tmp_path / "adapter")).eval()
    trainer.model.eval()
    batch = {"input_ids": torch.randint(0, 64, (3, 8)), "attention_mask": torch.ones(3, 8, dtype=torch.long)}
    with torch.no_grad():
        assert torch.equal(reloaded(**batch).logits, trainer.model(**batch).logits)
    report = json.loads((tmp_path / "adapter" / "snake_report.json").read_text())
    assert [s["stage"] for s in report["stages"]] == [0, 1, 2, 3]
    assert set(report["stages"][0]) >= {
        "stage", "pass_index", "node", "group", "steps", "train_loss", "wall_seconds", "bytes_sent",
        "bytes_received", "peak_memory_bytes",
    }  # fmt: skip


def test_per_node_datasets_are_each_nodes_shard(snake_args):
    shards = [cls_dataset(n=8, seed=s) for s in (1, 2, 3)]
    args = snake_args(num_nodes=3, num_block_groups=1)
    trainer = SnakeTrainer(tiny_bert(), args, train_dataset=shards, peft_config=bert_lora())
    assert trainer.node_data.sizes == [8, 8, 8]
    assert [s.steps for s in trainer.plan] == [2, 2, 2]  # one pass over 8 examples in batches of 4
    trainer.train()
    assert trainer.state.global_step == 6


def test_evaluate_and_predict_work_as_with_trainer(snake_args):
    args = snake_args(num_nodes=2, num_block_groups=2, stage_steps=1, per_device_eval_batch_size=8)
    data = cls_dataset()
    trainer = SnakeTrainer(tiny_bert(), args, train_dataset=data, eval_dataset=data, peft_config=bert_lora())
    trainer.train()
    metrics = trainer.evaluate()
    assert "eval_loss" in metrics
    assert trainer.predict(data).predictions.shape == (len(data), 2)


@pytest.mark.parametrize(
    "kwargs,message",
    [
        (dict(peft_config=None), "peft_config"),
        (dict(args="plain"), "SnakeConfig"),
    ],
    ids=["lora-without-config", "plain-training-arguments"],
)
def test_trainer_refuses_bad_setup(snake_args, tmp_path, kwargs, message):
    args = snake_args(train_mode="lora")
    if kwargs.get("args") == "plain":
        kwargs["args"] = TrainingArguments(output_dir=str(tmp_path))
        kwargs["peft_config"] = bert_lora()
    with pytest.raises((ValueError, TypeError), match=message):
        SnakeTrainer(tiny_bert(), train_dataset=cls_dataset(), **{"args": args, **kwargs})


def test_partition_by_name_splits_and_records_the_shard_summary(snake_args, tmp_path):
    args = snake_args(num_nodes=2, num_block_groups=1, stage_steps=1, partition="pathological",
                      partition_classes_per_node=1)  # fmt: skip
    trainer = SnakeTrainer(tiny_bert(), args, train_dataset=cls_dataset(n=40), peft_config=bert_lora())
    rows = trainer.shard_summary.rows
    assert sum(r["size"] for r in rows) == 40
    assert all(sum(1 for c in r["label_counts"].values() if c) == 1 for r in rows), "one label per node"
    trainer.train()
    trainer.save_model(str(tmp_path / "out"))
    report = json.loads((tmp_path / "out" / "snake_report.json").read_text())
    assert [r["size"] for r in report["shard_summary"]["rows"]] == trainer.node_data.sizes
