"""Bad input fails before any training, with an error that names the field, its value and the fix.

One table: configs, plans, datasets, models and payload/checkpoint files. Every row asserts the error type and the
words the message must contain (the field and the way out).
"""

from __future__ import annotations

import pytest
from peft import LoraConfig, get_peft_model
from torch import nn

from conftest import TinyCNN, cls_dataset, lm_dataset, tiny_bert, tiny_gpt2
from snake_hf import SnakeConfig, SnakeTrainer, Stage
from snake_hf.data.shards import DirichletPartitioner, PathologicalPartitioner
from snake_hf.engine.payload import EncodedPayload, PayloadError
from snake_hf.trainer.checkpoint import CheckpointError, StageCheckpoint


def lora():
    return LoraConfig(r=2, target_modules=["query", "value"], task_type="SEQ_CLS")


def config(tmp, **fields):
    return SnakeConfig(
        output_dir=str(tmp), report_to="none", use_cpu=True, disable_tqdm=True, **({"num_train_epochs": 1} | fields)
    )


def trainer(tmp, model=None, data=None, peft=True, **fields):
    model = tiny_bert() if model is None else model
    data = cls_dataset() if data is None else data
    return SnakeTrainer(model, config(tmp, **fields), train_dataset=data, peft_config=lora() if peft else None)


class NoBlocks(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2))

    def forward(self, x, labels=None):
        return {"logits": self.body(x)}


CASES = [
    # configs
    ("num_nodes-zero", lambda t: config(t, num_nodes=0), ValueError, ["num_nodes", "0"]),
    ("num_block_groups-zero", lambda t: config(t, num_block_groups=0), ValueError, ["num_block_groups"]),
    ("boundaries-not-from-zero", lambda t: config(t, group_boundaries=[1, 3]), ValueError, ["group_boundaries", "[0"]),
    ("boundaries-vs-groups", lambda t: config(t, num_block_groups=3, group_boundaries=[0, 2, 4]), ValueError,
     ["num_block_groups", "set only one"]),
    ("passes-zero", lambda t: config(t, num_passes=0), ValueError, ["num_passes"]),
    ("stage-steps-zero", lambda t: config(t, stage_steps=0), ValueError, ["stage_steps", ">= 1"]),
    ("unknown-schedule", lambda t: config(t, schedule="spiral"), ValueError, ["schedule", "serpentine"]),
    ("designated-groups", lambda t: config(t, schedule="designated", num_nodes=3, num_block_groups=2), ValueError,
     ["num_block_groups", "num_nodes"]),
    ("train-mode", lambda t: config(t, train_mode="qlora"), ValueError, ["train_mode", "'full'"]),
    ("partition", lambda t: config(t, partition="zipf"), ValueError, ["partition", "dirichlet"]),
    ("topology", lambda t: config(t, topology="ring"), ValueError, ["topology", "'cs'"]),
    ("hop-timeout", lambda t: config(t, hop_timeout=-1), ValueError, ["hop_timeout", "positive"]),
    ("no-epochs", lambda t: config(t, num_train_epochs=0), ValueError, ["num_train_epochs", "max_steps"]),
    ("max-steps-inside-fixed-stages", lambda t: trainer(t, num_nodes=2, num_block_groups=2, stage_steps=4,
                                                        max_steps=2), ValueError, ["`max_steps` (2)", "stage_steps"]),
    ("checkpointing", lambda t: config(t, gradient_checkpointing=True), ValueError, ["activation_checkpointing", "False"]),
    ("distill-alpha", lambda t: config(t, distill_alpha=1.5), ValueError, ["distill_alpha", "[0, 1]"]),
    ("distill-temperature", lambda t: config(t, distill_temperature=0), ValueError, ["distill_temperature"]),
    ("engine-distributed-unlaunched", lambda t: trainer(t, engine="distributed"), ValueError, ["engine", "torchrun"]),
    ("save-stages", lambda t: config(t, save_stages=-1), ValueError, ["save_stages"]),
    # plans
    ("plan-missing-node", lambda t: trainer(t, num_nodes=2, schedule=[Stage(0, 0, 5, 0, 1)]), ValueError,
     ["node 5", "num_nodes"]),
    ("plan-missing-group", lambda t: trainer(t, num_nodes=1, schedule=[Stage(0, 0, 0, 7, 1)]), ValueError,
     ["group 7", "num_block_groups"]),
    ("plan-zero-steps", lambda t: trainer(t, num_nodes=1, schedule=[{"node": 0, "group": 0, "steps": 0}]), ValueError,
     ["steps=0"]),
    # models
    ("groups-exceed-blocks", lambda t: trainer(t, num_block_groups=6), ValueError,
     ["`num_block_groups` (6)", "4 blocks", "group_boundaries"]),
    ("no-block-list", lambda t: trainer(t, model=NoBlocks(), peft=False, num_block_groups=2), ValueError,
     ["block_list_path"]),
    ("bad-block-path", lambda t: trainer(t, model=TinyCNN(), peft=False, train_mode="full", block_list_path="stages"),
     ValueError, ["block_list_path", "'stages'"]),
    ("lora-without-config", lambda t: trainer(t, peft=False, train_mode="lora"), ValueError, ["peft_config", "train_mode"]),
    ("full-with-peft", lambda t: trainer(t, train_mode="full"), ValueError, ["train_mode", "peft_config"]),
    ("peft-twice", lambda t: SnakeTrainer(get_peft_model(tiny_bert(), lora()), config(t), train_dataset=cls_dataset(),
                                          peft_config=lora()), ValueError, ["PeftModel", "only one"]),
    ("model-none", lambda t: SnakeTrainer(None, config(t), train_dataset=cls_dataset()), ValueError, ["model"]),
    # datasets
    ("no-train-dataset", lambda t: SnakeTrainer(tiny_bert(), config(t), train_dataset=None, peft_config=lora()).train(),
     ValueError, ["train_dataset"]),
    ("shard-count", lambda t: trainer(t, data=[cls_dataset(), cls_dataset()], num_nodes=3), ValueError,
     ["train_dataset", "num_nodes"]),
    ("empty-shard", lambda t: trainer(t, data=[cls_dataset(), cls_dataset().select([])], num_nodes=2), ValueError,
     ["Node 1", "empty"]),
    ("missing-label-column", lambda t: trainer(t, data=lm_dataset(), num_nodes=2, partition="dirichlet"), ValueError,
     ["label_column", "columns"]),
    ("dirichlet-alpha", lambda t: DirichletPartitioner(2, alpha=0.0), ValueError, ["alpha", "0.0"]),
    ("pathological-k", lambda t: PathologicalPartitioner(2, classes_per_node=5).split(cls_dataset()), ValueError,
     ["classes_per_node", "5"]),
    ("more-nodes-than-examples", lambda t: trainer(t, data=cls_dataset(n=3), num_nodes=5), ValueError, ["num_nodes"]),
    ("mitigation-without-labels", lambda t: SnakeTrainer(tiny_gpt2(), config(t, logit_adjustment=1.0),
     train_dataset=lm_dataset(), peft_config=LoraConfig(r=2, target_modules=["c_attn"])), ValueError,
     ["logit_adjustment", "label column"]),
    # payload and checkpoint files
    ("payload-garbage", lambda t: EncodedPayload.from_bytes(b"\x00" * 10), PayloadError, ["shorter than"]),
    ("payload-not-snake", lambda t: EncodedPayload.from_bytes(b"\x01" * 64), PayloadError, ["Not a snake_hf payload"]),
    ("checkpoint-missing", lambda t: StageCheckpoint.load(t / "nope"), CheckpointError, ["does not exist"]),
    ("checkpoint-incomplete", lambda t: (t.mkdir(exist_ok=True), StageCheckpoint.load(t))[1], CheckpointError,
     ["incomplete", "earlier checkpoint"]),
]  # fmt: skip


@pytest.mark.parametrize("build,error,words", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_is_refused_before_training_naming_field_and_fix(tmp_path, build, error, words):
    with pytest.raises(error) as raised:
        build(tmp_path)
    for word in words:
        assert word in str(raised.value), f"{word!r} missing from: {raised.value}"


def test_the_table_covers_at_least_25_bad_inputs():
    assert len(CASES) >= 25


def test_a_refused_setup_leaves_the_users_model_untouched(tmp_path):
    model = tiny_bert()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    with pytest.raises(ValueError, match="num_block_groups"):
        trainer(tmp_path, model=model, num_block_groups=9)
    assert not any("lora_" in n for n, _ in model.named_modules()), "no adapters were injected"
    assert dict(model.named_parameters()).keys() == before.keys()
