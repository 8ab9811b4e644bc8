"""Stage checkpoints: written to a temporary folder and renamed into place, so a kill mid-write never leaves a
checkpoint that resume would trust.

A checkpoint `checkpoint-<global step>` is taken at a stage boundary, after the stage's versions are recorded and
before its payload is handed on. It holds every part's tensors, the version vectors, the plan position (and
with it the learning-rate schedule's, a function of the global step), every node's RNG stream and the report so far
(a new stage starts with a fresh optimizer, so there is no optimizer state to keep) — plus a standard adapter (or model) folder
and `trainer_state.json`, so it also loads with plain PEFT and `Trainer`.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file


__all__ = ["CheckpointError", "StageCheckpoint", "latest_checkpoint", "rotate_checkpoints", "write_atomically"]

STATE_FILE = "snake_state.json"
PARTS_FILE = "snake_parts.safetensors"
RNG_FILE = "snake_rng.safetensors"
START_FILE = "snake_stage_start.safetensors"  # only in a checkpoint inside a stage whose objective keeps start values
FORMAT = 2  # 2: the run's signature and id (a checkpoint resumes only the run that wrote it)
_NAME = re.compile(r"^checkpoint-(\d+)$")


class CheckpointError(ValueError):
    """A checkpoint is missing, incomplete, damaged or from another run; nothing was restored."""


@dataclass
class StageCheckpoint:
    """What a stage checkpoint restores.

    Args:
        state (`dict`): JSON-able: `next_stage`, `global_step`, `plan`, `fingerprint`, `versions`, `checksums`,
            `report`, `rank`, `failures`, `run_id` and `signature` (see `snake_hf.trainer.resume`).
        parts (`dict[str, torch.Tensor]`): every part's tensors, by the trained model's tensor names.
        rng (`dict[int, torch.Tensor]`): each node's CPU RNG state.
        stage_start (`dict[str, torch.Tensor]`): inside a stage, the values it started from that its objective keeps
            (distillation's teacher, the proximal term's anchor; see `StageObjective.start_values`), else empty.
    """

    state: dict
    parts: dict[str, torch.Tensor]
    rng: dict[int, torch.Tensor]
    stage_start: dict[str, torch.Tensor] = field(default_factory=dict)

    def save(self, folder: Path) -> None:
        save_file(_on_host(self.parts), str(folder / PARTS_FILE))
        save_file({f"node_{node}": state for node, state in self.rng.items()}, str(folder / RNG_FILE))
        if self.stage_start:
            save_file(_on_host(self.stage_start), str(folder / START_FILE))
        (folder / STATE_FILE).write_text(json.dumps({"format": FORMAT, **self.state}, default=str))  # last: complete

    @classmethod
    def load(cls, folder: str | os.PathLike) -> StageCheckpoint:
        folder = Path(folder)
        if not folder.is_dir():
            raise CheckpointError(f"Checkpoint folder {folder} does not exist; pass an existing checkpoint-N folder.")
        missing = [f for f in (STATE_FILE, PARTS_FILE, RNG_FILE) if not (folder / f).is_file()]
        if missing:
            raise CheckpointError(
                f"Checkpoint {folder} is incomplete (missing {missing}); it was not written by a finished stage "
                "checkpoint. Resume from an earlier checkpoint-N, or start again."
            )
        try:
            state = json.loads((folder / STATE_FILE).read_text())
            parts = load_file(str(folder / PARTS_FILE))
            rng = {int(k.removeprefix("node_")): v for k, v in load_file(str(folder / RNG_FILE)).items()}
            stage_start = load_file(str(folder / START_FILE)) if (folder / START_FILE).is_file() else {}
        except (OSError, ValueError, RuntimeError, SafetensorError, EOFError) as error:
            raise CheckpointError(
                f"Checkpoint {folder} is damaged ({type(error).__name__}: {error}); resume from an earlier "
                "checkpoint-N, or start again."
            ) from error
        if state.get("format") != FORMAT:
            raise CheckpointError(
                f"Checkpoint {folder} has format {state.get('format')}; this snake_hf reads {FORMAT}. Resume it with "
                "the snake_hf version that wrote it, or start again."
            )
        return cls(state=state, parts=parts, rng=rng, stage_start=stage_start)


def _on_host(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {name: t.detach().contiguous().cpu() for name, t in tensors.items()}


def write_atomically(output_dir: str | os.PathLike, step: int, write) -> Path:
    """Calls `write(tmp_folder)`, then renames the folder to `checkpoint-<step>`: all of it, or nothing."""
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    for stale in output_dir.glob(".tmp-checkpoint-*"):  # left by a process killed mid-write
        shutil.rmtree(stale, ignore_errors=True)
    tmp = output_dir / f".tmp-checkpoint-{step}-{os.getpid()}"
    tmp.mkdir()
    write(tmp)
    final = output_dir / f"checkpoint-{step}"
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    return final


def _checkpoints(output_dir: Path) -> list[tuple[int, Path]]:
    found = []
    for path in output_dir.glob("checkpoint-*") if output_dir.is_dir() else ():
        match = _NAME.match(path.name)
        if match and (path / STATE_FILE).is_file():
            found.append((int(match.group(1)), path))
    return sorted(found)


def latest_checkpoint(output_dir: str | os.PathLike) -> Path | None:
    """The newest complete stage checkpoint in `output_dir` (None when there is none)."""
    found = _checkpoints(Path(output_dir))
    return found[-1][1] if found else None


def rotate_checkpoints(output_dir: str | os.PathLike, limit: int | None) -> None:
    """Deletes the oldest stage checkpoints beyond `limit` (`save_total_limit`)."""
    if not limit:
        return
    for _, path in _checkpoints(Path(output_dir))[:-limit]:
        shutil.rmtree(path, ignore_errors=True)
