"""`payload_dtype`: reduced-precision payloads in a SnakeTrainer run — bytes, what every node holds, refusals."""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig
from transformers import TrainerCallback

from conftest import lm_dataset, tiny_gpt2
from snake_hf import SnakeConfig, SnakeTrainer


def _lora():
    return LoraConfig(r=4, target_modules=["c_attn"], task_type="CAUSAL_LM", lora_dropout=0.0)


def _run(snake_args, payload_dtype, callback=None):
    args = snake_args(num_nodes=2, num_block_groups=2, stage_steps=3, payload_dtype=payload_dtype)
    trainer = SnakeTrainer(tiny_gpt2(), args, train_dataset=lm_dataset(), peft_config=_lora())
    if callback is not None:
        trainer.add_callback(callback(trainer))
    trainer.train()
    return trainer


def test_bfloat16_payloads_carry_exactly_two_bytes_per_value(snake_args):
    full, half = _run(snake_args, "float32"), _run(snake_args, "bfloat16")
    named = dict(half.model.named_parameters())
    numel = {p: sum(named[n].numel() for n in half.part_map.tensor_names(p)) for p in half.part_map.parts}
    assert [h.parts for h in half.snake_report.hops] == [h.parts for h in full.snake_report.hops]
    for hop_half, hop_full in zip(half.snake_report.hops, full.snake_report.hops):
        assert hop_half.tensor_nbytes == 2 * sum(numel[p] for p in hop_half.parts)
        assert 2 * hop_half.tensor_nbytes == hop_full.tensor_nbytes
    assert half.snake_report.part_nbytes == {p: 2 * n for p, n in numel.items()}, "the report counts wire bytes"
    tensor_bytes = [sum(h.tensor_nbytes for h in t.snake_report.hops) for t in (full, half)]
    assert tensor_bytes[1] * 2 == tensor_bytes[0]  # the manifest does not shrink (on this tiny model it dominates)


class _EndOfStageOne(TrainerCallback):
    """Group 0's tensors as stage 1 (node 1) finished training them, before the stage closed."""

    def __init__(self, trainer):
        self.trainer, self.values = trainer, None

    def on_optimizer_step(self, args, state, control, **kwargs):  # before the step ends (and the stage closes)
        if state.global_step + 1 == sum(s.steps for s in self.trainer.plan[:2]):
            named = dict(self.trainer.model.named_parameters())
            self.values = {n: named[n].detach().clone() for n in self.trainer.part_map.tensor_names("g0")}


def test_every_node_holds_the_cast_and_back_tensors_after_a_hop(snake_args):
    # Plan (n0,g0) (n1,g0) (n1,g1) (n0,g1): g0 last trains in stage 1 on node 1 and reaches node 0 by the hop before
    # stage 3; it is frozen from then on, so the final model holds what node 0 received.
    trainer = _run(snake_args, "bfloat16", _EndOfStageOne)
    assert [(s.node, s.group) for s in trainer.plan] == [(0, 0), (1, 0), (1, 1), (0, 1)]
    trained = next(cb for cb in trainer.callback_handler.callbacks if isinstance(cb, _EndOfStageOne)).values
    final = dict(trainer.model.named_parameters())
    assert any(not torch.equal(v, v.to(torch.bfloat16).float()) for v in trained.values()), "training left fp32 bits"
    for name, value in trained.items():
        assert final[name].dtype == torch.float32
        assert torch.equal(final[name], value.to(torch.bfloat16).float())


def test_payload_dtype_must_be_a_known_float(tmp_path):
    with pytest.raises(ValueError, match=r"`payload_dtype` \('int3'\).*bfloat16"):
        SnakeConfig(output_dir=str(tmp_path), payload_dtype="int3", use_cpu=True, report_to="none")
