"""`lr_schedule_scope`: one learning-rate schedule over the whole plan (as `Trainer`), or one per block group."""

import math

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import TrainerCallback

from conftest import lm_dataset, tiny_gpt2
from snake_hf import SnakeTrainer
from snake_hf.plan import serpentine_plan
from snake_hf.trainer.schedule import group_positions


class StepRates(TrainerCallback):
    """The learning rate each optimizer step used, read from the optimizer just before it steps."""

    def __init__(self):
        self.rates = []

    def on_pre_optimizer_step(self, args, state, control, optimizer=None, **kwargs):
        self.rates.append(optimizer.param_groups[0]["lr"])


def _train(snake_args, tmp_path, num_nodes=2, num_groups=2, **fields):
    model = get_peft_model(tiny_gpt2(), LoraConfig(r=4, target_modules=["c_attn", "c_proj"], lora_dropout=0.0))
    args = snake_args(num_nodes=num_nodes, num_block_groups=num_groups, output_dir=str(tmp_path), **fields)
    trainer = SnakeTrainer(model, args, train_dataset=lm_dataset(24))
    rates = StepRates()
    trainer.add_callback(rates)
    trainer.train()
    return trainer, rates.rates


def _linear(x, warmup, total):  # transformers' get_linear_schedule_with_warmup, written out
    return x / warmup if x < warmup else max(0.0, (total - x) / (total - warmup))


def _cosine(x, warmup, total):  # get_cosine_schedule_with_warmup (half a cosine), written out
    if x < warmup:
        return x / warmup
    return max(0.0, 0.5 * (1.0 + math.cos(math.pi * (x - warmup) / (total - warmup))))


def test_group_positions_give_every_group_the_whole_schedule_in_stage_order():
    plan = serpentine_plan(4, 3, steps=4)  # the LM study's shape: 12 stages of 4 steps, 16 steps per group
    positions = group_positions(plan)
    assert len(positions) == 48
    for group in range(3):
        own = [p for stage in plan if stage.group == group for p in positions[stage.index * 4 : stage.index * 4 + 4]]
        assert own == [3.0 * t for t in range(16)]  # t x 48/16: from the schedule's start to its last step


@pytest.mark.parametrize(("kind", "schedule"), [("linear", _linear), ("cosine", _cosine)])
def test_each_group_runs_the_schedule_over_its_own_steps(snake_args, tmp_path, kind, schedule):
    fields = dict(stage_steps=3, warmup_steps=2, lr_scheduler_type=kind, learning_rate=0.01)
    trainer, run_rates = _train(snake_args, tmp_path / "run", **fields)
    _, group_rates = _train(snake_args, tmp_path / "group", lr_schedule_scope="group", **fields)
    total = trainer.total_steps
    assert total == 12 and [s.group for s in trainer.plan] == [0, 0, 1, 1]  # serpentine: 2 nodes x 2 groups x 3
    assert run_rates == pytest.approx([0.01 * schedule(k, 2, total) for k in range(total)], rel=1e-6)
    # per group: each group's 6 steps read the schedule at 0, 2, 4, ... 10 of 12, warm-up included (2 x 6/12 = 1)
    expected = [0.01 * schedule(2.0 * (k % 6), 2, total) for k in range(total)]
    assert group_rates == pytest.approx(expected, rel=1e-6)
    assert group_rates[6] == group_rates[0] == 0.0 and group_rates[7] == group_rates[1] > run_rates[7]


def test_with_one_group_the_group_scope_is_the_run_scope_bit_for_bit(snake_args, tmp_path):
    fields = dict(num_nodes=1, num_groups=1, warmup_steps=2, lr_scheduler_type="cosine")
    run, run_rates = _train(snake_args, tmp_path / "run", **fields)
    group, group_rates = _train(snake_args, tmp_path / "group", lr_schedule_scope="group", **fields)
    assert run_rates == group_rates and len(run_rates) == run.total_steps
    a, b = dict(run.model.named_parameters()), dict(group.model.named_parameters())
    assert all(torch.equal(a[n], b[n]) for n in a)


def test_an_unknown_scope_is_refused_by_name(snake_args):
    with pytest.raises(ValueError, match="lr_schedule_scope.*'stage'.*'run'.*'group'"):
        snake_args(lr_schedule_scope="stage")


def test_a_schedule_that_follows_the_loss_is_refused_with_the_group_scope(snake_args, tmp_path):
    model = get_peft_model(tiny_gpt2(), LoraConfig(r=4, target_modules=["c_attn"]))
    args = snake_args(
        num_nodes=2, lr_schedule_scope="group", lr_scheduler_type="reduce_lr_on_plateau", eval_strategy="steps",
        eval_steps=1,
    )  # fmt: skip
    with pytest.raises(ValueError, match="lr_scheduler_type.*'reduce_lr_on_plateau'.*lr_schedule_scope='run'"):
        SnakeTrainer(model, args, train_dataset=lm_dataset(8))


def test_a_scheduler_of_the_users_own_is_refused_with_the_group_scope(snake_args, tmp_path):
    model = get_peft_model(tiny_gpt2(), LoraConfig(r=4, target_modules=["c_attn"]))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.01)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    args = snake_args(num_nodes=2, lr_schedule_scope="group")
    with pytest.raises(ValueError, match=r"lr_schedule_scope='group'.*scheduler of its own \(LambdaLR\)"):
        SnakeTrainer(model, args, train_dataset=lm_dataset(8), optimizers=(optimizer, scheduler))
