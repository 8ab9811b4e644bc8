"""A launched rank trains on `cuda:LOCAL_RANK`, alone (no `nn.DataParallel` over the host's GPUs); the CPU path is
unchanged. No GPU needed: the GPU side of `TrainingArguments` and `torch.cuda` are stood in for."""

from __future__ import annotations

import functools

import pytest
import torch
from transformers import TrainingArguments

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
# Blocks 0-1 (group 0) live on disk and load for each forward; the rest stays in CPU memory.
DEVICE_MAP = {
    "model.embed_tokens": "cpu", "model.rotary_emb": "cpu", "model.layers.0": "disk", "model.layers.1": "disk",
    "model.layers.2": "cpu", "model.layers.3": "cpu", "model.norm": "cpu", "lm_head": "cpu",
}  # fmt: skip


def test_a_device_map_that_offloads_weights_is_refused_before_any_work(tmp_path):
    """Offloaded weights are meta placeholders between forwards: no values for checksums, payloads or the base's
    fingerprint. Refused with the fix, before training."""
    from accelerate import dispatch_model
    from test_precision_base import tiny_llama_bf16

    from conftest import lm_dataset
    from snake_hf import SnakeTrainer

    model = dispatch_model(tiny_llama_bf16().float(), DEVICE_MAP, "cpu", offload_dir=tmp_path / "offload")
    assert model.model.layers[0].self_attn.q_proj.weight.is_meta
    args = SnakeConfig(str(tmp_path / "run"), num_nodes=2, num_block_groups=2, train_mode="full", **QUIET)
    with pytest.raises(ValueError, match=r"device map offloads weights \(18 tensors on the meta device"):
        SnakeTrainer(model, args, train_dataset=lm_dataset(n=8))


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
