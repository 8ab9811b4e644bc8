"""A launched rank trains on `cuda:LOCAL_RANK`, alone (no `nn.DataParallel` over the host's GPUs); the CPU path is
unchanged. No GPU needed: the GPU side of `TrainingArguments` and `torch.cuda` are stood in for."""

from __future__ import annotations

import functools

import pytest
import torch
from transformers import TrainingArguments, set_seed

from snake_hf import SnakeConfig
from snake_hf.devices import rank_device
from snake_hf.launch import _forget_process_launch, process_launch


@pytest.mark.parametrize(
    ("default", "local_rank", "count", "expected"),
    [
        ("cuda:0", 1, 4, "cuda:1"),
        ("cuda:0", 3, 4, "cuda:3"),
        ("cuda:0", 5, 4, "cuda:1"),  # more ranks than GPUs: round-robin
        ("cuda:0", 1, 1, "cuda:0"),  # two ranks share the one GPU
        ("cuda:0", None, 4, "cuda:0"),  # not launched: Trainer's choice
        ("cpu", 1, 4, "cpu"),  # use_cpu / no GPU: unchanged
        ("cuda:0", 1, 0, "cuda:0"),
    ],
    ids=["rank1", "rank3", "wraps", "shared-gpu", "not-launched", "cpu", "no-count"],
)
def test_rank_device_is_the_local_ranks_gpu(default, local_rank, count, expected):
    assert rank_device(torch.device(default), local_rank, count) == torch.device(expected)


@pytest.fixture
def four_gpu_host(monkeypatch):
    """`TrainingArguments` as it sets up on a 4-GPU host when not distributed (transformers 5.24: `cuda:0` and
    `n_gpu` = every visible GPU), and `torch.cuda` calls recorded."""
    calls = []

    def setup(self):
        self._n_gpu = 4
        return torch.device("cuda:0")

    monkeypatch.setattr(TrainingArguments, "_setup_devices", functools.cached_property(setup))
    TrainingArguments._setup_devices.__set_name__(TrainingArguments, "_setup_devices")
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    monkeypatch.setattr(torch.cuda, "set_device", calls.append)
    yield calls
    _forget_process_launch()


LAUNCHED = {"RANK": "6", "WORLD_SIZE": "8", "LOCAL_RANK": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29999"}


def test_launched_rank_takes_its_local_gpu_alone(tmp_path, monkeypatch, four_gpu_host):
    for name, value in LAUNCHED.items():
        monkeypatch.setenv(name, value)
    config = SnakeConfig(output_dir=str(tmp_path), report_to="none")
    assert config.device == torch.device("cuda:2")
    assert config.n_gpu == 1, "one GPU per rank: Trainer must not wrap the model in DataParallel"
    assert four_gpu_host == [torch.device("cuda:2")]


def test_config_built_after_the_launch_was_hidden_still_takes_its_local_gpu(tmp_path, monkeypatch, four_gpu_host):
    for name, value in LAUNCHED.items():
        monkeypatch.setenv(name, value)
    process_launch()  # SnakeTrainer reads the launch and hides it for the rest of the process
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    config = SnakeConfig(output_dir=str(tmp_path), report_to="none")
    assert config.device == torch.device("cuda:2")


def test_unlaunched_run_keeps_trainers_device_choice(tmp_path, monkeypatch, four_gpu_host):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    config = SnakeConfig(output_dir=str(tmp_path), report_to="none")
    assert (config.device, config.n_gpu, four_gpu_host) == (torch.device("cuda:0"), 4, [])


def test_cpu_rank_under_a_launcher_stays_on_cpu(tmp_path, monkeypatch):
    for name, value in LAUNCHED.items():
        monkeypatch.setenv(name, value)
    config = SnakeConfig(output_dir=str(tmp_path), report_to="none", use_cpu=True)
    assert config.device == torch.device("cpu")
    assert config.world_size == 1


# ---- one node over several devices: an Accelerate device map that offloads frozen blocks (CPU + disk here) ----

QUIET = dict(
    report_to="none", use_cpu=True, disable_tqdm=True, logging_steps=1, seed=0, learning_rate=1e-2,
    per_device_train_batch_size=4, save_strategy="no", num_train_epochs=1,
)  # fmt: skip
# Blocks 0 and 2 live on disk and load for each forward; the rest stays in CPU memory. With a GPU as main device,
# "cpu" entries would be offloaded to host memory the same way.
DEVICE_MAP = {
    "model.embed_tokens": "cpu", "model.rotary_emb": "cpu", "model.layers.0": "disk", "model.layers.1": "cpu",
    "model.layers.2": "disk", "model.layers.3": "cpu", "model.norm": "cpu", "lm_head": "cpu",
}  # fmt: skip
TWO_TARGETS = dict(r=4, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")


@pytest.fixture(scope="module")
def saved_llama(tmp_path_factory):
    """A tiny Llama saved as a user's checkpoint folder, to load with `from_pretrained(device_map=...)`."""
    from _matrix import tiny_llama

    folder = tmp_path_factory.mktemp("tiny-llama")
    tiny_llama().save_pretrained(folder)
    return folder


def _offloaded(folder, tmp_path, device_map=DEVICE_MAP, **kwargs):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(
        folder, device_map=device_map, offload_folder=str(tmp_path / "offload"), **kwargs
    )


def test_lora_over_an_offloaded_base_trains_bit_identical_to_the_base_loaded_whole(tmp_path, saved_llama):
    """Two nodes, two groups (one with a disk-offloaded block): the same adapters from the start (PEFT's draws), the
    same fingerprint, losses, trained adapters and bytes."""
    from peft import LoraConfig, get_peft_model_state_dict
    from transformers import AutoModelForCausalLM

    from conftest import assert_same_state, lm_dataset, losses
    from snake_hf import SnakeTrainer

    def trainer(load, name):
        set_seed(0)  # PEFT draws the adapters from the global generator, as a user's script seeds it
        args = SnakeConfig(str(tmp_path / name), num_nodes=2, num_block_groups=2, **QUIET)
        return SnakeTrainer(load(), args, train_dataset=lm_dataset(n=16), peft_config=LoraConfig(**TWO_TARGETS))

    whole = trainer(lambda: AutoModelForCausalLM.from_pretrained(saved_llama), "whole")
    offloaded = trainer(lambda: _offloaded(saved_llama, tmp_path), "offloaded")
    q_proj = offloaded.model.base_model.model.model.layers[0].self_attn.q_proj
    assert q_proj.base_layer.weight.is_meta, "block 0's frozen weight stays offloaded"
    assert q_proj.lora_A["default"].weight.device == torch.device("cpu"), "its adapter is placed on the device"
    assert_same_state(get_peft_model_state_dict(offloaded.model), get_peft_model_state_dict(whole.model))
    assert offloaded._spec.fingerprint == whole._spec.fingerprint, "same base and adapters, however they are placed"
    whole.train()
    offloaded.train()
    assert losses(offloaded) == losses(whole)
    assert_same_state(get_peft_model_state_dict(offloaded.model), get_peft_model_state_dict(whole.model))
    assert offloaded.snake_report.link_bytes() == whole.snake_report.link_bytes()
    assert q_proj.base_layer.weight.is_meta


def test_backward_stops_at_the_group_over_an_offloaded_base(tmp_path, saved_llama):
    """Group 1's stage builds no graph through the offloaded blocks below it (block 0 on disk): truncated backward
    holds whatever the placement."""
    from peft import LoraConfig
    from test_precision_base import _outputs_requiring_grad

    from conftest import lm_dataset
    from snake_hf import SnakeTrainer

    args = SnakeConfig(str(tmp_path / "run"), num_nodes=1, num_block_groups=2, num_passes=1, stage_steps=1, **QUIET)
    peft = LoraConfig(**TWO_TARGETS)
    trainer = SnakeTrainer(_offloaded(saved_llama, tmp_path), args, train_dataset=lm_dataset(n=8), peft_config=peft)
    forwards = _outputs_requiring_grad(trainer.model.base_model.model.model.layers)
    trainer.train()
    assert forwards == [[0, 1, 2, 3], [2, 3]]  # stage 0 trains blocks 0-1, stage 1 blocks 2-3


def test_snake_over_an_offloaded_base_equals_trainer_step_for_step(tmp_path, saved_llama):
    """One node, one group, one pass: `Trainer` + PEFT on the same offloaded base, wrapped the same way."""
    from peft import LoraConfig, get_peft_model, get_peft_model_state_dict
    from transformers import Trainer, TrainingArguments

    from conftest import assert_same_state, lm_dataset, losses
    from snake_hf import SnakeTrainer
    from snake_hf.devices import peft_on_offloaded_base

    set_seed(0)
    with peft_on_offloaded_base():
        plain_model = get_peft_model(_offloaded(saved_llama, tmp_path / "a"), LoraConfig(**TWO_TARGETS))
    plain = Trainer(plain_model, TrainingArguments(str(tmp_path / "plain"), **QUIET), train_dataset=lm_dataset(n=16))
    plain.train()
    args = SnakeConfig(str(tmp_path / "snake"), num_nodes=1, num_block_groups=1, num_passes=1, **QUIET)
    peft = LoraConfig(**TWO_TARGETS)
    set_seed(0)
    snake = SnakeTrainer(
        _offloaded(saved_llama, tmp_path / "b"), args, train_dataset=lm_dataset(n=16), peft_config=peft
    )
    snake.train()
    assert losses(snake) == losses(plain)
    assert_same_state(get_peft_model_state_dict(snake.model), get_peft_model_state_dict(plain.model))


def test_a_peft_model_wrapped_outside_gets_its_offloaded_adapters_placed(tmp_path, saved_llama, caplog):
    """`get_peft_model` alone leaves an offloaded module's adapters on meta: Snake places and draws them (with a
    warning that they differ from the whole base's), and the run trains."""
    from peft import LoraConfig, get_peft_model

    from conftest import lm_dataset
    from snake_hf import SnakeTrainer

    model = get_peft_model(_offloaded(saved_llama, tmp_path), LoraConfig(**TWO_TARGETS))
    assert model.base_model.model.model.layers[0].self_attn.q_proj.lora_A["default"].weight.is_meta
    args = SnakeConfig(str(tmp_path / "run"), num_nodes=2, num_block_groups=2, **QUIET)
    with caplog.at_level("WARNING"):
        trainer = SnakeTrainer(model, args, train_dataset=lm_dataset(n=16))
    assert "placed and drawn anew" in caplog.text
    placed = trainer.model.base_model.model.model.layers[0].self_attn.q_proj
    assert placed.lora_A["default"].weight.device == torch.device("cpu") and placed.lora_A["default"].weight.any()
    assert not placed.lora_B["default"].weight.any(), "LoRA's B starts at zero"
    trainer.train()
    assert placed.lora_B["default"].weight.any(), "the offloaded block's adapter trained"


def test_adapters_trained_over_an_offloaded_base_load_with_plain_peft(tmp_path, saved_llama):
    """`save_model` writes a standard adapter; `PeftModel.from_pretrained` on the base loaded whole gives the trained
    model's logits. Recompute above the group works over the offload too."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from conftest import lm_dataset
    from snake_hf import SnakeTrainer

    args = SnakeConfig(str(tmp_path / "run"), num_nodes=2, num_block_groups=2, recompute_above_group=True, **QUIET)
    peft = __import__("peft").LoraConfig(**TWO_TARGETS)
    trainer = SnakeTrainer(_offloaded(saved_llama, tmp_path), args, train_dataset=lm_dataset(n=16), peft_config=peft)
    trainer.train()
    trainer.save_model(str(tmp_path / "adapter"))
    loaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(saved_llama), tmp_path / "adapter")
    inputs = torch.tensor(lm_dataset(n=2)["input_ids"])
    with torch.no_grad():
        expected = trainer.model.eval()(input_ids=inputs).logits
        assert torch.equal(loaded.eval()(input_ids=inputs).logits, expected)
    trained = trainer.model.base_model.model.model.layers[2].self_attn.v_proj.lora_B["default"].weight
    assert trained.abs().sum() > 0, "the offloaded block's adapter trained"


def test_adapters_placed_on_an_offloaded_base_start_as_peft_starts_them(tmp_path, saved_llama):
    """PEFT's own draws, in float32 over a bfloat16 base whose offloaded weights stay bfloat16 placeholders."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from conftest import lm_dataset
    from snake_hf import SnakeTrainer

    set_seed(0)
    whole = get_peft_model(
        AutoModelForCausalLM.from_pretrained(saved_llama, dtype=torch.bfloat16), LoraConfig(**TWO_TARGETS)
    )
    args = SnakeConfig(str(tmp_path / "run"), num_nodes=2, num_block_groups=2, bf16=True, **QUIET)
    set_seed(0)
    base = _offloaded(saved_llama, tmp_path, dtype=torch.bfloat16)
    trainer = SnakeTrainer(base, args, train_dataset=lm_dataset(n=16), peft_config=LoraConfig(**TWO_TARGETS))
    placed = trainer.model.base_model.model.model.layers[2].self_attn.q_proj
    reference = whole.base_model.model.model.layers[2].self_attn.q_proj
    assert torch.equal(placed.lora_A["default"].weight, reference.lora_A["default"].weight), "PEFT's own draw"
    assert placed.lora_A["default"].weight.dtype == torch.float32
    assert not placed.lora_B["default"].weight.any()
    assert placed.base_layer.weight.is_meta and placed.base_layer.weight.dtype == torch.bfloat16
    trainer.train()
    assert placed.lora_B["default"].weight.any(), "the offloaded block's adapter trained"


def test_dora_on_an_offloaded_module_is_refused_before_any_work(tmp_path, saved_llama):
    """DoRA reads the base weight outside the base layer's forward, where the offload hook has put the placeholder."""
    from peft import LoraConfig

    from conftest import lm_dataset
    from snake_hf import SnakeTrainer

    args = SnakeConfig(str(tmp_path / "run"), num_nodes=2, num_block_groups=2, **QUIET)
    peft = LoraConfig(**TWO_TARGETS, use_dora=True)
    with pytest.raises(ValueError, match=r"`use_dora` is True and '.*layers\.0\.self_attn\.q_proj' is offloaded"):
        SnakeTrainer(_offloaded(saved_llama, tmp_path), args, train_dataset=lm_dataset(n=8), peft_config=peft)


def test_device_map_auto_with_max_memory_trains_offloaded(tmp_path, saved_llama):
    """`device_map="auto"` with a `max_memory` smaller than the model sends the tail to disk; Snake trains it."""
    from peft import LoraConfig

    from conftest import lm_dataset
    from snake_hf import SnakeTrainer

    model = _offloaded(saved_llama, tmp_path, device_map="auto", max_memory={"cpu": 40_000})
    assert "disk" in set(model.hf_device_map.values())
    args = SnakeConfig(str(tmp_path / "run"), num_nodes=2, num_block_groups=2, **QUIET)
    trainer = SnakeTrainer(model, args, train_dataset=lm_dataset(n=16), peft_config=LoraConfig(**TWO_TARGETS))
    trainer.train()
    assert len(trainer.snake_report.stages) == 4
    offloaded = [
        layer for name, layer in trainer.model.named_modules()
        if name.endswith("q_proj") and layer.base_layer.weight.is_meta
    ]  # fmt: skip
    assert offloaded and all(layer.lora_B["default"].weight.any() for layer in offloaded), "offloaded blocks trained"


def test_a_checkpoint_loads_into_an_offloaded_model_in_place(tmp_path, saved_llama):
    """`PeftModel.load_adapter` re-dispatches an offloaded model (and fails on its placeholders): Snake copies the
    saved adapter into the placed adapters instead, as resume and `load_best_model_at_end` need."""
    from peft import LoraConfig, get_peft_model, get_peft_model_state_dict

    from conftest import assert_same_state
    from snake_hf.devices import load_adapters_in_place, materialize_offloaded_adapters

    model = get_peft_model(_offloaded(saved_llama, tmp_path), LoraConfig(**TWO_TARGETS))
    materialize_offloaded_adapters(model)
    saved = {k: v.clone() for k, v in get_peft_model_state_dict(model).items()}
    model.save_pretrained(tmp_path / "ckpt")
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_" in name:
                param.add_(1.0)
    assert load_adapters_in_place(model, str(tmp_path / "ckpt"))
    assert_same_state(get_peft_model_state_dict(model), saved)
    whole = get_peft_model(__import__("_matrix").tiny_llama(), LoraConfig(**TWO_TARGETS))
    assert not load_adapters_in_place(whole, str(tmp_path / "ckpt")), "nothing offloaded: PEFT's own loading"


def test_full_mode_over_an_offloaded_base_is_refused_before_any_work(tmp_path, saved_llama):
    from conftest import lm_dataset
    from snake_hf import SnakeTrainer

    args = SnakeConfig(str(tmp_path / "run"), num_nodes=2, num_block_groups=2, train_mode="full", **QUIET)
    with pytest.raises(ValueError, match=r"`train_mode` is 'full' but the model's device map offloads weights"):
        SnakeTrainer(_offloaded(saved_llama, tmp_path), args, train_dataset=lm_dataset(n=8))
    assert not (tmp_path / "run").exists()


def test_an_offloaded_classifier_head_is_refused_and_an_offloaded_encoder_trains(tmp_path):
    """The head trains in every stage (`modules_to_save`): it must sit on a device; the frozen layers may not."""
    from accelerate import dispatch_model
    from peft import LoraConfig

    from conftest import cls_dataset, tiny_bert
    from snake_hf import SnakeTrainer

    peft = dict(r=4, target_modules=["query", "value"], task_type="SEQ_CLS")
    cpu = {"bert.embeddings": "cpu", "bert.pooler": "cpu", "classifier": "cpu", "dropout": "cpu"}
    cpu |= {f"bert.encoder.layer.{i}": "disk" if i in (1, 3) else "cpu" for i in range(4)}
    args = SnakeConfig(str(tmp_path / "run"), num_nodes=2, num_block_groups=2, **QUIET)
    head_off = dispatch_model(tiny_bert(), dict(cpu, classifier="disk"), "cpu", offload_dir=tmp_path / "a")
    with pytest.raises(ValueError, match=r"trainable tensors are offloaded by the device map \(e\.g\. '.*classifier"):
        SnakeTrainer(head_off, args, train_dataset=cls_dataset(n=16), peft_config=LoraConfig(**peft))
    encoder_off = dispatch_model(tiny_bert(), cpu, "cpu", offload_dir=tmp_path / "b")
    trainer = SnakeTrainer(encoder_off, args, train_dataset=cls_dataset(n=16), peft_config=LoraConfig(**peft))
    trainer.train()
    assert len(trainer.snake_report.stages) == 4


def test_initialisations_that_read_the_base_are_refused_over_an_offloaded_base(tmp_path, saved_llama):
    from peft import LoraConfig

    from conftest import lm_dataset
    from snake_hf import SnakeTrainer

    args = SnakeConfig(str(tmp_path / "run"), num_nodes=2, num_block_groups=2, **QUIET)
    peft = LoraConfig(**TWO_TARGETS, init_lora_weights="pissa")
    with pytest.raises(ValueError, match=r"`init_lora_weights` is 'pissa' and the model's device map offloads"):
        SnakeTrainer(_offloaded(saved_llama, tmp_path), args, train_dataset=lm_dataset(n=8), peft_config=peft)


def test_meta_tensors_with_no_stored_values_are_refused(tmp_path):
    from accelerate import init_empty_weights
    from transformers import LlamaForCausalLM

    from _matrix import tiny_llama
    from conftest import lm_dataset
    from snake_hf import SnakeTrainer

    with init_empty_weights():
        model = LlamaForCausalLM(tiny_llama().config)
    args = SnakeConfig(str(tmp_path / "run"), num_nodes=2, num_block_groups=2, **QUIET)
    with pytest.raises(ValueError, match=r"on the meta device with no stored values .* never loaded"):
        SnakeTrainer(model, args, train_dataset=lm_dataset(n=8), peft_config=__import__("peft").LoraConfig(r=4))


# ---- scripts/gpu_check.py: no GPU here, so its checks run on CPU at tiny sizes (--cpu-dry-run) ----


def test_gpu_check_script_parses():
    import subprocess
    from pathlib import Path

    script = Path(__file__).parents[1] / "scripts" / "gpu_check.sh"
    assert subprocess.run(["bash", "-n", str(script)]).returncode == 0


@pytest.mark.slow
def test_gpu_check_cpu_dry_run_passes_every_check():
    """Every check's code runs (a CPU stands in for the GPU; QLoRA skips without bitsandbytes)."""
    from pathlib import Path

    from conftest import load_script

    gpu_check = load_script(Path(__file__).parents[1] / "scripts" / "gpu_check.py")
    lines = gpu_check.run_checks(dry=True)
    assert list(lines) == list(gpu_check.CHECKS)
    failed = [line for line in lines.values() if "FAIL" in line]
    assert not failed, failed
