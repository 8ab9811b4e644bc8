"""Tiny models and datasets built from configs: offline, CPU, seconds."""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path

import datasets
import pytest
import torch
from torch import nn
from transformers import BertConfig, BertForSequenceClassification, GPT2Config, GPT2LMHeadModel, set_seed


os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# One thread: bit-identical results across processes, and no busy-waiting threads on a loaded 2-core machine.
torch.set_num_threads(1)

VOCAB = 64


def load_script(path, name: str | None = None):
    """Imports the script at `path` (a benchmark, recipe or example) as module `name` (default: its file stem), once.

    Its folder goes on `sys.path` (benchmarks import their siblings), and the module is registered in `sys.modules`
    before it runs (dataclasses look their module up while the class is built).
    """
    import importlib.util
    import sys
    from pathlib import Path

    path = Path(path)
    name = name or path.stem
    if name in sys.modules:
        return sys.modules[name]
    if str(path.parent) not in sys.path:
        sys.path.insert(0, str(path.parent))
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def free_port() -> int:
    """A loopback TCP port free a moment ago, for a test's rendezvous store."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def tiny_gpt2(seed: int = 0, n_layer: int = 4) -> GPT2LMHeadModel:
    set_seed(seed)
    return GPT2LMHeadModel(GPT2Config(n_layer=n_layer, n_embd=16, n_head=2, vocab_size=VOCAB, n_positions=32))


def tiny_bert(seed: int = 0, num_labels: int = 2) -> BertForSequenceClassification:
    set_seed(seed)
    config = BertConfig(
        vocab_size=VOCAB,
        hidden_size=16,
        num_hidden_layers=4,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=32,
        num_labels=num_labels,
    )
    return BertForSequenceClassification(config)


def lm_dataset(n: int = 24, length: int = 8, seed: int = 1) -> datasets.Dataset:
    ids = torch.randint(0, VOCAB, (n, length), generator=torch.Generator().manual_seed(seed)).tolist()
    return datasets.Dataset.from_dict({"input_ids": ids, "labels": ids})


def cls_dataset(n: int = 32, length: int = 8, num_labels: int = 2, seed: int = 1) -> datasets.Dataset:
    generator = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, num_labels, (n,), generator=generator)
    ids = torch.randint(4, VOCAB, (n, length), generator=generator)
    ids[:, 0] = labels + 1  # a learnable signal
    return datasets.Dataset.from_dict(
        {"input_ids": ids.tolist(), "attention_mask": torch.ones_like(ids).tolist(), "label": labels.tolist()}
    )


class TinyCNN(nn.Module):
    """Three conv stages and a classifier head: `features` is the block list (block_list_path='features')."""

    def __init__(self, num_classes: int = 3):
        super().__init__()
        self.features = nn.Sequential(
            nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.MaxPool2d(2)),
            nn.Sequential(nn.Conv2d(4, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.MaxPool2d(2)),
            nn.Sequential(nn.Flatten(), nn.Linear(8 * 2 * 2, num_classes)),
        )

    def forward(self, pixel_values, labels=None):
        logits = self.features(pixel_values)
        loss = nn.functional.cross_entropy(logits, labels) if labels is not None else None
        return {"loss": loss, "logits": logits}


def image_dataset(n: int = 24, num_classes: int = 3, seed: int = 1) -> datasets.Dataset:
    generator = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, num_classes, (n,), generator=generator)
    images = torch.randn(n, 1, 8, 8, generator=generator) + labels.view(-1, 1, 1, 1)
    return datasets.Dataset.from_dict({"pixel_values": images.tolist(), "labels": labels.tolist()}).with_format(
        "torch"
    )


@pytest.fixture(autouse=True)
def _fresh_process_launch():
    """Each test reads the launcher's variables afresh (`process_launch` keeps its answer for the process)."""
    from snake_hf.launch import _forget_process_launch

    _forget_process_launch()
    yield
    _forget_process_launch()


@pytest.fixture
def snake_args(tmp_path):
    """SnakeConfig factory with quiet, CPU, deterministic defaults for tests."""
    from snake_hf import SnakeConfig

    def make(**overrides):
        base = dict(
            output_dir=str(tmp_path / "out"),
            per_device_train_batch_size=4,
            learning_rate=1e-2,
            report_to="none",
            use_cpu=True,
            disable_tqdm=True,
            logging_steps=1,
            save_strategy="no",
            seed=0,
            num_train_epochs=1,  # one plan epoch (num_passes passes); Trainer's default is 3
        )
        base.update(overrides)
        return SnakeConfig(**base)

    return make


def losses(trainer) -> list[float]:
    """The training losses a `Trainer` logged, in order."""
    return [h["loss"] for h in trainer.state.log_history if "loss" in h]


def assert_same_state(a: dict, b: dict) -> None:
    """Two state dicts with the same names and bit-identical tensors."""
    assert a.keys() == b.keys()
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, f"tensors differ: {different[:3]}"


def assert_same_run(whole: Path, crashed: Path) -> None:
    """A run resumed after a crash ended as the uninterrupted one: final tensors, per-stage losses, bytes per link."""
    from safetensors.torch import load_file

    assert_same_state(load_file(str(whole / "final.safetensors")), load_file(str(crashed / "final.safetensors")))
    report_a = json.loads((whole / "final_report.json").read_text())
    report_b = json.loads((crashed / "final_report.json").read_text())
    assert [s["train_loss"] for s in report_a["stages"]] == [s["train_loss"] for s in report_b["stages"]]
    assert report_a["link_bytes"] == report_b["link_bytes"]
