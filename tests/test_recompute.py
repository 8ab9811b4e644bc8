"""`recompute_above_group`: blocks above the active group recompute their activations in backward — the same numbers
up to float rounding, fewer stored tensors.

Recomputed and stored activations are two mathematically equal paths that can run different kernels (a CPU may pick
another blocking for the recomputed call), so gradients differ in the last bits on some CPUs: they are compared within
a tolerance. What runs the same kernels on the same inputs (the first forward, the RNG stream) is compared exactly."""

from __future__ import annotations

import datasets
import pytest
import torch
from peft import LoraConfig
from transformers import AutoModelForCausalLM, set_seed

from conftest import lm_dataset, tiny_gpt2
from snake_hf import SnakeTrainer
from snake_hf.blocks import BlockGroups, PartMap, find_block_list, set_trainable
from snake_hf.recipes import tiny_config
from snake_hf.recompute import set_recompute


def _saved_bytes_and_grads(model, groups, recompute: bool):
    """One training forward and backward with group 0 trainable (dropout on, same seed): bytes autograd stored, grads."""
    parts = PartMap.build(model, groups, "full")
    set_trainable(model, parts.trainable_names(0))
    set_recompute(model, groups, 0 if recompute else None)
    model.zero_grad(set_to_none=True)
    saved = []

    def pack(tensor):
        saved.append(tensor.numel() * tensor.element_size())
        return tensor

    ids = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(0))
    set_seed(1)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    set_recompute(model, groups, None)
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return sum(saved), loss.detach(), grads, torch.get_rng_state()


def test_recompute_stores_fewer_tensors_and_gives_the_same_gradients_up_to_rounding():
    model = tiny_gpt2(n_layer=4).train()  # dropout 0.1: checkpoint replays the RNG, so recompute draws the same masks
    groups = BlockGroups.from_model(model, num_groups=4)
    plain = _saved_bytes_and_grads(model, groups, recompute=False)
    recomputed = _saved_bytes_and_grads(model, groups, recompute=True)
    assert recomputed[0] < 0.6 * plain[0], "three of four blocks keep (almost) nothing for backward"
    assert torch.equal(plain[1], recomputed[1]), "the forward runs the same kernels on the same inputs"
    assert torch.equal(plain[3], recomputed[3]), "the RNG stream is the same afterwards"
    assert plain[2].keys() == recomputed[2].keys()
    # Gradients range from 2e-4 (ln_1.weight) to 0.33 (c_proj.bias) at most per tensor. The recomputed backward may
    # run other kernels: on one CPU they differ by up to 1.5e-8, 1e-7 of the tensor's largest gradient (~1 ulp).
    # The tolerance, 1e-5 of each tensor's largest gradient (~80 ulps), is 100x that; replaying dropout with other
    # masks (the bug this guards against) moves every tensor by 5e-2 to 4e-1 of its largest gradient.
    for name, grad in plain[2].items():
        atol = 1e-5 * grad.abs().max().item()
        torch.testing.assert_close(recomputed[2][name], grad, rtol=1e-5, atol=atol, msg=lambda m, n=name: f"{n}: {m}")


def test_set_recompute_wraps_exactly_the_blocks_above_and_unwraps_them():
    model = tiny_gpt2(n_layer=4)
    groups = BlockGroups.from_model(model, num_groups=2)
    blocks = find_block_list(model)[1]
    assert set_recompute(model, groups, 0) == 2
    assert ["forward" in b.__dict__ for b in blocks] == [False, False, True, True]
    assert set_recompute(model, groups, 1) == 0
    assert not any("forward" in b.__dict__ or "_snake_plain_forward" in b.__dict__ for b in blocks)


def _assert_trains_the_same_up_to_rounding(plain, recomputed) -> None:
    """Recomputing changes gradients only by float rounding (~1 ulp, see above); training carries that on.

    Losses (3.5 to 4.2) must agree to 1e-5 relative: perturbing every gradient of these runs by up to 1e-7 of its
    tensor's largest element (~1 ulp) moved them by at most 1.3e-7 relative; replaying dropout with other masks moves
    them by 1e-4 to 4e-3. Weights must agree to a quarter of one AdamW step (`learning_rate / 4`): AdamW divides each
    gradient by its running RMS + 1e-8, so an element whose gradient is mathematically zero (GPT-2's key bias: softmax
    ignores a shift shared by every key) steps by lr x noise / (|noise| + 1e-8), where noise is the rounding. The
    perturbation above moved weights by up to 0.1 lr (0.02 lr under LoRA), the other kernels of one CPU by 2e-4 lr;
    replaying dropout with other masks moves them by 6 lr.
    """
    lr = plain.args.learning_rate
    losses = [[h["loss"] for h in t.state.log_history if "loss" in h] for t in (plain, recomputed)]
    assert len(losses[0]) == len(losses[1]) > 0 and losses[1] == pytest.approx(losses[0], rel=1e-5, abs=0)
    a, b = plain.model.state_dict(), recomputed.model.state_dict()
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=0, atol=lr / 4, msg=lambda m, k=key: f"{k}: {m}")


def _lora_run(snake_args, recompute: bool):
    lora = LoraConfig(r=4, target_modules=["c_attn"], task_type="CAUSAL_LM", lora_dropout=0.1)
    args = snake_args(num_nodes=2, num_block_groups=2, stage_steps=3, recompute_above_group=recompute)
    trainer = SnakeTrainer(tiny_gpt2(), args, train_dataset=lm_dataset(), peft_config=lora)
    trainer.train()
    return trainer


def _full_run(snake_args, recompute: bool):
    set_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_config("llama", "causal_lm", vocab_size=64))
    args = snake_args(
        num_nodes=3, num_block_groups=3, stage_steps=2, train_mode="full", schedule="designated",
        learning_rate=1e-3, recompute_above_group=recompute,
    )  # fmt: skip
    trainer = SnakeTrainer(model, args, train_dataset=lm_dataset())
    trainer.train()
    return trainer


@pytest.mark.parametrize("run", [_lora_run, _full_run], ids=["lora-gpt2-dropout", "full-llama"])
def test_recompute_above_group_trains_to_the_same_weights_up_to_rounding(snake_args, run):
    plain, recomputed = run(snake_args, False), run(snake_args, True)
    _assert_trains_the_same_up_to_rounding(plain, recomputed)
    blocks = find_block_list(recomputed.model)[1]
    assert not any("forward" in block.__dict__ for block in blocks), "train() leaves plain blocks behind"


def _padded_lm_dataset() -> datasets.Dataset:
    ids = torch.randint(1, 64, (16, 8), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[::2, 6:] = 0  # right padding: the attention mask is an explicit tensor, not just "causal"
    labels = ids.masked_fill(mask == 0, -100)
    return datasets.Dataset.from_dict(
        {"input_ids": ids.tolist(), "attention_mask": mask.tolist(), "labels": labels.tolist()}
    )


def _llama():
    set_seed(0)
    return AutoModelForCausalLM.from_config(tiny_config("llama", "causal_lm", vocab_size=64))


@pytest.mark.parametrize("make", [_llama, tiny_gpt2], ids=["llama-cache-kwarg", "gpt2-positional-cache"])
def test_recompute_above_group_with_use_cache_on_a_padded_batch_trains_like_the_plain_blocks(snake_args, make):
    def run(recompute):
        args = snake_args(num_nodes=2, num_block_groups=2, stage_steps=1, train_mode="full", learning_rate=1e-3,
                          use_cache=True, recompute_above_group=recompute)  # fmt: skip
        trainer = SnakeTrainer(make(), args, train_dataset=_padded_lm_dataset())
        trainer.train()
        return trainer

    _assert_trains_the_same_up_to_rounding(run(False), run(True))
