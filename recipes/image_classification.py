"""Snake Learning's vision case: a VGG-11-style CNN trained from scratch with Snake in full-parameter mode.

Every node keeps its shard of the training images; the model's six blocks (five conv stages and the classifier,
`block_list_path="stages"`) are cut into groups, and each stage trains one group on one node, handing the group's
weights and batch-norm statistics on to the next node. Prints held-out accuracy before and after, the accuracy after
every stage and the per-stage table, and writes the model, `snake_plan.json`, `snake_report.json`, `results.json`
and plots to `output_dir`.

Run:
    python recipes/image_classification.py recipes/configs/tiny_image_classification.yaml       # seconds
    python recipes/image_classification.py recipes/configs/fashion_mnist_iid.yaml                # GPU, or add:
        --model_preset small                                                                     # minutes on a CPU
    python recipes/image_classification.py recipes/configs/fashion_mnist_dirichlet.yaml --partition_alpha 0.5
    # The paper's setting, with CIFAR-10 as PNG folders (train/<class>/*.png, test/<class>/*.png):
    python recipes/image_classification.py recipes/configs/fashion_mnist_iid.yaml \
        --image_folder cifar10/train --eval_image_folder cifar10/test --in_channels 3

Fashion-MNIST comes from Debian: `bash scripts/install_assets.sh fashion_mnist` (`apt-get install -y
dataset-fashion-mnist`). With no arguments it runs recipes/configs/fashion_mnist_iid.yaml. `--help` lists Snake's
options first, `--help-all` every option.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import datasets
from transformers import set_seed

from snake_hf import SnakeConfig, SnakeTrainer
from snake_hf.data.summary import plot_shards
from snake_hf.recipes import compare_metrics
from snake_hf.recipes.cli import parse_recipe_args, run_recipe
from snake_hf.recipes.metrics import classification_compute_metrics
from snake_hf.recipes.vision import (
    BLOCK_LIST_PATH,
    VGG11,
    AccuracyCurveCallback,
    load_image_folder,
    stage_end_steps,
    synthetic_image_dataset,
)


@dataclass
class ImageClassificationArguments:
    """Data and model of the recipe (Snake and training settings are `SnakeConfig`'s).

    Args:
        dataset (`str`, defaults to `"fashion_mnist"`): `"fashion_mnist"` or `"synthetic"`; `image_folder` overrides.
        image_folder (`str`, *optional*): a torchvision-style folder `<class_name>/*.png` (e.g. CIFAR-10's train set).
        eval_image_folder (`str`, *optional*): the held-out folder; without it `eval_size` images are held out.
        eval_size (`int`, defaults to 1000): held-out images (synthetic data, or `image_folder` alone).
        train_limit (`int`, *optional*), eval_limit (`int`, *optional*): keep only the first images of each split.
        synthetic_examples (`int`, defaults to 256), synthetic_classes (`int`, defaults to 10): synthetic data size.
        model_preset (`str`, defaults to `"vgg11"`): `"vgg11"` (9.2M), `"small"` (0.58M) or `"tiny"` (10k).
        width_multiplier (`float`, *optional*): overrides the preset's width.
        in_channels (`int`, *optional*): 1 or 3; defaults to 3 for `image_folder`, else 1.
        batch_norm (`bool`, defaults to `True`): batch norm after every convolution.
        eval_every_stage (`bool`, defaults to `True`): measure held-out accuracy after every stage.
        plots (`bool`, defaults to `True`): write `snake_report.png` and `shards.png`.
    """

    dataset: str = field(default="fashion_mnist", metadata={"help": "'fashion_mnist' or 'synthetic'."})
    image_folder: str | None = field(default=None, metadata={"help": "Training images as <class_name>/*.png."})
    eval_image_folder: str | None = field(default=None, metadata={"help": "Held-out images as <class_name>/*.png."})
    eval_size: int = field(default=1000, metadata={"help": "Held-out images when no held-out set is given."})
    train_limit: int | None = field(default=None, metadata={"help": "Keep only the first training images."})
    eval_limit: int | None = field(default=None, metadata={"help": "Keep only the first held-out images."})
    synthetic_examples: int = field(default=256, metadata={"help": "Size of the synthetic data set."})
    synthetic_classes: int = field(default=10, metadata={"help": "Classes of the synthetic data set."})
    model_preset: str = field(default="vgg11", metadata={"help": "'vgg11', 'small' or 'tiny'."})
    width_multiplier: float | None = field(default=None, metadata={"help": "Overrides the preset's width."})
    in_channels: int | None = field(default=None, metadata={"help": "1 or 3 (default: 3 for image_folder, else 1)."})
    batch_norm: bool = field(default=True, metadata={"help": "Batch norm after every convolution."})
    eval_every_stage: bool = field(default=True, metadata={"help": "Held-out accuracy after every stage."})
    plots: bool = field(default=True, metadata={"help": "Write snake_report.png and shards.png."})


def load_data(script: ImageClassificationArguments, seed: int) -> tuple[datasets.Dataset, datasets.Dataset]:
    """The training and held-out sets the arguments name."""
    if script.image_folder is not None:
        channels = script.in_channels or 3
        train = load_image_folder(script.image_folder, in_channels=channels, limit=script.train_limit)
        if script.eval_image_folder is None:
            split = train.train_test_split(test_size=script.eval_size, seed=seed, stratify_by_column="labels")
            return split["train"], split["test"]
        names = train.features["labels"].names
        test = load_image_folder(
            script.eval_image_folder, in_channels=channels, class_names=names, limit=script.eval_limit
        )
        return train, test
    if script.dataset == "fashion_mnist":
        from snake_hf.recipes.assets import (
            load_fashion_mnist,  # raises with `apt-get install -y dataset-fashion-mnist`
        )

        return load_fashion_mnist("train", script.train_limit), load_fashion_mnist("test", script.eval_limit)
    if script.dataset == "synthetic":
        data = synthetic_image_dataset(
            script.synthetic_examples + script.eval_size, script.synthetic_classes, script.in_channels or 1, seed=seed
        )
        return data.select(range(script.synthetic_examples)), data.select(range(script.synthetic_examples, len(data)))
    raise ValueError(f"`dataset` ({script.dataset!r}) must be 'fashion_mnist' or 'synthetic', or pass --image_folder.")


def build_model(script: ImageClassificationArguments, num_classes: int, in_channels: int, seed: int) -> VGG11:
    set_seed(seed)  # the same initial weights on every node (and in every engine)
    overrides = {} if script.width_multiplier is None else {"width_multiplier": script.width_multiplier}
    return VGG11.from_preset(
        script.model_preset,
        num_classes=num_classes,
        in_channels=in_channels,
        batch_norm=script.batch_norm,
        **overrides,
    )


def check_full_mode(args: SnakeConfig) -> None:
    if args.train_mode != "full" or args.block_list_path != BLOCK_LIST_PATH:
        raise ValueError(
            f"This recipe trains the CNN from scratch in full mode: set `train_mode` to 'full' (got "
            f"{args.train_mode!r}) and `block_list_path` to {BLOCK_LIST_PATH!r} (got {args.block_list_path!r})."
        )


def print_summary(trainer: SnakeTrainer, results: dict, before: dict, after: dict) -> None:
    if trainer.shard_summary is not None:
        print("\nNode shards:\n" + trainer.shard_summary.to_markdown())
    print("\nPer stage:\n" + trainer.snake_report.to_markdown())
    if results["accuracy_curve"]:
        print("\n| after step | held-out accuracy |\n| ---: | ---: |")
        for step, accuracy in results["accuracy_curve"]:
            print(f"| {step} | {accuracy:.4f} |")
    print(
        "\nHeld-out set, before and after:\n"
        + compare_metrics(before, after, ["eval_accuracy", "eval_f1", "eval_loss"])
    )
    print(f"\n{results['num_stages']} stages, {results['total_bytes']:,} bytes moved between nodes.")


# What runs with no arguments: the paper's CNN case on Fashion-MNIST (offline asset).
DEFAULT_CONFIG = Path(__file__).resolve().parent / "configs" / "fashion_mnist_iid.yaml"


def main(argv: list[str] | None = None) -> dict:
    """Runs the recipe; returns the results written to `output_dir/results.json`."""
    script, args = parse_recipe_args(
        [ImageClassificationArguments, SnakeConfig], argv, description=__doc__, default_config=DEFAULT_CONFIG
    )
    check_full_mode(args)
    train, test = load_data(script, args.seed)
    in_channels = int(train[0]["pixel_values"].shape[0])
    num_classes = train.features["labels"].num_classes
    model = build_model(script, num_classes, in_channels, args.seed)
    trainer = SnakeTrainer(
        model, args, train_dataset=train, eval_dataset=test, compute_metrics=classification_compute_metrics()
    )
    curve = None
    if script.eval_every_stage:
        curve = AccuracyCurveCallback(test, stage_end_steps(trainer.plan), args.per_device_eval_batch_size)
        trainer.add_callback(curve)
    before = trainer.evaluate()
    output = trainer.train()
    after = trainer.evaluate()
    report = trainer.snake_report
    results = {
        "accuracy_before": before["eval_accuracy"],
        "accuracy_after": after["eval_accuracy"],
        "f1_before": before["eval_f1"],
        "f1_after": after["eval_f1"],
        "eval_loss_before": before["eval_loss"],
        "eval_loss_after": after["eval_loss"],
        "train_loss": output.training_loss,
        "stage_losses": [record.train_loss for record in report.stages],
        "accuracy_curve": [list(point) for point in curve.curve] if curve is not None else [],
        "num_stages": len(trainer.plan),
        "total_steps": trainer.total_steps,
        "total_bytes": report.total_bytes,
        "tensor_bytes": sum(hop.tensor_nbytes for hop in report.hops),
        "part_nbytes": report.part_nbytes,
        "shard_sizes": report.shard_sizes,
        "peak_memory_per_node": {str(k): v for k, v in report.peak_memory_per_node().items()},
        "peak_above_model_per_node": {str(k): v for k, v in report.peak_above_model_per_node().items()},
        "output_dir": args.output_dir,
    }
    trainer.save_model(args.output_dir)
    folder = Path(args.output_dir)
    (folder / "results.json").write_text(json.dumps(results, indent=2))
    if script.plots:
        report.plot(folder)
        if trainer.shard_summary is not None:
            alpha = f", α={args.partition_alpha:g}" if args.partition == "dirichlet" else ""
            names = train.features["labels"].names
            plot_shards(
                trainer.shard_summary, folder / "shards.png", title=f"{args.partition} split{alpha}", label_names=names
            )
    print_summary(trainer, results, before, after)
    return results


if __name__ == "__main__":
    run_recipe(main)
