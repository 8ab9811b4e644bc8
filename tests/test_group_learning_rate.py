"""`group_learning_rate_scale`: one learning-rate factor per block group (the causal-LM levers of benchmarks/lm_study)."""

import pytest
import torch
from peft import LoraConfig, get_peft_model

from conftest import lm_dataset, tiny_gpt2
from snake_hf import SnakeTrainer


def _train(snake_args, scale, tmp_path):
    model = get_peft_model(tiny_gpt2(), LoraConfig(r=4, target_modules=["c_attn", "c_proj"], lora_dropout=0.0))
    args = snake_args(
        num_nodes=1, num_block_groups=2, stage_steps=1, lr_scheduler_type="constant", weight_decay=0.0,
        max_grad_norm=0.0, group_learning_rate_scale=scale, output_dir=str(tmp_path),
    )  # fmt: skip
    before = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_B" in n}
    trainer = SnakeTrainer(model, args, train_dataset=lm_dataset(8))
    trainer.train()
    after = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if "lora_B" in n}
    return trainer, {n: after[n] - before[n] for n in before}


def test_group_learning_rate_scale_of_ones_is_bit_identical_to_none(snake_args, tmp_path):
    _, plain = _train(snake_args, None, tmp_path / "a")
    _, ones = _train(snake_args, [1.0, 1.0], tmp_path / "b")
    assert all(torch.equal(plain[n], ones[n]) for n in plain)


def test_group_learning_rate_scale_multiplies_only_its_groups_step(snake_args, tmp_path):
    # One AdamW step from zero moments without weight decay or clipping moves each weight by lr x g/(|g|+eps): a
    # power-of-two factor scales it exactly. Group 0 trains first with the same weights in both runs.
    _, plain = _train(snake_args, None, tmp_path / "a")
    _, scaled = _train(snake_args, [1.0, 2.0], tmp_path / "b")
    first = [n for n in plain if ".h.0." in n or ".h.1." in n]  # tiny GPT-2: 4 blocks, 2 groups of 2
    second = [n for n in plain if ".h.2." in n or ".h.3." in n]
    assert len(first) == len(second) == len(plain) // 2
    assert all(torch.equal(scaled[n], plain[n]) for n in first)
    assert all(torch.equal(scaled[n], 2 * plain[n]) for n in second)
    assert any(plain[n].abs().sum() > 0 for n in second)


@pytest.mark.parametrize("scale", [[1.0], [1.0, 2.0, 3.0]])
def test_group_learning_rate_scale_of_the_wrong_length_is_refused_by_name(snake_args, tmp_path, scale):
    model = get_peft_model(tiny_gpt2(), LoraConfig(r=4, target_modules=["c_attn"]))
    args = snake_args(num_nodes=1, num_block_groups=2, group_learning_rate_scale=scale)
    with pytest.raises(ValueError, match="group_learning_rate_scale.*2 block groups"):
        SnakeTrainer(model, args, train_dataset=lm_dataset(8))


@pytest.mark.parametrize("scale", [[], [1.0, -1.0], ["fast"], 2.0])
def test_group_learning_rate_scale_that_is_not_positive_factors_is_refused_by_name(snake_args, scale):
    with pytest.raises(ValueError, match="group_learning_rate_scale"):
        snake_args(group_learning_rate_scale=scale)
