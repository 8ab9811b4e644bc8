"""The vision case: VGG-11 in full-parameter mode (weights and batch-norm statistics per group), image loading, recipe."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import TrainerCallback, set_seed

import snake_hf.engine.relay
from snake_hf import SnakeTrainer
from snake_hf.recipes.vision import (
    BLOCK_LIST_PATH,
    VGG11,
    AccuracyCurveCallback,
    classification_accuracy,
    load_image_folder,
    stage_end_steps,
    synthetic_image_dataset,
)


REPO = Path(__file__).resolve().parents[1]
TINY_RECIPE_CONFIG = REPO / "recipes" / "configs" / "tiny_image_classification.yaml"


@pytest.fixture(autouse=True)
def _one_thread():
    # Tiny convolutions run fastest on one thread; with two threads on a busy 2-core machine, OpenMP's spin-waiting
    # can cost a second per step. The pinned losses below were measured with one thread.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_vgg(seed: int = 0, num_classes: int = 3) -> VGG11:
    set_seed(seed)
    return VGG11.from_preset("tiny", num_classes=num_classes)


def full_args(snake_args, **overrides):
    base = dict(
        num_nodes=2,
        num_block_groups=3,
        stage_steps=2,
        train_mode="full",
        block_list_path=BLOCK_LIST_PATH,
        partition_label_column="labels",
        per_device_train_batch_size=8,
    )
    return snake_args(**{**base, **overrides})


# ---- the model ----


@pytest.mark.parametrize(
    "preset,channels,num_params",
    [("tiny", (4, 8, 8, 16, 16), 9_894), ("small", (16, 32, 64, 128, 128), 578_810), ("vgg11", None, 9_227_210)],
    ids=["tiny", "small", "vgg11"],
)
def test_vgg11_presets_have_six_blocks_and_vgg11_widths(preset, channels, num_params):
    model = VGG11.from_preset(preset)
    assert len(model.stages) == 6
    assert model.channels == (channels or (64, 128, 256, 512, 512))
    assert sum(p.numel() for p in model.parameters()) == num_params
    convs = [sum(isinstance(m, torch.nn.Conv2d) for m in stage.modules()) for stage in model.stages]
    assert convs == [1, 1, 2, 2, 2, 0], "VGG-11 (configuration A): 8 convolutions in five stages"


def test_vgg11_forward_takes_hf_batches_and_returns_loss_and_logits():
    model = VGG11.from_preset("tiny", num_classes=5, in_channels=3)
    labels = torch.tensor([0, 4])
    out = model(pixel_values=torch.randn(2, 3, 32, 32), labels=labels)
    assert out.logits.shape == (2, 5)
    assert torch.allclose(out.loss, torch.nn.functional.cross_entropy(out.logits, labels))
    assert model(pixel_values=torch.randn(2, 3, 32, 32)).loss is None


def test_vgg11_without_batch_norm_has_no_buffers_and_conv_biases():
    model = VGG11.from_preset("tiny", batch_norm=False)
    assert list(model.buffers()) == []
    assert all(m.bias is not None for m in model.modules() if isinstance(m, torch.nn.Conv2d))


@pytest.mark.parametrize("width", [0, (4, 8, 8, 16)], ids=["zero-multiplier", "four-widths"])
def test_vgg11_refuses_bad_widths(width):
    with pytest.raises(ValueError, match="width_multiplier"):
        VGG11(width_multiplier=width)


# ---- full mode through SnakeTrainer ----


class _StageSnapshots(TrainerCallback):
    """The model's whole state_dict at the start and after every stage."""

    def __init__(self, ends):
        self.ends = set(ends)
        self.snapshots = []

    def _snap(self, model):
        self.snapshots.append({n: t.detach().clone() for n, t in model.state_dict().items()})

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self._snap(model)

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if state.global_step in self.ends:
            self._snap(model)


def _group_tensor_names(model: VGG11, blocks: range) -> set[str]:
    prefixes = tuple(f"{BLOCK_LIST_PATH}.{b}." for b in blocks)
    named = list(model.named_parameters()) + list(model.named_buffers())
    return {name for name, _ in named if name.startswith(prefixes)}


def test_full_mode_stage_changes_only_its_groups_weights_and_batchnorm_statistics(snake_args):
    data = synthetic_image_dataset(48, num_classes=3)
    trainer = SnakeTrainer(tiny_vgg(), full_args(snake_args), train_dataset=data)
    snaps = _StageSnapshots(stage_end_steps(trainer.plan))
    trainer.add_callback(snaps)
    trainer.train()
    every = set(snaps.snapshots[0])
    assert {s.group for s in trainer.plan} == {0, 1, 2}
    for stage, before, after in zip(trainer.plan, snaps.snapshots, snaps.snapshots[1:]):
        own = _group_tensor_names(trainer.model, trainer.groups.blocks_of(stage.group))
        changed = {n for n in every if not torch.equal(before[n], after[n])}
        assert changed == own, f"stage {stage.index} (group {stage.group}): exactly the group's tensors move"
        statistics = {n for n in own if "running_" in n or "num_batches_tracked" in n}
        assert statistics, "the group has batch-norm statistics, and they moved with it"


def test_full_mode_hops_carry_exactly_the_groups_parameters_and_buffers(snake_args, monkeypatch):
    carried = []
    encode = snake_hf.engine.relay.encode_payload

    def recording_encode(payload, part_of):
        carried.append((sorted(payload.manifest["parts"]), set(payload.tensors)))
        return encode(payload, part_of)

    monkeypatch.setattr(snake_hf.engine.relay, "encode_payload", recording_encode)
    data = synthetic_image_dataset(48, num_classes=3)
    trainer = SnakeTrainer(tiny_vgg(), full_args(snake_args, num_nodes=3), train_dataset=data)
    trainer.train()
    report, part_map, model = trainer.snake_report, trainer.part_map, trainer.model
    state = model.state_dict()
    for group in range(trainer.groups.num_groups):
        names = _group_tensor_names(model, trainer.groups.blocks_of(group))
        assert set(part_map.tensor_names(f"g{group}")) == names, "a part is its group's parameters and buffers"
        assert report.part_nbytes[f"g{group}"] == sum(state[n].numel() * state[n].element_size() for n in names)
    assert len(report.hops) == len(carried) > 0
    for hop, (parts, tensors) in zip(report.hops, carried):
        assert hop.parts == parts
        assert tensors == {n for p in parts for n in part_map.tensor_names(p)}
        assert hop.tensor_nbytes == sum(report.part_nbytes[p] for p in parts)


def test_accuracy_curve_records_every_stage_end_without_changing_training(snake_args):
    data = synthetic_image_dataset(64, num_classes=3).train_test_split(test_size=16, seed=0)
    losses = []
    for with_curve in (False, True):
        trainer = SnakeTrainer(tiny_vgg(), full_args(snake_args), train_dataset=data["train"])
        curve = AccuracyCurveCallback(data["test"], stage_end_steps(trainer.plan), batch_size=5)
        if with_curve:
            trainer.add_callback(curve)
        trainer.train()
        losses.append([r.train_loss for r in trainer.snake_report.stages])
    assert losses[0] == losses[1], "measuring accuracy between steps leaves the run bit-identical"
    assert [step for step, _ in curve.curve] == [0, *stage_end_steps(trainer.plan)]
    assert curve.curve[-1][1] == classification_accuracy(trainer.model, data["test"])


# ---- data ----


def _write_png(path: Path, size: tuple[int, int], mode: str, value: int) -> None:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, value if mode == "L" else (value, value, value)).save(path)


@pytest.fixture
def image_folder(tmp_path):
    root = tmp_path / "images"
    _write_png(root / "cat" / "a.png", (28, 28), "L", 255)  # smaller: padded
    _write_png(root / "cat" / "b.png", (32, 32), "RGB", 0)
    _write_png(root / "dog" / "c.png", (64, 32), "RGB", 255)  # larger: shrunk to 32x16, then padded
    (root / "dog" / "notes.txt").write_text("not an image")
    return root


@pytest.mark.parametrize("in_channels", [1, 3], ids=["grayscale", "rgb"])
def test_image_folder_loads_classes_resized_and_padded_to_32(image_folder, in_channels):
    data = load_image_folder(image_folder, in_channels=in_channels)
    assert data.features["labels"].names == ["cat", "dog"]
    assert data[:]["labels"].tolist() == [0, 0, 1]
    pixels = data[:]["pixel_values"]
    assert pixels.shape == (3, in_channels, 32, 32) and pixels.dtype == torch.float32
    padded = pixels[0, 0]  # white 28x28 in the centre, black border; normalised to [-1, 1]
    assert torch.all(padded[2:30, 2:30] == 1.0) and torch.all(padded[:2] == -1.0) and torch.all(padded[:, 30:] == -1.0)
    shrunk = pixels[2, 0]
    assert torch.all(shrunk[8:24] == 1.0) and torch.all(shrunk[:8] == -1.0) and torch.all(shrunk[24:] == -1.0)


def test_image_folder_limit_keeps_every_class(image_folder):
    data = load_image_folder(image_folder, in_channels=1, limit=2)
    assert data[:]["labels"].tolist() == [0, 1], "the first cat, then the first dog"


def test_image_folder_keeps_given_class_names_for_a_test_split(image_folder):
    data = load_image_folder(image_folder, in_channels=1, class_names=["dog", "cat", "bird"])
    assert data.features["labels"].names == ["dog", "cat", "bird"]
    assert data[:]["labels"].tolist() == [1, 1, 0]


@pytest.mark.parametrize(
    "layout,error,message",
    [
        ("missing", FileNotFoundError, "does not exist"),
        ("empty", FileNotFoundError, "No images"),
        ("unknown-class", ValueError, "not among `class_names`"),
    ],
    ids=["missing", "empty", "unknown-class"],
)
def test_image_folder_errors_name_the_problem(tmp_path, image_folder, layout, error, message):
    root = {"missing": tmp_path / "nowhere", "empty": tmp_path / "empty", "unknown-class": image_folder}[layout]
    (tmp_path / "empty" / "cat").mkdir(parents=True)
    names = ["cat"] if layout == "unknown-class" else None
    with pytest.raises(error, match=message):
        load_image_folder(root, class_names=names)


def test_synthetic_images_are_seeded_and_labelled():
    a = synthetic_image_dataset(20, num_classes=4, seed=3)[:]
    b = synthetic_image_dataset(20, num_classes=4, seed=3)[:]
    assert torch.equal(a["pixel_values"], b["pixel_values"]) and torch.equal(a["labels"], b["labels"])
    assert a["pixel_values"].shape == (20, 1, 32, 32) and set(a["labels"].tolist()) <= {0, 1, 2, 3}


# ---- the recipe ----


def _load_recipe():
    spec = importlib.util.spec_from_file_location(
        "image_classification_recipe", REPO / "recipes" / "image_classification.py"
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the file runs
    spec.loader.exec_module(module)
    return module


# Measured on CPU (torch 2.13, one thread) with the tiny config's seed; a change here means the run changed.
PINNED_TRAIN_LOSS = 1.3600269291136  # mean training loss over the plan's 18 steps
PINNED_EVAL_LOSS = 1.2836477756500244  # held-out loss after training


def test_recipe_runs_end_to_end_on_its_tiny_config_with_pinned_losses(tmp_path):
    recipe = _load_recipe()
    results = recipe.main([str(TINY_RECIPE_CONFIG), "--output_dir", str(tmp_path / "run")])
    assert results["train_loss"] == pytest.approx(PINNED_TRAIN_LOSS, rel=1e-4)
    assert results["eval_loss_after"] == pytest.approx(PINNED_EVAL_LOSS, rel=1e-4)
    assert results["num_stages"] == 6 and len(results["accuracy_curve"]) == 7
    assert results["stage_losses"][-1] < results["stage_losses"][0]
    for name in ("results.json", "snake_report.json", "snake_plan.json", "snake_report.png", "shards.png"):
        assert (tmp_path / "run" / name).is_file(), name
    assert json.loads((tmp_path / "run" / "results.json").read_text())["total_bytes"] == results["total_bytes"]


def test_recipe_refuses_lora_mode(tmp_path):
    recipe = _load_recipe()
    with pytest.raises(ValueError, match="train_mode"):
        recipe.main([str(TINY_RECIPE_CONFIG), "--output_dir", str(tmp_path), "--train_mode", "lora"])


def test_classification_accuracy_restores_each_modules_mode():
    model = tiny_vgg()
    model.train()
    model.stages[0].eval()
    data = synthetic_image_dataset(10, num_classes=3)
    accuracy = classification_accuracy(model, data, batch_size=4)
    assert 0.0 <= accuracy <= 1.0 and np.isclose(accuracy * 10, round(accuracy * 10))
    assert model.training and not model.stages[0].training and model.stages[1].training
