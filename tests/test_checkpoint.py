"""Stage checkpoints: atomic writes, resume after a real SIGKILL to bit-identical adapters, refusal of damage."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from peft import LoraConfig
from safetensors.torch import load_file

from conftest import lm_dataset, tiny_gpt2
from snake_hf import SnakeConfig, SnakeTrainer
from snake_hf.checkpoint import PARTS_FILE, STATE_FILE, CheckpointError, latest_checkpoint, write_atomically


HERE = Path(__file__).parent


def _run(out: Path, *args: str) -> subprocess.CompletedProcess:
    command = [sys.executable, str(HERE / "_resume_run.py"), str(out), *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=300)


@pytest.mark.slow
def test_sigkill_mid_stage_then_resume_gives_bit_identical_adapters(tmp_path):
    whole, crashed = tmp_path / "whole", tmp_path / "crashed"
    done = _run(whole, "run")
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    killed = _run(crashed, "run", "8")  # stages of 3 steps: step 8 is inside the third stage
    assert killed.returncode == -signal.SIGKILL
    assert latest_checkpoint(crashed).name == "checkpoint-6"  # the last stage boundary before the kill
    assert not (crashed / "final.safetensors").exists()
    resumed = _run(crashed, "resume")
    assert resumed.returncode == 0, resumed.stdout[-2000:] + resumed.stderr[-2000:]
    a, b = load_file(str(whole / "final.safetensors")), load_file(str(crashed / "final.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    report_a = json.loads((whole / "final_report.json").read_text())
    report_b = json.loads((crashed / "final_report.json").read_text())
    assert [s["train_loss"] for s in report_a["stages"]] == [s["train_loss"] for s in report_b["stages"]]
    assert report_a["link_bytes"] == report_b["link_bytes"]
    assert len(list(crashed.glob("checkpoint-*"))) <= 2, "save_total_limit is honoured"


def _trained_with_checkpoints(tmp_path) -> SnakeTrainer:
    trainer = _fresh(tmp_path)
    trainer.train()
    return trainer


def _fresh(tmp_path) -> SnakeTrainer:
    args = SnakeConfig(
        output_dir=str(tmp_path), num_nodes=2, num_block_groups=2, stage_steps=2, per_device_train_batch_size=4,
        save_strategy="steps", report_to="none", use_cpu=True, disable_tqdm=True, seed=0,
    )  # fmt: skip
    lora = LoraConfig(r=2, target_modules=["c_attn"], task_type="CAUSAL_LM")
    return SnakeTrainer(tiny_gpt2(), args, train_dataset=lm_dataset(), peft_config=lora)


def test_stage_checkpoints_are_written_at_stage_boundaries_and_load_with_peft(tmp_path):
    _trained_with_checkpoints(tmp_path)
    names = sorted(p.name for p in tmp_path.glob("checkpoint-*"))
    assert names == ["checkpoint-2", "checkpoint-4", "checkpoint-6"]  # 4 stages x 2 steps; none after the last
    for name in names:
        assert (tmp_path / name / STATE_FILE).is_file() and (tmp_path / name / "adapter_model.safetensors").is_file()


def test_truncated_checkpoint_file_is_refused_naming_the_checkpoint(tmp_path):
    _trained_with_checkpoints(tmp_path)
    parts = latest_checkpoint(tmp_path) / PARTS_FILE
    parts.write_bytes(parts.read_bytes()[: parts.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="damaged"):
        _fresh(tmp_path).train(resume_from_checkpoint=True)


def test_tampered_checkpoint_tensors_fail_their_checksums(tmp_path):
    from safetensors.torch import save_file

    _trained_with_checkpoints(tmp_path)
    parts = latest_checkpoint(tmp_path) / PARTS_FILE
    tensors = load_file(str(parts))
    first = sorted(tensors)[0]
    tensors[first] = tensors[first] + 1.0
    save_file(tensors, str(parts))
    with pytest.raises(CheckpointError, match="checksums"):
        _fresh(tmp_path).train(resume_from_checkpoint=True)


def test_a_folder_killed_mid_write_is_never_trusted(tmp_path):
    def crash(folder: Path) -> None:
        (folder / PARTS_FILE).write_bytes(b"half")
        raise KeyboardInterrupt  # the process dies before the rename

    with pytest.raises(KeyboardInterrupt):
        write_atomically(tmp_path, 7, crash)
    assert latest_checkpoint(tmp_path) is None and not (tmp_path / "checkpoint-7").exists()


def test_resume_without_a_checkpoint_says_so(tmp_path):
    with pytest.raises(CheckpointError, match="No complete stage checkpoint"):
        _fresh(tmp_path).train(resume_from_checkpoint=True)
