"""Block discovery on tiny configs of every listed architecture, group cuts, and part maps."""

from __future__ import annotations

import pytest
import torch
import transformers
from peft import LoraConfig, get_peft_model

from conftest import TinyCNN, tiny_bert, tiny_gpt2
from snake_hf.blocks import SHARED, BlockGroups, PartMap, find_block_list, group_boundaries, set_trainable


SMALL = dict(hidden_size=16, num_attention_heads=2, intermediate_size=32, vocab_size=64, max_position_embeddings=32)
ARCHITECTURES = [
    ("gpt2", transformers.GPT2Config(n_layer=3, n_embd=16, n_head=2, vocab_size=64), "transformer.h"),
    ("bert", transformers.BertConfig(num_hidden_layers=3, **SMALL), "bert.encoder.layer"),
    ("roberta", transformers.RobertaConfig(num_hidden_layers=3, **SMALL), "roberta.encoder.layer"),
    (
        "distilbert",
        transformers.DistilBertConfig(n_layers=3, dim=16, n_heads=2, hidden_dim=32, vocab_size=64),
        "distilbert.transformer.layer",
    ),
    ("llama", transformers.LlamaConfig(num_hidden_layers=3, num_key_value_heads=2, **SMALL), "model.layers"),
    ("mistral", transformers.MistralConfig(num_hidden_layers=3, num_key_value_heads=2, **SMALL), "model.layers"),
    ("qwen2", transformers.Qwen2Config(num_hidden_layers=3, num_key_value_heads=2, **SMALL), "model.layers"),
    (
        "opt",
        transformers.OPTConfig(num_hidden_layers=3, hidden_size=16, ffn_dim=32, num_attention_heads=2, vocab_size=64,
                               word_embed_proj_dim=16, max_position_embeddings=32),
        "model.decoder.layers",
    ),
    ("gpt_neox", transformers.GPTNeoXConfig(num_hidden_layers=3, **SMALL), "gpt_neox.layers"),
    ("falcon", transformers.FalconConfig(num_hidden_layers=3, hidden_size=16, num_attention_heads=2, vocab_size=64),
     "transformer.h"),
    ("phi", transformers.PhiConfig(num_hidden_layers=3, **SMALL), "model.layers"),
]  # fmt: skip


def _build(config):
    if isinstance(config, (transformers.BertConfig, transformers.RobertaConfig, transformers.DistilBertConfig)):
        return transformers.AutoModelForSequenceClassification.from_config(config)
    return transformers.AutoModelForCausalLM.from_config(config)


@pytest.mark.parametrize("name,config,path", ARCHITECTURES, ids=[a[0] for a in ARCHITECTURES])
def test_find_block_list_finds_transformer_layers(name, config, path):
    found, blocks = find_block_list(_build(config))
    assert (found, len(blocks)) == (path, 3)


def test_find_block_list_sees_through_peft_wrapper():
    model = get_peft_model(tiny_gpt2(), LoraConfig(r=2, target_modules=["c_attn"]))
    path, blocks = find_block_list(model)
    assert path == "transformer.h" and len(blocks) == 4


def test_find_block_list_uses_block_list_path_for_cnn():
    path, blocks = find_block_list(TinyCNN(), "features")
    assert (path, len(blocks)) == ("features", 3)


def test_find_block_list_without_a_list_names_block_list_path():
    with pytest.raises(ValueError, match="block_list_path"):
        find_block_list(TinyCNN())


def test_find_block_list_bad_path_names_the_missing_attribute():
    with pytest.raises(ValueError, match="'stages'"):
        find_block_list(TinyCNN(), "stages")


@pytest.mark.parametrize(
    "blocks,groups,expected",
    [(4, 1, [0, 4]), (4, 2, [0, 2, 4]), (10, 3, [0, 4, 7, 10]), (5, 5, [0, 1, 2, 3, 4, 5])],
    ids=["one", "even", "uneven", "one-each"],
)
def test_group_boundaries_are_contiguous_and_balanced(blocks, groups, expected):
    assert group_boundaries(blocks, groups) == expected


def test_group_boundaries_refuses_more_groups_than_blocks():
    with pytest.raises(ValueError, match=r"`num_block_groups` \(6\) exceeds the model's 4 blocks"):
        group_boundaries(4, 6)


def test_explicit_boundaries_must_cover_the_blocks():
    with pytest.raises(ValueError, match="group_boundaries"):
        BlockGroups.from_model(tiny_gpt2(), boundaries=[0, 2, 3])


def test_part_map_lora_assigns_adapters_by_block_and_head_to_shared():
    model = get_peft_model(tiny_bert(), LoraConfig(r=2, target_modules=["query", "value"], task_type="SEQ_CLS"))
    groups = BlockGroups.from_model(model, num_groups=2)
    parts = PartMap.build(model, groups, "lora")
    assert parts.parts == ["g0", "g1", SHARED]
    assert all(".layer.0." in n or ".layer.1." in n for n in parts.params["g0"])
    assert all(".layer.2." in n or ".layer.3." in n for n in parts.params["g1"])
    assert all("lora_" in n for n in parts.params["g0"] + parts.params["g1"])
    assert parts.params[SHARED] and all("classifier" in n for n in parts.params[SHARED])
    assert len(parts.params["g0"]) == 2 * 2 * 2  # 2 blocks x 2 targets x (A, B)


def test_part_map_full_mode_holds_all_block_weights_and_batchnorm_buffers():
    model = TinyCNN()
    groups = BlockGroups.from_model(model, num_groups=3, block_list_path="features")
    parts = PartMap.build(model, groups, "full")
    assert parts.params["g0"] == [
        "features.0.0.weight",
        "features.0.0.bias",
        "features.0.1.weight",
        "features.0.1.bias",
    ]
    assert set(parts.buffers["g0"]) == {
        "features.0.1.running_mean",
        "features.0.1.running_var",
        "features.0.1.num_batches_tracked",
    }
    assert SHARED not in parts.parts


def test_set_trainable_freezes_everything_else():
    model = get_peft_model(tiny_gpt2(), LoraConfig(r=2, target_modules=["c_attn"]))
    parts = PartMap.build(model, BlockGroups.from_model(model, num_groups=2), "lora")
    count = set_trainable(model, parts.trainable_names(1))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == set(parts.params["g1"]) and count == len(trainable)


def test_frozen_lower_blocks_store_no_activations():
    model = get_peft_model(tiny_gpt2(), LoraConfig(r=2, target_modules=["c_attn"]))
    parts = PartMap.build(model, BlockGroups.from_model(model, num_groups=2), "lora")
    set_trainable(model, parts.trainable_names(1))
    needs_grad = []
    for block in find_block_list(model)[1]:
        block.register_forward_hook(
            lambda m, i, o: needs_grad.append(o[0].requires_grad if isinstance(o, tuple) else o.requires_grad)
        )
    model(input_ids=torch.zeros(1, 4, dtype=torch.long), labels=torch.zeros(1, 4, dtype=torch.long)).loss.backward()
    # blocks 0-1 (group 0) build no graph: autograd stores nothing for them and backward stops at block 2
    assert needs_grad == [False, False, True, True]
    assert all(p.grad is None for n, p in model.named_parameters() if n in parts.params["g0"])
