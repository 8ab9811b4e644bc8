"""The model and adapter configurations users run, for the engine tests (distributed parity, kill-and-resume).

The engine tests used to run one configuration, a GPT-2 with one LoRA target module, where a set's order cannot show.
Each entry here builds a fresh model, dataset, `peft_config` and Snake fields; the scripts that start ranks
(`_snake_run.py`, `_resume_run.py`, `_dist_fault_run.py`) pick one by name from `SNAKE_TEST_CONFIG`, and the tests start
every rank with its own `PYTHONHASHSEED`, so anything that depends on a process's hash seed shows up as a mismatch.
"""

from __future__ import annotations

import os
import tempfile

import torch
from peft import LoraConfig, PeftModel, get_peft_model, get_peft_model_state_dict
from transformers import LlamaConfig, LlamaForCausalLM, set_seed

from conftest import VOCAB, cls_dataset, lm_dataset, tiny_bert, tiny_gpt2


DEFAULT = "gpt2_c_attn"


def tiny_llama(seed: int = 0) -> LlamaForCausalLM:
    set_seed(seed)
    config = LlamaConfig(
        vocab_size=VOCAB, hidden_size=16, intermediate_size=32, num_hidden_layers=4, num_attention_heads=2,
        num_key_value_heads=2, max_position_embeddings=32,
    )  # fmt: skip
    return LlamaForCausalLM(config)


# Which of the tiny Llama's 4 blocks each process offloads to disk: every rank places its model its own way.
OFFLOADED_BLOCKS = {None: (0, 2), "0": (2, 3), "1": (0, 1), "2": (1, 3)}


def offloaded_llama(blocks, peft_config: LoraConfig, seed: int = 0) -> PeftModel:
    """`tiny_llama(seed)` + `peft_config` with `blocks` offloaded to disk by an Accelerate device map (the rest on the
    CPU); its adapters are PEFT's draws, the same as the model's built whole."""
    from accelerate import dispatch_model

    from snake_hf.devices import peft_on_offloaded_base

    device_map = {"model.embed_tokens": "cpu", "model.rotary_emb": "cpu", "model.norm": "cpu", "lm_head": "cpu"}
    device_map |= {f"model.layers.{i}": "disk" if i in blocks else "cpu" for i in range(4)}
    base = dispatch_model(tiny_llama(seed), device_map, "cpu", offload_dir=tempfile.mkdtemp(prefix="snake-offload-"))
    with peft_on_offloaded_base():
        return get_peft_model(base, peft_config)


def _lora(targets, task_type: str = "CAUSAL_LM", **extra) -> LoraConfig:
    return LoraConfig(r=4, target_modules=targets, task_type=task_type, lora_dropout=0.1, **extra)


# name -> () -> (model, train dataset, peft_config or None, SnakeConfig fields)
CONFIGS = {
    "gpt2_c_attn": lambda: (tiny_gpt2(), lm_dataset(n=36), _lora(["c_attn"]), {}),
    # four target modules, and one LR schedule per block group (its clock must agree across ranks and resumes)
    "llama_qkvo": lambda: (
        tiny_llama(),
        lm_dataset(n=36),
        _lora(["q_proj", "k_proj", "v_proj", "o_proj"]),
        {"lr_schedule_scope": "group"},
    ),
    "llama_all_linear": lambda: (tiny_llama(), lm_dataset(n=36), _lora("all-linear"), {}),
    # the classifier is new: PEFT puts it in modules_to_save, it trains in every stage and travels as the shared part
    "bert_head": lambda: (tiny_bert(), cls_dataset(n=36), _lora(["query", "key", "value"], "SEQ_CLS"), {}),
    "llama_dora": lambda: (tiny_llama(), lm_dataset(n=36), _lora(["q_proj", "v_proj"], use_dora=True), {}),
    "llama_full": lambda: (tiny_llama(), lm_dataset(n=36), None, {"train_mode": "full"}),
    # a bfloat16 base in full mode with float32 master weights (in the optimizer's state: resumes must restore them)
    "llama_full_bf16_master": lambda: (
        tiny_llama().to(torch.bfloat16),
        lm_dataset(n=36),
        None,
        {"train_mode": "full", "bf16": True, "master_dtype": "float32"},
    ),  # fmt: skip
    # one node over several devices: frozen blocks offloaded to disk, a different map in every process
    "llama_offload": lambda: (
        offloaded_llama(OFFLOADED_BLOCKS[os.environ.get("RANK")], _lora(["q_proj", "v_proj"])),
        lm_dataset(n=36),
        None,
        {},
    ),  # fmt: skip
}
MATRIX = [name for name in CONFIGS if name != DEFAULT]  # the default runs in every engine test already


def build(name: str | None = None):
    """`(model, dataset, peft_config, fields)` of configuration `name` (default: `$SNAKE_TEST_CONFIG` or GPT-2)."""
    return CONFIGS[name or os.environ.get("SNAKE_TEST_CONFIG", DEFAULT)]()


def trained_state(model) -> dict[str, torch.Tensor]:
    """What a run trains and hands on: the PEFT state (adapters and modules_to_save), or every weight in full mode."""
    state = get_peft_model_state_dict(model) if isinstance(model, PeftModel) else model.state_dict()
    return {name: tensor.detach().contiguous() for name, tensor in state.items()}
