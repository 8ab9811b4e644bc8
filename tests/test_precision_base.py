"""Half-precision frozen bases: a model loaded in bfloat16 trains under `SnakeTrainer` as under `Trainer`.

* 1 node, 1 group, 1 pass: the same losses and trained tensors as plain `Trainer` + PEFT on the same bf16 base, step
  for step (bit-identical on CPU), with and without `bf16=True` (Trainer's mixed precision: CPU autocast here), for
  several adapter settings and for full mode.
* LoRA adapters train in float32 on the bf16 base (peft's `autocast_adapter_dtype`); full mode trains the group in the
  model's own dtype, as `Trainer` does.
* Payloads travel in the trained tensors' dtype (never widened), or narrower with `payload_dtype`.
"""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig, get_peft_model, get_peft_model_state_dict
from transformers import LlamaForCausalLM, Trainer, TrainingArguments, set_seed

from _matrix import tiny_llama
from conftest import assert_same_state, lm_dataset, losses
from snake_hf import SnakeConfig, SnakeTrainer


QUIET = dict(
    report_to="none", use_cpu=True, disable_tqdm=True, logging_steps=1, seed=0, learning_rate=1e-2,
    per_device_train_batch_size=4, save_strategy="no", num_train_epochs=1,
)  # fmt: skip


def tiny_llama_bf16(seed: int = 0) -> LlamaForCausalLM:
    """A tiny Llama as a user loads a base in half precision (`from_pretrained(..., dtype=torch.bfloat16)`)."""
    return tiny_llama(seed).to(torch.bfloat16)


ADAPTERS = {
    "two-targets": lambda: LoraConfig(r=4, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"),
    "all-linear": lambda: LoraConfig(r=4, target_modules="all-linear", task_type="CAUSAL_LM", lora_dropout=0.1),
    "dora": lambda: LoraConfig(r=4, target_modules=["q_proj", "v_proj"], use_dora=True, task_type="CAUSAL_LM"),
}


@pytest.mark.parametrize(
    ("adapter", "bf16"),
    [("two-targets", False), ("two-targets", True), ("all-linear", True), ("dora", True)],
    ids=["two-targets-bf16-weights", "two-targets-bf16-autocast", "all-linear-bf16-autocast", "dora-bf16-autocast"],
)
def test_lora_on_bf16_base_equals_trainer_step_for_step(tmp_path, adapter, bf16):
    data = lm_dataset(n=16)
    plain = Trainer(
        get_peft_model(tiny_llama_bf16(), ADAPTERS[adapter]()),
        TrainingArguments(str(tmp_path / "plain"), bf16=bf16, **QUIET),
        train_dataset=data,
    )
    plain.train()
    args = SnakeConfig(str(tmp_path / "snake"), bf16=bf16, num_nodes=1, num_block_groups=1, num_passes=1, **QUIET)
    snake = SnakeTrainer(tiny_llama_bf16(), args, train_dataset=data, peft_config=ADAPTERS[adapter]())
    snake.train()
    assert losses(snake) == losses(plain)
    trained = get_peft_model_state_dict(snake.model)
    assert_same_state(trained, get_peft_model_state_dict(plain.model))
    assert {t.dtype for t in trained.values()} == {torch.float32}, "adapters train in float32 over the bf16 base"
    base = [p for n, p in snake.model.named_parameters() if "lora_" not in n]
    assert {p.dtype for p in base} == {torch.bfloat16}, "the frozen base stays bf16"


@pytest.mark.parametrize("bf16", [False, True], ids=["bf16-weights", "bf16-autocast"])
def test_full_mode_on_bf16_base_equals_trainer_step_for_step(tmp_path, bf16):
    data = lm_dataset(n=16)
    plain = Trainer(
        tiny_llama_bf16(), TrainingArguments(str(tmp_path / "plain"), bf16=bf16, **QUIET), train_dataset=data
    )
    plain.train()
    args = SnakeConfig(str(tmp_path / "snake"), bf16=bf16, num_nodes=1, num_block_groups=1, num_passes=1, **QUIET)
    snake = SnakeTrainer(tiny_llama_bf16(), args, train_dataset=data)
    snake.train()
    assert losses(snake) == losses(plain)
    assert_same_state(snake.model.state_dict(), plain.model.state_dict())
    assert {p.dtype for p in snake.model.parameters()} == {torch.bfloat16}, "full mode trains in the model's dtype"


@pytest.mark.parametrize(
    ("mode", "payload_dtype", "bytes_per_value"),
    [("lora", "float32", 4), ("lora", "bfloat16", 2), ("full", "float32", 2)],
    ids=["lora-float32-adapters", "lora-bfloat16-wire", "full-bf16-never-widened"],
)
def test_payloads_travel_in_the_trained_dtype_or_payload_dtype(tmp_path, mode, payload_dtype, bytes_per_value):
    args = SnakeConfig(
        str(tmp_path), num_nodes=2, num_block_groups=2, num_passes=1, stage_steps=1, payload_dtype=payload_dtype,
        bf16=True, **QUIET,
    )  # fmt: skip
    peft = ADAPTERS["two-targets"]() if mode == "lora" else None
    trainer = SnakeTrainer(tiny_llama_bf16(), args, train_dataset=lm_dataset(n=16), peft_config=peft)
    trainer.train()
    hops = trainer.snake_report.hops
    assert hops, "a 2-node run hands payloads on"
    named = dict(trainer.model.named_parameters())
    for hop in hops:
        values = sum(named[n].numel() for part in hop.parts for n in trainer.part_map.tensor_names(part))
        assert hop.tensor_nbytes == bytes_per_value * values


def _outputs_requiring_grad(blocks) -> list[list[int]]:
    """Per training forward, the indices of the blocks whose output requires grad (the ones backward runs through)."""
    forwards: list[list[int]] = []

    def hook(module, args, output, index):
        if torch.is_grad_enabled() and module.training:
            if index == 0:
                forwards.append([])
            hidden = output[0] if isinstance(output, tuple) else output
            if hidden.requires_grad:
                forwards[-1].append(index)

    for index, block in enumerate(blocks):
        block.register_forward_hook(lambda m, a, o, i=index: hook(m, a, o, i))
    return forwards


def test_backward_stops_at_the_group_on_a_bf16_base(tmp_path):
    """The frozen bf16 prefix below the active group builds no graph, so backward stops at the group's first block."""
    args = SnakeConfig(
        str(tmp_path), num_nodes=1, num_block_groups=2, num_passes=1, stage_steps=1, bf16=True, **QUIET
    )  # fmt: skip
    trainer = SnakeTrainer(tiny_llama_bf16(), args, train_dataset=lm_dataset(n=8), peft_config=ADAPTERS["dora"]())
    forwards = _outputs_requiring_grad(trainer.model.base_model.model.model.layers)
    trainer.train()
    upper = trainer.groups.boundaries[1]
    assert forwards == [[0, 1, 2, 3], list(range(upper, 4))]  # stage 0 trains group 0, stage 1 group 1


def test_input_grad_hook_and_checkpointing_are_removed_so_backward_stops_at_the_group(tmp_path):
    """What peft's `prepare_model_for_kbit_training` sets on a model (input-grad hook, checkpointing on every block)
    would make backward run through the frozen prefix; Snake removes both before training."""
    model = tiny_llama_bf16()
    model.enable_input_require_grads()
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
    args = SnakeConfig(
        str(tmp_path), num_nodes=1, num_block_groups=2, num_passes=1, stage_steps=1, **QUIET
    )  # fmt: skip
    trainer = SnakeTrainer(model, args, train_dataset=lm_dataset(n=8), peft_config=ADAPTERS["two-targets"]())
    forwards = _outputs_requiring_grad(model.model.layers)
    trainer.train()
    assert forwards == [[0, 1, 2, 3], [2, 3]]
    assert not model.is_activation_checkpointing


# ---- 4-bit bases (QLoRA): need bitsandbytes (the `bnb` extra); bitsandbytes >= 0.45 runs 4-bit on CPU ----


def tiny_llama_4bit(tmp_path, seed: int = 0):
    """The tiny Llama saved and loaded back in 4-bit NF4 (bf16 compute), prepared as QLoRA recipes do."""
    pytest.importorskip("bitsandbytes")
    from peft import prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    path = tmp_path / "base"
    if not path.exists():
        tiny_llama_bf16(seed).to(torch.float32).save_pretrained(path)
    quantization = BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.bfloat16
    )
    model = AutoModelForCausalLM.from_pretrained(path, quantization_config=quantization, device_map="cpu")
    set_seed(seed)  # the adapters' initial values
    return prepare_model_for_kbit_training(model)  # input-grad hook and checkpointing on, as QLoRA recipes run it


def test_qlora_trains_adapters_and_backward_stops_at_the_group(tmp_path):
    model = tiny_llama_4bit(tmp_path)
    assert model.is_activation_checkpointing and model._require_grads_hooks, "what QLoRA preparation sets"
    args = SnakeConfig(
        str(tmp_path / "run"), num_nodes=2, num_block_groups=2, num_passes=1, stage_steps=3, **QUIET,
    )  # fmt: skip
    trainer = SnakeTrainer(model, args, train_dataset=lm_dataset(n=16), peft_config=ADAPTERS["two-targets"]())
    before = {k: v.clone() for k, v in get_peft_model_state_dict(trainer.model).items()}
    forwards = _outputs_requiring_grad(trainer.model.base_model.model.model.layers)
    trainer.train()
    # serpentine over 2 nodes x 2 groups: (n0,g0) (n1,g0) (n1,g1) (n0,g1), 3 steps each
    assert forwards == [[0, 1, 2, 3]] * 6 + [[2, 3]] * 6
    after = get_peft_model_state_dict(trainer.model)
    assert all(not torch.equal(before[k], after[k]) for k in before), "every adapter trained"
    assert type(trainer.model.base_model.model.model.layers[0].self_attn.q_proj.base_layer).__name__ == "Linear4bit"


def test_qlora_one_node_equals_trainer_step_for_step(tmp_path):
    """Trainer runs the prepared model with its checkpointing (a reentrant recompute through every block); Snake
    without it. The same kernels on the same values: bit-identical on CPU."""
    data = lm_dataset(n=16)
    plain = Trainer(
        get_peft_model(tiny_llama_4bit(tmp_path), ADAPTERS["two-targets"]()),
        TrainingArguments(str(tmp_path / "plain"), **QUIET),
        train_dataset=data,
    )
    plain.train()
    args = SnakeConfig(str(tmp_path / "snake"), num_nodes=1, num_block_groups=1, num_passes=1, **QUIET)
    snake = SnakeTrainer(tiny_llama_4bit(tmp_path), args, train_dataset=data, peft_config=ADAPTERS["two-targets"]())
    snake.train()
    assert losses(snake) == losses(plain)
    assert_same_state(get_peft_model_state_dict(snake.model), get_peft_model_state_dict(plain.model))


def test_full_mode_on_a_4bit_base_is_refused(tmp_path):
    args = SnakeConfig(str(tmp_path / "run"), num_nodes=1, train_mode="full", **QUIET)
    with pytest.raises(ValueError, match=r"`train_mode` is 'full' but the base is quantized \(4bit\)"):
        SnakeTrainer(tiny_llama_4bit(tmp_path), args, train_dataset=lm_dataset(n=8))


# ---- model-state bytes per node (analytic): weights as stored + gradients + AdamW states ----


def _buffer_bytes(model) -> int:
    return sum(b.nbytes for b in {(b.data_ptr(), b.nbytes): b for b in model.buffers()}.values())


def test_model_state_counts_weights_as_stored_and_the_largest_groups_training_state():
    from snake_hf.blocks import BlockGroups, PartMap
    from snake_hf.capacity.model_state import full_finetune_state, snake_node_state

    model = tiny_llama_bf16()
    part_map = PartMap.build(model, BlockGroups.from_model(model, 4), "full")
    numel = sum(p.numel() for p in model.parameters())  # lm_head is not tied here
    largest = max(
        sum(dict(model.named_parameters())[n].numel() for n in part_map.trainable_names(g)) for g in range(4)
    )
    buffers = _buffer_bytes(model)  # rotary frequencies
    state = snake_node_state(model, part_map)
    assert (state.weights, state.gradients, state.optimizer_state) == (2 * numel + buffers, 2 * largest, 4 * largest)
    reference = full_finetune_state(model)
    assert reference.total == 16 * numel, "full fine-tuning: float32 weights, gradients and AdamW, whatever the load"
    model.float()
    assert snake_node_state(model, part_map).weights == 4 * numel + _buffer_bytes(model)


def test_model_state_of_a_4bit_base_counts_packed_weights_and_their_constants(tmp_path):
    from snake_hf.capacity.model_state import full_finetune_state
    from snake_hf.frozen_base import base_weights

    model = tiny_llama_4bit(tmp_path)
    dense = tiny_llama_bf16()
    weights = base_weights(model)
    assert weights.quantization == "4bit"
    linear = sum(p.numel() for n, p in dense.named_parameters() if "proj" in n)
    rest = sum(p.numel() for n, p in dense.named_parameters() if "proj" not in n)
    # prepare_model_for_kbit_training made the rest float32; 4-bit weights: half a byte, plus one float32 scale per 64
    assert weights.weight_bytes > linear // 2 + 4 * rest
    assert weights.weight_bytes < linear // 2 + linear // 16 + 4 * rest + 4096  # + the NF4 code book
    assert full_finetune_state(model).total == 16 * (linear + rest)


def test_capacity_probe_runs_after_the_input_grad_hook_is_removed(tmp_path):
    """Node profiles measure block costs before training: on a QLoRA-prepared model (hook and checkpointing on) they
    must measure the model as it will train, i.e. as a model that never had them."""

    def costs(model):
        args = SnakeConfig(
            str(tmp_path), num_nodes=2, num_block_groups=2, node_profiles=[{"memory_bytes": 2**40}] * 2, **QUIET
        )  # fmt: skip
        trainer = SnakeTrainer(model, args, train_dataset=lm_dataset(n=8), peft_config=ADAPTERS["two-targets"]())
        return trainer.capacity.costs

    hooked = tiny_llama_bf16()
    hooked.enable_input_require_grads()
    hooked.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
    assert costs(hooked) == costs(tiny_llama_bf16())


# ---- float32 master weights for the group in training (master_dtype) ----


def _full_bf16_run(tmp_path, name: str, master: str | None, float32_base: bool = False) -> dict[str, torch.Tensor]:
    """Full mode, 2 nodes x 2 groups, 2 passes of 4-step stages at a small learning rate, from the bf16 weights."""
    model = tiny_llama_bf16()
    args = SnakeConfig(
        str(tmp_path / name), num_nodes=2, num_block_groups=2, stage_steps=4, num_passes=2, bf16=True,
        master_dtype=master, train_mode="full", **{**QUIET, "learning_rate": 3e-5},
    )  # fmt: skip
    trainer = SnakeTrainer(model.float() if float32_base else model, args, train_dataset=lm_dataset(n=64))
    trainer.train()
    return {name: tensor.float() for name, tensor in trainer.model.state_dict().items()}


def test_master_weights_keep_the_updates_bf16_weights_lose(tmp_path):
    """At a learning rate where most AdamW updates are under half a bfloat16 step, a bf16 group loses about half of
    its movement (against the same run in float32, from the same bf16 values); with float32 masters it keeps nearly
    all of it and stays closer to the float32 run. Fixed seed: measured 0.55 / 0.99 of the float32 run's movement."""
    start = {name: tensor.float() for name, tensor in tiny_llama_bf16().state_dict().items()}
    reference = _full_bf16_run(tmp_path, "float32", None, float32_base=True)
    plain = _full_bf16_run(tmp_path, "bf16", None)
    master = _full_bf16_run(tmp_path, "master", "float32")

    def distance(a, b):
        return sum(float((a[k] - b[k]).norm() ** 2) for k in a) ** 0.5

    moved = distance(reference, start)
    assert distance(plain, start) < 0.7 * moved, "bf16 weights drop the updates under half a bf16 step"
    assert distance(master, start) > 0.9 * moved, "the masters accumulate them"
    assert distance(master, reference) < 0.8 * distance(plain, reference)


def test_master_weights_leave_the_model_and_payloads_in_bf16(tmp_path):
    args = SnakeConfig(
        str(tmp_path), num_nodes=2, num_block_groups=2, num_passes=1, stage_steps=1, bf16=True,
        master_dtype="float32", train_mode="full", **QUIET,
    )  # fmt: skip
    trainer = SnakeTrainer(tiny_llama_bf16(), args, train_dataset=lm_dataset(n=16))
    trainer.train()
    assert {p.dtype for p in trainer.model.parameters()} == {torch.bfloat16}
    named = dict(trainer.model.named_parameters())
    for hop in trainer.snake_report.hops:
        values = sum(named[n].numel() for part in hop.parts for n in trainer.part_map.tensor_names(part))
        assert hop.tensor_nbytes == 2 * values, "the rounded bf16 weights travel"
    masters = trainer.optimizer.state_dict()["snake_master_weights"]
    assert masters and {t.dtype for t in masters} == {torch.float32}


def test_master_weights_are_a_no_op_for_float32_adapters(tmp_path):
    """LoRA adapters are float32 over a bf16 base already: the same run, bit for bit, with and without masters."""
    runs = []
    for master in (None, "float32"):
        args = SnakeConfig(
            str(tmp_path / str(master)), num_nodes=2, num_block_groups=2, bf16=True, master_dtype=master, **QUIET
        )
        trainer = SnakeTrainer(
            tiny_llama_bf16(), args, train_dataset=lm_dataset(n=16), peft_config=ADAPTERS["two-targets"]()
        )
        trainer.train()
        runs.append(get_peft_model_state_dict(trainer.model))
    assert_same_state(*runs)


def test_master_dtype_other_than_float32_is_refused(tmp_path):
    with pytest.raises(ValueError, match=r"`master_dtype`.*'bfloat16'.*use 'float32'"):
        SnakeConfig(str(tmp_path), master_dtype="bfloat16", report_to="none")
