"""Stage checkpoints: atomic writes, resume after a real SIGKILL to bit-identical adapters, refusal of damage."""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from peft import LoraConfig
from safetensors.torch import load_file

from _matrix import DEFAULT, MATRIX
from conftest import assert_same_run, lm_dataset, tiny_gpt2
from snake_hf import SnakeConfig, SnakeTrainer
from snake_hf.engine.session import Session
from snake_hf.engine.transport import InMemoryTransport
from snake_hf.launch import LaunchInfo
from snake_hf.trainer.checkpoint import PARTS_FILE, STATE_FILE, CheckpointError, latest_checkpoint, write_atomically
from snake_hf.trainer.resume import StageCheckpoints


HERE = Path(__file__).parent


def _run(out: Path, *args: str, config: str = DEFAULT, hash_seed: int = 0) -> subprocess.CompletedProcess:
    command = [sys.executable, str(HERE / "_resume_run.py"), str(out), *args]
    env = dict(os.environ, SNAKE_TEST_CONFIG=config, PYTHONHASHSEED=str(hash_seed))
    return subprocess.run(command, capture_output=True, text=True, timeout=300, env=env)


@pytest.mark.slow
@pytest.mark.parametrize("config", [DEFAULT, *MATRIX])
def test_sigkill_mid_stage_then_resume_gives_bit_identical_adapters(tmp_path, config):
    # Each process has its own PYTHONHASHSEED (a resume in a new process must not depend on a set's order).
    whole, crashed = tmp_path / "whole", tmp_path / "crashed"
    done = _run(whole, "run", config=config, hash_seed=7)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    killed = _run(crashed, "run", "8", config=config, hash_seed=101)  # 3-step stages: step 8 is in the third
    assert killed.returncode == -signal.SIGKILL
    assert latest_checkpoint(crashed).name == "checkpoint-6"  # the last stage boundary before the kill
    assert not (crashed / "final.safetensors").exists()
    resumed = _run(crashed, "resume", config=config, hash_seed=118)
    assert resumed.returncode == 0, resumed.stdout[-2000:] + resumed.stderr[-2000:]
    assert_same_run(whole, crashed)
    assert len(list(crashed.glob("checkpoint-*"))) <= 2, "save_total_limit is honoured"


def _trained_with_checkpoints(tmp_path) -> SnakeTrainer:
    trainer = _fresh(tmp_path)
    trainer.train()
    return trainer


def _fresh(tmp_path, **overrides) -> SnakeTrainer:
    settings = dict(
        output_dir=str(tmp_path), num_nodes=2, num_block_groups=2, stage_steps=2, per_device_train_batch_size=4,
        save_strategy="steps", report_to="none", use_cpu=True, disable_tqdm=True, seed=0, num_train_epochs=1,
    )  # fmt: skip
    args = SnakeConfig(**(settings | overrides))
    lora = LoraConfig(r=2, target_modules=["c_attn"], task_type="CAUSAL_LM")
    return SnakeTrainer(tiny_gpt2(), args, train_dataset=lm_dataset(), peft_config=lora)


def test_stage_checkpoints_are_written_at_stage_boundaries_and_load_with_peft(tmp_path):
    _trained_with_checkpoints(tmp_path)
    names = sorted(p.name for p in tmp_path.glob("checkpoint-*"))
    assert names == ["checkpoint-2", "checkpoint-4", "checkpoint-6", "checkpoint-8"]  # 4 stages x 2 steps, and the end
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


@pytest.fixture(scope="module")
def checkpointed(tmp_path_factory) -> Path:
    """The output_dir of one finished run with stage checkpoints (copy it before changing anything)."""
    out = tmp_path_factory.mktemp("checkpointed")
    _trained_with_checkpoints(out)
    return out


def _copy(checkpointed: Path, tmp_path: Path) -> Path:
    shutil.copytree(checkpointed, tmp_path / "out")
    return tmp_path / "out"


def _edit_state(checkpoint: Path, **changes) -> None:
    state = json.loads((checkpoint / STATE_FILE).read_text())
    for key, value in changes.items():
        target, *path = key.split("__")
        if path:
            state[target][path[0]] = value
        else:
            state[target] = value
    (checkpoint / STATE_FILE).write_text(json.dumps(state))


@pytest.mark.parametrize(("field", "value", "saved"), [("payload_dtype", "bfloat16", "'float32'"), ("seed", 1, "0"),
                         ("lr_schedule_scope", "group", "'run'"), ("proximal_mu", 0.5, "0.0")],
                         ids=["payload_dtype", "seed", "lr_schedule_scope", "proximal_mu"])  # fmt: skip
def test_resume_with_another_run_setting_is_refused_naming_the_field(checkpointed, tmp_path, field, value, saved):
    out = _copy(checkpointed, tmp_path)
    expected = rf"`{field}` = {saved}; this run has {value!r}\. Resume with the same `{field}`, or start a new run"
    with pytest.raises(CheckpointError, match=expected):
        _fresh(out, **{field: value}).train(resume_from_checkpoint=True)


def test_a_checkpoint_from_before_lr_schedule_scope_resumes_as_the_run_scope_it_had(checkpointed, tmp_path):
    out = _copy(checkpointed, tmp_path)
    checkpoint = latest_checkpoint(out)
    state = json.loads((checkpoint / STATE_FILE).read_text())
    del state["signature"]["lr_schedule_scope"]  # written by a version without the field
    (checkpoint / STATE_FILE).write_text(json.dumps(state))
    _fresh(out).train(resume_from_checkpoint=True)
    with pytest.raises(CheckpointError, match=r"`lr_schedule_scope` = 'run'; this run has 'group'"):
        _fresh(out, lr_schedule_scope="group").train(resume_from_checkpoint=True)


def test_a_checkpoint_from_before_proximal_mu_was_signed_resumes_unchecked_on_it_with_a_warning(
    checkpointed, tmp_path, caplog
):
    out = _copy(checkpointed, tmp_path)
    checkpoint = latest_checkpoint(out)
    state = json.loads((checkpoint / STATE_FILE).read_text())
    del state["signature"]["proximal_mu"]  # written when the field existed but was not part of the signature
    (checkpoint / STATE_FILE).write_text(json.dumps(state))
    caplog.set_level(logging.WARNING, logger="snake_hf.trainer.resume")
    _fresh(out, proximal_mu=0.5).train(resume_from_checkpoint=True)
    assert any("did not record ['proximal_mu']" in r.getMessage() for r in caplog.records)


def test_checkpoint_written_after_a_replan_is_refused_naming_the_failed_rank(checkpointed, tmp_path):
    # A cs node failure re-plans the run (snake_hf.engine.coordinator); its later checkpoints follow the effective plan, which a
    # relaunch does not know: resuming them is refused.
    out = _copy(checkpointed, tmp_path)
    _edit_state(latest_checkpoint(out), failures=[{"rank": 1, "stage": 3, "action": "replan"}])
    with pytest.raises(CheckpointError, match=r"re-planned the run \(rank 1 failed first\); resuming a re-planned"):
        _fresh(out).train(resume_from_checkpoint=True)


def _told(next_stage: int = 0, run_id: str | None = "run-a", error: str | None = None) -> dict:
    if error is not None:
        return {"error": error}
    return {"next_stage": next_stage, "path": f"node/checkpoint-{next_stage}" if next_stage else "", "run_id": run_id}


# fmt: off
AGREEMENTS = [  # what ranks 0 and 1 told each other (plan nodes 0 1 1 0) -> the stage the run goes on at, or the error
    ([_told(1), _told(3)], 3),
    ([_told(1), _told(0, None)], 1),
    ([_told(error="Checkpoint c was written by a run with `seed` = 0"), _told(3)],
     r"Rank 0 cannot resume, so the run cannot: Checkpoint c was written by a run with `seed` = 0"),
    ([_told(1, "run-a"), _told(3, "run-b")], r"different runs \(run id: ranks \{'run-a': \[0\], 'run-b': \[1\]\}\)"),
    ([_told(0, None), _told(2)], r"Rank 0 resumes at stage 0 \(no checkpoint\), but the run goes on at stage 2 and "
                                 r"rank 0 trained stage 0 before it"),
    ([_told(0, None), _told(0, None)], "No rank has a complete stage checkpoint"),
]
# fmt: on


@pytest.mark.parametrize(("told", "expected"), AGREEMENTS,
                         ids=["latest", "one-rank-has-none", "error", "two-runs", "missing", "none"])  # fmt: skip
def test_ranks_agree_on_the_resume_stage_or_all_raise_the_same_cause(tmp_path, told, expected):
    trainer = _fresh(tmp_path)
    if isinstance(expected, int):
        assert trainer.checkpoints._agree_on_resume(told) == expected
    else:
        with pytest.raises(CheckpointError, match=expected):
            trainer.checkpoints._agree_on_resume(told)


class _Exchange(InMemoryTransport):
    """The store exchange of a distributed run, seen from one rank: the other ranks already told `others`."""

    def __init__(self, rank: int, others: dict[int, dict]):
        super().__init__()
        self.rank, self.others, self.told = rank, others, []

    def exchange_text(self, name: str, text: str) -> list[str]:
        self.told.append((name, text))
        return [text if r == self.rank else json.dumps(self.others[r]) for r in range(len(self.others) + 1)]


def test_a_rank_that_refuses_its_checkpoint_tells_the_others_why(checkpointed, tmp_path):
    out = _copy(checkpointed, tmp_path)
    (out / "node-1").mkdir()
    shutil.copytree(latest_checkpoint(out), out / "node-1" / "checkpoint-6")
    _edit_state(out / "node-1" / "checkpoint-6", rank=1, signature__seed=7)  # rank 1's checkpoint, of another run
    trainer = _fresh(out)
    launch = LaunchInfo(rank=1, world_size=2, local_rank=1, master_addr="127.0.0.1", master_port=0)
    exchange = _Exchange(1, {0: _told(1)})
    session = Session(launch, num_nodes=2, transport=exchange)  # rank 1 of 2, its store exchange faked
    checkpoints = StageCheckpoints(
        trainer.args, session, trainer.plan, trainer.part_map, trainer._spec, trainer.groups, trainer.node_data
    )
    relay = session.make_relay(trainer.model, trainer.part_map, trainer._spec, trainer.plan, 0, trainer.snake_report)
    with pytest.raises(CheckpointError, match=r"`seed` = 7; this run has 0"):
        checkpoints.resume(True, trainer.model, relay, trainer.snake_report)
    [(name, text)] = exchange.told
    assert name == "resume" and "`seed` = 7; this run has 0" in json.loads(text)["error"]  # the others raise it too
