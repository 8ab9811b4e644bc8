"""The numbered examples run: 01-03 as subprocesses (as a user runs them), 04 in-process as one simulated run."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest


EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def _load(name: str):
    spec = importlib.util.spec_from_file_location(f"example_{name}", EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("script", ["01_simulate_nodes", "02_custom_groups", "03_full_mode_cnn"])
def test_example_runs_as_a_script(tmp_path, script):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "2", "TOKENIZERS_PARALLELISM": "false"}
    result = subprocess.run(
        [sys.executable, str(EXAMPLES / f"{script}.py")],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "bytes moved in all" in result.stdout  # the per-stage table was printed


def test_examples_readme_lists_every_example():
    readme = (EXAMPLES / "README.md").read_text()
    scripts = sorted(p.name for p in EXAMPLES.glob("[0-9][0-9]_*.py"))
    assert scripts and all(f"`{name}`" in readme for name in scripts)


def test_distributed_example_runs_as_one_simulated_process(tmp_path, monkeypatch):
    for variable in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(variable, raising=False)
    results = _load("04_distributed_launch").main(["--output_dir", str(tmp_path)])
    assert results["world_size"] == 1 and results["stages"] == 2 * 2  # 2 simulated nodes x 2 groups
    assert results["total_bytes"] > 0 and (tmp_path / "adapter_model.safetensors").is_file()


def test_custom_groups_example_uses_its_boundaries_and_plan(tmp_path):
    results = _load("02_custom_groups").main(str(tmp_path))
    assert results == {"boundaries": [0, 1, 4], "stages": 3}


def test_resume_example_finishes_the_plan_with_the_uninterrupted_adapters(tmp_path):
    results = _load("05_resume").main(str(tmp_path))
    assert results == {"global_step": 12, "identical": True}
