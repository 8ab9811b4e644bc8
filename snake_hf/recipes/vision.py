"""Snake Learning's vision case: a VGG-11-style CNN trained from scratch in full-parameter mode, and image data.

The paper trains VGG-11 on CIFAR-10 with Snake in full mode. [`VGG11`] keeps its five conv stages and its classifier
in one `nn.ModuleList` named `stages` (six blocks, `block_list_path="stages"`), and takes Hugging Face-style batches
(`pixel_values`, `labels`) so `Trainer` and [`SnakeTrainer`] use it unchanged. In full mode each block group's
weights *and* batch-norm running statistics form its part and travel with it (`snake_hf.blocks.PartMap`).

Data: [`load_image_folder`] reads a torchvision-style folder (`root/<class_name>/*.png`, e.g. CIFAR-10 exported to
PNG), [`synthetic_image_dataset`] makes seeded, learnable images for tests, and `snake_hf.recipes.assets.load_fashion_mnist`
gives Fashion-MNIST. [`classification_accuracy`] and [`AccuracyCurveCallback`] measure held-out accuracy, the latter
after every stage of a plan.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from pathlib import Path

import datasets
import numpy as np
import torch
from torch import nn
from transformers import TrainerCallback
from transformers.modeling_outputs import ImageClassifierOutput
from transformers.utils import logging

# The arrow-backed builder of `Array3D` image datasets (10x faster than `Dataset.from_dict`); shared with assets.
from .assets import image_dataset


logger = logging.get_logger(__name__)

__all__ = [
    "BLOCK_LIST_PATH",
    "IMAGE_EXTENSIONS",
    "VGG11",
    "VGG11_PRESETS",
    "AccuracyCurveCallback",
    "classification_accuracy",
    "load_image_folder",
    "stage_end_steps",
    "synthetic_image_dataset",
]

BLOCK_LIST_PATH = "stages"
# VGG-11 ("configuration A"): conv widths per stage, convs per stage; each stage ends in a 2x2 max-pool.
VGG11_CHANNELS = (64, 128, 256, 512, 512)
VGG11_CONVS_PER_STAGE = (1, 1, 2, 2, 2)
VGG11_PRESETS: dict[str, dict] = {
    "vgg11": {"width_multiplier": 1.0},  # 9.2M parameters: the paper's model
    "small": {"width_multiplier": 0.25},  # 0.58M: minutes on a CPU
    "tiny": {"width_multiplier": (4, 8, 8, 16, 16)},  # 5.6k: tests
}
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp")


class VGG11(nn.Module):
    """A VGG-11-style CNN for small images (CIFAR-10, Fashion-MNIST padded to 32x32), cut into six blocks.

    `stages[0..4]` are VGG-11's conv stages (1, 1, 2, 2, 2 convolutions of 3x3, each followed by batch norm and ReLU,
    then a 2x2 max-pool); `stages[5]` is the classifier (global average pool, flatten, linear; optionally a hidden
    layer). A 32x32 input leaves a 1x1 map after the five pools, so the pool is the identity there and other sizes
    (at least 32) work too.

    Args:
        num_classes (`int`, defaults to 10): number of classes.
        in_channels (`int`, defaults to 1): 1 for grayscale, 3 for RGB.
        batch_norm (`bool`, defaults to `True`): batch norm after every convolution (convolutions then have no bias).
        width_multiplier (`float` or `Sequence[int]`, defaults to 1.0): scales VGG-11's widths (64, 128, 256, 512, 512),
            or gives the five stage widths outright.
        classifier_hidden (`int`, *optional*): width of a hidden classifier layer (none by default, as in the
            CIFAR variants of VGG).
        dropout (`float`, defaults to 0.0): dropout before each classifier linear layer.

    Example:
        ```python
        >>> model = VGG11.from_preset("tiny", num_classes=10)
        >>> out = model(torch.zeros(2, 1, 32, 32), labels=torch.tensor([0, 1]))
        >>> out.logits.shape, len(model.stages)
        (torch.Size([2, 10]), 6)
        ```
    """

    def __init__(
        self,
        num_classes: int = 10,
        in_channels: int = 1,
        batch_norm: bool = True,
        width_multiplier: float | Sequence[int] = 1.0,
        classifier_hidden: int | None = None,
        dropout: float = 0.0,
    ):
        super().__init__()
        self.channels = _stage_channels(width_multiplier)
        self.num_labels = num_classes
        stages: list[nn.Module] = []
        width = in_channels
        for out, convs in zip(self.channels, VGG11_CONVS_PER_STAGE):
            stages.append(_conv_stage(width, out, convs, batch_norm))
            width = out
        stages.append(_classifier(width, num_classes, classifier_hidden, dropout))
        self.stages = nn.ModuleList(stages)
        self._init_weights()

    @classmethod
    def from_preset(cls, name: str, **kwargs) -> VGG11:
        """Builds a preset of [`VGG11_PRESETS`] (`"vgg11"`, `"small"`, `"tiny"`); `kwargs` override it."""
        if name not in VGG11_PRESETS:
            raise ValueError(f"Unknown VGG11 preset {name!r}; use one of {sorted(VGG11_PRESETS)}.")
        return cls(**{**VGG11_PRESETS[name], **kwargs})

    def _init_weights(self) -> None:
        # torchvision's VGG initialisation.
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.BatchNorm2d):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Linear):
                nn.init.normal_(module.weight, 0, 0.01)
                nn.init.zeros_(module.bias)

    def forward(self, pixel_values: torch.Tensor, labels: torch.Tensor | None = None) -> ImageClassifierOutput:
        """Classifies a batch of images.

        Args:
            pixel_values (`torch.Tensor` of shape `(batch, in_channels, height, width)`): the images.
            labels (`torch.Tensor` of shape `(batch,)`, *optional*): class indices; when given, `loss` is the mean
                cross-entropy.

        Returns:
            `ImageClassifierOutput`: `loss` (or `None`) and `logits` of shape `(batch, num_classes)`.
        """
        hidden = pixel_values
        for stage in self.stages:
            hidden = stage(hidden)
        loss = nn.functional.cross_entropy(hidden, labels) if labels is not None else None
        return ImageClassifierOutput(loss=loss, logits=hidden)


def _stage_channels(width_multiplier: float | Sequence[int]) -> tuple[int, ...]:
    if isinstance(width_multiplier, (int, float)):
        if width_multiplier <= 0:
            raise ValueError(f"`width_multiplier` ({width_multiplier}) must be positive, e.g. 0.25 or 1.0.")
        return tuple(max(1, round(c * width_multiplier)) for c in VGG11_CHANNELS)
    channels = tuple(int(c) for c in width_multiplier)
    if len(channels) != len(VGG11_CHANNELS) or min(channels) < 1:
        raise ValueError(
            f"`width_multiplier` as channels must give {len(VGG11_CHANNELS)} positive stage widths, got {channels}; "
            f"VGG-11's are {VGG11_CHANNELS}."
        )
    return channels


def _conv_stage(in_channels: int, out_channels: int, convs: int, batch_norm: bool) -> nn.Sequential:
    layers: list[nn.Module] = []
    for i in range(convs):
        layers.append(
            nn.Conv2d(in_channels if i == 0 else out_channels, out_channels, 3, padding=1, bias=not batch_norm)
        )
        if batch_norm:
            layers.append(nn.BatchNorm2d(out_channels))
        layers.append(nn.ReLU(inplace=True))
    layers.append(nn.MaxPool2d(2))
    return nn.Sequential(*layers)


def _classifier(in_features: int, num_classes: int, hidden: int | None, dropout: float) -> nn.Sequential:
    layers: list[nn.Module] = [nn.AdaptiveAvgPool2d(1), nn.Flatten()]
    if hidden:
        layers += [nn.Dropout(dropout), nn.Linear(in_features, hidden), nn.ReLU(inplace=True)]
        in_features = hidden
    layers += [nn.Dropout(dropout), nn.Linear(in_features, num_classes)]
    return nn.Sequential(*layers)


# ---- data ----


def load_image_folder(
    root: str | os.PathLike,
    image_size: int = 32,
    in_channels: int = 3,
    mean: Sequence[float] | float = 0.5,
    std: Sequence[float] | float = 0.5,
    class_names: Sequence[str] | None = None,
    limit: int | None = None,
) -> datasets.Dataset:
    """Reads a torchvision `ImageFolder`-style folder (`root/<class_name>/<image>.png`) into a `datasets.Dataset`.

    Classes are the sub-folders in sorted order (or `class_names`, e.g. the training folder's, so a test folder gets
    the same label ids). Each image is converted to grayscale (`in_channels=1`) or RGB (3); a larger image is shrunk
    to fit `image_size` keeping its aspect ratio, and the image is then zero-padded, centred, to a square of
    `image_size`. Pixels are scaled to [0, 1] and normalised with `mean` and `std` (per channel or one value).

    Args:
        root (`str` or `os.PathLike`): the folder.
        image_size (`int`, defaults to 32): side of the square output.
        in_channels (`int`, defaults to 3): 1 (grayscale) or 3 (RGB).
        mean (`float` or `Sequence[float]`, defaults to 0.5), std (`float` or `Sequence[float]`, defaults to 0.5):
            normalisation; the defaults map [0, 1] to [-1, 1]. CIFAR-10's own are (0.4914, 0.4822, 0.4465) and
            (0.2470, 0.2435, 0.2616).
        class_names (`Sequence[str]`, *optional*): the label names in label order; every sub-folder must be one.
        limit (`int`, *optional*): keep only `limit` images: each class's first image (by file name), then each
            class's second, and so on.

    Returns:
        `datasets.Dataset`: `pixel_values` (float32, `(in_channels, image_size, image_size)`) and `labels`
        (`ClassLabel`), formatted for torch.

    Raises:
        `FileNotFoundError`: if `root` does not exist or holds no images in class sub-folders.
        `ValueError`: for `in_channels` other than 1 or 3, or a sub-folder that is not in `class_names`.

    Example:
        ```python
        >>> train = load_image_folder("cifar10/train", in_channels=3)
        >>> test = load_image_folder("cifar10/test", in_channels=3, class_names=train.features["labels"].names)
        ```
    """
    from PIL import Image

    if in_channels not in (1, 3):
        raise ValueError(f"`in_channels` ({in_channels}) must be 1 (grayscale) or 3 (RGB).")
    files, labels, names = _scan_image_folder(Path(root), class_names)
    if limit is not None:  # the first images of every class in turn, so a subset keeps every class
        seen: dict[int, int] = {}
        rank = []
        for label in labels:
            rank.append(seen.get(label, 0))
            seen[label] = rank[-1] + 1
        keep = sorted(range(len(files)), key=lambda i: (rank[i], labels[i]))[:limit]
        files, labels = [files[i] for i in keep], [labels[i] for i in keep]
    mode = "L" if in_channels == 1 else "RGB"
    pixels = np.empty((len(files), in_channels, image_size, image_size), dtype=np.float32)
    for i, path in enumerate(files):
        with Image.open(path) as image:
            pixels[i] = (
                _fit_square(image.convert(mode), image_size).reshape(image_size, image_size, -1).transpose(2, 0, 1)
            )
    pixels /= 255.0
    pixels -= np.broadcast_to(np.asarray(mean, dtype=np.float32), (in_channels,))[:, None, None]
    pixels /= np.broadcast_to(np.asarray(std, dtype=np.float32), (in_channels,))[:, None, None]
    logger.info(f"Read {len(files)} images of {len(names)} classes from {root}")
    return image_dataset(pixels, np.asarray(labels, dtype=np.int64), list(names)).with_format("torch")


def _scan_image_folder(root: Path, class_names: Sequence[str] | None) -> tuple[list[Path], list[int], list[str]]:
    layout = "root/<class_name>/<image>.png, as torchvision's ImageFolder reads"
    if not root.is_dir():
        raise FileNotFoundError(f"Image folder {str(root)!r} does not exist; expected {layout}.")
    folders = sorted(p for p in root.iterdir() if p.is_dir())
    names = list(class_names) if class_names is not None else [p.name for p in folders]
    unknown = [p.name for p in folders if p.name not in names]
    if unknown:
        raise ValueError(f"Class folders {unknown} under {str(root)!r} are not among `class_names` {names}.")
    files, labels = [], []
    for folder in folders:
        images = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS)
        files += images
        labels += [names.index(folder.name)] * len(images)
    if not files:
        raise FileNotFoundError(
            f"No images ({', '.join(IMAGE_EXTENSIONS)}) in class sub-folders of {str(root)!r}; expected {layout}."
        )
    return files, labels, names


def _fit_square(image, size: int) -> np.ndarray:
    """Shrinks `image` to fit a `size` square (keeping its aspect ratio), then zero-pads it there, centred."""
    from PIL import Image

    if image.width > size or image.height > size:
        scale = size / max(image.width, image.height)
        image = image.resize((max(1, round(image.width * scale)), max(1, round(image.height * scale))), Image.BICUBIC)
    canvas = Image.new(image.mode, (size, size))
    canvas.paste(image, ((size - image.width) // 2, (size - image.height) // 2))
    return np.asarray(canvas, dtype=np.float32)


def synthetic_image_dataset(
    num_examples: int,
    num_classes: int = 10,
    in_channels: int = 1,
    image_size: int = 32,
    noise: float = 1.0,
    seed: int = 0,
) -> datasets.Dataset:
    """Seeded, learnable images: each class has a fixed coarse random pattern, each image is it plus noise.

    Draw one set and split it (`train_test_split`) for training and held-out data: the patterns depend on `seed`.

    Args:
        num_examples (`int`): number of images.
        num_classes (`int`, defaults to 10), in_channels (`int`, defaults to 1), image_size (`int`, defaults to 32).
        noise (`float`, defaults to 1.0): standard deviation of the Gaussian noise (the patterns have 1).
        seed (`int`, defaults to 0): seed of patterns, labels and noise.

    Returns:
        `datasets.Dataset`: `pixel_values` (float32) and `labels` (`ClassLabel` of `class_0`, ...), torch-formatted.

    Example:
        ```python
        >>> data = synthetic_image_dataset(64, num_classes=4).train_test_split(test_size=16, seed=0)
        ```
    """
    rng = np.random.default_rng(seed)
    # Coarse patterns (a 4x4 grid of blocks) survive the CNN's pooling, so even a tiny model learns them quickly.
    coarse = rng.standard_normal((num_classes, in_channels, 4, 4), dtype=np.float32)
    block = -(-image_size // 4)
    patterns = coarse.repeat(block, axis=2).repeat(block, axis=3)[:, :, :image_size, :image_size]
    labels = rng.integers(0, num_classes, num_examples)
    images = patterns[labels] + noise * rng.standard_normal(
        (num_examples, in_channels, image_size, image_size), dtype=np.float32
    )
    names = [f"class_{k}" for k in range(num_classes)]
    return image_dataset(images, labels.astype(np.int64), names).with_format("torch")


# ---- accuracy ----


@torch.no_grad()
def classification_accuracy(model: nn.Module, dataset: datasets.Dataset, batch_size: int = 256) -> float:
    """Accuracy of `model` on `dataset` (`pixel_values`, `labels`), in eval mode and without drawing random numbers.

    Every module's train/eval mode is restored afterwards (a Snake stage keeps frozen batch norms in eval mode), so
    this can run between training steps without changing the training run.

    Args:
        model (`nn.Module`): returns `logits` (attribute or key) from `model(pixel_values=...)`.
        dataset (`datasets.Dataset`): torch-formatted images and labels.
        batch_size (`int`, defaults to 256).
    """
    modes = {module: module.training for module in model.modules()}
    device = next(model.parameters()).device
    model.eval()
    correct = 0
    try:
        for start in range(0, len(dataset), batch_size):
            batch = dataset[start : start + batch_size]
            logits = model(pixel_values=batch["pixel_values"].to(device))["logits"]
            correct += int((logits.argmax(-1).cpu() == batch["labels"]).sum())
    finally:
        for module, training in modes.items():
            module.training = training
    return correct / len(dataset)


def stage_end_steps(plan: Iterable) -> list[int]:
    """Global step at the end of every stage of a plan (`[s0, s0 + s1, ...]`)."""
    ends, total = [], 0
    for stage in plan:
        total += stage.steps
        ends.append(total)
    return ends


class AccuracyCurveCallback(TrainerCallback):
    """Records held-out accuracy at the start of training and after the given global steps (e.g. every stage end).

    Args:
        eval_dataset (`datasets.Dataset`): torch-formatted `pixel_values` and `labels`.
        at_steps (`Iterable[int]`): global steps after which to measure (`stage_end_steps(trainer.plan)`).
        batch_size (`int`, defaults to 256).

    Attributes:
        curve (`list[tuple[int, float]]`): `(global_step, accuracy)`, starting with step 0.

    Example:
        ```python
        >>> curve = AccuracyCurveCallback(test_set, stage_end_steps(trainer.plan))
        >>> trainer.add_callback(curve)
        >>> trainer.train()
        >>> curve.curve[-1]
        ```
    """

    def __init__(self, eval_dataset: datasets.Dataset, at_steps: Iterable[int], batch_size: int = 256):
        self.eval_dataset = eval_dataset
        self.at_steps = set(at_steps)
        self.batch_size = batch_size
        self.curve: list[tuple[int, float]] = []

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self.curve = [(0, classification_accuracy(model, self.eval_dataset, self.batch_size))]

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if state.global_step in self.at_steps:
            self.curve.append((state.global_step, classification_accuracy(model, self.eval_dataset, self.batch_size)))
