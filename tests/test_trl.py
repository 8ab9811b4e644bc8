"""Snake inside TRL: `SnakeSFTTrainer` against plain `SFTTrainer` + PEFT, on a tiny Llama and a character tokenizer."""

from __future__ import annotations

import random

import datasets
import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model_state_dict
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast, Trainer, TrainerCallback, set_seed


trl = pytest.importorskip("trl")

from conftest import losses  # noqa: E402
from snake_hf.blocks import SHARED  # noqa: E402
from snake_hf.compose import SnakeMixin, snake_config, snake_trainer  # noqa: E402
from snake_hf.trainer import SnakeTrainer  # noqa: E402
from snake_hf.trl import FUSED_LM_HEAD, SnakeSFTConfig, SnakeSFTTrainer  # noqa: E402


CHARS = "abcdefghijklmnopqrstuvwxyz .,?!"
WORDS = ["snake", "node", "group", "train", "data", "model", "token", "chat", "pack", "loss", "hop", "adapter"]


def char_tokenizer() -> PreTrainedTokenizerFast:
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers

    vocab = {"<pad>": 0, "<eos>": 1, "<unk>": 2, **{c: i + 3 for i, c in enumerate(CHARS)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>")


def tiny_llama(seed: int = 0) -> LlamaForCausalLM:
    set_seed(seed)
    config = LlamaConfig(
        vocab_size=len(CHARS) + 3, hidden_size=16, intermediate_size=32, num_hidden_layers=4, num_attention_heads=2,
        num_key_value_heads=2, max_position_embeddings=128, pad_token_id=0, eos_token_id=1, bos_token_id=1,
    )  # fmt: skip
    return LlamaForCausalLM(config)


def _sentence(rng: random.Random, lo: int, hi: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(lo, hi)))


def text_data(n: int = 16, seed: int = 0) -> datasets.Dataset:
    rng = random.Random(seed)
    return datasets.Dataset.from_dict({"text": [_sentence(rng, 2, 6) for _ in range(n)]})


def prompt_completion_data(n: int = 16, seed: int = 0) -> datasets.Dataset:
    rng = random.Random(seed)
    rows = [(_sentence(rng, 1, 3) + "?", " " + _sentence(rng, 1, 3) + ".") for _ in range(n)]
    return datasets.Dataset.from_dict({"prompt": [p for p, _ in rows], "completion": [c for _, c in rows]})


def lora() -> LoraConfig:
    return LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0)


COMMON = dict(
    per_device_train_batch_size=4, learning_rate=1e-2, num_train_epochs=1, logging_steps=1, save_strategy="no",
    report_to=[], use_cpu=True, bf16=False, gradient_checkpointing=False, max_length=64, seed=0,
    dataloader_num_workers=0,
)  # fmt: skip


def snake_sft(tmp_path, data, **overrides):
    args = SnakeSFTConfig(output_dir=str(tmp_path / "snake"), **{**COMMON, **overrides})
    return SnakeSFTTrainer(
        tiny_llama(), args, train_dataset=data, processing_class=char_tokenizer(), peft_config=lora()
    )


def _adapter(trainer) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in get_peft_model_state_dict(trainer.model).items()}


@pytest.mark.parametrize(
    ("data", "extra"),
    [(text_data, {"packing": True, "max_length": 16}), (prompt_completion_data, {})],
    ids=["text-packing", "prompt-completion"],
)
def test_one_node_one_group_matches_plain_sft_trainer_step_for_step(tmp_path, data, extra):
    plain_args = trl.SFTConfig(output_dir=str(tmp_path / "plain"), **{**COMMON, **extra})
    plain = trl.SFTTrainer(
        tiny_llama(), plain_args, train_dataset=data(), processing_class=char_tokenizer(), peft_config=lora()
    )
    plain.train()
    snake = snake_sft(tmp_path, data(), num_nodes=1, num_block_groups=1, **extra)
    snake.train()
    if data is prompt_completion_data:
        assert snake.completion_only_loss, "prompt-completion data trains on the completion only, as in TRL"
        assert (torch.tensor(snake.train_dataset[0]["labels"]) == -100).any(), "the prompt is masked out of the loss"
    assert len(losses(plain)) == len(losses(snake)) >= 3
    assert losses(snake) == losses(plain)
    a, b = _adapter(plain), _adapter(snake)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


class _StageSnapshots(TrainerCallback):
    def __init__(self, trainer):
        self.trainer, self.ends, self.snapshots = trainer, set(), []

    def _snap(self):
        self.snapshots.append({n: t.detach().clone() for n, t in self.trainer.model.state_dict().items()})

    def on_train_begin(self, args, state, control, **kwargs):
        total = 0
        for stage in self.trainer.plan:
            total += stage.steps
            self.ends.add(total)
        self._snap()

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step in self.ends:
            self._snap()


def test_three_nodes_two_groups_each_stage_trains_exactly_its_group_on_prepared_shards(tmp_path):
    trainer = snake_sft(tmp_path, text_data(24), num_nodes=3, num_block_groups=2, packing=True, max_length=16)
    assert set(trainer.node_data.dataset.column_names) >= {"input_ids", "seq_lengths"}, "split after TRL's packing"
    snaps = _StageSnapshots(trainer)
    trainer.add_callback(snaps)
    trainer.train()
    assert len(trainer.plan) == 6 and {s.group for s in trainer.plan} == {0, 1}
    parts, everything = trainer.part_map, set(snaps.snapshots[0])
    for stage, before, after in zip(trainer.plan, snaps.snapshots, snaps.snapshots[1:]):
        own = set(parts.params[f"g{stage.group}"]) | set(parts.params[SHARED])
        assert {n for n in own if not torch.equal(before[n], after[n])} == own, f"stage {stage.index}"
        assert {n for n in everything - own if not torch.equal(before[n], after[n])} == set(), f"stage {stage.index}"


def test_saved_adapter_reloads_with_plain_peft_to_identical_logits(tmp_path):
    trainer = snake_sft(tmp_path, prompt_completion_data(18), num_nodes=3, num_block_groups=2)
    trainer.train()
    trainer.save_model(str(tmp_path / "adapter"))
    reloaded = PeftModel.from_pretrained(tiny_llama(), str(tmp_path / "adapter")).eval()
    ids = torch.tensor([[5, 6, 7, 8, 9, 3, 4]])
    with torch.no_grad():
        expected = trainer.model.eval()(input_ids=ids).logits
        assert torch.equal(reloaded(input_ids=ids).logits, expected)
    training_logs = [h for h in trainer.state.log_history if "loss" in h]
    assert all("mean_token_accuracy" in h for h in training_logs), "TRL's metrics stay with TRL's training logs"
    card = tmp_path / "snake" / "README.md"
    trainer.create_model_card()
    text = card.read_text()
    assert "snake-learning" in text and "sft" in text and "## Snake Learning" in text


def test_distillation_changes_the_loss_and_zero_alpha_equals_none_exactly(tmp_path):
    runs = {}
    for name, alpha in (("none", None), ("zero", 0.0), ("half", 0.5)):
        extra = {"loss_type": "nll"} if alpha is None else {"loss_type": "nll", "distill_alpha": alpha}
        trainer = snake_sft(tmp_path / name, prompt_completion_data(12), num_nodes=3, num_block_groups=2, **extra)
        trainer.train()
        runs[name] = (losses(trainer), _adapter(trainer), trainer.state.log_history)
    assert runs["zero"][0] == runs["none"][0]
    assert all(torch.equal(runs["zero"][1][k], runs["none"][1][k]) for k in runs["none"][1])
    assert runs["half"][0] != runs["none"][0]
    assert not all(torch.equal(runs["half"][1][k], runs["none"][1][k]) for k in runs["none"][1])
    # At a stage's first step the teacher is the student (KL 0): the loss is (1-λ) x TRL's task loss, whichever way
    # the trl version computes it (trl >= 1.15: Trainer's NLL from the logits vs TRL's fused LM head).
    assert runs["half"][0][0] == pytest.approx(0.5 * runs["none"][0][0], rel=1e-5)
    assert all("mean_token_accuracy" in h for h in runs["half"][2] if "loss" in h), "TRL's metrics still logged"


def test_unset_loss_type_is_trls_default_and_nll_when_distillation_needs_the_logits():
    trls = trl.SFTConfig("o", use_cpu=True).loss_type  # "chunked_nll" in trl 1.13-1.14, "nll" from trl 1.15
    assert SnakeSFTConfig("o", use_cpu=True).loss_type == trls == ("nll" if FUSED_LM_HEAD else "chunked_nll")
    assert SnakeSFTConfig("o", use_cpu=True, distill_alpha=0.5).loss_type == "nll"


def test_per_node_dataset_list_is_prepared_node_by_node(tmp_path):
    shards = [text_data(8, seed=s) for s in range(3)]
    trainer = snake_sft(tmp_path, shards, num_nodes=3, num_block_groups=2, packing=True)
    assert len(trainer.node_data.sizes) == 3
    for node, shard in enumerate(shards):
        prepared = trainer.node_data.shard(node)
        assert "input_ids" in prepared.column_names
        tokens = sum(len(ids) for ids in prepared["input_ids"])
        assert tokens == sum(len(t) + 1 for t in shard["text"]), f"node {node} holds its own text, packed (+eos)"
    trainer.train()


def test_snake_sft_config_keeps_trls_defaults():
    snake, plain = SnakeSFTConfig("o", num_nodes=3, use_cpu=True), trl.SFTConfig("o", use_cpu=True)
    for name in ("learning_rate", "logging_steps", "bf16", "max_length", "packing", "completion_only_loss"):
        assert getattr(snake, name) == getattr(plain, name), name
    assert (snake.learning_rate, snake.logging_steps) == (2e-5, 10)
    assert snake.num_nodes == 3 and snake.gradient_checkpointing is False, "TRL's True is refused by Snake"
    with pytest.raises(ValueError, match="gradient_checkpointing"):
        SnakeSFTConfig("o", use_cpu=True, gradient_checkpointing=True)
    from transformers import HfArgumentParser

    (parsed,) = HfArgumentParser(SnakeSFTConfig).parse_args_into_dataclasses(
        ["--output_dir", "o", "--use_cpu", "true", "--num_nodes", "3", "--packing", "true"]
    )
    assert (parsed.learning_rate, parsed.logging_steps, parsed.num_nodes, parsed.packing) == (2e-5, 10, 3, True)


def test_chunked_lm_loss_and_liger_distillation_are_refused_by_name(tmp_path):
    with pytest.raises(ValueError, match="lm_loss_chunk_tokens.*set it to 0"):
        snake_sft(tmp_path, text_data(), num_nodes=1, lm_loss_chunk_tokens=8)
    refused = "dft" if FUSED_LM_HEAD else "chunked_nll"  # trl >= 1.15 has no chunked_nll (it maps it to nll)
    with pytest.raises(ValueError, match=f"distill_alpha.*{refused}"):
        snake_sft(tmp_path, text_data(), num_nodes=3, num_block_groups=2, distill_alpha=0.5, loss_type=refused)
    with pytest.raises(ValueError, match="distill_alpha.*use_liger_kernel"):
        snake_sft(tmp_path, text_data(), num_nodes=3, num_block_groups=2, distill_alpha=0.5, use_liger_kernel=True)


def test_plain_training_arguments_are_refused_before_trl_drops_snakes_fields(tmp_path):
    with pytest.raises(TypeError, match="SnakeConfig"):
        SnakeSFTTrainer(tiny_llama(), trl.SFTConfig(str(tmp_path), use_cpu=True), train_dataset=text_data(),
                        processing_class=char_tokenizer())  # fmt: skip


class _OwnLoss(Trainer):
    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        outputs = model(**inputs)
        return (outputs.loss, outputs) if return_outputs else outputs.loss


def test_a_parent_loss_that_skips_snakes_hook_is_refused_by_name(tmp_path):
    cls = snake_trainer(_OwnLoss)
    config = SnakeSFTConfig(str(tmp_path), use_cpu=True, bf16=False, report_to=[], num_nodes=3, num_block_groups=2,
                            distill_alpha=0.5, max_steps=6, per_device_train_batch_size=2)  # fmt: skip
    ids = torch.randint(3, 20, (12, 8))
    data = datasets.Dataset.from_dict({"input_ids": ids.tolist(), "labels": ids.tolist()})
    trainer = cls(tiny_llama(), config, train_dataset=data, peft_config=lora())
    with pytest.raises(RuntimeError, match="_OwnLoss.compute_loss did not reach SnakeTrainer.compute_loss"):
        trainer.train()


def test_mixin_order_is_checked_when_the_class_is_made():
    with pytest.raises(TypeError, match="SnakeMixin first and SnakeTrainer last"):
        type("Wrong", (SnakeMixin, SnakeTrainer, trl.SFTTrainer), {})


def _launch_sft_ranks(out_dir, num_nodes: int, mode: str, timeout: float = 300) -> None:
    """One process per node (spawned, never forked), each with its own PYTHONHASHSEED, joined by the rendezvous."""
    import os
    import socket
    import subprocess
    import sys
    from pathlib import Path

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    script = str(Path(__file__).parent / "_sft_run.py")
    procs = []
    for rank in range(num_nodes):
        env = dict(os.environ, RANK=str(rank), WORLD_SIZE=str(num_nodes), LOCAL_RANK=str(rank),
                   MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1",
                   PYTHONHASHSEED=str(101 + 17 * rank))  # fmt: skip
        procs.append(subprocess.Popen([sys.executable, script, str(out_dir), str(num_nodes), mode], env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))  # fmt: skip
    outputs = []
    try:
        outputs = [proc.communicate(timeout=timeout)[0] for proc in procs]
    finally:
        for proc in procs:
            proc.kill()
    for rank, (proc, output) in enumerate(zip(procs, outputs)):
        assert proc.returncode == 0, f"rank {rank} failed:\n{output[-3000:]}"


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["split", "local"])
def test_two_processes_give_adapters_bit_identical_to_the_simulation(tmp_path, mode):
    from _sft_run import run
    from safetensors.torch import load_file

    threads = torch.get_num_threads()
    try:
        (tmp_path / "sim").mkdir()
        run(str(tmp_path / "sim"), 2, mode, engine="simulation")
    finally:
        torch.set_num_threads(threads)
    simulated = load_file(str(tmp_path / "sim" / "adapters-0.safetensors"))
    sim_engine, sim_sizes = (tmp_path / "sim" / "engine-0.txt").read_text().split(" ", 1)
    (tmp_path / "dist").mkdir()
    _launch_sft_ranks(tmp_path / "dist", 2, mode)
    for rank in range(2):
        engine, sizes = (tmp_path / "dist" / f"engine-{rank}.txt").read_text().split(" ", 1)
        assert (sim_engine, engine, sizes) == ("simulation", "distributed", sim_sizes)
        got = load_file(str(tmp_path / "dist" / f"adapters-{rank}.safetensors"))
        assert got.keys() == simulated.keys()
        assert all(torch.equal(got[k], simulated[k]) for k in got), f"rank {rank} ({mode})"


class _Preparing(Trainer):
    """A parent with its own argument order (like DPOTrainer's `ref_model` second) that prepares data in __init__."""

    def __init__(self, model, reference=None, args=None, data_collator=None, train_dataset=None, **kwargs):
        self.reference = reference
        super().__init__(model, args, data_collator, self.prepare(train_dataset), **kwargs)

    @staticmethod
    def prepare(dataset):
        return dataset.map(lambda row: {"input_ids": row["values"], "labels": row["values"]}, remove_columns="values")


def test_any_trainer_subclass_is_split_after_its_own_preparation_with_its_argument_order(tmp_path):
    cls = snake_trainer(_Preparing, prepare_node_dataset=lambda self, dataset, args: self.prepare(dataset))
    config = SnakeSFTConfig(str(tmp_path), use_cpu=True, bf16=False, report_to=[], num_nodes=3, num_block_groups=2,
                            per_device_train_batch_size=2, learning_rate=1e-2, save_strategy="no", num_train_epochs=1)  # fmt: skip
    shards = [datasets.Dataset.from_dict({"values": torch.randint(3, 20, (4 + n, 8)).tolist()}) for n in range(3)]
    trainer = cls(tiny_llama(), "ref", config, None, shards, peft_config=lora())
    assert trainer.reference == "ref" and isinstance(trainer.model, PeftModel)
    assert trainer.node_data.sizes == [4, 5, 6]
    assert all(trainer.node_data.shard(n)["input_ids"] == shards[n]["values"] for n in range(3))
    trainer.train()
    assert [s.node for s in trainer.snake_report.stages] == [0, 1, 2, 2, 1, 0]


def test_trls_dpo_trainer_made_snake_trains_each_group_in_turn_and_refuses_snakeslosses(tmp_path):
    config_class = snake_config(trl.DPOConfig)
    common = dict(use_cpu=True, bf16=False, report_to=[], num_nodes=3, num_block_groups=2, learning_rate=1e-2,
                  per_device_train_batch_size=2, save_strategy="no", num_train_epochs=1, gradient_checkpointing=False,
                  max_length=32)  # fmt: skip
    rng = random.Random(0)
    pairs = {
        "prompt": [_sentence(rng, 1, 3) + "?" for _ in range(12)],
        "chosen": [" yes."] * 12,
        "rejected": [" no."] * 12,
    }
    data = datasets.Dataset.from_dict(pairs)
    cls = snake_trainer(trl.DPOTrainer)
    trainer = cls(tiny_llama(), args=config_class(str(tmp_path / "dpo"), **common), train_dataset=data,
                  processing_class=char_tokenizer(), peft_config=lora())  # fmt: skip
    assert "snake-learning" in cls._tag_names and "dpo" in cls._tag_names
    snaps = _StageSnapshots(trainer)
    trainer.add_callback(snaps)
    trainer.train()
    assert [s.node for s in trainer.snake_report.stages] == [0, 1, 2, 2, 1, 0]
    parts, everything = trainer.part_map, set(snaps.snapshots[0])
    for stage, before, after in zip(trainer.plan, snaps.snapshots, snaps.snapshots[1:]):
        own = set(parts.params[f"g{stage.group}"]) | set(parts.params[SHARED])
        assert {n for n in everything if not torch.equal(before[n], after[n])} == own, f"stage {stage.index}"
    distilling = cls(tiny_llama(), args=config_class(str(tmp_path / "kd"), **common, distill_alpha=0.5),
                     train_dataset=data, processing_class=char_tokenizer(), peft_config=lora())  # fmt: skip
    with pytest.raises(RuntimeError, match="DPOTrainer.compute_loss did not reach SnakeTrainer.compute_loss"):
        distilling.train()
