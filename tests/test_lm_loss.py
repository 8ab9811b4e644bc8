"""`lm_loss_chunk_tokens`: the causal-LM loss from hidden states in chunks — the model's own loss and gradients (up to
float rounding), without the full logits."""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig
from transformers import AutoModelForCausalLM, set_seed

from conftest import cls_dataset, lm_dataset, tiny_bert, tiny_gpt2
from snake_hf import SnakeConfig, SnakeTrainer
from snake_hf.lm_loss import chunked_causal_lm_loss
from snake_hf.recipes import tiny_config


def _llama(vocab=64):
    set_seed(0)
    return AutoModelForCausalLM.from_config(tiny_config("llama", "causal_lm", vocab_size=vocab))


def _batch(vocab=64):
    ids = torch.randint(0, vocab, (3, 12), generator=torch.Generator().manual_seed(0))
    labels = ids.clone()
    labels[0, :4] = -100  # a prompt that is not predicted
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}


def _loss_and_grads(model, compute):
    model.zero_grad(set_to_none=True)
    loss = compute()
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("make", [_llama, lambda: tiny_gpt2()], ids=["llama", "gpt2-tied-head"])
@pytest.mark.parametrize("num_items", [None, 40], ids=["mean", "num-items-in-batch"])
def test_chunked_loss_equals_the_models_own_loss_and_gradients(make, num_items):
    model, batch = make().eval(), _batch()
    own = _loss_and_grads(model, lambda: model(**batch, num_items_in_batch=num_items).loss)
    chunked = _loss_and_grads(model, lambda: chunked_causal_lm_loss(model, batch, 5, num_items))
    torch.testing.assert_close(chunked[0], own[0], rtol=1e-6, atol=1e-7)
    assert chunked[1].keys() == own[1].keys()
    for name in own[1]:
        torch.testing.assert_close(chunked[1][name], own[1][name], rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("make", [_llama, lambda: tiny_gpt2()], ids=["llama", "gpt2-tied-head"])
@pytest.mark.parametrize(
    "num_items", [None, torch.tensor(40), torch.tensor(0)], ids=["mean-nan", "num-items-zero-loss", "no-items-nan"]
)
def test_chunked_loss_on_an_all_masked_batch_is_the_models_own_with_zero_gradients(make, num_items):
    model, batch = make().eval(), _batch()
    batch["labels"] = torch.full_like(batch["labels"], -100)
    own = _loss_and_grads(model, lambda: model(**batch, num_items_in_batch=num_items).loss)
    chunked = _loss_and_grads(model, lambda: chunked_causal_lm_loss(model, batch, 5, num_items))
    torch.testing.assert_close(chunked[0], own[0], equal_nan=True)
    assert chunked[1].keys() == own[1].keys()
    assert all(not grad.any() for grad in chunked[1].values())


def test_snake_run_with_chunked_loss_matches_the_plain_loss_with_all_masked_rows(snake_args):
    dataset = lm_dataset(n=16)
    labels = torch.tensor(dataset["labels"])
    labels[:2] = -100  # micro-batches with nothing to predict
    dataset = dataset.remove_columns("labels").add_column("labels", labels.tolist())

    def run(chunk):
        args = snake_args(num_nodes=1, num_block_groups=2, stage_steps=4, train_mode="full", learning_rate=1e-3,
                          per_device_train_batch_size=1, gradient_accumulation_steps=2, lm_loss_chunk_tokens=chunk)  # fmt: skip
        trainer = SnakeTrainer(_llama(), args, train_dataset=dataset)
        trainer.train()
        return trainer

    plain, chunked = run(0), run(4)
    losses = [[h["loss"] for h in t.state.log_history if "loss" in h] for t in (plain, chunked)]
    assert losses[1] == pytest.approx(losses[0], rel=1e-5, nan_ok=True)
    a, b = plain.model.state_dict(), chunked.model.state_dict()
    for name in a:
        torch.testing.assert_close(b[name], a[name], rtol=1e-4, atol=1e-6)


def test_chunked_loss_stores_no_full_logits():
    vocab = 2048  # logits dominate, as with SmolLM2's 49k vocabulary
    model, batch = _llama(vocab).eval(), _batch(vocab)
    saved = []

    def pack(tensor):
        saved.append(tensor.numel() * tensor.element_size())
        return tensor

    for compute in (lambda: model(**batch).loss, lambda: chunked_causal_lm_loss(model, batch, 4)):
        saved.append(None)
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
            compute()
    plain, chunked = (sum(saved[1 : saved.index(None, 1)]), sum(saved[saved.index(None, 1) + 1 :]))
    logits_bytes = batch["input_ids"].numel() * vocab * 4
    assert plain - chunked >= logits_bytes, (plain, chunked, logits_bytes)


def test_snake_run_with_chunked_loss_matches_the_plain_loss(snake_args):
    def run(chunk):
        args = snake_args(num_nodes=2, num_block_groups=2, stage_steps=2, train_mode="full", learning_rate=1e-3,
                          lm_loss_chunk_tokens=chunk)  # fmt: skip
        trainer = SnakeTrainer(_llama(), args, train_dataset=lm_dataset())
        trainer.train()
        return trainer

    plain, chunked = run(0), run(7)
    losses = [[h["loss"] for h in t.state.log_history if "loss" in h] for t in (plain, chunked)]
    assert losses[1] == pytest.approx(losses[0], rel=1e-5)
    a, b = plain.model.state_dict(), chunked.model.state_dict()
    for name in a:
        torch.testing.assert_close(b[name], a[name], rtol=1e-4, atol=1e-6)


def test_chunked_loss_is_refused_with_options_that_need_logits(tmp_path):
    with pytest.raises(ValueError, match="lm_loss_chunk_tokens.*distillation"):
        SnakeConfig(output_dir=str(tmp_path), lm_loss_chunk_tokens=64, distill_alpha=0.5, use_cpu=True)


def test_chunked_loss_is_refused_for_a_model_without_an_output_head_before_the_model_is_touched(snake_args):
    model = tiny_bert()
    args = snake_args(num_nodes=2, num_block_groups=2, stage_steps=1, lm_loss_chunk_tokens=64)
    lora = LoraConfig(r=4, target_modules=["query"], task_type="SEQ_CLS")
    with pytest.raises(ValueError, match=r"`lm_loss_chunk_tokens` \(64\).*BertForSequenceClassification.*=0"):
        SnakeTrainer(model, args, train_dataset=cls_dataset(), peft_config=lora)
    assert not any("lora_" in name for name, _ in model.named_parameters()), "no LoRA layers were added"
